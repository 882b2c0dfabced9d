//! The Redis brokers: `redis` (pub/sub on one Redis) and `redis-cluster`
//! (sharded pub/sub on a Redis Cluster).
//!
//! - **Publish** ([`script`]): one Lua script spends the channel's next
//!   offset and PUBLISHes (SPUBLISH) the message carrying it and the
//!   channel's epoch; names and bodies are in [`wire`].
//! - **Interest** ([`coordinator`]): a node subscribes to a channel in
//!   Redis when its first local subscriber appears and unsubscribes when the
//!   last one leaves. Shards report these changes through a bounded queue
//!   (a full queue turns into a full resynchronisation, never a lost
//!   change); the coordinator routes each channel to the subscriber
//!   connection of the Redis node that owns it.
//! - **Delivery** ([`subscriber`]): the subscriber connections are read by
//!   Herald itself ([`crate::proto::resp`]), so nothing sits in an
//!   unbounded queue: a message is queued on the shards, or the connection
//!   waits while their queues are full (TCP pushes back to Redis), or it is
//!   counted as dropped by reason. Offsets are checked per channel
//!   ([`channels`]); a jump or an epoch change is a gap, counted and logged.
//! - **Faults**: a lost connection is retried with backoff; on reconnect
//!   every channel with local interest is subscribed again. Publishes fail
//!   with `unavailable` while Redis cannot take them.
//!
//! Everything but publishing runs on one thread of its own (`herald-broker`).

mod channels;
mod control;
mod coordinator;
mod presence;
mod script;
mod subscriber;
mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use tokio::sync::{watch, Notify};

use crate::broker::{HistoryError, Page, Start};
use crate::config::Config;
use crate::message::{BrokerDown, Epoch, Position, PublishError, Published};
use crate::proto::json::Payload;
use crate::router::Router;
use channels::Channels;
use script::{Publisher, Read, Scripts};

/// Interest changes waiting for the coordinator; past it, a full resync.
const DIRTY_QUEUE: usize = 65_536;

/// Counters of the Redis bridge (rendered by `/metrics`).
#[derive(Debug, Default)]
pub(crate) struct BrokerMetrics {
    pub received: AtomicU64,
    pub dropped_no_interest: AtomicU64,
    pub dropped_malformed: AtomicU64,
    pub gaps: AtomicU64,
    pub missed: AtomicU64,
    pub publish_errors: AtomicU64,
    /// Publishes answered from an idempotency key (nothing published).
    pub repeats: AtomicU64,
    /// Messages read from a channel's stream to fill a gap.
    pub filled: AtomicU64,
    /// Messages from Redis already delivered (read from the stream first).
    pub duplicates: AtomicU64,
    /// Epoch changes announced to subscribers.
    pub epochs: AtomicU64,
    pub backpressure: AtomicU64,
    /// Dead nodes whose presence entries this node removed.
    pub presence_swept: AtomicU64,
    pub reconnects: AtomicU64,
    /// Channels this node is subscribed to in Redis (confirmed).
    pub subscribed: AtomicU64,
    /// Subscriber connections up, and in all.
    pub nodes_up: AtomicU64,
    pub nodes: AtomicU64,
    /// Nodes expected before any is connected (1, or the cluster's seeds
    /// until its slot map is known): `herald_broker_nodes` is never 0
    /// while Redis is unreachable, so `up < nodes` alerts fire.
    pub nodes_expected: AtomicU64,
}

/// A configured Redis broker that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A URL redis-rs cannot parse.
    #[error("bad Redis URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A URL that is not `redis[s]://host:port` (a Unix socket).
    #[error("Redis URL {0:?}: only redis://host:port and rediss://host:port are supported")]
    Unsupported(String),
    /// `redis_tls_ca` cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// The host and port of a TCP (plain or TLS) Redis address.
pub(crate) fn host_port(addr: &redis::ConnectionAddr) -> Option<(String, u16)> {
    match addr {
        redis::ConnectionAddr::Tcp(h, p) | redis::ConnectionAddr::TcpTls { host: h, port: p, .. } => Some((h.clone(), *p)),
        _ => None,
    }
}

/// How Herald's connections to Redis use TLS (`rediss://`).
pub(crate) struct RedisTls {
    /// For the subscriber connections Herald reads itself.
    pub client: Arc<rustls::ClientConfig>,
    /// The CA bundle for redis-rs's connections, if one was configured
    /// (else redis-rs trusts the system's CAs, as `client` does).
    pub ca_pem: Option<Vec<u8>>,
}

