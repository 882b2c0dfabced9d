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

use std::sync::Arc;

use crate::config::Config;
use crate::message::{Epoch, Message, Position, PublishFuture};
use crate::proto::json::Payload;
use crate::router::Router;
use crate::shard::BoxFuture;
use local::LocalBroker;
pub use redis::BrokerError;
use redis::RedisBroker;

/// Where a new subscription starts.
#[derive(Debug)]
pub(crate) struct Start {
    pub epoch: Epoch,
    /// The channel's top offset, when the broker knows it.
    pub top: Option<u64>,
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
    /// History is off, or the broker keeps none (Redis, for now).
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HistoryError {
    /// The channel table is full of channels with subscribers.
    #[error("channel limit reached")]
    ChannelLimit,
    /// The broker keeps no history (the Redis brokers, for now).
    #[error("history is not kept with a Redis broker yet")]
    NotKept,
}

impl HistoryError {
    pub(crate) fn code(self) -> crate::proto::ErrorCode {
        match self {
            HistoryError::ChannelLimit => crate::proto::ErrorCode::Limit,
            HistoryError::NotKept => crate::proto::ErrorCode::Unavailable,
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

/// The node's broker.
#[derive(Debug)]
pub(crate) enum Broker {
    Local(LocalBroker),
    Redis(RedisBroker),
}

impl Broker {
    /// The broker the configuration asks for (not started yet).
    pub(crate) fn from_config(config: &Config, router: &Arc<Router>) -> Result<Broker, BrokerError> {
        Ok(match RedisBroker::from_config(config, router)? {
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
            Broker::Redis(_) if key.is_some() => PublishFuture::Ready(Some(Err(crate::message::PublishError::IdempotencyUnsupported))),
            Broker::Redis(r) => PublishFuture::Waiting(Box::pin(r.publish(channel.to_owned(), payload, shard))),
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

    /// The channel's epoch if everything published from now on reaches
    /// this node's subscribers; `None` while a new subscription is not in
    /// place yet (see [`Broker::await_subscribed`]).
    pub(crate) fn subscribed(&self, router: &Router, channel: &str) -> Option<Epoch> {
        match self {
            Broker::Local(b) => b.epoch(router, channel),
            Broker::Redis(r) => r.subscribed(channel),
        }
    }

    /// Where a subscription the router already counts starts, with what
    /// it missed since `since`: `Some` from the local broker, read in one
    /// step with the channel's history (`None` when the channel table is
    /// full is `Err`); `Ok(None)` from the Redis brokers, whose epoch comes
    /// with the confirmation of their subscription ([`Broker::subscribed`])
    /// and which keep no history yet.
    pub(crate) fn starting_point(&self, router: &Router, channel: &str, since: Option<Position>) -> Result<Option<Start>, HistoryError> {
        match self {
            Broker::Local(b) => b.start(router, channel, since, std::time::Instant::now()).map(Some).ok_or(HistoryError::ChannelLimit),
            Broker::Redis(_) => Ok(None),
        }
    }

    /// A page of the channel's history.
    pub(crate) fn history(&self, router: &Router, channel: &str, since: Option<Position>, limit: usize) -> Result<Page, HistoryError> {
        match self {
            Broker::Local(b) => b.history(router, channel, since, limit, std::time::Instant::now()).ok_or(HistoryError::ChannelLimit),
            Broker::Redis(_) => Err(HistoryError::NotKept),
        }
    }

    /// Waits (at most the broker's timeout) for [`Broker::subscribed`].
    pub(crate) fn await_subscribed(&self, router: &Router, channel: &str) -> BoxFuture<Option<Epoch>> {
        match self {
            Broker::Local(b) => Box::pin(std::future::ready(b.epoch(router, channel))),
            Broker::Redis(r) => Box::pin(r.await_subscribed(channel.to_owned())),
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
