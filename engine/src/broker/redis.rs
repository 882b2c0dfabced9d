//! The Redis brokers: `redis` (pub/sub on one Redis) and `redis-cluster`
//! (sharded pub/sub on a Redis Cluster).
//!
//! - **Publish**: one Lua script increments the channel's counter in a hash
//!   (`{prefix}{channel}:meta`, fields `o` and `e`), reads or creates the
//!   epoch, and PUBLISHes (SPUBLISH) `h1|{epoch}|{offset}|{kind}{payload}`
//!   on `{prefix}{channel}`: an offset is never spent without its message.
//!   The hash tag puts key and channel in one cluster slot.
//! - **Interest**: a node subscribes to a channel in Redis when its first
//!   local subscriber appears and unsubscribes when the last one leaves.
//!   Shards report these changes through a bounded queue (a full queue
//!   turns into a full resynchronisation, never a lost change); the
//!   coordinator task routes each channel to the subscriber connection of
//!   the Redis node that owns it.
//! - **Delivery**: the subscriber connections are read by Herald itself
//!   ([`crate::proto::resp`]), so nothing sits in an unbounded queue: a
//!   message is queued on the shards, or the connection waits while their
//!   queues are full (TCP pushes back to Redis), or it is counted as
//!   dropped by reason. Offsets are checked per channel; a jump or an epoch
//!   change is a gap, counted and logged.
//! - **Faults**: a lost connection is retried with backoff; on reconnect
//!   every channel with local interest is subscribed again. Publishes fail
//!   with `unavailable` while Redis cannot take them.
//!
//! Everything runs on one thread of its own (`herald-broker`).

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use crossbeam_queue::ArrayQueue;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};

use super::local::Delivered;
use super::{PublishError, Published};
use crate::config::Config;
use crate::message::Epoch;
use crate::proto::json::Payload;
use crate::proto::resp::{self, Resp};
use crate::Inner;

/// Interest changes waiting for the coordinator; past it, a full resync.
const DIRTY_QUEUE: usize = 65_536;
/// Subscribe/unsubscribe commands waiting for one Redis connection.
const NODE_QUEUE: usize = 4096;
/// Channels per SUBSCRIBE command when resubscribing.
const SUBSCRIBE_BATCH: usize = 256;
/// Read buffer of a subscriber connection (it grows for a larger message).
const READ_BYTES: usize = 64 * 1024;
/// Subscribe commands a connection has in flight at most: Redis buffers
/// the confirmations (and messages) in its pub/sub output buffer, so a
/// reconnect with many channels subscribes them a window at a time.
const MAX_UNACKED: usize = 4096;
/// Epoch fetches (one round trip each) running at once.
const MAX_FETCHES: usize = 32;
/// Slot-map refreshes, at most one per this interval.
const REFRESH_EVERY: Duration = Duration::from_millis(500);

const PUBLISH_LUA: &str = r"
local o = redis.call('HINCRBY', KEYS[1], 'o', 1)
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e)
end
if ARGV[3] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call(ARGV[4], KEYS[2], 'h1|' .. e .. '|' .. o .. '|' .. ARGV[2])
return {o, e}
";

const EPOCH_LUA: &str = r"
redis.call('HSETNX', KEYS[1], 'e', ARGV[1])
if ARGV[2] ~= '0' and redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('HGET', KEYS[1], 'e')
";

/// Counters of the Redis bridge (rendered by `/metrics`).
#[derive(Debug, Default)]
pub(crate) struct BrokerMetrics {
    pub received: AtomicU64,
    pub dropped_no_interest: AtomicU64,
    pub dropped_malformed: AtomicU64,
    pub gaps: AtomicU64,
    pub missed: AtomicU64,
    pub publish_errors: AtomicU64,
    pub backpressure: AtomicU64,
    /// Channels this node is subscribed to in Redis (confirmed).
    pub subscribed: AtomicU64,
    /// Subscriber connections up, and in all.
    pub nodes_up: AtomicU64,
    pub nodes: AtomicU64,
}

