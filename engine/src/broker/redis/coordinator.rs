//! The broker thread's main task: connects the publisher, starts a
//! subscriber connection per Redis node (per master of a cluster, from its
//! slot map) and routes interest changes to them. It alone decides which
//! channels are subscribed where; each subscription carries the generation
//! it got in [`super::channels`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::script::{self, SlotMap};
use super::subscriber::{self, NodeCmd};
use super::Shared;
use crate::proto::resp;

/// Subscribe/unsubscribe commands waiting for one Redis connection.
const NODE_QUEUE: usize = 4096;
/// Commands waiting in a node's outbox while its queue is full, at most;
/// past it the outbox is cleared and the node's channels are routed again
/// by a full resynchronisation (which needs no history of commands).
const OUTBOX_MAX: usize = 65_536;
/// Slot-map refreshes, at most one per this interval.
const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// A Redis node the broker reads pub/sub from, and its connection's queue
/// (`None` once the node left the cluster).
struct Node {
    addr: (String, u16),
    tx: Option<mpsc::Sender<NodeCmd>>,
    /// Commands that did not fit the queue yet (sent in order later).
    outbox: VecDeque<NodeCmd>,
}

impl Node {
    fn new(addr: (String, u16)) -> Node {
        Node { addr, tx: None, outbox: VecDeque::new() }
    }

    /// Queues a command; false when the outbox is full (the caller resyncs).
    fn send(&mut self, cmd: NodeCmd) -> bool {
        if self.outbox.len() >= OUTBOX_MAX {
            return false;
        }
        self.outbox.push_back(cmd);
        self.flush();
        true
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

/// Runs until the broker stops.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    let outage = std::cell::RefCell::new(super::Outage::default());
    let failed = |e: &redis::RedisError| {
        let mut o = outage.borrow_mut();
        if o.failed(std::time::Instant::now()) {
            let attempts = o.attempts();
            tracing::warn!(broker = %shared.mode(), error = %e, attempts, "cannot connect to Redis; retrying (said again every 10 s while it lasts)");
        }
    };
    let Some(publisher) = shared.connect_publisher(failed).await else { return };
    if let Some(attempts) = outage.borrow_mut().ended() {
        tracing::info!(broker = %shared.mode(), attempts, "connected to Redis");
    }
    let _ = shared.publisher.set(publisher);
    let mut c = Coordinator { shared: Arc::clone(&shared), nodes: Vec::new(), slots: Vec::new(), assigned: HashMap::new() };
    if !shared.cluster {
        if let Some(node) = super::host_port(shared.seeds[0].addr()) {
            c.nodes.push(Node::new(node));
        }
    }
    let mut refreshed: Option<tokio::time::Instant> = None;
    shared.resync.store(true, Ordering::Release);
    loop {
        if shared.cluster && (c.slots.is_empty() || shared.resync.load(Ordering::Acquire)) {
            // Rate-limited: a dead master makes every reconnect ask again.
            if let Some(at) = refreshed {
                let wait = (at + REFRESH_EVERY).saturating_duration_since(tokio::time::Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => break,
                }
            }
            refreshed = Some(tokio::time::Instant::now());
            if !c.refresh_slots(&stop).await {
                continue;
            }
        }
        if !shared.cluster && c.nodes.first().is_some_and(|n| n.tx.is_none()) {
            let addr = c.nodes[0].addr.clone();
            c.nodes[0].tx = Some(spawn_node(&shared, &addr, &stop));
        }
        c.route_changes();
        let backlog = c.nodes.iter().any(|n| !n.outbox.is_empty());
        let retry = backlog || shared.resync.load(Ordering::Acquire);
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)), if backlog => {}
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry && !backlog => {}
            _ = stop.changed() => break,
        }
        for n in &mut c.nodes {
            n.flush();
        }
    }
}

struct Coordinator {
    shared: Arc<Shared>,
    nodes: Vec<Node>,
    slots: SlotMap,
    /// Channel → node it is subscribed on.
    assigned: HashMap<Arc<str>, usize>,
}

