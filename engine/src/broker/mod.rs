//! Brokers: where a publish is ordered and given its offset before the
//! [`Router`] takes it onto the shards.
//!
//! - [`local`]: the default, in-process broker. Offsets and epochs live in
//!   this node.
//! - [`redis`]: `redis` and `redis-cluster`. Offsets and epochs live in
//!   Redis; every node delivers what comes back from Redis.
//!
//! Both sit behind [`Broker`]: publish, hear that the node's interest in a
//! channel changed, and say when a new subscription is in place.

pub(crate) mod local;
pub(crate) mod redis;

use std::collections::VecDeque;
use std::sync::Arc;

use crate::config::Config;
use crate::message::{Epoch, Message, Position, PublishFuture};
use crate::proto::json::Payload;
use crate::router::Router;
use crate::shard::BoxFuture;
use local::LocalBroker;
pub use redis::BrokerError;
use redis::RedisBroker;

/// Where server API commands from other nodes go (the engine carries
/// them out).
pub(crate) type CommandSink = Box<dyn Fn(&[u8]) + Send + Sync>;

/// Where a new subscription starts.
#[derive(Debug)]
pub(crate) struct Start {
    pub epoch: Epoch,
    /// The channel's top offset (0 before its first message).
    pub top: u64,
    /// Given a position: what the subscriber missed since, or why it cannot
    /// have it.
    pub recovery: Option<Recovery>,
}

/// The outcome of a recovery.
#[derive(Debug)]
pub(crate) enum Recovery {
    /// Every message after the position, in order (none: it was the top).
    Recovered(Vec<Arc<Message>>),
    Missed(Miss),
}

/// Why a recovery answers `recovered: false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    /// History is off (`history_size = 0`).
    Off = 0,
    /// The position is of another epoch (or ahead of the top).
    Epoch = 1,
    /// History no longer holds the messages right after the position.
    TooOld = 2,
    /// More than `recovery_max` messages were missed.
    TooMany = 3,
}

impl Miss {
    pub(crate) const LABELS: [&'static str; 4] = ["off", "epoch_changed", "too_old", "too_many"];
}

/// Why a channel's history or starting position cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HistoryError {
    /// The channel table is full of channels with subscribers.
    #[error("channel limit reached")]
    ChannelLimit,
    /// The broker (Redis) did not answer, or not in time.
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
}

impl HistoryError {
    pub(crate) fn code(&self) -> crate::proto::ErrorCode {
        match self {
            HistoryError::ChannelLimit => crate::proto::ErrorCode::Limit,
            HistoryError::Unavailable(_) => crate::proto::ErrorCode::Unavailable,
        }
    }
}

/// A page of a channel's history.
#[derive(Debug)]
pub(crate) struct Page {
    pub epoch: Epoch,
    pub top: u64,
    pub messages: Vec<Arc<Message>>,
    pub complete: bool,
}

impl Page {
    /// The page as the `history` reply (`op`, with the command's `id`) or
    /// the HTTP body, cut to `max_bytes`.
    pub(crate) fn to_json(&self, op: bool, channel: &str, id: Option<&str>, max_bytes: usize) -> Vec<u8> {
        let publications = self.messages.iter().map(|m| (m.offset, &m.payload));
        crate::proto::json::history_body(op, channel, self.epoch.as_str(), self.top, publications, self.complete, id, max_bytes)
    }
}

/// What a subscriber at `p` missed, if the channel's `history` (every
/// message it holds after `p`, in order; `size` 0: history is off) can give
/// all of it.
pub(crate) fn recover(epoch: Epoch, top: u64, history: &VecDeque<Arc<Message>>, p: Position, size: usize, recovery_max: usize) -> Recovery {
    if size == 0 {
        return Recovery::Missed(Miss::Off);
    }
    // A position ahead of the top cannot come from this epoch.
    if p.epoch != epoch || p.offset > top {
        return Recovery::Missed(Miss::Epoch);
    }
    let missed = top - p.offset;
    if missed == 0 {
        return Recovery::Recovered(Vec::new());
    }
    if missed > recovery_max as u64 {
        return Recovery::Missed(Miss::TooMany);
    }
    let after: Vec<Arc<Message>> = history.iter().filter(|m| m.offset > p.offset).cloned().collect();
    if after.first().is_none_or(|m| m.offset != p.offset + 1) || after.len() as u64 != missed {
        return Recovery::Missed(Miss::TooOld);
    }
    Recovery::Recovered(after)
}