/// A start waiting for a read of its channel: its position, and where the
/// snapshot goes.
type StartWaiter = (Option<Position>, tokio::sync::oneshot::Sender<Result<Arc<script::Snapshot>, HistoryError>>);

/// The starts of one channel's new subscriptions: whether a read runs
/// (its leader serves every waiter), and who waits for the next one. At
/// most one per subscribe being answered, so bounded by the connections.
#[derive(Default)]
struct StartReads {
    running: bool,
    waiting: Vec<StartWaiter>,
}

/// What the broker thread and the shards share.
pub(crate) struct Shared {
    cluster: bool,
    seeds: Vec<redis::ConnectionInfo>,
    /// Set when the URLs are `rediss://`.
    tls: Option<RedisTls>,
    timeout: Duration,
    scripts: Scripts,
    recovery_max: usize,
    /// Per channel, the starts of new subscriptions waiting for a read.
    starts: Mutex<HashMap<Arc<str>, StartReads>>,
    router: Arc<Router>,
    channels: Channels,
    /// The broker thread's publisher: epoch fetches, the slot map, and
    /// publishes from threads that are not shards.
    publisher: OnceLock<Publisher>,
    /// Each shard's own publisher, driven by the shard's runtime, so a
    /// publish from a shard crosses no thread on its way to Redis and back.
    shard_publishers: Box<[OnceLock<Publisher>]>,
    dirty: ArrayQueue<Arc<str>>,
    /// Channels whose subscription Redis dropped (a slot moved): routed
    /// and subscribed again by the coordinator.
    lost: ArrayQueue<Arc<str>>,
    resync: AtomicBool,
    /// Set when `lost` overflowed: subscribe every channel again.
    lost_all: AtomicBool,
    wake: Notify,
    /// Bumped whenever a subscription is confirmed (waiters re-check).
    confirmed: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    metrics: BrokerMetrics,
    /// This node's id among the nodes sharing the Redis (random at start).
    node: Box<str>,
    /// The control channel's subscription is up.
    control_up: AtomicBool,
    /// Where other nodes' server API commands go (the engine).
    command_sink: OnceLock<crate::broker::CommandSink>,
    /// Commands from other nodes carried out.
    commands: AtomicU64,
    /// This node's presence table (refreshed into Redis).
    presence: Arc<crate::presence::Presence>,
    presence_scripts: presence::PresenceScripts,
    presence_ttl_ms: u64,
    /// Changes of the presence table waiting for the writer.
    presence_queue: ArrayQueue<presence::Change>,
    /// Set when `presence_queue` overflowed: rewrite every channel.
    presence_overflow: AtomicBool,
    presence_wake: Notify,
}