#[derive(Clone)]
enum Publisher {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Publisher {
    /// Runs a script on a clone of the connection (clones share it).
    async fn invoke<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> redis::RedisResult<T> {
        match self.clone() {
            Publisher::Single(mut c) => inv.invoke_async(&mut c).await,
            Publisher::Cluster(mut c) => inv.invoke_async(&mut c).await,
        }
    }
}

/// The Redis broker of one node.
pub(crate) struct RedisBroker {
    cluster: bool,
    seeds: Vec<redis::ConnectionInfo>,
    prefix: String,
    timeout: Duration,
    ttl_ms: u64,
    publisher: OnceLock<Publisher>,
    publish_script: redis::Script,
    epoch_script: redis::Script,
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
    /// Epoch fetches running at once, at most.
    fetches: tokio::sync::Semaphore,
    stop: watch::Sender<bool>,
    thread: Mutex<Option<(std::thread::JoinHandle<()>, tokio::sync::oneshot::Receiver<()>)>>,
    pub(crate) metrics: BrokerMetrics,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("cluster", &self.cluster).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// The configured Redis broker could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerError(String);

impl RedisBroker {
    /// The broker the configuration asks for, if any (not started yet).
    pub(crate) fn from_config(c: &Config) -> Result<Option<RedisBroker>, BrokerError> {
        let (cluster, urls): (bool, Vec<&String>) = match (&c.redis, c.redis_cluster.is_empty()) {
            (Some(url), _) => (false, vec![url]),
            (None, false) => (true, c.redis_cluster.iter().collect()),
            (None, true) => return Ok(None),
        };
        let mut seeds = Vec::new();
        for url in urls {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| BrokerError(format!("bad Redis URL {url:?}: {e}")))?;
            if !matches!(info.addr(), redis::ConnectionAddr::Tcp(..)) {
                return Err(BrokerError(format!("Redis URL {url:?}: only redis://host:port is supported")));
            }
            seeds.push(info);
        }
        Ok(Some(RedisBroker {
            cluster,
            seeds,
            prefix: c.redis_prefix.clone(),
            timeout: Config::dur(c.redis_timeout_ms),
            ttl_ms: c.redis_counter_ttl_ms,
            publisher: OnceLock::new(),
            publish_script: redis::Script::new(PUBLISH_LUA),
            epoch_script: redis::Script::new(EPOCH_LUA),
            dirty: ArrayQueue::new(DIRTY_QUEUE),
            lost: ArrayQueue::new(DIRTY_QUEUE),
            resync: AtomicBool::new(false),
            lost_all: AtomicBool::new(false),
            wake: Notify::new(),
            confirmed: watch::channel(0).0,
            fetches: tokio::sync::Semaphore::new(MAX_FETCHES),
            stop: watch::channel(false).0,
            thread: Mutex::new(None),
            metrics: BrokerMetrics::default(),
        }))
    }

    pub(crate) fn mode(&self) -> &'static str {
        if self.cluster {
            "redis-cluster"
        } else {
            "redis"
        }
    }

