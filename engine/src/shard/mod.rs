//! Shards: one OS thread each, running a current-thread tokio runtime.
//!
//! A shard owns its connections, its channel → local-subscribers index and
//! every connection's outbound queue; only its own thread touches them
//! (`Rc`/`RefCell`, no locks). Other threads reach a shard through its
//! lock-free inbox (messages, see [`inbox`]) and its control channel
//! (closures to run, shutdown).
//!
//! A shard knows nothing of HTTP, routing or brokers: it calls up only
//! through the [`Upstream`] its engine gives it. Work that must finish
//! before the shard stops (an HTTP connection, say) holds a [`TaskGuard`]
//! and watches [`Shard::drain_signal`].

pub(crate) mod conn;
pub(crate) mod inbox;
pub(crate) mod sse;
pub(crate) mod ws;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexSet;
use slab::Slab;
use tokio::sync::{mpsc, oneshot, watch};

use crate::broker::{HistoryError, Page, Pending as Answer, Start};
use crate::config::Config;
use crate::message::{Encode, Epoch, Message, Position, PublishFuture};
use crate::metrics::{Disconnect, Metrics, ShardMetrics};
use crate::proto::json::Payload;
use crate::proto::ErrorCode;
pub(crate) use conn::Access;
use conn::{Check, Conn, ConnLog, Format, Offer, Pending, Transport};
use inbox::Inbox;

/// A boxed future that may move between threads.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a shard asks of the engine above it.
pub(crate) trait Upstream: Send + Sync + 'static {
    fn config(&self) -> &Config;
    fn metrics(&self) -> &Metrics;
    /// The inbound message queue of shard `shard`.
    fn inbox(&self, shard: usize) -> &Inbox;
    /// `shard` has its first subscriber to `channel`: returns the shared
    /// name, or `None` when the node has as many channels as it may.
    fn joined(&self, channel: &str, shard: usize) -> Option<Arc<str>>;
    /// `shard`'s last subscriber to `channel` left.
    fn left(&self, channel: &Arc<str>, shard: usize);
    /// Publishes from a client of this shard (checked like every publish).
    /// With an idempotency key, a repeat publishes nothing and gets the
    /// first publish's result.
    fn publish(&self, channel: &str, payload: Payload, key: Option<&str>) -> PublishFuture;
    /// Where a subscription this shard just added starts, and what it
    /// missed since `since` (see [`crate::broker::Broker::starting_point`]).
    fn starting_point(&self, channel: &str, since: Option<Position>) -> Answer<Result<Start, HistoryError>>;
    /// A page of the channel's history.
    fn history(&self, channel: &str, since: Option<Position>, limit: usize) -> Answer<Result<Page, HistoryError>>;
    /// The token verifier, when `[auth]` is set.
    fn auth(&self) -> Option<&crate::auth::Auth>;
    /// The namespaces' rules.
    fn rules(&self) -> &crate::config::ChannelRules;
    /// The application's hooks, when `[proxy]` is set.
    fn proxy(&self) -> Option<&crate::proxy::Proxy>;
    /// A subscription of a connection of `user` to `channel` started
    /// (`joined`) or ended (presence channels count it).
    fn presence_changed(&self, channel: &Arc<str>, user: Option<&str>, joined: bool);
    /// Who is subscribed to a presence channel.
    fn presence(&self, channel: &str) -> Answer<Result<crate::presence::Snapshot, HistoryError>>;
}

/// Messages fanned out per turn before the shard writes and lets other
/// tasks run.
const FANOUT_BATCH: usize = 64;
/// Connections the fan-out writes to between two yields.
const WRITE_CHUNK: usize = 64;
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
    /// Drain and stop; reply when done.
    Shutdown(Instant),
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::Run(_) => "Run",
            Control::Shutdown(_) => "Shutdown",
        })
    }
}

/// Work that keeps its shard from stopping until it ends (or the drain
/// deadline passes); counted while the guard lives.
#[derive(Debug)]
pub(crate) struct TaskGuard(Rc<Shard>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.tasks.set(self.0.tasks.get() - 1);
    }
}