impl Shared {
    fn mode(&self) -> &'static str {
        if self.cluster {
            "redis-cluster"
        } else {
            "redis"
        }
    }

    /// The CA redis-rs must trust, when one is configured for `rediss://`.
    fn certs(&self) -> Option<redis::TlsCertificates> {
        let ca = self.tls.as_ref()?.ca_pem.clone()?;
        Some(redis::TlsCertificates { client_tls: None, root_cert: Some(ca) })
    }

    /// A redis-rs client for `info`, trusting the configured CA.
    fn client(&self, info: redis::ConnectionInfo) -> redis::RedisResult<redis::Client> {
        match self.certs() {
            Some(certs) => redis::Client::build_with_tls(info, certs),
            None => redis::Client::open(info),
        }
    }

    /// Asks the coordinator to route every channel again.
    fn request_resync(&self) {
        self.resync.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Connects a publisher, retrying with backoff (`failed` hears of each
    /// failure) until it is up; `None` once the broker stops.
    async fn connect_publisher(&self, failed: impl Fn(&redis::RedisError)) -> Option<Publisher> {
        let mut stop = self.stop.subscribe();
        let mut backoff = Backoff::default();
        loop {
            let connected = tokio::select! {
                r = Publisher::connect(self.cluster, &self.seeds, self.certs(), self.timeout) => r,
                _ = stop.changed() => return None,
            };
            match connected {
                Ok(p) => return Some(p),
                Err(e) => {
                    failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next()) => {}
                        _ = stop.changed() => return None,
                    }
                }
            }
        }
    }

    /// The publisher of shard `shard` once it is up, else the broker
    /// thread's.
    fn publisher_for(&self, shard: Option<usize>) -> Option<&Publisher> {
        let own = shard.and_then(|s| self.shard_publishers.get(s)).and_then(OnceLock::get);
        own.or_else(|| self.publisher.get())
    }

    /// Runs the read script on `shard`'s publisher (else the broker
    /// thread's).
    /// A read changes nothing that matters, so one lost to a connection
    /// that broke (redis-rs reconnects it on the error) is tried again once.
    async fn read(&self, channel: &Arc<str>, what: Read, shard: Option<usize>) -> Result<script::Snapshot, HistoryError> {
        let p = self.publisher_for(shard).ok_or_else(|| HistoryError::Unavailable("not connected to Redis".into()))?;
        let r = match self.scripts.read(p, channel, what).await {
            Err(script::ScriptError::Redis(e)) if e.is_io_error() => self.scripts.read(p, channel, what).await,
            r => r,
        };
        r.map_err(|e| HistoryError::Unavailable(e.to_string()))
    }

    /// The snapshot a new subscription starts from, read after the call
    /// (so after the subscription holds its live messages). Subscriptions
    /// of one channel starting together share reads: while one read runs,
    /// the next ones wait, and one more read then serves them all (from the
    /// oldest position asked). A reconnect storm costs a few reads per
    /// channel, and the replayed messages are shared and encoded once. The
    /// reads run in a task of their own on the calling shard's runtime, so
    /// a start waits for its own read only.
    async fn start_snapshot(
        self: &Arc<Self>,
        channel: &Arc<str>,
        since: Option<Position>,
        shard: Option<usize>,
    ) -> Result<Arc<script::Snapshot>, HistoryError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lead = {
            let mut map = crate::router::lock(&self.starts);
            let group = map.entry(Arc::clone(channel)).or_default();
            group.waiting.push((since, tx));
            !std::mem::replace(&mut group.running, true)
        };
        if lead {
            let (shared, channel) = (Arc::clone(self), Arc::clone(channel));
            tokio::spawn(async move { shared.lead_reads(&channel, shard).await });
        }
        rx.await.unwrap_or_else(|_| Err(HistoryError::Unavailable("the read was abandoned (shutting down)".into())))
    }

    /// Reads for the waiting starts of `channel` until none waits.
    async fn lead_reads(&self, channel: &Arc<str>, shard: Option<usize>) {
        /// Clears the group if the leader is dropped half way (its shard
        /// stops): the waiters then get an error instead of waiting forever.
        struct Lead<'a>(&'a Shared, &'a Arc<str>, bool);
        impl Drop for Lead<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    crate::router::lock(&self.0.starts).remove(self.1);
                }
            }
        }
        let mut lead = Lead(self, channel, false);
        loop {
            let batch = {
                let mut map = crate::router::lock(&self.starts);
                match map.get_mut(channel) {
                    Some(group) if !group.waiting.is_empty() => std::mem::take(&mut group.waiting),
                    // Done, under the lock a new start takes to join.
                    _ => {
                        map.remove(channel);
                        lead.2 = true;
                        return;
                    }
                }
            };
            // The oldest position of the first epoch asked (a start of
            // another epoch that turns out current waits for the next read).
            let asked = batch.iter().find_map(|(s, _)| s.map(|p| p.epoch));
            let offsets: Vec<u64> = batch.iter().filter_map(|(s, _)| s.filter(|p| Some(p.epoch) == asked).map(|p| p.offset)).collect();
            let what = match (asked, offsets.iter().min()) {
                (Some(epoch), Some(&offset)) => Read::Recent {
                    since: Position { epoch, offset },
                    count: self.recovery_max,
                    // All at one position: read nothing when too many were
                    // missed. Several: the last recovery_max after the
                    // oldest, all that any of them can recover.
                    capped: offsets.iter().all(|&o| o == offset),
                },
                _ => Read::Top,
            };
            let r = self.read(channel, what, shard).await.map(Arc::new);
            let mut again = Vec::new();
            for (since, tx) in batch {
                match (&r, since) {
                    (Ok(snap), Some(p)) if p.epoch == snap.epoch && Some(p.epoch) != asked => again.push((since, tx)),
                    _ => {
                        let _ = tx.send(r.clone());
                    }
                }
            }
            if !again.is_empty() {
                // First in the next read, which asks their epoch.
                if let Some(group) = crate::router::lock(&self.starts).get_mut(channel) {
                    group.waiting.splice(0..0, again);
                }
            }
        }
    }

    /// A message of the control channel: another node's command goes to
    /// the engine.
    fn handle_command(&self, body: &[u8]) {
        match control::decode(body) {
            Some((node, _)) if node == &*self.node => {}
            Some((_, cmd)) => {
                self.commands.fetch_add(1, Ordering::Relaxed);
                if let Some(sink) = self.command_sink.get() {
                    sink(cmd);
                }
            }
            None => tracing::debug!("unreadable message on the control channel"),
        }
    }

    /// Redis dropped `channel`'s subscription: route it again.
    fn lost(&self, channel: &Arc<str>) {
        if self.lost.push(Arc::clone(channel)).is_err() {
            self.lost_all.store(true, Ordering::Release);
        }
    }
}