impl Coordinator {
    /// Reads the cluster's slot map; starts connections to new masters and
    /// retires those gone. False when there is no map to route with yet.
    async fn refresh_slots(&mut self, stop: &watch::Receiver<bool>) -> bool {
        let shared = &self.shared;
        let Some(publisher) = shared.publisher.get() else { return false };
        let seed_host = super::host_port(shared.seeds[0].addr()).map(|(h, _)| h).unwrap_or_default();
        let map = match script::cluster_slots(publisher, shared.timeout, &seed_host).await {
            Ok(map) if !map.is_empty() => map,
            // Keep routing with the map we have, if any (and then say so
            // only at debug level: a refresh is retried every 500 ms).
            r => {
                let error = r.err().map_or_else(|| "the slot map is empty".to_string(), |e| e.to_string());
                if self.slots.is_empty() {
                    tracing::warn!(%error, "cannot read the Redis Cluster slot map; retrying");
                } else {
                    tracing::debug!(%error, "cannot refresh the Redis Cluster slot map; keeping the last one");
                }
                return !self.slots.is_empty();
            }
        };
        for (_, _, addr) in &map {
            if !self.nodes.iter().any(|n| &n.addr == addr) {
                self.nodes.push(Node::new(addr.clone()));
            }
        }
        // Masters gone from the map are retired (their connection ends);
        // they get a new one if they return.
        for n in &mut self.nodes {
            let in_map = map.iter().any(|(_, _, a)| *a == n.addr);
            if !in_map && n.tx.take().is_some() {
                shared.metrics.nodes.fetch_sub(1, Ordering::Relaxed);
                tracing::info!(node = %format!("{}:{}", n.addr.0, n.addr.1), "Redis node left the cluster's slot map");
            }
            if in_map && n.tx.is_none() {
                n.tx = Some(spawn_node(shared, &n.addr, stop));
            }
        }
        // The slot map says how many masters there are: the seeds no longer.
        shared.metrics.nodes_expected.store(0, Ordering::Relaxed);
        self.slots = map;
        true
    }

    /// Subscribes, moves and releases the channels whose interest or route
    /// changed.
    fn route_changes(&mut self) {
        let shared = Arc::clone(&self.shared);
        let mut changed: Vec<Arc<str>> = Vec::new();
        if shared.lost_all.swap(false, Ordering::AcqRel) {
            self.assigned.clear();
            shared.resync.store(true, Ordering::Release);
        }
        while let Some(name) = shared.lost.pop() {
            // Redis dropped it: subscribe it again, wherever it routes now.
            self.assigned.remove(&name);
            changed.push(name);
        }
        if shared.resync.swap(false, Ordering::AcqRel) {
            changed.extend(shared.router.interested());
            changed.extend(self.assigned.keys().cloned());
        }
        while let Some(name) = shared.dirty.pop() {
            changed.push(name);
        }
        let mut seen = HashSet::new();
        for name in changed {
            if !seen.insert(Arc::clone(&name)) {
                continue;
            }
            let interest = shared.router.has_interest(&name);
            let want = if interest { self.route(&name) } else { None };
            let have = self.assigned.get(&name).copied();
            if interest && want.is_none() {
                // No master owns its slot now: retry at the next resync.
                shared.resync.store(true, Ordering::Release);
            }
            if want == have {
                continue;
            }
            let sent = match want {
                // Unsubscribe only if nobody subscribed meanwhile (decided
                // under the channel's lock); else its change is queued.
                None => match have {
                    Some(node) if shared.channels.release(&shared.router, &name) => {
                        self.assigned.remove(&name);
                        self.nodes[node].send(NodeCmd::Unsubscribe(name))
                    }
                    _ => true,
                },
                Some(node) => {
                    let moved = have.is_none_or(|old| self.nodes[old].send(NodeCmd::Unsubscribe(Arc::clone(&name))));
                    let gen = shared.channels.subscribe(&name);
                    self.assigned.insert(Arc::clone(&name), node);
                    moved && self.nodes[node].send(NodeCmd::Subscribe(name, gen))
                }
            };
            if !sent {
                self.overflowed();
                return;
            }
        }
    }

    /// A node's outbox is full (its connection has been stalled for a
    /// long time): forget every assignment and route everything again
    /// once the queues drain. Subscriber connections apply commands to
    /// their own wanted set, so a later full resubscribe converges.
    fn overflowed(&mut self) {
        tracing::warn!("a Redis subscriber connection is far behind; routing every channel again");
        for n in &mut self.nodes {
            n.outbox.clear();
        }
        self.shared.lost_all.store(true, Ordering::Release);
        self.shared.request_resync();
    }

    /// The node a channel's subscription belongs on.
    fn route(&self, name: &str) -> Option<usize> {
        if !self.shared.cluster {
            return Some(0);
        }
        let slot = resp::key_slot(self.shared.scripts.names.channel(name).as_bytes());
        let addr = &self.slots.iter().find(|(a, b, _)| (*a..=*b).contains(&slot))?.2;
        self.nodes.iter().position(|n| &n.addr == addr && n.tx.is_some())
    }
}

fn spawn_node(shared: &Arc<Shared>, addr: &(String, u16), stop: &watch::Receiver<bool>) -> mpsc::Sender<NodeCmd> {
    let (tx, rx) = mpsc::channel(NODE_QUEUE);
    tokio::task::spawn_local(subscriber::run(Arc::clone(shared), addr.clone(), rx, stop.clone()));
    shared.metrics.nodes.fetch_add(1, Ordering::Relaxed);
    tx
}
