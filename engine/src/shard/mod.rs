//! Shards: one OS thread each, running a current-thread tokio runtime.
//!
//! A shard owns its connections, its channel → local-subscribers index and
//! every connection's outbound queue; only its own thread touches them
//! (`Rc`/`RefCell`, no locks). Other threads reach a shard through its
//! lock-free inbox (messages, see [`inbox`]) and its control channel
//! (connections to adopt, closures to run, shutdown).

pub(crate) mod conn;
pub(crate) mod inbox;
pub(crate) mod sse;
pub(crate) mod ws;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexSet;
use slab::Slab;
use tokio::sync::{mpsc, oneshot, watch};

use crate::message::{Epoch, Message};
use crate::metrics::{Disconnect, ShardMetrics};
use crate::proto::ErrorCode;
use crate::Inner;
use conn::{Conn, Format, Offer, Transport};

/// Messages fanned out per turn before the shard lets its writers run.
const FANOUT_BATCH: usize = 64;
/// Size of the per-shard read buffer shared by all its connections.
pub(crate) const SCRATCH_BYTES: usize = 64 * 1024;

/// One open client connection counted against `max_connections`; released
/// on drop.
#[derive(Debug)]
pub(crate) struct Permit(Arc<AtomicUsize>);

impl Permit {
    pub(crate) fn acquire(counter: &Arc<AtomicUsize>, max: usize) -> Option<Permit> {
        counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Permit(Arc::clone(counter)))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A closure to run on a shard's thread.
pub(crate) type ShardTask = Box<dyn FnOnce(&Rc<Shard>) + Send>;

/// Work handed to a shard from another thread.
pub(crate) enum Control {
    /// Run this on the shard's thread.
    Run(ShardTask),
    /// Serve HTTP on this accepted socket.
    Accept(std::net::TcpStream, Permit),
    /// Drain and stop; reply when done.
    Shutdown(Instant),
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::Run(_) => "Run",
            Control::Accept(..) => "Accept",
            Control::Shutdown(_) => "Shutdown",
        })
    }
}

#[derive(Debug)]
struct LocalChannel {
    epoch: Epoch,
    subscribers: IndexSet<usize>,
}

/// A shard's state, owned by its thread.
#[derive(Debug)]
pub(crate) struct Shard {
    pub id: usize,
    pub inner: Arc<Inner>,
    conns: RefCell<Slab<Rc<Conn>>>,
    index: RefCell<HashMap<Arc<str>, LocalChannel>>,
    /// Connections that overflowed during a fan-out, to unsubscribe after it.
    overflowed: RefCell<Vec<usize>>,
    /// Read buffer shared by every connection of the shard.
    pub scratch: RefCell<Box<[u8]>>,
    /// Open HTTP connections (standalone server).
    http_conns: Cell<usize>,
    /// Tells HTTP connections to finish and close.
    http_shutdown: watch::Sender<bool>,
    draining: Cell<bool>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// The shard running on this thread, if it belongs to the Herald `inner`.
pub(crate) fn current(inner: &Inner) -> Option<Rc<Shard>> {
    CURRENT.with(|c| c.borrow().as_ref().filter(|s| std::ptr::eq(Arc::as_ptr(&s.inner), inner)).cloned())
}

impl Shard {
    pub(crate) fn metrics(&self) -> &ShardMetrics {
        self.inner.metrics.shard(self.id)
    }