/// A page of `history` (the latest messages, or at least every one after
/// `since` up to `limit` + 1, in order).
pub(crate) fn page(epoch: Epoch, top: u64, history: &VecDeque<Arc<Message>>, since: Option<Position>, limit: usize) -> Page {
    let (messages, complete) = match since {
        None => {
            let skip = history.len().saturating_sub(limit);
            let messages: Vec<_> = history.iter().skip(skip).cloned().collect();
            // The page holds the whole epoch.
            let complete = messages.first().map_or(top == 0, |m| m.offset == 1);
            (messages, complete)
        }
        Some(p) if p.epoch != epoch || p.offset > top => (Vec::new(), false),
        Some(p) => {
            let held = history.front().is_some_and(|m| m.offset <= p.offset + 1) || p.offset == top;
            let after = history.iter().filter(|m| m.offset > p.offset);
            let messages: Vec<_> = after.clone().take(limit).cloned().collect();
            (messages, held && after.count() <= limit)
        }
    };
    Page { epoch, top, messages, complete }
}

/// A broker's answer that may have to wait (Redis) or not (the local
/// broker).
pub(crate) enum Pending<T> {
    Ready(T),
    Waiting(BoxFuture<T>),
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pending::Ready(_) => "Pending::Ready",
            Pending::Waiting(_) => "Pending::Waiting",
        })
    }
}

impl<T: Send + 'static> Pending<T> {
    /// The answer, waiting for it if it has to.
    pub(crate) async fn get(self) -> T {
        match self {
            Pending::Ready(t) => t,
            Pending::Waiting(f) => f.await,
        }
    }
}

/// The node's broker.
#[derive(Debug)]
pub(crate) enum Broker {
    Local(LocalBroker),
    Redis(RedisBroker),
}

impl Broker {
    /// The broker the configuration asks for (not started yet).
    pub(crate) fn from_config(
        config: &Config,
        router: &Arc<Router>,
        presence: &Arc<crate::presence::Presence>,
    ) -> Result<Broker, BrokerError> {
        Ok(match RedisBroker::from_config(config, router, Arc::clone(presence))? {
            Some(r) => Broker::Redis(r),
            None => Broker::Local(LocalBroker::new(config.max_channels, local::HistoryLimits::from_config(config))),
        })
    }

