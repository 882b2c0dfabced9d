//! A connection as its shard sees it: transport, format, subscriptions and
//! the bounded outbound queue that fan-out appends to and the connection's
//! task drains.
//!
//! Touched only by its shard's thread (`Rc` + `RefCell`, no locks).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpStream;

use super::Permit;
use crate::config::SlowConsumerPolicy;
use crate::message::{Epoch, Kind, Message};
use crate::metrics::{Disconnect, ShardMetrics};
use crate::proto::form::Form;

/// How a connection receives messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Ws,
    Sse,
}

/// What a connection's frames look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// The v1 envelope; WebSocket clients may send commands.
    Json,
    /// The payload alone; channels come from the query only.
    Raw,
    /// `/echo`: every data message is sent back (conformance testing).
    Echo,
}

impl Format {
    pub(crate) fn form(self, transport: Transport) -> Form {
        match (transport, self) {
            (Transport::Ws, Format::Raw) => Form::WsRaw,
            (Transport::Ws, _) => Form::WsJson,
            (Transport::Sse, Format::Raw) => Form::SseRaw,
            (Transport::Sse, _) => Form::SseJson,
        }
    }
}

/// Frames written per `writev` at most.
pub(crate) const MAX_IOV: usize = 64;

#[derive(Debug)]
struct Queued {
    bytes: Bytes,
    /// Set for message frames (counted as deliveries), not for replies.
    published_at: Option<Instant>,
}

/// Why and how a connection is closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closing {
    pub reason: Disconnect,
}

/// What a closing connection does with the frames already queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pending {
    /// Write them before the last frame (a drain).
    Keep,
    /// Drop them, but finish a frame already partly written (a slow consumer).
    Discard,
}

/// What happened to a message frame offered to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    Queued,
    /// Dropped under the `drop` policy.
    Dropped,
    /// The queue overflowed under the `disconnect` policy; the connection
    /// is now closing and must leave the channel index.
    Overflow,
    /// The connection is already closing.
    Closed,
}

#[derive(Debug, Default)]
pub(crate) struct Outbound {
    frames: VecDeque<Queued>,
    /// Bytes in `frames`, minus what is already written of the first one.
    queued_bytes: usize,
    /// Bytes of `frames[0]` already written.
    head_written: usize,
    waker: Option<Waker>,
    closing: Option<Closing>,
    /// Under the `drop` policy: per channel, the first and last offsets
    /// dropped since the subscriber last kept up (one entry per channel,
    /// so at most one per subscription).
    lagged: Vec<(Arc<str>, u64, u64)>,
}

impl Outbound {
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub(crate) fn closing(&self) -> Option<Closing> {
        self.closing
    }

    pub(crate) fn set_waker(&mut self, waker: &Waker) {
        match &self.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => self.waker = Some(waker.clone()),
        }
    }

    pub(crate) fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn push(&mut self, bytes: Bytes, published_at: Option<Instant>) {
        let was_empty = self.frames.is_empty();
        self.push_quiet(bytes, published_at);
        if was_empty {
            self.wake();
        }
    }

    /// Queues without waking the writer (the shard writes it, see
    /// [`Conn::write_now`]).
    fn push_quiet(&mut self, bytes: Bytes, published_at: Option<Instant>) {
        self.queued_bytes += bytes.len();
        self.frames.push_back(Queued { bytes, published_at });
    }

    /// Fills `slices` with the unwritten bytes at the front of the queue and
    /// returns how many it used.
    pub(crate) fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (i, q) in self.frames.iter().take(slices.len()).enumerate() {
            let b = if i == 0 { &q.bytes[self.head_written..] } else { &q.bytes[..] };
            slices[i] = IoSlice::new(b);
            n += 1;
        }
        n
    }

    /// Takes the front frame whole (for transports that pass `Bytes` on).
    pub(crate) fn pop_frame(&mut self, metrics: &ShardMetrics, transport: Transport) -> Option<Bytes> {
        debug_assert_eq!(self.head_written, 0);
        let q = self.frames.pop_front()?;
        self.queued_bytes -= q.bytes.len();
        if let Some(at) = q.published_at {
            count_delivery(metrics, transport, q.bytes.len(), at, Instant::now());
        }
        Some(q.bytes)
    }

    /// Marks `n` more bytes written; counts every message frame finished.
    pub(crate) fn advance(&mut self, mut n: usize, metrics: &ShardMetrics, transport: Transport) {
        self.queued_bytes -= n;
        let mut now = None;
        while n > 0 {
            let Some(front) = self.frames.front() else { break };
            let left = front.bytes.len() - self.head_written;
            if n < left {
                self.head_written += n;
                return;
            }
            n -= left;
            self.head_written = 0;
            if let Some(q) = self.frames.pop_front() {
                if let Some(at) = q.published_at {
                    let now = *now.get_or_insert_with(Instant::now);
                    count_delivery(metrics, transport, q.bytes.len(), at, now);
                }
            }
        }
    }
}