/// The Redis broker of one node.
pub(crate) struct RedisBroker {
    shared: Arc<Shared>,
    thread: Mutex<Option<(std::thread::JoinHandle<()>, tokio::sync::oneshot::Receiver<()>)>>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("mode", &self.shared.mode()).finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// The broker the configuration asks for, if any (not started yet).
    pub(crate) fn from_config(
        c: &Config,
        router: &Arc<Router>,
        presence: Arc<crate::presence::Presence>,
    ) -> Result<Option<RedisBroker>, BrokerError> {
        let (cluster, urls): (bool, Vec<&String>) = match (&c.redis, c.redis_cluster.is_empty()) {
            (Some(url), _) => (false, vec![url]),
            (None, false) => (true, c.redis_cluster.iter().collect()),
            (None, true) => return Ok(None),
        };
        let mut seeds = Vec::new();
        for url in urls {
            let shown = crate::config::redact_url(url);
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| BrokerError::BadUrl { url: shown.clone(), reason: e.to_string() })?;
            if host_port(info.addr()).is_none() {
                return Err(BrokerError::Unsupported(shown));
            }
            seeds.push(info);
        }
        let tls = match seeds[0].addr() {
            redis::ConnectionAddr::TcpTls { .. } => {
                let roots = crate::tls::roots("redis_tls_ca", c.redis_tls_ca.as_deref())?;
                let ca_pem = match &c.redis_tls_ca {
                    Some(path) => Some(std::fs::read(path).map_err(|e| crate::tls::TlsError::File {
                        setting: "redis_tls_ca",
                        path: path.clone(),
                        reason: e.to_string(),
                    })?),
                    None => None,
                };
                Some(RedisTls { client: crate::tls::client_config(roots)?, ca_pem })
            }
            _ => None,
        };
        let timeout = Config::dur(c.redis_timeout_ms);
        let seed_count = seeds.len() as u64;
        let shared = Shared {
            cluster,
            seeds,
            tls,
            timeout,
            scripts: Scripts::new(wire::Names::new(&c.redis_prefix), cluster, timeout, script::Limits::from_config(c)),
            recovery_max: c.recovery_max,
            starts: Mutex::new(HashMap::new()),
            router: Arc::clone(router),
            channels: Channels::new(),
            publisher: OnceLock::new(),
            shard_publishers: (0..c.shards).map(|_| OnceLock::new()).collect(),
            dirty: ArrayQueue::new(DIRTY_QUEUE),
            lost: ArrayQueue::new(DIRTY_QUEUE),
            resync: AtomicBool::new(false),
            lost_all: AtomicBool::new(false),
            wake: Notify::new(),
            confirmed: watch::channel(0).0,
            stop: watch::channel(false).0,
            metrics: BrokerMetrics { nodes_expected: AtomicU64::new(seed_count), ..BrokerMetrics::default() },
            node: format!("{:016x}", fastrand::u64(..)).into(),
            control_up: AtomicBool::new(false),
            command_sink: OnceLock::new(),
            commands: AtomicU64::new(0),
            presence,
            presence_scripts: presence::PresenceScripts::default(),
            presence_ttl_ms: c.presence_ttl_s.saturating_mul(1000),
            presence_queue: ArrayQueue::new(presence::QUEUE),
            presence_overflow: AtomicBool::new(false),
            presence_wake: Notify::new(),
        };
        Ok(Some(RedisBroker { shared: Arc::new(shared), thread: Mutex::new(None) }))
    }

    pub(crate) fn mode(&self) -> &'static str {
        self.shared.mode()
    }

    /// Starts the broker thread.
    pub(crate) fn start(&self) -> std::io::Result<()> {
        let shared = Arc::clone(&self.shared);
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        let handle = std::thread::Builder::new().name("herald-broker".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the broker runtime");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                tokio::task::spawn_local(control::run(Arc::clone(&shared)));
                let presence = tokio::task::spawn_local(Arc::clone(&shared).write_presence());
                coordinator::run(shared).await;
                // The presence writer removes the node's entries as it stops.
                let _ = presence.await;
            });
            drop(local);
            drop(rt);
            let _ = ended_tx.send(());
        })?;
        *crate::router::lock(&self.thread) = Some((handle, ended_rx));
        Ok(())
    }

    /// Stops the broker thread: waits for it at most 2 s without
    /// blocking the caller's runtime.
    pub(crate) async fn stop(&self) {
        let _ = self.shared.stop.send(true);
        let taken = crate::router::lock(&self.thread).take();
        if let Some((handle, ended)) = taken {
            if tokio::time::timeout(Duration::from_secs(2), ended).await.is_ok() {
                let _ = handle.join();
            } else {
                tracing::warn!("the broker thread did not stop within 2 s");
            }
        }
    }

    /// Publishes a server API command on the control channel; the number
    /// of other nodes subscribed to it that got it.
    pub(crate) async fn send_command(&self, cmd: &[u8]) -> Result<u64, String> {
        let p = self.shared.publisher.get().ok_or("not connected to Redis")?;
        let body = control::encode(&self.shared.node, cmd);
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.shared.scripts.names.control_channel()).arg(body);
        let reached: u64 = match p.clone() {
            script::Publisher::Single(mut c) => publish.query_async(&mut c).await,
            script::Publisher::Cluster(mut c) => publish.query_async(&mut c).await,
        }
        .map_err(|e| e.to_string())?;
        let own = u64::from(self.shared.control_up.load(Ordering::Acquire));
        Ok(reached.saturating_sub(own))
    }

    /// `user`'s connections on this node in `channel` are now `count`
    /// (called under the presence table's lock); `announce`: join and
    /// leave events.
    pub(crate) fn presence_changed(&self, channel: &Arc<str>, user: &str, count: u64, announce: bool) {
        self.shared.presence_changed(presence::Change { channel: Arc::clone(channel), user: user.into(), count, announce });
    }

    /// A channel's presence across the nodes.
    pub(crate) fn presence_read(
        &self,
        channel: &str,
        shard: Option<usize>,
    ) -> impl std::future::Future<Output = Result<crate::presence::Snapshot, HistoryError>> + Send + 'static {
        let (shared, channel) = (Arc::clone(&self.shared), channel.to_owned());
        async move { shared.presence_read(&channel, shard).await }
    }

    /// Where commands from other nodes go (set once).
    pub(crate) fn on_command(&self, sink: crate::broker::CommandSink) {
        let _ = self.shared.command_sink.set(sink);
    }

    /// A shard gained its node's first subscriber to `channel`, or lost the
    /// last one.
    pub(crate) fn interest_changed(&self, channel: &Arc<str>) {
        if self.shared.dirty.push(Arc::clone(channel)).is_err() {
            self.shared.resync.store(true, Ordering::Release);
        }
        self.shared.wake.notify_one();
    }

    /// Connects shard `shard`'s own publisher, retrying until it is up or
    /// the broker stops. Runs on that shard.
    pub(crate) fn connect_shard_publisher(&self, shard: usize) -> impl std::future::Future<Output = ()> + 'static {
        let shared = Arc::clone(&self.shared);
        async move {
            let failed =
                |e: &redis::RedisError| tracing::debug!(shard, error = %e, "cannot connect a shard's publisher to Redis; retrying");
            if let Some(p) = shared.connect_publisher(failed).await {
                let _ = shared.shard_publishers[shard].set(p);
            }
        }
    }

    /// Publishes through Redis: the offset and epoch come back from it.
    /// `shard` is the calling shard, whose own connection is used once up.
    pub(crate) fn publish(
        &self,
        channel: String,
        payload: Payload,
        key: Option<String>,
        shard: Option<usize>,
    ) -> impl std::future::Future<Output = Result<Published, PublishError>> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        async move {
            let r = match shared.publisher_for(shard) {
                Some(p) => shared.scripts.publish(p, &channel, &payload, key.as_deref()).await,
                None => Err(PublishError::NotPublished(BrokerDown::NotConnected)),
            };
            match r {
                Ok((published, repeat)) => {
                    if repeat {
                        shared.metrics.repeats.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(published)
                }
                Err(e) => {
                    shared.metrics.publish_errors.fetch_add(1, Ordering::Relaxed);
                    Err(e)
                }
            }
        }
    }

    /// Where a new subscription of this node's starts: once Redis confirmed
    /// the node's subscription (everything published from then on reaches
    /// the node), the channel's epoch, top and, given `since`, what was
    /// missed, read from its stream in one script.
    pub(crate) fn start_at(
        &self,
        channel: String,
        since: Option<Position>,
        shard: Option<usize>,
    ) -> impl std::future::Future<Output = Result<Start, HistoryError>> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        let confirmed = self.await_subscribed(channel.clone());
        async move {
            if confirmed.await.is_none() {
                return Err(HistoryError::Unavailable("Redis did not confirm the subscription in time; retry".into()));
            }
            let name: Arc<str> = channel.into();
            let snap = shared.start_snapshot(&name, since, shard).await?;
            let size = shared.scripts.limits().history(&name).0;
            let recovery = since.map(|p| crate::broker::recover(snap.epoch, snap.top, &snap.history, p, size, shared.recovery_max));
            Ok(Start { epoch: snap.epoch, top: snap.top, recovery })
        }
    }

    /// A page of the channel's history, read from its stream.
    pub(crate) fn history(
        &self,
        channel: String,
        since: Option<Position>,
        limit: usize,
        shard: Option<usize>,
    ) -> impl std::future::Future<Output = Result<Page, HistoryError>> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        async move {
            let what = match since {
                Some(p) => Read::After { since: p, count: limit + 1, capped: false },
                None => Read::Latest(limit),
            };
            let snap = shared.read(&channel.into(), what, shard).await?;
            Ok(crate::broker::page(snap.epoch, snap.top, &snap.history, since, limit))
        }
    }

    /// Waits until Redis confirmed this node's subscription to `channel`
    /// (at most the Redis timeout); returns the channel's epoch.
    fn await_subscribed(&self, channel: String) -> impl std::future::Future<Output = Option<Epoch>> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        let mut rx = shared.confirmed.subscribe();
        let deadline = tokio::time::Instant::now() + shared.timeout;
        async move {
            loop {
                if let Some(e) = shared.channels.confirmed(&channel) {
                    return Some(e);
                }
                if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                    return None;
                }
            }
        }
    }

    /// The broker's lines of the Prometheus exposition.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let m = &self.shared.metrics;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let publisher = u64::from(self.shared.publisher.get().is_some());
        metric(
            "herald_broker_publisher_up",
            "gauge",
            "1 once the publisher connection to Redis is established (it reconnects by itself after).",
            &[("", publisher)],
        );
        let shard_publishers = self.shared.shard_publishers.iter().filter(|p| p.get().is_some()).count() as u64;
        metric(
            "herald_broker_shard_publishers_up",
            "gauge",
            "Shards whose own publisher connection to Redis is established (until then they publish through the broker thread's).",
            &[("", shard_publishers)],
        );
        metric("herald_broker_up", "gauge", "Redis subscriber connections up (of herald_broker_nodes).", &[("", g(&m.nodes_up))]);
        let nodes = g(&m.nodes).max(g(&m.nodes_expected));
        metric(
            "herald_broker_nodes",
            "gauge",
            "Redis nodes this node reads pub/sub from (configured ones until it knows them).",
            &[("", nodes)],
        );
        metric("herald_broker_subscriptions", "gauge", "Channels this node is subscribed to in Redis.", &[("", g(&m.subscribed))]);
        metric("herald_broker_messages_total", "counter", "Messages received from Redis.", &[("", g(&m.received))]);
        metric(
            "herald_broker_dropped_total",
            "counter",
            "Messages from Redis not delivered, by reason.",
            &[
                ("{reason=\"no_interest\"}", g(&m.dropped_no_interest)),
                ("{reason=\"malformed\"}", g(&m.dropped_malformed)),
                ("{reason=\"duplicate\"}", g(&m.duplicates)),
            ],
        );
        metric("herald_broker_gaps_total", "counter", "Offset jumps or epoch changes seen in a channel from Redis.", &[("", g(&m.gaps))]);
        metric(
            "herald_broker_missed_messages_total",
            "counter",
            "Offsets lost in those gaps: not in the stream any more when the node filled them (announced with lagged).",
            &[("", g(&m.missed))],
        );
        metric("herald_broker_publish_errors_total", "counter", "Publishes that Redis did not take.", &[("", g(&m.publish_errors))]);
        metric(
            "herald_idempotent_repeats_total",
            "counter",
            "Publishes answered from an idempotency key, publishing nothing.",
            &[("", g(&m.repeats))],
        );
        metric("herald_broker_filled_total", "counter", "Messages read from a channel's stream to fill a gap.", &[("", g(&m.filled))]);
        metric(
            "herald_broker_epoch_changes_total",
            "counter",
            "Epoch changes seen under a subscription and announced to its subscribers.",
            &[("", g(&m.epochs))],
        );
        metric(
            "herald_presence_nodes_swept_total",
            "counter",
            "Nodes whose presence entries this node removed after they stopped refreshing them (presence_ttl_s).",
            &[("", g(&m.presence_swept))],
        );
        metric(
            "herald_broker_commands_total",
            "counter",
            "Server API commands from other nodes carried out here (control channel).",
            &[("", self.shared.commands.load(Ordering::Relaxed))],
        );
        metric(
            "herald_broker_control_up",
            "gauge",
            "1 while this node is subscribed to the control channel.",
            &[("", u64::from(self.shared.control_up.load(Ordering::Relaxed)))],
        );
        metric(
            "herald_broker_backpressure_total",
            "counter",
            "Times a message from Redis waited for a full shard queue.",
            &[("", g(&m.backpressure))],
        );
    }

    /// Reconnections of the subscriber connections.
    pub(crate) fn reconnects(&self) -> u64 {
        self.shared.metrics.reconnects.load(Ordering::Relaxed)
    }
}