    pub(crate) fn mode(&self) -> &'static str {
        match self {
            Broker::Local(_) => "local",
            Broker::Redis(r) => r.mode(),
        }
    }

    /// Starts the broker's own thread, if it has one.
    pub(crate) fn start(&self) -> std::io::Result<()> {
        match self {
            Broker::Local(_) => Ok(()),
            Broker::Redis(r) => r.start(),
        }
    }

    pub(crate) async fn stop(&self) {
        if let Broker::Redis(r) = self {
            r.stop().await;
        }
    }

    /// Orders and stores a publish, and gets it to every subscriber. The
    /// local broker is done at once ([`PublishFuture::ready`]).
    /// `shard` is the calling shard, if a shard is calling.
    pub(crate) fn publish(
        &self,
        router: &Router,
        channel: &str,
        payload: Payload,
        key: Option<&str>,
        shard: Option<usize>,
    ) -> PublishFuture {
        match self {
            Broker::Local(b) => PublishFuture::Ready(Some(b.publish_once(router, channel, payload, key, std::time::Instant::now()))),
            Broker::Redis(r) => PublishFuture::Waiting(Box::pin(r.publish(channel.to_owned(), payload, key.map(str::to_owned), shard))),
        }
    }

    /// Work the broker runs on each shard once it started (the Redis
    /// brokers connect the shard's own publisher).
    pub(crate) fn on_shard(&self, shard: usize) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> {
        match self {
            Broker::Local(_) => None,
            Broker::Redis(r) => Some(Box::pin(r.connect_shard_publisher(shard))),
        }
    }

    /// The node gained its first subscriber to `channel`, or lost its last.
    pub(crate) fn interest_changed(&self, channel: &Arc<str>) {
        if let Broker::Redis(r) = self {
            r.interest_changed(channel);
        }
    }

    /// Where a subscription the router already counts starts, with what
    /// it missed since `since`. The local broker reads it in one step with
    /// the channel's history; the Redis brokers wait until this node's
    /// subscription in Redis is in place (so every later message reaches it)
    /// and then read the channel's top and stream in one script. `shard` is
    /// the calling shard, whose own connection is used.
    pub(crate) fn starting_point(
        &self,
        router: &Router,
        channel: &str,
        since: Option<Position>,
        shard: Option<usize>,
    ) -> Pending<Result<Start, HistoryError>> {
        match self {
            Broker::Local(b) => {
                Pending::Ready(b.start(router, channel, since, std::time::Instant::now()).ok_or(HistoryError::ChannelLimit))
            }
            Broker::Redis(r) => Pending::Waiting(Box::pin(r.start_at(channel.to_owned(), since, shard))),
        }
    }

    /// A page of the channel's history.
    pub(crate) fn history(
        &self,
        router: &Router,
        channel: &str,
        since: Option<Position>,
        limit: usize,
        shard: Option<usize>,
    ) -> Pending<Result<Page, HistoryError>> {
        match self {
            Broker::Local(b) => {
                Pending::Ready(b.history(router, channel, since, limit, std::time::Instant::now()).ok_or(HistoryError::ChannelLimit))
            }
            Broker::Redis(r) => Pending::Waiting(Box::pin(r.history(channel.to_owned(), since, limit, shard))),
        }
    }

    /// Sends a server API command (already carried out here) to every
    /// other node: the number it reached (Redis brokers), `None` with the
    /// local broker (there is no other node).
    pub(crate) async fn send_command(&self, cmd: &[u8]) -> Result<Option<u64>, String> {
        match self {
            Broker::Local(_) => Ok(None),
            Broker::Redis(r) => r.send_command(cmd).await.map(Some),
        }
    }

    /// Where commands from other nodes go.
    pub(crate) fn on_command(&self, sink: CommandSink) {
        if let Broker::Redis(r) = self {
            r.on_command(sink);
        }
    }

    /// `user`'s ("" anonymous) connections on this node in a presence
    /// channel are now `count`: a Redis broker writes it into Redis (which
    /// announces join and leave to every node when `announce`) and returns
    /// true; the local broker's presence is the node's table alone (false).
    /// Called under the table's lock: it only queues.
    pub(crate) fn presence_changed(&self, channel: &Arc<str>, user: &str, count: u64, announce: bool) -> bool {
        match self {
            Broker::Local(_) => false,
            Broker::Redis(r) => {
                r.presence_changed(channel, user, count, announce);
                true
            }
        }
    }

    /// A channel's presence across the nodes (Redis brokers); `None` for
    /// the local broker (read the node's table).
    pub(crate) fn presence_read(
        &self,
        channel: &str,
        shard: Option<usize>,
    ) -> Option<BoxFuture<Result<crate::presence::Snapshot, HistoryError>>> {
        match self {
            Broker::Local(_) => None,
            Broker::Redis(r) => Some(Box::pin(r.presence_read(channel, shard))),
        }
    }

    /// Channels whose state the broker keeps (counters for the local
    /// broker; Redis keeps them for the Redis brokers).
    pub(crate) fn channels(&self) -> Option<usize> {
        match self {
            Broker::Local(b) => Some(b.len()),
            Broker::Redis(_) => None,
        }
    }

    /// Subscriber connections re-established.
    pub(crate) fn reconnects(&self) -> u64 {
        match self {
            Broker::Local(_) => 0,
            Broker::Redis(r) => r.reconnects(),
        }
    }

    /// The broker's own lines of the Prometheus exposition.
    pub(crate) fn render(&self, out: &mut String) {
        match self {
            Broker::Local(b) => b.render(out),
            Broker::Redis(r) => r.render(out),
        }
    }
}