fn count_delivery(metrics: &ShardMetrics, transport: Transport, len: usize, at: Instant, now: Instant) {
    match transport {
        Transport::Ws => metrics.delivered_ws.inc(),
        Transport::Sse => metrics.delivered_sse.inc(),
    }
    metrics.bytes_delivered.add(len as u64);
    metrics.publish_to_write.record(now.saturating_duration_since(at));
}

/// What a connection may subscribe to and publish to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Access {
    /// No `[auth]`, no identity from the embedder: everything, as in v1.
    Open,
    /// `[auth]` is set and no token was given (yet): nothing.
    Anonymous,
    /// A user's grants.
    User(crate::auth::Identity),
}

impl Access {
    /// Whether the connection may subscribe to (and read the history of)
    /// `channel`: its grants, or its namespace is `anonymous` (never for a
    /// user channel).
    pub(crate) fn may_subscribe(&self, rules: &crate::config::ChannelRules, channel: &str) -> bool {
        let open_to_all = || rules.of(channel).anonymous && !channel.starts_with("user:");
        match self {
            Access::Open => true,
            Access::Anonymous => open_to_all(),
            Access::User(id) => id.may_subscribe(channel) || open_to_all(),
        }
    }

    pub(crate) fn may_publish(&self, channel: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Anonymous => false,
            Access::User(id) => id.may_publish(channel),
        }
    }

    /// The connection's user, if it has one.
    pub(crate) fn user(&self) -> Option<&str> {
        match self {
            Access::User(id) => Some(id.user()),
            _ => None,
        }
    }

    /// When the connection's token expires, if it has one.
    pub(crate) fn expires_at(&self) -> Option<u64> {
        match self {
            Access::User(id) => id.expires_at(),
            _ => None,
        }
    }
}

/// A new subscription's place in its channel's live messages.
#[derive(Debug)]
enum Seam {
    /// Its start is being read (a Redis broker): live messages wait here,
    /// with their bytes (counted against the outbound queue's bound), for
    /// the start whose token this is.
    Holding(Vec<Arc<Message>>, usize, u64),
    /// Started at (epoch, top).
    At(Epoch, u64),
}

/// What a subscription's seam says of a live message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Deliver it.
    Pass,
    /// Not for this connection: before its start.
    Skip,
    /// Kept until the subscription's start is known.
    Held,
    /// Holding it would pass the queue's bound: handled by the slow
    /// consumer policy ([`Offer::Dropped`] or [`Offer::Overflow`]).
    Over(Offer),
}

#[derive(Debug)]
pub(crate) struct Conn {
    pub key: usize,
    pub transport: Transport,
    pub format: Format,
    pub form: Form,
    /// permessage-deflate, when this WebSocket agreed it.
    pub deflate: Option<crate::proto::deflate::Agreed>,
    pub out: RefCell<Outbound>,
    /// Channels this connection is subscribed to.
    pub subs: RefCell<Vec<Arc<str>>>,
    /// Publish commands waiting for the broker's answer.
    pub in_flight: Cell<u32>,
    /// Who the connection is, and so what it may do.
    pub access: RefCell<Access>,
    /// An expiry watcher runs for this connection.
    pub watched: Cell<bool>,
    /// The connection's socket, when it is a plain TCP stream the shard can
    /// write to itself: fan-out then writes message frames from its own
    /// loop instead of waking the connection's task for each.
    direct: RefCell<Option<Rc<TcpStream>>>,
    /// Message frames were queued quietly for the shard to write.
    flush_due: Cell<bool>,
    /// New subscriptions: waiting for their start (live messages held), or
    /// started at a channel's (epoch, top), whose live messages up to it
    /// (already dispatched, or replayed) are skipped.
    seams: RefCell<Vec<(Arc<str>, Seam)>>,
    /// An SSE stream of several channels: every channel's position, in the
    /// stream's order, written before each message as its `id:` list.
    positions: RefCell<Vec<(Arc<str>, Epoch, u64)>>,
    /// Bytes held by all the holding seams together.
    held_bytes: Cell<usize>,
    /// The token of the latest [`Conn::hold`].
    holds: Cell<u64>,
    /// Subscribes waiting for the subscribe hook: (channel, token). An
    /// unsubscribe meanwhile removes them, and the hook's answer is then
    /// not acted on. At most one per command in flight.
    hooked: RefCell<Vec<(Arc<str>, u64)>>,
    /// The client's address (standalone server).
    pub remote: Option<std::net::SocketAddr>,
    /// Its log span, only while `herald::conn` logs at `debug`.
    pub log: Option<Box<ConnLog>>,
    _permit: Permit,
}

