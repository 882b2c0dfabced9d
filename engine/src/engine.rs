//! The engine: what the public handle, the shards and the HTTP handlers
//! share. It owns the router and the broker and is the shards'
//! [`Upstream`]; it holds nothing broker-specific.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::broker::{Broker, HistoryError, Page, Pending, Start};
use crate::config::Config;
use crate::message::{Position, PublishError, PublishFuture, Published};
use crate::metrics::{Metrics, ShardMetrics};
use crate::proto::json::Payload;
use crate::router::Router;
use crate::shard::inbox::Inbox;
use crate::shard::{self, Control, Permit, Shard, Upstream};

pub(crate) struct Engine {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) router: Arc<Router>,
    pub(crate) broker: Broker,
    /// The token verifier, when `[auth]` is set.
    pub(crate) auth: Option<crate::auth::Auth>,
    /// The namespaces' rules.
    pub(crate) rules: crate::config::ChannelRules,
    pub(crate) controls: Box<[mpsc::Sender<Control>]>,
    open: Arc<AtomicUsize>,
    rr: AtomicUsize,
    shutting_down: AtomicBool,
    pub(crate) local_addr: Option<SocketAddr>,
    pub(crate) done: Mutex<Vec<oneshot::Receiver<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("shards", &self.config.shards).field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

/// A shard did not take the work: its control channel is closed (the
/// engine is stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shard is stopping")]
pub(crate) struct ShardGone;

impl Engine {
    pub(crate) fn new(
        config: Config,
        router: Arc<Router>,
        broker: Broker,
        auth: Option<crate::auth::Auth>,
        controls: Box<[mpsc::Sender<Control>]>,
        local_addr: Option<SocketAddr>,
        done: Vec<oneshot::Receiver<()>>,
    ) -> Engine {
        Engine {
            metrics: Metrics::new(config.shards),
            rules: crate::config::ChannelRules::from_config(&config),
            router,
            broker,
            auth,
            controls,
            open: Arc::new(AtomicUsize::new(0)),
            rr: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            local_addr,
            done: Mutex::new(done),
            config,
        }
    }

    /// The metrics slot of the shard running this thread, or the global one.
    pub(crate) fn metrics_here(&self) -> &ShardMetrics {
        match shard::current(self) {
            Some(s) => self.metrics.shard(s.id),
            None => self.metrics.global(),
        }
    }

    pub(crate) fn acquire_permit(&self) -> Option<Permit> {
        Permit::acquire(&self.open, self.config.max_connections)
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Marks the engine as shutting down; false if it already was.
    pub(crate) fn begin_shutdown(&self) -> bool {
        !self.shutting_down.swap(true, Ordering::AcqRel)
    }

    /// The next shard in round-robin order.
    pub(crate) fn next_shard(&self) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed) % self.config.shards
    }

    /// The shard for a new connection: this thread's shard if the request
    /// is served by one (its socket is already there), else round-robin.
    /// The flag says whether the socket is already on the chosen shard.
    pub(crate) fn pick_shard(&self) -> (usize, bool) {
        match shard::current(self) {
            Some(s) => (s.id, true),
            None => (self.next_shard(), false),
        }
    }

    pub(crate) async fn send_control(&self, shard: usize, ctl: Control) -> Result<(), ShardGone> {
        self.controls[shard].send(ctl).await.map_err(|_| ShardGone)
    }

    /// Runs `f` on shard `target`: at once if this thread is that shard.
    pub(crate) async fn on_shard(&self, target: usize, f: impl FnOnce(&Rc<Shard>) + Send + 'static) -> Result<(), ShardGone> {
        let f = match shard::current(self) {
            Some(s) if s.id == target => {
                f(&s);
                return Ok(());
            }
            _ => f,
        };
        self.send_control(target, Control::Run(Box::new(f))).await
    }

    fn check_publish(&self, channel: &str, payload: &Payload) -> Result<(), PublishError> {
        crate::proto::channel::validate(channel)?;
        if payload.len() > self.config.max_message_bytes {
            return Err(PublishError::TooLarge { size: payload.len(), max: self.config.max_message_bytes });
        }
        if self.is_shutting_down() {
            return Err(PublishError::ShuttingDown);
        }
        Ok(())
    }

    /// Starts a publish through the broker. Its result is counted by
    /// [`crate::message::count_publish`] once known.
    /// With `key`, a repeat of an earlier publish on the channel within
    /// `idempotency_window_s` publishes nothing and returns the first one's
    /// result.
    pub(crate) fn start_publish(&self, channel: &str, payload: Payload, key: Option<&str>) -> PublishFuture {
        if key.is_some_and(|k| !crate::message::valid_idempotency_key(k)) {
            return PublishFuture::Ready(Some(Err(PublishError::BadIdempotencyKey)));
        }
        match self.check_publish(channel, &payload) {
            Ok(()) => self.broker.publish(&self.router, channel, payload, key, shard::current(self).map(|s| s.id)),
            Err(e) => PublishFuture::Ready(Some(Err(e))),
        }
    }

    /// Publishes and counts the result in `metrics`.
    pub(crate) async fn publish(
        &self,
        channel: &str,
        payload: Payload,
        key: Option<&str>,
        metrics: &ShardMetrics,
    ) -> Result<Published, PublishError> {
        let r = self.start_publish(channel, payload, key).await;
        crate::message::count_publish(metrics, &r);
        r
    }

    pub(crate) fn metrics_text(&self) -> String {
        let open = self.open.load(Ordering::Relaxed) as u64;
        let mut gauges = vec![
            ("herald_open_permits", "Client connections counted against max_connections.", open),
            ("herald_channels", "Channels with subscribers on this node.", self.router.len() as u64),
        ];
        if let Some(n) = self.broker.channels() {
            gauges.push(("herald_channel_counters", "Channels whose offset counters the local broker remembers.", n as u64));
        }
        let mut out = self.metrics.render(&gauges, self.broker.reconnects());
        self.broker.render(&mut out);
        out
    }
}

impl Upstream for Engine {
    fn config(&self) -> &Config {
        &self.config
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn inbox(&self, shard: usize) -> &Inbox {
        self.router.inbox(shard)
    }

    fn joined(&self, channel: &str, shard: usize) -> Option<Arc<str>> {
        let (name, first) = self.router.subscribe(channel, shard).ok()?;
        if first {
            self.broker.interest_changed(&name);
        }
        Some(name)
    }

    fn left(&self, channel: &Arc<str>, shard: usize) {
        if self.router.unsubscribe(channel, shard) {
            self.broker.interest_changed(channel);
        }
    }

    fn publish(&self, channel: &str, payload: Payload, key: Option<&str>) -> PublishFuture {
        self.start_publish(channel, payload, key)
    }

    fn starting_point(&self, channel: &str, since: Option<Position>) -> Pending<Result<Start, HistoryError>> {
        self.broker.starting_point(&self.router, channel, since, shard::current(self).map(|s| s.id))
    }

    fn history(&self, channel: &str, since: Option<Position>, limit: usize) -> Pending<Result<Page, HistoryError>> {
        self.broker.history(&self.router, channel, since, limit, shard::current(self).map(|s| s.id))
    }

    fn auth(&self) -> Option<&crate::auth::Auth> {
        self.auth.as_ref()
    }

    fn rules(&self) -> &crate::config::ChannelRules {
        &self.rules
    }
}