    /// Starts the broker thread.
    pub(crate) fn start(inner: &Arc<Inner>) -> std::io::Result<()> {
        let Some(broker) = inner.broker.as_ref() else { return Ok(()) };
        let inner2 = Arc::clone(inner);
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
            local.block_on(&rt, coordinator(inner2));
            drop(local);
            drop(rt);
            let _ = ended_tx.send(());
        })?;
        *broker.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some((handle, ended_rx));
        Ok(())
    }

    /// Stops the broker thread: waits for it at most 2 s without
    /// blocking the caller's runtime.
    pub(crate) async fn stop(&self) {
        let _ = self.stop.send(true);
        let taken = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((handle, ended)) = taken {
            if tokio::time::timeout(Duration::from_secs(2), ended).await.is_ok() {
                let _ = handle.join();
            } else {
                tracing::warn!("the broker thread did not stop within 2 s");
            }
        }
    }

    /// A shard gained its node's first subscriber to `channel`, or lost the
    /// last one.
    pub(crate) fn interest_changed(&self, channel: &Arc<str>) {
        if self.dirty.push(Arc::clone(channel)).is_err() {
            self.resync.store(true, Ordering::Release);
        }
        self.wake.notify_one();
    }

    fn redis_channel(&self, channel: &str) -> String {
        format!("{}{{{channel}}}", self.prefix)
    }

    fn meta_key(&self, channel: &str) -> String {
        format!("{}{{{channel}}}:meta", self.prefix)
    }

    /// The Herald channel of a Redis channel name (`{prefix}{name}`).
    fn herald_channel<'a>(&self, redis_channel: &'a [u8]) -> Option<&'a str> {
        let rest = redis_channel.strip_prefix(self.prefix.as_bytes())?;
        let name = rest.strip_prefix(b"{")?.strip_suffix(b"}")?;
        std::str::from_utf8(name).ok()
    }

    /// Publishes through Redis: the offset and epoch come back from it.
    pub(crate) async fn publish(&self, channel: &str, payload: &Payload) -> Result<Published, PublishError> {
        let unavailable = |why: String| {
            self.metrics.publish_errors.fetch_add(1, Ordering::Relaxed);
            PublishError::Unavailable(why)
        };
        let Some(publisher) = self.publisher.get() else {
            return Err(unavailable("not connected to Redis yet".into()));
        };
        let mut body = Vec::with_capacity(payload.len() + 1);
        body.push(if payload.is_json() { b'j' } else { b't' });
        body.extend_from_slice(payload.as_bytes());
        let mut inv = self.publish_script.prepare_invoke();
        inv.key(self.meta_key(channel))
            .key(self.redis_channel(channel))
            .arg(Epoch::random().as_str())
            .arg(body)
            .arg(self.ttl_ms)
            .arg(if self.cluster { "SPUBLISH" } else { "PUBLISH" });
        match tokio::time::timeout(self.timeout, publisher.invoke::<(u64, String)>(&inv)).await {
            Ok(Ok((offset, epoch))) => {
                let epoch = Epoch::parse(epoch.as_bytes()).ok_or_else(|| unavailable(format!("Redis returned a bad epoch {epoch:?}")))?;
                Ok(Published { channel: channel.into(), offset, epoch })
            }
            Ok(Err(e)) => Err(unavailable(format!("Redis did not take the publish: {e}"))),
            Err(_) => Err(unavailable(format!(
                "Redis did not answer within {} ms (the message may or may not have been published)",
                self.timeout.as_millis()
            ))),
        }
    }

    /// The channel's epoch in Redis (created if it has none yet).
    async fn fetch_epoch(&self, channel: &str) -> Option<Epoch> {
        let publisher = self.publisher.get()?;
        let mut inv = self.epoch_script.prepare_invoke();
        inv.key(self.meta_key(channel)).arg(Epoch::random().as_str()).arg(self.ttl_ms);
        match tokio::time::timeout(self.timeout, publisher.invoke::<String>(&inv)).await {
            Ok(Ok(e)) => Epoch::parse(e.as_bytes()),
            _ => None,
        }
    }

    /// Waits until Redis confirmed this node's subscription to `channel`
    /// (at most the Redis timeout); returns the channel's epoch.
    pub(crate) async fn wait_confirmed(&self, inner: &Inner, channel: &str) -> Option<Epoch> {
        let mut rx = self.confirmed.subscribe();
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            if let Some(e) = inner.channels.broker_epoch(channel) {
                return Some(e);
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return None;
            }
        }
    }

    /// The broker's lines of the Prometheus exposition.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let m = &self.metrics;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        metric("herald_broker_up", "gauge", "Redis subscriber connections up (of herald_broker_nodes).", &[("", g(&m.nodes_up))]);
        metric("herald_broker_nodes", "gauge", "Redis nodes this node reads pub/sub from.", &[("", g(&m.nodes))]);
        metric("herald_broker_subscriptions", "gauge", "Channels this node is subscribed to in Redis.", &[("", g(&m.subscribed))]);
        metric("herald_broker_messages_total", "counter", "Messages received from Redis.", &[("", g(&m.received))]);
        metric(
            "herald_broker_dropped_total",
            "counter",
            "Messages from Redis not delivered, by reason.",
            &[("{reason=\"no_interest\"}", g(&m.dropped_no_interest)), ("{reason=\"malformed\"}", g(&m.dropped_malformed))],
        );
        metric("herald_broker_gaps_total", "counter", "Offset jumps or epoch changes seen in a channel from Redis.", &[("", g(&m.gaps))]);
        metric("herald_broker_missed_messages_total", "counter", "Offsets skipped by those gaps.", &[("", g(&m.missed))]);
        metric("herald_broker_publish_errors_total", "counter", "Publishes that Redis did not take.", &[("", g(&m.publish_errors))]);
        metric(
            "herald_broker_backpressure_total",
            "counter",
            "Times a message from Redis waited for a full shard queue.",
            &[("", g(&m.backpressure))],
        );
    }
}

/// A command for a subscriber connection.
#[derive(Debug)]
enum NodeCmd {
    /// Subscribe; the generation the coordinator gave the subscription.
    Subscribe(Arc<str>, u64),
    Unsubscribe(Arc<str>),
}

/// The slot map of a cluster: `(first slot, last slot, node address)`.
type SlotMap = Vec<(u16, u16, (String, u16))>;

/// A Redis node the broker reads pub/sub from, and its connection's queue
/// (`None` once the node left the cluster).
struct Node {
    addr: (String, u16),
    tx: Option<mpsc::Sender<NodeCmd>>,
    /// Commands that did not fit the queue yet (sent in order later).
    outbox: std::collections::VecDeque<NodeCmd>,
}

impl Node {
    fn send(&mut self, cmd: NodeCmd) {
        self.outbox.push_back(cmd);
        self.flush();
    }

    /// Moves what fits from the outbox to the connection's queue; never
    /// waits, so one stalled connection cannot stop the routing of others.
    fn flush(&mut self) {
        let Some(tx) = &self.tx else {
            self.outbox.clear();
            return;
        };
        while let Some(cmd) = self.outbox.pop_front() {
            match tx.try_send(cmd) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(cmd)) => {
                    self.outbox.push_front(cmd);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.outbox.clear();
                    return;
                }
            }
        }
    }
}