/// Reconnect delays: 50 ms, doubling up to 500 ms, plus up to 25 ms of
/// jitter. A failed attempt costs a refused connect, and the cap bounds
/// how long a node stays cut off after Redis is back.
#[derive(Debug, Default)]
struct Backoff(u32);

/// Says a repeated failure once when it starts, then at most every
/// [`Outage::EVERY`] with the attempts made since, and once when it ends:
/// an outage is a few lines in the log, not one per retry.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    /// When it was last said, and the attempts in all.
    said: Option<std::time::Instant>,
    attempts: u64,
}

impl Outage {
    pub(crate) const EVERY: Duration = Duration::from_secs(10);

    /// A failure: true when it is to be logged now (then `attempts()` is
    /// how many failed in all).
    pub(crate) fn failed(&mut self, now: std::time::Instant) -> bool {
        self.attempts += 1;
        match self.said {
            Some(at) if now.duration_since(at) < Self::EVERY => false,
            _ => {
                self.said = Some(now);
                true
            }
        }
    }

    pub(crate) fn attempts(&self) -> u64 {
        self.attempts
    }

    /// A success: the failed attempts before it, if there were any.
    pub(crate) fn ended(&mut self) -> Option<u64> {
        let n = std::mem::take(&mut self.attempts);
        self.said = None;
        (n > 0).then_some(n)
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = 50u64 << self.0.min(4);
        self.0 += 1;
        Duration::from_millis(base.min(500) + fastrand::u64(..25))
    }
    fn reset(&mut self) {
        self.0 = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::Outage;
    use std::time::{Duration, Instant};

    #[test]
    fn an_outage_is_said_when_it_starts_every_ten_seconds_and_when_it_ends() {
        let t0 = Instant::now();
        let mut o = Outage::default();
        // Retries twice a second for 25 s: said at 0 s, 10 s and 20 s.
        let said: Vec<u64> = (0..50u64).filter(|i| o.failed(t0 + Duration::from_millis(500 * i))).map(|i| i / 2).collect();
        assert_eq!(said, [0, 10, 20]);
        assert_eq!(o.attempts(), 50);
        assert_eq!(o.ended(), Some(50));
        assert_eq!(o.ended(), None, "a success after a success is no news");
        // The next outage is said at once.
        assert!(o.failed(t0 + Duration::from_secs(26)));
    }
}