/// A shard's state, owned by its thread.
pub(crate) struct Shard {
    pub id: usize,
    pub up: Arc<dyn Upstream>,
    conns: RefCell<Slab<Rc<Conn>>>,
    /// Channel → local subscribers (connection keys).
    index: RefCell<HashMap<Arc<str>, IndexSet<usize>>>,
    /// Connections that overflowed during a fan-out, to unsubscribe after it.
    overflowed: RefCell<Vec<usize>>,
    /// Read buffer shared by every connection of the shard.
    pub scratch: RefCell<Box<[u8]>>,
    /// Live [`TaskGuard`]s.
    tasks: Cell<usize>,
    /// Set when the shard starts draining.
    drain: watch::Sender<bool>,
    /// How many slow-consumer cuts were said lately (a burst is a few lines).
    slow_log: Cell<LogBudget>,
}

/// At most [`LogBudget::LINES`] lines per [`LogBudget::WINDOW`]; the rest
/// are counted and said as one line when the next window opens.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LogBudget {
    window: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl LogBudget {
    pub(crate) const LINES: u32 = 10;
    pub(crate) const WINDOW: Duration = Duration::from_secs(10);

    /// Whether a line may be written at `now`, and how many went unsaid in
    /// the window before (to say first).
    pub(crate) fn admit(&mut self, now: Instant) -> (bool, Option<u64>) {
        let mut unsaid = None;
        if self.window.is_none_or(|w| now.duration_since(w) >= Self::WINDOW) {
            unsaid = (self.suppressed > 0).then_some(self.suppressed);
            *self = LogBudget { window: Some(now), lines: 0, suppressed: 0 };
        }
        if self.lines < Self::LINES {
            self.lines += 1;
            (true, unsaid)
        } else {
            self.suppressed += 1;
            (false, unsaid)
        }
    }
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).field("conns", &self.conn_count()).finish_non_exhaustive()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// The shard running on this thread, if it serves `up`.
pub(crate) fn current<U: Upstream>(up: &U) -> Option<Rc<Shard>> {
    let want = up as *const U as *const ();
    CURRENT.with(|c| c.borrow().as_ref().filter(|s| std::ptr::eq(Arc::as_ptr(&s.up) as *const (), want)).cloned())
}

impl Shard {
    pub(crate) fn metrics(&self) -> &ShardMetrics {
        self.up.metrics().shard(self.id)
    }

    pub(crate) fn config(&self) -> &Config {
        self.up.config()
    }

    fn draining(&self) -> bool {
        *self.drain.borrow()
    }

    /// Resolves once the shard starts draining.
    pub(crate) fn drain_signal(&self) -> impl Future<Output = ()> + 'static {
        let mut rx = self.drain.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Counts work that the shard waits for when it drains.
    pub(crate) fn task_guard(self: &Rc<Self>) -> TaskGuard {
        self.tasks.set(self.tasks.get() + 1);
        TaskGuard(Rc::clone(self))
    }

    pub(crate) fn conn_count(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Registers a connection and subscribes it to `channels`. On error
    /// nothing stays registered.
    /// An SSE stream carries each message's position in its `id:` line
    /// (the shared bytes for one channel; for several, every channel's
    /// position, written before the shared bytes), starts at each channel's
    /// top (announced by `event: subscribed` in `format=json`) and, given
    /// `since` (its `Last-Event-ID`: one position per channel, in order),
    /// replays what it missed first.
    // `since` is for SSE streams, `deflate` for WebSockets: one call site each.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open_conn(
        self: &Rc<Self>,
        transport: Transport,
        format: Format,
        channels: &[String],
        since: Option<Vec<Position>>,
        access: Access,
        permit: Permit,
        deflate: Option<crate::proto::deflate::Agreed>,
        remote: Option<std::net::SocketAddr>,
    ) -> Result<Rc<Conn>, OpenError> {
        if self.draining() {
            return Err(OpenError::ShuttingDown);
        }
        let positioned = transport == Transport::Sse && channels.len() == 1;
        let conn = {
            let mut conns = self.conns.borrow_mut();
            let entry = conns.vacant_entry();
            let mut conn = Conn::new(entry.key(), transport, format, permit);
            conn.remote = remote;
            if tracing::enabled!(target: "herald::conn", tracing::Level::DEBUG) {
                let span = tracing::debug_span!(
                    target: "herald::conn",
                    "conn",
                    conn = entry.key(),
                    transport = %transport.as_str(),
                    shard = self.id,
                    remote = %crate::accept::DisplayAddr(remote),
                    user = %access.user().unwrap_or("-"),
                );
                span.in_scope(
                    || tracing::debug!(target: "herald::conn", channels = channels.len(), compression = deflate.is_some(), "opened"),
                );
                conn.log = Some(Box::new(ConnLog { span, opened: std::time::Instant::now() }));
            }
            if positioned {
                conn.form = conn.form.with_id();
            }
            if let Some(agreed) = deflate {
                conn.deflate = Some(agreed);
                // The benchmarks' per-connection mode keeps the plain form
                // and compresses each delivery (see `fan_out`).
                if !self.config().compression_per_connection {
                    conn.form = conn.form.deflated();
                }
                self.metrics().compression_opened.inc();
            }
            let conn = Rc::new(conn);
            entry.insert(Rc::clone(&conn));
            conn
        };
        match transport {
            Transport::Ws => self.metrics().ws_opened.inc(),
            Transport::Sse => self.metrics().sse_opened.inc(),
        }
        *conn.access.borrow_mut() = access;
        self.watch_expiry(&conn);
        for ch in channels {
            if let Err(e) = self.subscribe(&conn, ch) {
                self.remove_conn(&conn, Disconnect::Client);
                return Err(OpenError::Subscribe { channel: ch.clone(), source: e });
            }
        }
        if transport == Transport::Sse {
            self.start_sse(&conn, format, channels, since);
        }
        Ok(conn)
    }