/// The broker thread's main task: connects the publisher, starts the
/// subscriber connections and routes interest changes to them. It alone
/// decides which channels are subscribed where; the subscription state in
/// the channel table carries its generation.
async fn coordinator(inner: Arc<Inner>) {
    let Some(broker) = inner.broker.as_ref() else { return };
    let mut stop = broker.stop.subscribe();
    // The publisher connection (redis-rs reconnects it by itself).
    let mut backoff = Backoff::default();
    loop {
        let connected = tokio::select! {
            r = connect_publisher(broker) => r,
            _ = stop.changed() => return,
        };
        match connected {
            Ok(p) => {
                let _ = broker.publisher.set(p);
                break;
            }
            Err(e) => {
                tracing::warn!(broker = broker.mode(), error = %e, "cannot connect to Redis; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next()) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut slots: SlotMap = Vec::new();
    let mut refreshed: Option<tokio::time::Instant> = None;
    if !broker.cluster {
        if let redis::ConnectionAddr::Tcp(host, port) = broker.seeds[0].addr() {
            nodes.push(Node { addr: (host.clone(), *port), tx: None, outbox: Default::default() });
        }
    }
    // Channel → node it is subscribed on.
    let mut assigned: HashMap<Arc<str>, usize> = HashMap::new();
    broker.resync.store(true, Ordering::Release);
    loop {
        if broker.cluster && (slots.is_empty() || broker.resync.load(Ordering::Acquire)) {
            // Rate-limited: a dead master makes every reconnect ask again.
            if let Some(at) = refreshed {
                let wait = (at + REFRESH_EVERY).saturating_duration_since(tokio::time::Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => break,
                }
            }
            refreshed = Some(tokio::time::Instant::now());
            match cluster_slots(broker).await {
                Ok(map) if !map.is_empty() => {
                    for (_, _, addr) in &map {
                        if !nodes.iter().any(|n| &n.addr == addr) {
                            nodes.push(Node { addr: addr.clone(), tx: None, outbox: Default::default() });
                        }
                    }
                    // Masters gone from the map are retired (their
                    // connection ends); they get a new one if they return.
                    for n in &mut nodes {
                        let in_map = map.iter().any(|(_, _, a)| *a == n.addr);
                        if !in_map && n.tx.take().is_some() {
                            broker.metrics.nodes.fetch_sub(1, Ordering::Relaxed);
                            tracing::info!(node = %format!("{}:{}", n.addr.0, n.addr.1), "Redis node left the cluster's slot map");
                        }
                        if in_map && n.tx.is_none() {
                            n.tx = Some(spawn_node(&inner, &n.addr, &stop));
                        }
                    }
                    slots = map;
                }
                _ if slots.is_empty() => {
                    tracing::warn!("cannot read the Redis Cluster slot map; retrying");
                    continue;
                }
                _ => {}
            }
        }
        if !broker.cluster && nodes.first().is_some_and(|n| n.tx.is_none()) {
            let addr = nodes[0].addr.clone();
            nodes[0].tx = Some(spawn_node(&inner, &addr, &stop));
        }
        let mut changed: Vec<Arc<str>> = Vec::new();
        if broker.lost_all.swap(false, Ordering::AcqRel) {
            assigned.clear();
            broker.resync.store(true, Ordering::Release);
        }
        while let Some(name) = broker.lost.pop() {
            // Redis dropped it: subscribe it again, wherever it routes now.
            assigned.remove(&name);
            changed.push(name);
        }
        if broker.resync.swap(false, Ordering::AcqRel) {
            changed.extend(inner.channels.interested());
            changed.extend(assigned.keys().cloned());
        }
        while let Some(name) = broker.dirty.pop() {
            changed.push(name);
        }
        let mut seen = HashSet::new();
        for name in changed {
            if !seen.insert(Arc::clone(&name)) {
                continue;
            }
            let interest = inner.channels.has_interest(&name);
            let want = if interest { route(broker, &slots, &nodes, &name) } else { None };
            let have = assigned.get(&name).copied();
            if interest && want.is_none() {
                // No master owns its slot now: retry at the next resync.
                broker.resync.store(true, Ordering::Release);
            }
            if want == have {
                continue;
            }
            match want {
                None => {
                    // Unsubscribe only if nobody subscribed meanwhile (decided
                    // under the channel's lock); else its change is queued.
                    if let Some(node) = have {
                        if inner.channels.broker_release(&name) {
                            assigned.remove(&name);
                            nodes[node].send(NodeCmd::Unsubscribe(name));
                        }
                    }
                }
                Some(node) => {
                    if let Some(old) = have {
                        nodes[old].send(NodeCmd::Unsubscribe(Arc::clone(&name)));
                    }
                    let gen = inner.channels.broker_subscribe(&name, have.is_none());
                    assigned.insert(Arc::clone(&name), node);
                    nodes[node].send(NodeCmd::Subscribe(name, gen));
                }
            }
        }
        let backlog = nodes.iter().any(|n| !n.outbox.is_empty());
        let retry = backlog || broker.resync.load(Ordering::Acquire);
        tokio::select! {
            _ = broker.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)), if backlog => {}
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry && !backlog => {}
            _ = stop.changed() => break,
        }
        for n in &mut nodes {
            n.flush();
        }
    }
}

/// The node a channel's subscription belongs on.
fn route(broker: &RedisBroker, slots: &SlotMap, nodes: &[Node], name: &str) -> Option<usize> {
    if !broker.cluster {
        return Some(0);
    }
    let slot = resp::key_slot(broker.redis_channel(name).as_bytes());
    let addr = &slots.iter().find(|(a, b, _)| (*a..=*b).contains(&slot))?.2;
    nodes.iter().position(|n| &n.addr == addr && n.tx.is_some())
}

fn spawn_node(inner: &Arc<Inner>, addr: &(String, u16), stop: &watch::Receiver<bool>) -> mpsc::Sender<NodeCmd> {
    let (tx, rx) = mpsc::channel(NODE_QUEUE);
    tokio::task::spawn_local(subscriber(Arc::clone(inner), addr.clone(), rx, stop.clone()));
    if let Some(b) = inner.broker.as_ref() {
        b.metrics.nodes.fetch_add(1, Ordering::Relaxed);
    }
    tx
}

async fn connect_publisher(broker: &RedisBroker) -> redis::RedisResult<Publisher> {
    if broker.cluster {
        // No retries: a publish retried after an I/O error could run its
        // script twice (two offsets for one message).
        let client = redis::cluster::ClusterClient::builder(broker.seeds.clone())
            .connection_timeout(broker.timeout)
            .response_timeout(broker.timeout)
            .retries(0)
            .build()?;
        Ok(Publisher::Cluster(client.get_async_connection().await?))
    } else {
        let client = redis::Client::open(broker.seeds[0].clone())?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(broker.timeout))
            .set_response_timeout(Some(broker.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        Ok(Publisher::Single(ConnectionManager::new_with_config(client, cfg).await?))
    }
}

/// Reads `CLUSTER SLOTS` into a slot map of the masters.
async fn cluster_slots(broker: &RedisBroker) -> Result<SlotMap, String> {
    let Some(Publisher::Cluster(mut c)) = broker.publisher.get().cloned() else { return Err("not connected".into()) };
    let v: redis::Value = tokio::time::timeout(broker.timeout, redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let seed_host = match broker.seeds[0].addr() {
        redis::ConnectionAddr::Tcp(h, _) => h.clone(),
        _ => String::new(),
    };
    let mut map = Vec::new();
    let redis::Value::Array(ranges) = v else { return Err("CLUSTER SLOTS: not an array".into()) };
    for r in ranges {
        let redis::Value::Array(r) = r else { continue };
        let (Some(redis::Value::Int(a)), Some(redis::Value::Int(b)), Some(redis::Value::Array(master))) = (r.first(), r.get(1), r.get(2))
        else {
            continue;
        };
        let host = match master.first() {
            Some(redis::Value::BulkString(h)) if !h.is_empty() => String::from_utf8_lossy(h).into_owned(),
            _ => seed_host.clone(),
        };
        let Some(redis::Value::Int(port)) = master.get(1) else { continue };
        map.push((*a as u16, *b as u16, (host, *port as u16)));
    }
    Ok(map)
}

#[derive(Debug, Default)]
struct Backoff(u32);

impl Backoff {
    /// 50 ms, doubling up to 500 ms, plus up to 25 ms of jitter: a failed
    /// attempt costs a refused connect, and the cap bounds how long a node
    /// stays cut off after Redis is back.
    fn next(&mut self) -> Duration {
        let base = 50u64 << self.0.min(4);
        self.0 += 1;
        let jitter = u64::from(Epoch::random().as_str().as_bytes()[0]) % 25;
        Duration::from_millis(base.min(500) + jitter)
    }
    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// One subscriber connection to one Redis node: keeps the channels routed
/// to it subscribed across reconnects, and delivers what it reads.
async fn subscriber(inner: Arc<Inner>, node: (String, u16), mut cmds: mpsc::Receiver<NodeCmd>, mut stop: watch::Receiver<bool>) {
    let Some(broker) = inner.broker.as_ref() else { return };
    // Channel → generation of its subscription.
    let mut want: HashMap<Arc<str>, u64> = HashMap::new();
    let mut backoff = Backoff::default();
    let mut ever_up = false;
    loop {
        let outcome = tokio::select! {
            r = session(&inner, broker, &node, &mut want, &mut cmds, &mut ever_up, &mut backoff) => r,
            _ = stop.changed() => return,
        };
        if broker.cluster && !matches!(outcome, Session::Closed) {
            // The cluster may have changed: read its slot map again.
            broker.resync.store(true, Ordering::Release);
            broker.wake.notify_one();
        }
        match outcome {
            Session::Closed => return,
            Session::Failed(e) => {
                tracing::warn!(node = %format!("{}:{}", node.0, node.1), error = %e, channels = want.len(),
                    "Redis subscriber connection lost; reconnecting");
            }
            Session::NoConnect(e) => {
                tracing::debug!(node = %format!("{}:{}", node.0, node.1), error = %e, "cannot connect to Redis");
            }
        }
        // Commands keep coming while disconnected: apply them to `want`.
        let pause = tokio::time::sleep(backoff.next());
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                c = cmds.recv() => match c {
                    Some(NodeCmd::Subscribe(ch, gen)) => { want.insert(ch, gen); }
                    Some(NodeCmd::Unsubscribe(ch)) => { want.remove(&ch); }
                    None => return,
                },
                _ = stop.changed() => return,
            }
        }
    }
}

enum Session {
    /// The command channel closed: the broker is stopping.
    Closed,
    /// Could not connect.
    NoConnect(String),
    /// Connected, then lost the connection.
    Failed(String),
}

async fn connect_node(broker: &RedisBroker, node: &(String, u16)) -> Result<TcpStream, String> {
    let connect = TcpStream::connect((node.0.as_str(), node.1));
    let mut stream = match tokio::time::timeout(broker.timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("connect timed out".into()),
    };
    let _ = stream.set_nodelay(true);
    let info = broker.seeds[0].redis_settings();
    if let Some(pass) = info.password() {
        let mut cmd = Vec::new();
        match info.username() {
            Some(user) => resp::command(&mut cmd, &[b"AUTH", user.as_bytes(), pass.as_bytes()]),
            None => resp::command(&mut cmd, &[b"AUTH", pass.as_bytes()]),
        }
        stream.write_all(&cmd).await.map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(256);
        let reply = loop {
            if let Some(v) = resp::decode(&mut buf).map_err(|e| e.to_string())? {
                break v;
            }
            match tokio::time::timeout(broker.timeout, stream.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err("no answer to AUTH".into()),
                Ok(Ok(_)) => {}
            }
        };
        if let Resp::Error(e) = reply {
            return Err(format!("AUTH refused: {}", String::from_utf8_lossy(&e)));
        }
    }
    Ok(stream)
}

fn sub_command(broker: &RedisBroker, subscribe: bool, channels: &[Arc<str>]) -> Vec<u8> {
    let verb: &[u8] = match (broker.cluster, subscribe) {
        (false, true) => b"SUBSCRIBE",
        (false, false) => b"UNSUBSCRIBE",
        (true, true) => b"SSUBSCRIBE",
        (true, false) => b"SUNSUBSCRIBE",
    };
    let names: Vec<String> = channels.iter().map(|c| broker.redis_channel(c)).collect();
    let mut args: Vec<&[u8]> = vec![verb];
    args.extend(names.iter().map(|n| n.as_bytes()));
    let mut out = Vec::new();
    resp::command(&mut out, &args);
    out
}

/// One connection's view of its subscriptions.
#[derive(Default)]
struct SubState {
    /// Confirmed by Redis on this connection.
    confirmed: HashSet<Arc<str>>,
    /// To subscribe, in order (checked against `want` when sent).
    backlog: std::collections::VecDeque<Arc<str>>,
    /// Subscribe commands sent and not yet answered.
    unacked: usize,
    /// Unsubscribe commands sent and not yet answered, per channel: their
    /// answers are not Redis dropping a subscription.
    unsubscribing: HashMap<Arc<str>, u32>,
    /// False once the connection is gone (late epoch fetches then do not
    /// confirm anything).
    alive: Rc<Cell<bool>>,
}

async fn session(
    inner: &Arc<Inner>,
    broker: &RedisBroker,
    node: &(String, u16),
    want: &mut HashMap<Arc<str>, u64>,
    cmds: &mut mpsc::Receiver<NodeCmd>,
    ever_up: &mut bool,
    backoff: &mut Backoff,
) -> Session {
    let stream = match connect_node(broker, node).await {
        Ok(s) => s,
        Err(e) => return Session::NoConnect(e),
    };
    let (mut rd, mut wr) = stream.into_split();
    backoff.reset();
    if *ever_up {
        inner.metrics.global().broker_reconnects.inc();
        tracing::info!(node = %format!("{}:{}", node.0, node.1), channels = want.len(), "reconnected to Redis; subscribing again");
    }
    *ever_up = true;
    broker.metrics.nodes_up.fetch_add(1, Ordering::Relaxed);
    let mut st = SubState { alive: Rc::new(Cell::new(true)), ..SubState::default() };
    st.backlog.extend(want.keys().cloned());
    let r = session_io(inner, broker, want, cmds, &mut st, (&mut rd, &mut wr)).await;
    st.alive.set(false);
    broker.metrics.nodes_up.fetch_sub(1, Ordering::Relaxed);
    // The subscriptions on that connection are gone.
    broker.metrics.subscribed.fetch_sub(st.confirmed.len() as u64, Ordering::Relaxed);
    for (ch, gen) in want.iter() {
        inner.channels.broker_confirm(ch, *gen, false, None);
    }
    r
}

async fn session_io(
    inner: &Arc<Inner>,
    broker: &RedisBroker,
    want: &mut HashMap<Arc<str>, u64>,
    cmds: &mut mpsc::Receiver<NodeCmd>,
    st: &mut SubState,
    (rd, wr): (&mut tokio::net::tcp::OwnedReadHalf, &mut tokio::net::tcp::OwnedWriteHalf),
) -> Session {
    let fail = |e: std::io::Error| Session::Failed(e.to_string());
    let mut buf = BytesMut::with_capacity(READ_BYTES);
    let ping_every = broker.timeout.max(Duration::from_millis(200));
    let mut ping = tokio::time::interval(ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut awaiting_pong = false;
    loop {
        // Subscribe what is waiting, a window at a time (sharded pub/sub:
        // one channel per command, since one SSUBSCRIBE stays in one slot).
        let per_command = if broker.cluster { 1 } else { SUBSCRIBE_BATCH };
        while st.unacked < MAX_UNACKED && !st.backlog.is_empty() {
            let mut batch = Vec::new();
            while batch.len() < per_command.min(MAX_UNACKED - st.unacked) {
                let Some(ch) = st.backlog.pop_front() else { break };
                if want.contains_key(&ch) && !st.confirmed.contains(&ch) {
                    batch.push(ch);
                }
            }
            if batch.is_empty() {
                continue;
            }
            st.unacked += batch.len();
            if let Err(e) = wr.write_all(&sub_command(broker, true, &batch)).await {
                return fail(e);
            }
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => {
                match r {
                    Ok(0) => return Session::Failed("Redis closed the connection".into()),
                    Ok(_) => {}
                    Err(e) => return fail(e),
                }
                loop {
                    let v = match resp::decode(&mut buf) {
                        Ok(Some(v)) => v,
                        Ok(None) => break,
                        Err(e) => return Session::Failed(e.to_string()),
                    };
                    awaiting_pong = false;
                    handle(inner, broker, v, want, st).await;
                }
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(READ_BYTES);
                }
            }
            c = cmds.recv() => match c {
                None => return Session::Closed,
                Some(NodeCmd::Subscribe(ch, gen)) => {
                    // A new generation: confirmed again when Redis answers.
                    if st.confirmed.remove(&ch) {
                        broker.metrics.subscribed.fetch_sub(1, Ordering::Relaxed);
                    }
                    want.insert(Arc::clone(&ch), gen);
                    st.backlog.push_back(ch);
                }
                Some(NodeCmd::Unsubscribe(ch)) => {
                    want.remove(&ch);
                    if st.confirmed.remove(&ch) {
                        broker.metrics.subscribed.fetch_sub(1, Ordering::Relaxed);
                    }
                    *st.unsubscribing.entry(Arc::clone(&ch)).or_default() += 1;
                    if let Err(e) = wr.write_all(&sub_command(broker, false, &[ch])).await {
                        return fail(e);
                    }
                }
            },
            _ = ping.tick() => {
                if awaiting_pong {
                    return Session::Failed(format!("no answer to PING within {} ms", ping_every.as_millis()));
                }
                let mut cmd = Vec::new();
                resp::command(&mut cmd, &[b"PING"]);
                if let Err(e) = wr.write_all(&cmd).await {
                    return fail(e);
                }
                awaiting_pong = true;
            }
        }
    }
}

/// Handles one value read from a subscriber connection.
async fn handle(inner: &Arc<Inner>, broker: &RedisBroker, v: Resp, want: &HashMap<Arc<str>, u64>, st: &mut SubState) {
    let items = match v {
        Resp::Array(Some(items)) => items,
        Resp::Error(e) => {
            // The answer to a (S)SUBSCRIBE: the node does not own the slot
            // (MOVED) or refuses. Read the slot map again and route every
            // unconfirmed channel of this connection anew.
            st.unacked = st.unacked.saturating_sub(1);
            let e = String::from_utf8_lossy(&e);
            tracing::warn!(error = %e, "Redis refused a subscription command");
            for ch in want.keys().filter(|c| !st.confirmed.contains(*c)) {
                if broker.lost.push(Arc::clone(ch)).is_err() {
                    broker.lost_all.store(true, Ordering::Release);
                }
            }
            broker.resync.store(true, Ordering::Release);
            broker.wake.notify_one();
            return;
        }
        _ => return,
    };
    let kind = items.first().and_then(Resp::as_bytes).map(|b| b.as_ref()).unwrap_or_default();
    let name = || items.get(1).and_then(Resp::as_bytes).and_then(|c| broker.herald_channel(c));
    match kind {
        b"message" | b"smessage" => {
            let (Some(ch), Some(body)) = (items.get(1).and_then(Resp::as_bytes), items.get(2).and_then(Resp::as_bytes)) else { return };
            broker.metrics.received.fetch_add(1, Ordering::Relaxed);
            deliver(inner, broker, ch, body.clone()).await;
        }
        b"subscribe" | b"ssubscribe" => {
            st.unacked = st.unacked.saturating_sub(1);
            let Some(name) = name() else { return };
            let Some((ch, &gen)) = want.get_key_value(name) else { return };
            let ch = Arc::clone(ch);
            if st.confirmed.insert(Arc::clone(&ch)) {
                broker.metrics.subscribed.fetch_add(1, Ordering::Relaxed);
            }
            // The epoch comes from the publisher connection (which may be
            // reconnecting too): do not hold up reading; retry until this
            // connection ends. The generation keeps a late answer from
            // confirming a later subscription.
            let (inner, alive) = (Arc::clone(inner), Rc::clone(&st.alive));
            tokio::task::spawn_local(async move {
                let Some(broker) = inner.broker.as_ref() else { return };
                let mut backoff = Backoff::default();
                while alive.get() && inner.channels.has_interest(&ch) {
                    let epoch = {
                        let Ok(_permit) = broker.fetches.acquire().await else { return };
                        broker.fetch_epoch(&ch).await
                    };
                    if let Some(epoch) = epoch {
                        if alive.get() {
                            inner.channels.broker_confirm(&ch, gen, true, Some(epoch));
                            broker.confirmed.send_modify(|n| *n += 1);
                        }
                        return;
                    }
                    tokio::time::sleep(backoff.next()).await;
                }
            });
        }
        b"sunsubscribe" | b"unsubscribe" => {
            let Some(name) = name() else { return };
            if let Some(n) = st.unsubscribing.get_mut(name) {
                // The answer to our own UNSUBSCRIBE.
                *n -= 1;
                if *n == 0 {
                    st.unsubscribing.remove(name);
                }
                return;
            }
            // Redis dropped a subscription by itself (its slot moved):
            // route the channel again.
            let Some((ch, &gen)) = want.get_key_value(name) else { return };
            if st.confirmed.remove(name) {
                broker.metrics.subscribed.fetch_sub(1, Ordering::Relaxed);
            }
            inner.channels.broker_confirm(ch, gen, false, None);
            if broker.lost.push(Arc::clone(ch)).is_err() {
                broker.lost_all.store(true, Ordering::Release);
            }
            broker.resync.store(true, Ordering::Release);
            broker.wake.notify_one();
        }
        _ => {}
    }
}

/// A message body: `h1|{epoch}|{offset}|{kind}{payload}`.
fn parse_body(body: &Bytes) -> Option<(Epoch, u64, Payload)> {
    let rest = body.strip_prefix(b"h1|")?;
    let epoch = Epoch::parse(rest.get(..8)?)?;
    let rest = rest.get(8..)?.strip_prefix(b"|")?;
    let bar = rest.iter().position(|&b| b == b'|')?;
    let offset: u64 = std::str::from_utf8(&rest[..bar]).ok()?.parse().ok()?;
    let kind = *rest.get(bar + 1)?;
    let start = body.len() - rest.len() + bar + 2;
    let data = body.slice(start..);
    let payload = match kind {
        b'j' => Payload::json_prevalidated(data),
        b't' => Payload::text_from_utf8(data).ok()?,
        _ => return None,
    };
    Some((epoch, offset, payload))
}

async fn deliver(inner: &Arc<Inner>, broker: &RedisBroker, redis_channel: &Bytes, body: Bytes) {
    let m = &broker.metrics;
    let (Some(channel), Some((epoch, offset, payload))) = (broker.herald_channel(redis_channel), parse_body(&body)) else {
        m.dropped_malformed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut waited = false;
    loop {
        match inner.channels.deliver(&inner.dispatch, channel, epoch, offset, &payload) {
            Delivered::Queued { missed, reset } => {
                if missed > 0 || reset {
                    m.gaps.fetch_add(1, Ordering::Relaxed);
                    m.missed.fetch_add(missed, Ordering::Relaxed);
                    tracing::warn!(channel, missed, offsets_restarted = reset, offset, "gap in a channel from Redis");
                }
                return;
            }
            Delivered::NoInterest => {
                m.dropped_no_interest.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Delivered::Full => {
                // The shards are behind: stop reading until they catch up
                // (Redis buffers meanwhile, up to its pub/sub output limit).
                if !waited {
                    m.backpressure.fetch_add(1, Ordering::Relaxed);
                    waited = true;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_bodies_parse_without_copying_the_payload() {
        let body = Bytes::from_static(b"h1|abcd1234|17|j{\"a\":1}");
        let (e, o, p) = parse_body(&body).unwrap();
        assert_eq!((e.as_str(), o, p.as_bytes(), p.is_json()), ("abcd1234", 17, &b"{\"a\":1}"[..], true));
        let (_, _, p) = parse_body(&Bytes::from_static(b"h1|abcd1234|1|th|i")).unwrap();
        assert_eq!((p.as_bytes(), p.is_json()), (&b"h|i"[..], false));
        for bad in [&b"h2|abcd1234|1|tx"[..], b"h1|abcd|1|tx", b"h1|abcd1234|x|tx", b"h1|abcd1234|1|qx", b"h1|abcd1234|1|t\xff"] {
            assert!(parse_body(&Bytes::copy_from_slice(bad)).is_none(), "{bad:?}");
        }
    }
}