/// A connection's log span (fields `conn`, `transport`, `shard`, `remote`,
/// `user`) and when it opened.
#[derive(Debug)]
pub(crate) struct ConnLog {
    pub span: tracing::Span,
    pub opened: std::time::Instant,
}

impl Transport {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

impl Conn {
    pub(crate) fn new(key: usize, transport: Transport, format: Format, permit: Permit) -> Conn {
        Conn {
            key,
            transport,
            format,
            form: format.form(transport),
            deflate: None,
            out: RefCell::new(Outbound::default()),
            subs: RefCell::new(Vec::new()),
            in_flight: Cell::new(0),
            access: RefCell::new(Access::Open),
            watched: Cell::new(false),
            direct: RefCell::new(None),
            flush_due: Cell::new(false),
            seams: RefCell::new(Vec::new()),
            positions: RefCell::new(Vec::new()),
            held_bytes: Cell::new(0),
            holds: Cell::new(0),
            hooked: RefCell::new(Vec::new()),
            remote: None,
            log: None,
            _permit: permit,
        }
    }

    /// It agreed compression with a window under 32 KiB: the shared
    /// compressed frame of a message longer than the window is not for it.
    pub(crate) fn narrow_window(&self) -> bool {
        self.form.is_deflate() && self.deflate.is_some_and(|a| a.send_limit() != usize::MAX)
    }

    /// The frame of `msg` for this connection: its form's, but the plain
    /// one where its window is too small for the shared compressed frame.
    pub(crate) fn frame_of<'m>(&self, msg: &'m Message, enc: &crate::message::Encode<'_>) -> &'m Bytes {
        let frame = msg.frame(self.form, enc);
        if self.narrow_window() && crate::proto::deflate::is_compressed(frame) {
            let plain = msg.frame(self.form.plain(), enc);
            let limit = self.deflate.map_or(usize::MAX, |a| a.send_limit());
            if crate::proto::frame::server_payload(plain).len() > limit {
                return plain;
            }
        }
        frame
    }

    /// Makes this SSE stream write its channels' positions before each
    /// message, starting from these.
    pub(crate) fn set_positions(&self, positions: Vec<(Arc<str>, Epoch, u64)>) {
        *self.positions.borrow_mut() = positions;
    }

    /// The `id: a:1,b:2` line of `msg` on this stream, if it keeps
    /// positions and `msg`'s channel is one of them.
    fn id_line(&self, msg: &Message) -> Option<Bytes> {
        let positions = self.positions.borrow();
        if positions.is_empty() || !positions.iter().any(|(c, _, _)| **c == *msg.channel) {
            return None;
        }
        let mut line = String::with_capacity(4 + positions.len() * 16);
        line.push_str("id: ");
        for (i, (c, epoch, offset)) in positions.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            let (e, o) = if **c == *msg.channel { (&msg.epoch, msg.offset) } else { (epoch, *offset) };
            line.push_str(e.as_str());
            line.push(':');
            line.push_str(itoa::Buffer::new().format(o));
        }
        line.push('\n');
        Some(Bytes::from(line))
    }