    /// Places an SSE stream's subscriptions at their tops, or recovers
    /// them from `since`. With a Redis broker the starts are read first
    /// (live messages held meanwhile); a start that cannot be read ends the
    /// stream (its client reconnects with its position).
    fn start_sse(self: &Rc<Self>, conn: &Rc<Conn>, format: Format, channels: &[String], since: Option<Vec<Position>>) {
        let n = channels.len();
        let sinces: Vec<Option<Position>> = match since {
            None => vec![None; n],
            Some(list) if list.len() == n => list.into_iter().map(Some).collect(),
            // Not one position per channel: nothing can be recovered.
            Some(_) => vec![Some(Position::nowhere()); n],
        };
        let mut answers = Vec::with_capacity(n);
        for (ch, s) in channels.iter().zip(&sinces) {
            answers.push(self.up.starting_point(ch, *s));
        }
        if answers.iter().all(|a| matches!(a, Answer::Ready(_))) {
            let mut starts = Vec::with_capacity(n);
            for a in answers {
                let Answer::Ready(Ok(start)) = a else { return };
                starts.push(start);
            }
            self.finish_sse(conn, format, channels, &sinces, starts);
            return;
        }
        for name in conn.subs.borrow().iter() {
            conn.hold(name);
        }
        let (shard, conn, channels) = (Rc::clone(self), Rc::clone(conn), channels.to_vec());
        tokio::task::spawn_local(async move {
            let mut starts = Vec::with_capacity(n);
            for a in answers {
                match a.get().await {
                    Ok(s) => starts.push(s),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot start an SSE stream's subscription; ending the stream");
                        conn.close(Disconnect::Unavailable, Pending::Keep, None);
                        return;
                    }
                }
            }
            if conn.out.borrow().closing().is_none() {
                shard.finish_sse(&conn, format, &channels, &sinces, starts);
            }
        });
    }

    fn finish_sse(&self, conn: &Conn, format: Format, channels: &[String], sinces: &[Option<Position>], mut starts: Vec<Start>) {
        use crate::broker::{Miss, Recovery};
        let n = channels.len();
        if n > 1 {
            // All the replays, with their id lines, must fit the queue
            // together, or none is made.
            let enc = self.encode();
            let id_bytes = 4 + n * 30;
            let bytes: usize = starts
                .iter()
                .filter_map(|s| match &s.recovery {
                    Some(Recovery::Recovered(m)) => Some(m.iter().map(|m| m.frame(conn.form, &enc).len() + id_bytes).sum::<usize>()),
                    _ => None,
                })
                .sum();
            if bytes + conn.queued_bytes() + conn.held_bytes() + 256 * n > self.config().outbound_queue_bytes {
                for s in &mut starts {
                    if matches!(s.recovery, Some(Recovery::Recovered(_))) {
                        s.recovery = Some(Recovery::Missed(Miss::TooMany));
                    }
                }
            }
            let subs = conn.subs.borrow().clone();
            let positions = channels
                .iter()
                .zip(&starts)
                .zip(sinces)
                .filter_map(|((ch, s), since)| {
                    let name = subs.iter().find(|c| ***c == **ch)?;
                    let at = match (&s.recovery, since) {
                        (Some(Recovery::Recovered(_)), Some(p)) => p.offset,
                        _ => s.top,
                    };
                    Some((Arc::clone(name), s.epoch, at))
                })
                .collect();
            conn.set_positions(positions);
        }
        for (ch, start) in channels.iter().zip(starts) {
            self.start_subscription(conn, ch, start, true, |epoch, top, recovered| {
                (format == Format::Json).then(|| crate::proto::json::sse_subscribed(ch, epoch.as_str(), top, recovered))
            });
        }
    }

    /// Ends `conn` when its token expires (plus the leeway) without a
    /// refresh: a WebSocket is closed with 4001 `token expired`, an SSE
    /// stream ends. One watcher per connection, holding it weakly.
    pub(crate) fn watch_expiry(self: &Rc<Self>, conn: &Rc<Conn>) {
        if conn.access.borrow().expires_at().is_none() || conn.watched.replace(true) {
            return;
        }
        let leeway = self.up.auth().map_or(0, crate::auth::Auth::leeway_s);
        let (shard, weak) = (Rc::clone(self), Rc::downgrade(conn));
        tokio::task::spawn_local(async move {
            loop {
                let deadline = {
                    let Some(conn) = weak.upgrade() else { return };
                    if conn.out.borrow().closing().is_some() {
                        return;
                    }
                    let Some(exp) = conn.access.borrow().expires_at() else {
                        conn.watched.set(false);
                        return;
                    };
                    let (deadline, now) = (exp.saturating_add(leeway), crate::auth::unix_now());
                    if now >= deadline {
                        shard.metrics().auth[crate::auth::TokenError::EXPIRED].inc();
                        let last = (conn.transport == Transport::Ws).then(|| crate::proto::frame::encode_close(4001, "token expired"));
                        conn.close(Disconnect::TokenExpired, Pending::Keep, last);
                        return;
                    }
                    deadline - now
                };
                tokio::time::sleep(Duration::from_secs(deadline)).await;
            }
        });
    }

    /// This shard's connections of `user`.
    fn conns_of(&self, user: &str) -> Vec<Rc<Conn>> {
        self.conns.borrow().iter().filter(|(_, c)| c.access.borrow().user() == Some(user)).map(|(_, c)| Rc::clone(c)).collect()
    }

    /// Closes every connection of `user` (a WebSocket with 4002
    /// `disconnected`); returns how many.
    pub(crate) fn disconnect_user(&self, user: &str) -> usize {
        let conns = self.conns_of(user);
        for conn in &conns {
            let last = (conn.transport == Transport::Ws).then(|| crate::proto::frame::encode_close(4002, "disconnected"));
            conn.close(Disconnect::ServerApi, Pending::Keep, last);
        }
        conns.len()
    }

    /// Unsubscribes every connection of `user` from `channel`: a
    /// WebSocket is told (`unsubscribed`, no `id`), an SSE stream left
    /// with no channel ends. Returns how many.
    pub(crate) fn unsubscribe_user(&self, user: &str, channel: &str) -> usize {
        let conns = self.conns_of(user);
        let mut touched = 0;
        for conn in &conns {
            // A subscribe waiting for the hook is undone too.
            let cancelled = conn.cancel_hooked(channel);
            let subscribed = self.unsubscribe(conn, channel);
            if subscribed {
                match conn.transport {
                    Transport::Ws if conn.format == Format::Json => {
                        self.send_to(conn, crate::proto::json::reply_unsubscribed(channel, None));
                    }
                    Transport::Sse if conn.subs.borrow().is_empty() => conn.close(Disconnect::ServerApi, Pending::Keep, None),
                    _ => {}
                }
            }
            touched += usize::from(subscribed || cancelled);
        }
        touched
    }

    /// This shard's channels and their subscriber counts.
    pub(crate) fn channel_counts(&self) -> Vec<(Arc<str>, usize)> {
        self.index.borrow().iter().map(|(c, subs)| (Arc::clone(c), subs.len())).collect()
    }

    /// Removes a finished connection from the shard.
    pub(crate) fn remove_conn(&self, conn: &Conn, reason: Disconnect) {
        // Work still waiting for it (a hook's answer, a broker's start)
        // sees it closed, and touches nothing: its slab key may be reused.
        conn.close(reason, Pending::Discard, None);
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
            if conn.deflate.is_some() {
                m.compression_closed.inc();
            }
            m.disconnect(reason);
            let said = if reason == Disconnect::SlowConsumer {
                let mut budget = self.slow_log.get();
                let (say, unsaid) = budget.admit(Instant::now());
                self.slow_log.set(budget);
                if let Some(n) = unsaid {
                    tracing::info!(target: "herald::conn", shard = self.id, count = n, "more slow consumers cut, unsaid (herald_disconnects_total counts them all)");
                }
                say
            } else {
                true
            };
            log_close(self.id, conn, reason, said);
        }
    }

    /// Subscribes `conn` to `channel` (already validated). Returns whether
    /// this created the subscription (false: it was there already).
    pub(crate) fn subscribe(&self, conn: &Conn, channel: &str) -> Result<bool, SubscribeError> {
        let mut index = self.index.borrow_mut();
        if index.get(channel).is_some_and(|subs| subs.contains(&conn.key)) {
            return Ok(false);
        }
        let max = self.config().max_subscriptions;
        if conn.subs.borrow().len() >= max {
            return Err(SubscribeError::PerConnection(max));
        }
        let name = match index.get_key_value(channel) {
            Some((name, _)) => Arc::clone(name),
            None => {
                let name = self.up.joined(channel, self.id).ok_or(SubscribeError::Channels)?;
                index.insert(Arc::clone(&name), IndexSet::new());
                name
            }
        };
        if let Some(subs) = index.get_mut(channel) {
            subs.insert(conn.key);
        }
        drop(index);
        self.up.presence_changed(&name, conn.access.borrow().user(), true);
        conn.subs.borrow_mut().push(name);
        self.metrics().subscriptions_added.inc();
        Ok(true)
    }

    /// Unsubscribes `conn` from `channel`; returns whether it was subscribed.
    pub(crate) fn unsubscribe(&self, conn: &Conn, channel: &str) -> bool {
        let mut subs = conn.subs.borrow_mut();
        let Some(pos) = subs.iter().position(|c| &**c == channel) else { return false };
        let name = subs.swap_remove(pos);
        drop(subs);
        conn.clear_seam(&name);
        self.unindex(conn.key, &name);
        true
    }

    fn unindex(&self, key: usize, channel: &str) {
        let mut index = self.index.borrow_mut();
        let Some(subs) = index.get_mut(channel) else { return };
        if subs.swap_remove(&key) {
            self.metrics().subscriptions_removed.inc();
            let name = index.get_key_value(channel).map(|(n, _)| Arc::clone(n));
            if let (Some(conn), Some(name)) = (self.conns.borrow().get(key), name) {
                self.up.presence_changed(&name, conn.access.borrow().user(), false);
            }
        }
        let Some(subs) = index.get_mut(channel) else { return };
        if subs.is_empty() {
            if let Some((name, _)) = index.remove_entry(channel) {
                self.up.left(&name, self.id);
            }
        }
    }

    /// Answers a subscribe the broker placed: from the channel's top, with
    /// what the client missed when it gave a position. Live messages up to
    /// the top are skipped for this connection (a new subscription's, that
    /// is: they were published before it started, or are replayed now);
    /// those held while the start was read follow the replay. `reply` makes
    /// the answer (`subscribed`) from the epoch, the top and whether it
    /// recovered, queued before the replay.
    pub(crate) fn start_subscription(
        &self,
        conn: &Conn,
        channel: &str,
        start: crate::broker::Start,
        created: bool,
        reply: impl FnOnce(Epoch, u64, Option<bool>) -> Option<bytes::Bytes>,
    ) {
        use crate::broker::{Miss, Recovery};
        let top = start.top;
        let mut held = Vec::new();
        if created {
            let name = conn.subs.borrow().iter().find(|c| ***c == *channel).cloned();
            if let Some(name) = name {
                held = conn.set_seam(&name, start.epoch, top);
            }
        }
        let metrics = self.metrics();
        let enc = self.encode();
        let cfg = self.config();
        let mut recovery = start.recovery;
        // The replay must fit the connection's queue whole, with room for the
        // reply, or it would meet the slow-consumer policy half way: all or
        // nothing, so nothing.
        if let Some(Recovery::Recovered(messages)) = &recovery {
            let bytes: usize = messages.iter().map(|m| conn.frame_of(m, &enc).len()).sum();
            if bytes + conn.queued_bytes() + conn.held_bytes() + 256 + channel.len() > cfg.outbound_queue_bytes {
                recovery = Some(Recovery::Missed(Miss::TooMany));
            }
        }
        let recovered = recovery.as_ref().map(|r| matches!(r, Recovery::Recovered(_)));
        if let Some(frame) = reply(start.epoch, top, recovered) {
            self.send_to(conn, frame);
        }
        match recovery {
            None => {}
            Some(Recovery::Missed(why)) => metrics.recoveries[1 + why as usize].inc(),
            Some(Recovery::Recovered(messages)) => {
                metrics.recoveries[0].inc();
                metrics.replayed.add(messages.len() as u64);
                for m in &messages {
                    let frame = conn.frame_of(m, &enc);
                    if conn.replay(m, frame, cfg.outbound_queue_bytes, cfg.slow_consumer, metrics) == Offer::Closed {
                        break;
                    }
                }
            }
        }
        for m in &held {
            self.offer_live(conn, m, conn.frame_of(m, &enc));
        }
        if !held.is_empty() && conn.take_flush_due() {
            conn.out.borrow_mut().wake();
        }
    }

    /// Offers one live message (or notice), whose frame for `conn` is
    /// `frame`, to `conn` past its seam. `None` when nothing was offered as
    /// a message: skipped or held by the seam, or queued as a notice.
    fn offer_live(&self, conn: &Conn, msg: &Arc<Message>, frame: &bytes::Bytes) -> Option<Offer> {
        let (cfg, metrics) = (self.config(), self.metrics());
        match conn.check_seam(msg, frame.len(), cfg.outbound_queue_bytes, cfg.slow_consumer, metrics) {
            // A join or leave is bounded like a reply (raw forms get none).
            Check::Pass if msg.is_presence() => {
                (!frame.is_empty()).then(|| conn.event(frame, cfg.outbound_queue_bytes, cfg.slow_consumer, metrics))
            }
            Check::Pass if msg.is_notice() => {
                conn.notice(msg, frame, cfg.outbound_queue_bytes);
                None
            }
            Check::Pass => Some(conn.offer(msg, frame, cfg.outbound_queue_bytes, cfg.slow_consumer, metrics)),
            Check::Skip | Check::Held => None,
            Check::Over(o) => Some(o),
        }
    }

    /// How this shard encodes messages: its counters, the compression settings.
    pub(crate) fn encode(&self) -> Encode<'_> {
        let cfg = self.config();
        Encode { metrics: self.metrics(), level: cfg.compression_level, min_bytes: cfg.compression_min_bytes }
    }

    /// Queues a reply or control frame for `conn` under the configured
    /// bound and slow-consumer policy; a data frame to a connection that
    /// agreed compression is compressed first (by the same rules as
    /// messages).
    pub(crate) fn send_to(&self, conn: &Conn, frame: bytes::Bytes) -> bool {
        let cfg = self.config();
        let frame = match conn.deflate {
            Some(agreed) => self.encode().deflate_reply(frame, agreed.send_limit()),
            None => frame,
        };
        conn.send_control(frame, cfg.outbound_queue_bytes, cfg.slow_consumer, self.metrics())
    }

    /// Appends one message to every local subscriber's queue; connections
    /// the shard is to write itself go into `dirty` (once each).
    fn fan_out(&self, msg: &Arc<Message>, dirty: &mut Vec<Rc<Conn>>) {
        let index = self.index.borrow();
        let Some(subs) = index.get(&*msg.channel) else { return };
        let conns = self.conns.borrow();
        let enc = self.encode();
        let per_connection = self.config().compression_per_connection;
        let mut forms: [Option<&bytes::Bytes>; 8] = [None; 8];
        for &key in subs {
            let Some(conn) = conns.get(key) else { continue };
            let mut frame = *forms[conn.form as usize].get_or_insert_with(|| msg.frame(conn.form, &enc));
            if conn.narrow_window() {
                frame = conn.frame_of(msg, &enc);
            }
            let owned;
            if let (true, Some(agreed)) = (per_connection, conn.deflate) {
                // The benchmarks' baseline: one deflate per delivery.
                if crate::proto::frame::server_payload(frame).len() <= agreed.send_limit() {
                    owned = enc.deflate(frame, 0).unwrap_or_else(|| frame.clone());
                    frame = &owned;
                }
            }
            let Some(offer) = self.offer_live(conn, msg, frame) else { continue };
            match offer {
                Offer::Overflow => self.overflowed.borrow_mut().push(key),
                Offer::Queued if conn.take_flush_due() => dirty.push(Rc::clone(conn)),
                _ => {}
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
        let inbox = self.up.inbox(self.id);
        let mut dirty = Vec::new();
        loop {
            inbox.wait().await;
            let mut n = 0;
            while let Some(msg) = inbox.pop() {
                self.fan_out(&msg, &mut dirty);
                n += 1;
                if n == FANOUT_BATCH {
                    self.unindex_overflowed();
                    self.write_dirty(&mut dirty).await;
                    n = 0;
                }
            }
            self.unindex_overflowed();
            self.write_dirty(&mut dirty).await;
        }
    }

    /// Writes the frames a batch of messages queued, connection by
    /// connection, with one `writev` each (several frames when several
    /// messages came). Every [`WRITE_CHUNK`] connections it yields, so a
    /// request that arrived meanwhile (a publish waiting for its reply) is
    /// served between chunks rather than after the whole fan-out.
    async fn write_dirty(&self, dirty: &mut Vec<Rc<Conn>>) {
        let metrics = self.metrics();
        let mut written = 0;
        for conn in dirty.drain(..) {
            conn.write_now(metrics);
            written += 1;
            if written % WRITE_CHUNK == 0 {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Fans out whatever is queued now (used before draining): the
    /// connections' tasks write it.
    fn flush_inbox(&self) {
        let inbox = self.up.inbox(self.id);
        let mut dirty = Vec::new();
        while let Some(msg) = inbox.pop() {
            self.fan_out(&msg, &mut dirty);
        }
        for conn in dirty {
            conn.out.borrow_mut().wake();
        }
        self.unindex_overflowed();
    }

    fn begin_drain(&self) {
        let _ = self.drain.send(true);
        self.flush_inbox();
        let conns: Vec<Rc<Conn>> = self.conns.borrow().iter().map(|(_, c)| Rc::clone(c)).collect();
        for conn in conns {
            let last = (conn.transport == Transport::Ws).then(|| crate::proto::frame::encode_close(1001, "going away"));
            conn.close(Disconnect::Shutdown, Pending::Keep, last);
        }
    }
}

/// Why a shard could not register a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("cannot subscribe to {channel:?}: {source}")]
    Subscribe { channel: String, source: SubscribeError },
}

impl OpenError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            OpenError::ShuttingDown => ErrorCode::Unavailable,
            OpenError::Subscribe { .. } => ErrorCode::Limit,
        }
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SubscribeError {
    #[error("subscription limit reached ({0} per connection)")]
    PerConnection(usize),
    #[error("channel limit reached")]
    Channels,
}

/// Starts shard `id`'s thread. `done` is signalled when it has stopped.
pub(crate) fn spawn(
    id: usize,
    up: Arc<dyn Upstream>,
    mut control: mpsc::Receiver<Control>,
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
                up,
                conns: RefCell::new(Slab::new()),
                index: RefCell::new(HashMap::new()),
                overflowed: RefCell::new(Vec::new()),
                scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
                tasks: Cell::new(0),
                drain: watch::channel(false).0,
                slow_log: Cell::new(LogBudget::default()),
            });
            CURRENT.with(|c| *c.borrow_mut() = Some(Rc::clone(&shard)));
            tokio::task::spawn_local(Rc::clone(&shard).run_inbox());
            let mut deadline = None;
            while let Some(ctl) = control.recv().await {
                match ctl {
                    Control::Run(f) => f(&shard),
                    Control::Shutdown(d) => {
                        deadline = Some(d);
                        break;
                    }
                }
            }
            shard.begin_drain();
            let deadline = deadline.unwrap_or_else(Instant::now);
            while (shard.conn_count() > 0 || shard.tasks.get() > 0) && Instant::now() < deadline {
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
    per_connection: bool,
}

impl FanoutBench {
    /// `n` WebSocket subscribers in the JSON format.
    pub fn new(n: usize) -> FanoutBench {
        let counter = Arc::new(AtomicUsize::new(0));
        let conns = (0..n)
            .filter_map(|key| Permit::acquire(&counter, usize::MAX).map(|p| Conn::new(key, Transport::Ws, Format::Json, p)))
            .collect();
        FanoutBench { conns, metrics: ShardMetrics::default(), per_connection: false }
    }

    /// `n` WebSocket subscribers in the JSON format that agreed
    /// compression: the message is deflated once for all of them, or with
    /// `per_connection` once for each (what sharing saves).
    pub fn deflating(n: usize, per_connection: bool) -> FanoutBench {
        let mut b = FanoutBench::new(n);
        let agreed = crate::proto::deflate::negotiate(["permessage-deflate"]);
        for c in &mut b.conns {
            c.deflate = agreed;
            if !per_connection {
                c.form = c.form.deflated();
            }
        }
        b.per_connection = per_connection;
        b
    }

    /// Encodes `payload` once, queues it for every subscriber and drains
    /// the queues; returns the deliveries.
    pub fn run(&self, channel: &Arc<str>, offset: u64, payload: &crate::Payload) -> usize {
        let msg = Message::new(Arc::clone(channel), crate::message::Epoch::random(), offset, payload.clone());
        let policy = crate::SlowConsumerPolicy::Disconnect;
        let enc = Encode::new(&self.metrics);
        for c in &self.conns {
            let frame = msg.frame(c.form, &enc);
            if self.per_connection {
                let owned = enc.deflate(frame, 0).unwrap_or_else(|| frame.clone());
                c.offer(&msg, &owned, 1 << 20, policy, &self.metrics);
            } else {
                c.offer(&msg, frame, 1 << 20, policy, &self.metrics);
            }
        }
        for c in &self.conns {
            let mut out = c.out.borrow_mut();
            while out.pop_frame(&self.metrics, Transport::Ws).is_some() {}
        }
        self.conns.len()
    }
}

/// Says why a connection closed: at `debug` in its span, and a slow
/// consumer's cut at `info` always (an operator's signal) unless the
/// shard's budget for such lines is spent (`say`).
fn log_close(shard: usize, conn: &Conn, reason: Disconnect, say: bool) {
    let slow = reason == Disconnect::SlowConsumer;
    if conn.log.is_none() && !(slow && say) {
        return;
    }
    let access = conn.access.borrow();
    let user = access.user().unwrap_or("-");
    let subscriptions = conn.subs.borrow().len();
    match &conn.log {
        Some(log) => log.span.in_scope(|| {
            let ms = log.opened.elapsed().as_millis() as u64;
            if slow && say {
                tracing::info!(target: "herald::conn", reason = %reason.label(), %user, subscriptions, ms, "slow consumer cut: its outbound queue overflowed");
            } else {
                tracing::debug!(target: "herald::conn", reason = %reason.label(), ms, "closed");
            }
        }),
        None => tracing::info!(
            target: "herald::conn",
            conn = conn.key,
            transport = %conn.transport.as_str(),
            shard,
            remote = %crate::accept::DisplayAddr(conn.remote),
            %user,
            subscriptions,
            "slow consumer cut: its outbound queue overflowed"
        ),
    }
}

#[cfg(test)]
mod log_tests {
    use super::LogBudget;
    use std::time::{Duration, Instant};

    #[test]
    fn a_burst_of_cuts_is_ten_lines_then_one_count() {
        let t0 = Instant::now();
        let mut b = LogBudget::default();
        let said = (0..1000).filter(|i| b.admit(t0 + Duration::from_millis(*i)).0).count();
        assert_eq!(said, 10, "ten lines in the first 10 s");
        // The next window: the 990 unsaid are said as one count first.
        assert_eq!(b.admit(t0 + Duration::from_secs(11)), (true, Some(990)));
        assert_eq!(b.admit(t0 + Duration::from_secs(12)), (true, None));
    }
}