    pub(crate) fn conn_count(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Registers a connection and subscribes it to `channels`. On error
    /// nothing stays registered.
    pub(crate) fn open_conn(
        self: &Rc<Self>,
        transport: Transport,
        format: Format,
        channels: &[String],
        permit: Permit,
    ) -> Result<Rc<Conn>, (ErrorCode, String)> {
        if self.draining.get() {
            return Err((ErrorCode::Unavailable, "server is shutting down".into()));
        }
        let conn = {
            let mut conns = self.conns.borrow_mut();
            let entry = conns.vacant_entry();
            let conn = Rc::new(Conn::new(entry.key(), transport, format, permit));
            entry.insert(Rc::clone(&conn));
            conn
        };
        match transport {
            Transport::Ws => self.metrics().ws_opened.inc(),
            Transport::Sse => self.metrics().sse_opened.inc(),
        }
        for ch in channels {
            if let Err(code) = self.subscribe(&conn, ch) {
                self.remove_conn(&conn, Disconnect::Client);
                return Err((code, format!("cannot subscribe to {ch:?}: channel limit reached")));
            }
        }
        Ok(conn)
    }

    /// Removes a finished connection from the shard.
    pub(crate) fn remove_conn(&self, conn: &Conn, reason: Disconnect) {
        let channels: Vec<Arc<str>> = std::mem::take(&mut *conn.subs.borrow_mut());
        for ch in channels {
            self.unindex(conn.key, &ch);
        }
        if self.conns.borrow_mut().try_remove(conn.key).is_some() {
            let m = self.metrics();
            match conn.transport {
                Transport::Ws => m.ws_closed.inc(),
                Transport::Sse => m.sse_closed.inc(),
            }
            m.disconnect(reason);
        }
    }

    /// Subscribes `conn` to `channel` (already validated); idempotent.
    pub(crate) fn subscribe(&self, conn: &Conn, channel: &str) -> Result<Epoch, ErrorCode> {
        let mut index = self.index.borrow_mut();
        if let Some(local) = index.get(channel) {
            if local.subscribers.contains(&conn.key) {
                return Ok(local.epoch);
            }
        }
        if conn.subs.borrow().len() >= self.inner.config.max_subscriptions {
            return Err(ErrorCode::Limit);
        }
        let (name, epoch) = match index.get_key_value(channel) {
            Some((name, local)) => (Arc::clone(name), local.epoch),
            None => {
                let (name, epoch, first) = self.inner.channels.subscribe(channel, self.id).map_err(|_| ErrorCode::Limit)?;
                index.insert(Arc::clone(&name), LocalChannel { epoch, subscribers: IndexSet::new() });
                if first {
                    self.inner.interest_changed(&name);
                }
                (name, epoch)
            }
        };
        if let Some(local) = index.get_mut(channel) {
            local.subscribers.insert(conn.key);
        }
        conn.subs.borrow_mut().push(name);
        self.metrics().subscriptions_added.inc();
        Ok(epoch)
    }

    /// Unsubscribes `conn` from `channel`; returns whether it was subscribed.
    pub(crate) fn unsubscribe(&self, conn: &Conn, channel: &str) -> bool {
        let mut subs = conn.subs.borrow_mut();
        let Some(pos) = subs.iter().position(|c| &**c == channel) else { return false };
        let name = subs.swap_remove(pos);
        drop(subs);
        self.unindex(conn.key, &name);
        true
    }

    fn unindex(&self, key: usize, channel: &str) {
        let mut index = self.index.borrow_mut();
        let Some(local) = index.get_mut(channel) else { return };
        if local.subscribers.swap_remove(&key) {
            self.metrics().subscriptions_removed.inc();
        }
        if local.subscribers.is_empty() {
            if let Some((name, _)) = index.remove_entry(channel) {
                if self.inner.channels.unsubscribe(&name, self.id) {
                    self.inner.interest_changed(&name);
                }
            }
        }
    }

    /// Queues a reply or control frame for `conn` under the configured
    /// bound and slow-consumer policy.
    pub(crate) fn send_to(&self, conn: &Conn, frame: bytes::Bytes) -> bool {
        let cfg = &self.inner.config;
        conn.send_control(frame, cfg.outbound_queue_bytes, cfg.slow_consumer, self.metrics())
    }

    /// Appends one message to every local subscriber's queue.
    fn fan_out(&self, msg: &Message) {
        let index = self.index.borrow();
        let Some(local) = index.get(&*msg.channel) else { return };
        let conns = self.conns.borrow();
        let metrics = self.metrics();
        let cfg = &self.inner.config;
        let mut forms: [Option<&bytes::Bytes>; 4] = [None; 4];
        for &key in &local.subscribers {
            let Some(conn) = conns.get(key) else { continue };
            let frame = *forms[conn.form as usize].get_or_insert_with(|| msg.frame(conn.form, metrics));
            if conn.offer(msg, frame, cfg.outbound_queue_bytes, cfg.slow_consumer, metrics) == Offer::Overflow {
                self.overflowed.borrow_mut().push(key);
            }
        }
    }

    /// Takes slow consumers out of the index once no fan-out is iterating it.
    fn unindex_overflowed(&self) {
        let keys = std::mem::take(&mut *self.overflowed.borrow_mut());
        for key in keys {
            let conn = self.conns.borrow().get(key).cloned();
            if let Some(conn) = conn {
                let channels: Vec<Arc<str>> = std::mem::take(&mut *conn.subs.borrow_mut());
                for ch in channels {
                    self.unindex(key, &ch);
                }
            }
        }
    }

    async fn run_inbox(self: Rc<Self>) {
        let inbox = self.inner.dispatch.inbox(self.id);
        loop {
            inbox.wait().await;
            let mut n = 0;
            while let Some(msg) = inbox.pop() {
                self.fan_out(&msg);
                n += 1;
                if n == FANOUT_BATCH {
                    self.unindex_overflowed();
                    n = 0;
                    tokio::task::yield_now().await;
                }
            }
            self.unindex_overflowed();
        }
    }

    /// Fans out whatever is queued now (used before draining).
    fn flush_inbox(&self) {
        let inbox = self.inner.dispatch.inbox(self.id);
        while let Some(msg) = inbox.pop() {
            self.fan_out(&msg);
        }
        self.unindex_overflowed();
    }

    fn begin_drain(&self) {
        self.draining.set(true);
        let _ = self.http_shutdown.send(true);
        self.flush_inbox();
        let conns: Vec<Rc<Conn>> = self.conns.borrow().iter().map(|(_, c)| Rc::clone(c)).collect();
        for conn in conns {
            let last = (conn.transport == Transport::Ws).then(|| crate::proto::frame::encode_close(1001, "going away"));
            conn.close(Disconnect::Shutdown, false, last);
        }
    }

    pub(crate) fn http_shutdown(&self) -> watch::Receiver<bool> {
        self.http_shutdown.subscribe()
    }

    pub(crate) fn http_opened(&self) {
        self.http_conns.set(self.http_conns.get() + 1);
    }

    pub(crate) fn http_closed(&self) {
        self.http_conns.set(self.http_conns.get() - 1);
    }
}

/// Starts shard `id`'s thread. `done` is signalled when it has stopped.
pub(crate) fn spawn(
    id: usize,
    inner: Arc<Inner>,
    mut control: mpsc::Receiver<Control>,
    listener: Option<std::net::TcpListener>,
    done: oneshot::Sender<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("herald-shard-{id}")).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(shard = id, error = %e, "cannot start the shard runtime");
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let shard = Rc::new(Shard {
                id,
                inner,
                conns: RefCell::new(Slab::new()),
                index: RefCell::new(HashMap::new()),
                overflowed: RefCell::new(Vec::new()),
                scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
                http_conns: Cell::new(0),
                http_shutdown: watch::channel(false).0,
                draining: Cell::new(false),
            });
            CURRENT.with(|c| *c.borrow_mut() = Some(Rc::clone(&shard)));
            tokio::task::spawn_local(Rc::clone(&shard).run_inbox());
            let acceptor = listener.map(|l| tokio::task::spawn_local(crate::http::accept_loop(Rc::clone(&shard), l)));
            let mut deadline = None;
            while let Some(ctl) = control.recv().await {
                match ctl {
                    Control::Run(f) => f(&shard),
                    Control::Accept(stream, permit) => crate::http::serve_accepted(&shard, stream, permit),
                    Control::Shutdown(d) => {
                        deadline = Some(d);
                        break;
                    }
                }
            }
            if let Some(a) = acceptor {
                a.abort();
            }
            shard.begin_drain();
            let deadline = deadline.unwrap_or_else(Instant::now);
            while (shard.conn_count() > 0 || shard.http_conns.get() > 0) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            CURRENT.with(|c| *c.borrow_mut() = None);
        });
        drop(local);
        drop(rt);
        let _ = done.send(());
    })
}