    /// Bytes queued for this connection.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.out.borrow().queued_bytes
    }

    /// Holds `channel`'s live messages until its start is known
    /// ([`Conn::set_seam`]). Returns the hold's token: only the start it
    /// was made for may end it ([`Conn::holding`]).
    pub(crate) fn hold(&self, channel: &Arc<str>) -> u64 {
        self.clear_seam(channel);
        let token = self.holds.get() + 1;
        self.holds.set(token);
        self.seams.borrow_mut().push((Arc::clone(channel), Seam::Holding(Vec::new(), 0, token)));
        token
    }

    /// Whether `channel`'s seam is still the hold of `token` (not undone by
    /// an unsubscribe, nor replaced by a later subscribe).
    pub(crate) fn holding(&self, channel: &str, token: u64) -> bool {
        self.seams.borrow().iter().any(|(c, s)| **c == *channel && matches!(s, Seam::Holding(_, _, t) if *t == token))
    }

    /// A subscribe to `channel` waits for the subscribe hook: its token.
    pub(crate) fn hook_pending(&self, channel: &Arc<str>) -> u64 {
        let token = self.holds.get() + 1;
        self.holds.set(token);
        self.hooked.borrow_mut().push((Arc::clone(channel), token));
        token
    }

    /// The hook answered the subscribe of `token`: whether it still
    /// stands (no unsubscribe came meanwhile).
    pub(crate) fn hook_answered(&self, token: u64) -> bool {
        let mut hooked = self.hooked.borrow_mut();
        match hooked.iter().position(|(_, t)| *t == token) {
            Some(i) => {
                hooked.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Forgets the subscribes to `channel` waiting for the hook; whether
    /// there were any.
    pub(crate) fn cancel_hooked(&self, channel: &str) -> bool {
        let mut hooked = self.hooked.borrow_mut();
        let before = hooked.len();
        hooked.retain(|(c, _)| **c != *channel);
        hooked.len() != before
    }

    /// Bytes held by seams waiting for their start.
    pub(crate) fn held_bytes(&self) -> usize {
        self.held_bytes.get()
    }

    /// From now on, `channel`'s messages up to offset `top` are not for
    /// this connection (it was told `top`, and got what it missed). Returns
    /// the live messages held meanwhile, in order, to pass through
    /// [`Conn::check_seam`] again.
    pub(crate) fn set_seam(&self, channel: &Arc<str>, epoch: Epoch, top: u64) -> Vec<Arc<Message>> {
        let mut seams = self.seams.borrow_mut();
        let held = match seams.iter().position(|(c, _)| **c == **channel) {
            Some(i) => match std::mem::replace(&mut seams[i].1, Seam::At(epoch, top)) {
                Seam::Holding(held, bytes, _) => {
                    self.held_bytes.set(self.held_bytes.get() - bytes);
                    held
                }
                Seam::At(..) => Vec::new(),
            },
            None => {
                seams.push((Arc::clone(channel), Seam::At(epoch, top)));
                Vec::new()
            }
        };
        held
    }

    /// Forgets the seam of `channel` (unsubscribed), with what it held.
    pub(crate) fn clear_seam(&self, channel: &str) {
        let mut seams = self.seams.borrow_mut();
        if !seams.is_empty() {
            seams.retain(|(c, s)| {
                let gone = **c == *channel;
                if let (true, Seam::Holding(_, bytes, _)) = (gone, s) {
                    self.held_bytes.set(self.held_bytes.get() - bytes);
                }
                !gone
            });
        }
    }

    /// What `msg` (whose frame for this connection is `len` bytes) is to
    /// this connection's subscription to its channel. Past a seam `(epoch,
    /// top)`: a message at or before the top is skipped, as is one of
    /// another epoch (older: a channel's epoch changes only with an epoch
    /// notice, and what was queued before comes first); an epoch notice of
    /// the seam's epoch is skipped (the subscriber was told that epoch), of
    /// another one delivered. The first message delivered removes the seam.
    #[inline]
    pub(crate) fn check_seam(
        &self,
        msg: &Arc<Message>,
        len: usize,
        limit: usize,
        policy: SlowConsumerPolicy,
        metrics: &ShardMetrics,
    ) -> Check {
        let mut seams = self.seams.borrow_mut();
        if seams.is_empty() {
            return Check::Pass;
        }
        let Some(i) = seams.iter().position(|(c, _)| **c == *msg.channel) else { return Check::Pass };
        match &mut seams[i].1 {
            Seam::Holding(held, bytes, _) => {
                // Notices are never dropped (they are small, and few);
                // presence events wait with the rest, and meet the bound
                // as replies do once released.
                if !msg.is_notice() && !msg.is_presence() && self.queued_bytes() + self.held_bytes.get() + len > limit {
                    drop(seams);
                    return Check::Over(self.over_limit(msg, policy, metrics));
                }
                *bytes += len;
                self.held_bytes.set(self.held_bytes.get() + len);
                held.push(Arc::clone(msg));
                Check::Held
            }
            // Not positioned: the seam stays for the messages behind it.
            Seam::At(..) if msg.is_presence() => Check::Pass,
            Seam::At(epoch, top) => {
                let before = match msg.kind {
                    Kind::Presence { .. } => false,
                    Kind::Epoch => msg.epoch == *epoch,
                    Kind::Lagged { to } => msg.epoch != *epoch || to <= *top,
                    Kind::Publication => msg.epoch != *epoch || msg.offset <= *top,
                };
                if before {
                    return Check::Skip;
                }
                seams.swap_remove(i);
                Check::Pass
            }
        }
    }

    /// Queues a notice (`frame`: an epoch change, messages lost), not
    /// counted as a delivery. A notice is never dropped, whatever the
    /// slow-consumer policy (a subscriber that missed one could not tell
    /// the epochs apart): it may pass the queue's bound by its own few
    /// bytes, and past twice the bound the connection is closed as a slow
    /// consumer. A stream keeping positions moves the channel's to the new
    /// epoch.
    pub(crate) fn notice(&self, msg: &Message, frame: &Bytes, limit: usize) -> bool {
        match msg.kind {
            Kind::Epoch => {
                if let Some(p) = self.positions.borrow_mut().iter_mut().find(|(c, _, _)| **c == *msg.channel) {
                    (p.1, p.2) = (msg.epoch, 0);
                }
            }
            Kind::Lagged { to } => {
                if let Some(p) = self.positions.borrow_mut().iter_mut().find(|(c, _, _)| **c == *msg.channel) {
                    (p.1, p.2) = (msg.epoch, to);
                }
            }
            Kind::Publication | Kind::Presence { .. } => {}
        }
        if frame.is_empty() {
            return true;
        }
        let mut out = self.out.borrow_mut();
        if out.closing.is_some() {
            return false;
        }
        if out.queued_bytes + frame.len() > limit.saturating_mul(2) {
            drop(out);
            self.close_slow();
            return false;
        }
        out.push(frame.clone(), None);
        true
    }

    /// Queues a join or leave frame under the same bound and policy as a
    /// reply (not a delivery: it has no offset, and is never `lagged`),
    /// written by the fan-out like a message when the shard writes this
    /// socket itself.
    pub(crate) fn event(&self, frame: &Bytes, limit: usize, policy: SlowConsumerPolicy, metrics: &ShardMetrics) -> Offer {
        let mut out = self.out.borrow_mut();
        if out.closing.is_some() {
            return Offer::Closed;
        }
        if out.queued_bytes + frame.len() > limit {
            drop(out);
            return match policy {
                SlowConsumerPolicy::Drop => {
                    metrics.dropped_slow_consumer.inc();
                    Offer::Dropped
                }
                SlowConsumerPolicy::Disconnect => {
                    self.close_slow();
                    Offer::Overflow
                }
            };
        }
        if self.direct.borrow().is_some() {
            out.push_quiet(frame.clone(), None);
            self.flush_due.set(true);
        } else {
            out.push(frame.clone(), None);
        }
        Offer::Queued
    }

    /// Queues a replayed message and makes sure it is written.
    pub(crate) fn replay(&self, msg: &Message, frame: &Bytes, limit: usize, policy: SlowConsumerPolicy, metrics: &ShardMetrics) -> Offer {
        // Not timed: its publish-to-write delay is not the fan-out's.
        let offer = self.offer_at(msg, frame, None, limit, policy, metrics);
        if self.take_flush_due() {
            self.out.borrow_mut().wake();
        }
        offer
    }

    /// Offers `frame`, the wire form of `msg` for this connection
    /// (fan-out's per-subscriber step).
    #[inline]
    pub(crate) fn offer(&self, msg: &Message, frame: &Bytes, limit: usize, policy: SlowConsumerPolicy, metrics: &ShardMetrics) -> Offer {
        self.offer_at(msg, frame, Some(msg.published_at), limit, policy, metrics)
    }

    #[inline]
    fn offer_at(
        &self,
        msg: &Message,
        frame: &Bytes,
        published_at: Option<std::time::Instant>,
        limit: usize,
        policy: SlowConsumerPolicy,
        metrics: &ShardMetrics,
    ) -> Offer {
        let mut out = self.out.borrow_mut();
        if out.closing.is_some() {
            return Offer::Closed;
        }
        let id = self.id_line(msg);
        let size = frame.len() + id.as_ref().map_or(0, Bytes::len);
        let fits = out.queued_bytes + size <= limit;
        if fits && (out.lagged.is_empty() || self.push_lagged(&mut out, limit - size, metrics)) {
            if let Some(id) = id {
                // Not a message frame: not counted as a delivery.
                out.push(id, None);
                if let Some(p) = self.positions.borrow_mut().iter_mut().find(|(c, _, _)| **c == *msg.channel) {
                    (p.1, p.2) = (msg.epoch, msg.offset);
                }
            }
            if self.direct.borrow().is_some() {
                out.push_quiet(frame.clone(), published_at);
                self.flush_due.set(true);
            } else {
                out.push(frame.clone(), published_at);
            }
            return Offer::Queued;
        }
        drop(out);
        self.over_limit(msg, policy, metrics)
    }

    /// `msg` does not fit under the queue's bound: dropped and remembered
    /// for a `lagged` notice, or the connection closes, by policy.
    fn over_limit(&self, msg: &Message, policy: SlowConsumerPolicy, metrics: &ShardMetrics) -> Offer {
        match policy {
            SlowConsumerPolicy::Drop => {
                metrics.dropped_slow_consumer.inc();
                let mut out = self.out.borrow_mut();
                match out.lagged.iter_mut().find(|(c, _, _)| **c == *msg.channel) {
                    Some(range) => range.2 = msg.offset,
                    None => out.lagged.push((Arc::clone(&msg.channel), msg.offset, msg.offset)),
                }
                Offer::Dropped
            }
            SlowConsumerPolicy::Disconnect => {
                self.close_slow();
                Offer::Overflow
            }
        }
    }

    /// Lets the shard write this connection's frames to `tcp` itself.
    pub(crate) fn set_direct(&self, tcp: Option<Rc<TcpStream>>) {
        *self.direct.borrow_mut() = tcp;
    }

    /// Whether message frames were queued for the shard to write; clears it.
    pub(crate) fn take_flush_due(&self) -> bool {
        self.flush_due.replace(false)
    }

    /// Writes what is queued straight to the socket, without the
    /// connection's task, as far as the socket takes it. Whatever is left
    /// (a full socket, an error, a closing connection, `lagged` notices
    /// due) wakes the task, which deals with it.
    pub(crate) fn write_now(&self, metrics: &ShardMetrics) {
        let direct = self.direct.borrow();
        let mut out = self.out.borrow_mut();
        if let (Some(tcp), None) = (direct.as_ref(), out.closing) {
            while !out.is_empty() {
                let written = {
                    let mut slices = [IoSlice::new(&[]); MAX_IOV];
                    let n = out.slices(&mut slices);
                    tcp.try_write_vectored(&slices[..n])
                };
                match written {
                    Ok(n) if n > 0 => out.advance(n, metrics, self.transport),
                    _ => break,
                }
            }
            if out.is_empty() && out.lagged.is_empty() {
                return;
            }
        }
        out.wake();
    }

    /// Queues the `lagged` notices of a subscriber that dropped frames,
    /// if they all fit under `limit`; returns whether none is left.
    fn push_lagged(&self, out: &mut Outbound, limit: usize, metrics: &ShardMetrics) -> bool {
        let notices: Vec<Bytes> =
            out.lagged.iter().filter_map(|(channel, from, to)| crate::proto::json::lagged(self.form, channel, *from, *to)).collect();
        if out.queued_bytes + notices.iter().map(Bytes::len).sum::<usize>() > limit {
            return false;
        }
        metrics.lagged_notices.add(notices.len() as u64);
        for n in notices {
            out.push(n, None);
        }
        out.lagged.clear();
        true
    }

    /// Called by the writer when it has written everything: a subscriber
    /// that dropped frames and has now caught up gets its `lagged`
    /// notices without waiting for the next message.
    pub(crate) fn caught_up(&self, limit: usize, metrics: &ShardMetrics) {
        let mut out = self.out.borrow_mut();
        if out.lagged.is_empty() || !out.frames.is_empty() || out.closing.is_some() {
            return;
        }
        self.push_lagged(&mut out, limit, metrics);
    }

    /// Queues a reply or control frame. Replies count against the same
    /// bound: a client that floods commands without reading is a slow
    /// consumer too, handled by the same policy (under `drop` the reply or
    /// ping is dropped and counted).
    pub(crate) fn send_control(&self, frame: Bytes, limit: usize, policy: SlowConsumerPolicy, metrics: &ShardMetrics) -> bool {
        let mut out = self.out.borrow_mut();
        if out.closing.is_some() {
            return false;
        }
        if out.queued_bytes + frame.len() > limit {
            drop(out);
            match policy {
                SlowConsumerPolicy::Drop => metrics.dropped_slow_consumer.inc(),
                SlowConsumerPolicy::Disconnect => self.close_slow(),
            }
            return false;
        }
        out.push(frame, None);
        true
    }

    /// Closes a slow consumer: what is queued is discarded; a WebSocket
    /// gets close 1008, an SSE stream just ends.
    fn close_slow(&self) {
        let last = (self.transport == Transport::Ws).then(|| crate::proto::frame::encode_close(1008, "slow consumer"));
        self.close(Disconnect::SlowConsumer, Pending::Discard, last);
    }

    /// Starts closing: no more frames are accepted; `pending` says what
    /// becomes of the frames waiting; `last` is sent after the rest (a
    /// WebSocket close frame). The first reason wins.
    pub(crate) fn close(&self, reason: Disconnect, pending: Pending, last: Option<Bytes>) {
        let mut out = self.out.borrow_mut();
        if out.closing.is_some() {
            return;
        }
        out.closing = Some(Closing { reason });
        if pending == Pending::Discard {
            let keep = usize::from(out.head_written > 0);
            out.frames.truncate(keep);
            out.queued_bytes = out.frames.front().map_or(0, |q| q.bytes.len() - out.head_written);
        }
        if let Some(frame) = last {
            out.queued_bytes += frame.len();
            out.frames.push_back(Queued { bytes: frame, published_at: None });
        }
        out.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn conn() -> Conn {
        let counter = Arc::new(AtomicUsize::new(0));
        Conn::new(0, Transport::Ws, Format::Json, Permit::acquire(&counter, 10).unwrap())
    }

    #[test]
    fn partial_writes_advance_and_count_whole_frames() {
        let c = conn();
        let m = ShardMetrics::default();
        let msg = Message::new("c".into(), crate::Epoch::random(), 1, crate::Payload::text("x"));
        for _ in 0..3 {
            assert_eq!(c.offer(&msg, &Bytes::from_static(b"abcd"), 100, SlowConsumerPolicy::Disconnect, &m), Offer::Queued);
        }
        let mut out = c.out.borrow_mut();
        out.advance(6, &m, Transport::Ws);
        assert_eq!(m.delivered_ws.get(), 1);
        let mut s = [IoSlice::new(&[]); 4];
        let n = out.slices(&mut s);
        assert_eq!(n, 2);
        assert_eq!(&*s[0], b"cd");
        out.advance(6, &m, Transport::Ws);
        assert!(out.is_empty());
        assert_eq!(m.delivered_ws.get(), 3);
        assert_eq!(m.bytes_delivered.get(), 12);
    }

    #[test]
    fn overflow_disconnects_or_drops_by_policy() {
        let m = ShardMetrics::default();
        let f = Bytes::from(vec![0u8; 600]);
        let msg = Message::new("c".into(), crate::Epoch::random(), 1, crate::Payload::text("x"));
        let c = conn();
        assert_eq!(c.offer(&msg, &f, 1024, SlowConsumerPolicy::Drop, &m), Offer::Queued);
        assert_eq!(c.offer(&msg, &f, 1024, SlowConsumerPolicy::Drop, &m), Offer::Dropped);
        assert_eq!(m.dropped_slow_consumer.get(), 1);
        assert_eq!(c.offer(&msg, &f, 1024, SlowConsumerPolicy::Disconnect, &m), Offer::Overflow);
        let out = c.out.borrow();
        assert_eq!(out.closing().map(|c| c.reason), Some(Disconnect::SlowConsumer));
        // The queue was discarded; only the close frame is left.
        assert_eq!(out.frames.len(), 1);
        assert_eq!(&out.frames[0].bytes[..4], &[0x88, 15, 0x03, 0xF0]);
        drop(out);
        assert_eq!(c.offer(&msg, &f, 1024, SlowConsumerPolicy::Disconnect, &m), Offer::Closed);
    }

    #[test]
    fn dropped_ranges_become_lagged_notices_once_there_is_room() {
        let m = ShardMetrics::default();
        let c = conn();
        let f = Bytes::from(vec![0u8; 600]);
        let msg = |ch: &str, o| Message::new(ch.into(), crate::Epoch::random(), o, crate::Payload::text("x"));
        assert_eq!(c.offer(&msg("a", 1), &f, 1024, SlowConsumerPolicy::Drop, &m), Offer::Queued);
        for o in 2..=4 {
            assert_eq!(c.offer(&msg("a", o), &f, 1024, SlowConsumerPolicy::Drop, &m), Offer::Dropped);
        }
        assert_eq!(c.offer(&msg("b", 7), &f, 1024, SlowConsumerPolicy::Drop, &m), Offer::Dropped);
        c.caught_up(1024, &m);
        assert_eq!(c.out.borrow().frames.len(), 1, "not caught up while frames are queued");
        c.out.borrow_mut().advance(600, &m, Transport::Ws);
        c.caught_up(1024, &m);
        let out = c.out.borrow();
        let text: Vec<String> = out.frames.iter().map(|q| String::from_utf8_lossy(&q.bytes[2..]).into_owned()).collect();
        assert_eq!(
            text,
            [
                r#"{"op":"lagged","channel":"a","missed_from":2,"missed_to":4}"#,
                r#"{"op":"lagged","channel":"b","missed_from":7,"missed_to":7}"#
            ]
        );
        assert_eq!(m.lagged_notices.get(), 2);
    }

    #[test]
    fn discard_keeps_a_partly_written_frame() {
        let m = ShardMetrics::default();
        let c = conn();
        let msg = Message::new("c".into(), crate::Epoch::random(), 1, crate::Payload::text("x"));
        c.offer(&msg, &Bytes::from_static(b"0123456789"), 100, SlowConsumerPolicy::Disconnect, &m);
        c.offer(&msg, &Bytes::from_static(b"abc"), 100, SlowConsumerPolicy::Disconnect, &m);
        c.out.borrow_mut().advance(4, &m, Transport::Ws);
        c.close(Disconnect::Shutdown, Pending::Discard, Some(Bytes::from_static(b"CLOSE")));
        let out = c.out.borrow();
        assert_eq!(out.frames.len(), 2);
        assert_eq!(out.queued_bytes, 6 + 5);
    }

    #[test]
    fn a_seam_skips_what_came_before_it_then_goes() {
        let c = conn();
        let m = ShardMetrics::default();
        let (old, new) = (Epoch::random(), Epoch::random());
        let msg = |epoch, offset| Arc::new(Message::new("c".into(), epoch, offset, crate::Payload::text("x")));
        let check = |msg: &Arc<Message>| c.check_seam(msg, 10, 1024, SlowConsumerPolicy::Disconnect, &m);
        let name: Arc<str> = "c".into();
        c.set_seam(&name, new, 3);
        assert_eq!(check(&msg(old, 40)), Check::Skip, "a message of the epoch before, still queued");
        assert_eq!(check(&msg(new, 3)), Check::Skip, "at the top: replayed or published before");
        let other = Arc::new(Message::new("other".into(), new, 1, crate::Payload::text("x")));
        assert_eq!(check(&other), Check::Pass, "other channels pass");
        assert_eq!(check(&msg(new, 4)), Check::Pass, "past the top: live");
        assert_eq!(check(&msg(old, 1)), Check::Pass, "the seam is gone once passed");
        c.set_seam(&name, new, 9);
        c.clear_seam("c");
        assert_eq!(check(&msg(new, 2)), Check::Pass, "unsubscribing clears it");
    }

    #[test]
    fn a_held_subscription_keeps_live_messages_until_its_start_is_known() {
        let c = conn();
        let m = ShardMetrics::default();
        let (e1, e2) = (Epoch::random(), Epoch::random());
        let name: Arc<str> = "c".into();
        let msg = |epoch, offset| Arc::new(Message::new("c".into(), epoch, offset, crate::Payload::text("x")));
        let notice = Arc::new(Message::notice("c".into(), e2, 0, Kind::Epoch));
        c.hold(&name);
        for held in [msg(e1, 4), msg(e1, 5), Arc::clone(&notice), msg(e2, 1)] {
            assert_eq!(c.check_seam(&held, 100, 1024, SlowConsumerPolicy::Disconnect, &m), Check::Held);
        }
        let held = c.set_seam(&name, e1, 4);
        let seen: Vec<Check> = held.iter().map(|h| c.check_seam(h, 100, 1024, SlowConsumerPolicy::Disconnect, &m)).collect();
        assert_eq!(seen, [Check::Skip, Check::Pass, Check::Pass, Check::Pass], "5 is past the start; the new epoch follows");
        // Read after the epoch changed: the notice and what came before it are old news.
        c.hold(&name);
        for h in [msg(e1, 6), Arc::clone(&notice), msg(e2, 1), msg(e2, 2)] {
            c.check_seam(&h, 100, 1024, SlowConsumerPolicy::Disconnect, &m);
        }
        let held = c.set_seam(&name, e2, 1);
        let seen: Vec<Check> = held.iter().map(|h| c.check_seam(h, 100, 1024, SlowConsumerPolicy::Disconnect, &m)).collect();
        assert_eq!(seen, [Check::Skip, Check::Skip, Check::Skip, Check::Pass]);
        // Holding counts against the queue's bound.
        c.hold(&name);
        assert_eq!(c.check_seam(&msg(e2, 3), 600, 1024, SlowConsumerPolicy::Drop, &m), Check::Held);
        assert_eq!(c.check_seam(&msg(e2, 4), 600, 1024, SlowConsumerPolicy::Drop, &m), Check::Over(Offer::Dropped));
        assert_eq!(m.dropped_slow_consumer.get(), 1);
    }
}