/// A shard's fan-out step without sockets, for the micro benches: one
/// message offered to `n` in-memory subscriber queues, then taken off
/// them as a writer would.
#[doc(hidden)]
#[derive(Debug)]
pub struct FanoutBench {
    conns: Vec<Conn>,
    metrics: ShardMetrics,
}

impl FanoutBench {
    /// `n` WebSocket subscribers in the JSON format.
    pub fn new(n: usize) -> FanoutBench {
        let counter = Arc::new(AtomicUsize::new(0));
        let conns = (0..n)
            .filter_map(|key| Permit::acquire(&counter, usize::MAX).map(|p| Conn::new(key, Transport::Ws, Format::Json, p)))
            .collect();
        FanoutBench { conns, metrics: ShardMetrics::default() }
    }

    /// Encodes `payload` once, queues it for every subscriber and drains
    /// the queues; returns the deliveries.
    pub fn run(&self, channel: &Arc<str>, offset: u64, payload: &crate::Payload) -> usize {
        let msg = Message::new(Arc::clone(channel), offset, payload.clone());
        let policy = crate::SlowConsumerPolicy::Disconnect;
        for c in &self.conns {
            let frame = msg.frame(c.form, &self.metrics);
            c.offer(&msg, frame, 1 << 20, policy, &self.metrics);
        }
        for c in &self.conns {
            let mut out = c.out.borrow_mut();
            while out.pop_frame(&self.metrics, Transport::Ws).is_some() {}
        }
        self.conns.len()
    }
}
