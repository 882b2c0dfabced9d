//! A WebSocket connection's task: one hand-polled future that reads client
//! frames, writes the outbound queue with vectored I/O and runs the
//! ping/idle and close timers.
//!
//! Reads land in the shard's shared scratch buffer; a connection keeps
//! bytes of its own only while a frame or fragmented message is partly
//! received, so an idle connection holds no read buffer. Polling by hand
//! (no `select!` over non-cancel-safe futures) keeps every step resumable.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::conn::{Conn, Format};
use super::Shard;
use crate::config::{Config, COMMAND_OVERHEAD_BYTES};
use crate::metrics::Disconnect;
use crate::proto::assemble::{Assembler, Incoming};
use crate::proto::command::{self, Command};
use crate::proto::frame::{self, OpCode, ProtocolError};
use crate::proto::json::{self, Payload};
use crate::proto::ErrorCode;

/// Frames written per `writev` at most.
const MAX_IOV: usize = 64;
/// Reads per poll before the task yields to others.
const READS_PER_POLL: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading commands, writing frames.
    Open,
    /// Closing: writing what is left (ending with a close frame).
    Flushing,
    /// Everything written: shutting down the write side.
    Shutdown,
    /// Waiting for the client to close its side.
    Linger,
}

struct WsTask<S> {
    shard: Rc<Shard>,
    conn: Rc<Conn>,
    io: S,
    /// Bytes of a partly received frame.
    inbuf: Vec<u8>,
    assembler: Assembler,
    timer: Pin<Box<Sleep>>,
    last_ping: Instant,
    phase: Phase,
}

/// Serves a WebSocket connection whose handshake is done until it ends.
/// `leftover` holds bytes the client sent right after its handshake.
pub(crate) async fn run<S>(shard: Rc<Shard>, conn: Rc<Conn>, io: S, leftover: Bytes)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = &shard.inner.config;
    let now = Instant::now();
    let mut task = WsTask {
        timer: Box::pin(tokio::time::sleep_until((now + Config::dur(cfg.ping_interval_ms)).into())),
        assembler: Assembler::new(cfg.max_message_bytes + COMMAND_OVERHEAD_BYTES),
        inbuf: Vec::new(),
        last_ping: now,
        phase: Phase::Open,
        shard,
        conn,
        io,
    };
    if !leftover.is_empty() {
        task.inbuf.extend_from_slice(&leftover);
        let used = process(&mut task.inbuf, &mut task.assembler, &task.shard, &task.conn);
        task.inbuf.drain(..used);
    }
    // `leftover` is a slice of hyper's read buffer (8 KiB or more): release
    // it now rather than for the life of the connection.
    drop(leftover);
    let reason = poll_fn(|cx| task.poll(cx)).await;
    task.shard.remove_conn(&task.conn, reason);
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsTask<S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        self.conn.out.borrow_mut().set_waker(cx.waker());
        loop {
            if let Poll::Ready(reason) = self.step(cx) {
                return Poll::Ready(reason);
            }
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    if let Some(reason) = self.on_timer() {
                        return Poll::Ready(reason);
                    }
                }
            }
        }
    }

    /// Reads, writes and closes as far as the socket allows.
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        if self.phase == Phase::Open {
            if let Poll::Ready(reason) = self.poll_read(cx) {
                // The client is gone (or the socket failed): nothing more can be written.
                return Poll::Ready(self.closing_reason().unwrap_or(reason));
            }
        }
        if self.phase == Phase::Open && self.closing_reason().is_some() {
            self.phase = Phase::Flushing;
            self.reset_timer(Instant::now() + Config::dur(self.shard.inner.config.close_timeout_ms));
        }
        if matches!(self.phase, Phase::Open | Phase::Flushing) {
            if let Poll::Ready(Err(e)) = self.poll_write(cx) {
                return Poll::Ready(self.closing_reason().unwrap_or(classify(&e)));
            }
            if self.phase == Phase::Flushing {
                // Keep reading (and discarding) so the client's close frame or
                // EOF is noticed while the rest is written.
                if let Poll::Ready(r) = self.poll_discard(cx) {
                    return Poll::Ready(self.closing_reason().unwrap_or(r));
                }
                if self.conn.out.borrow().is_empty() {
                    self.phase = Phase::Shutdown;
                }
            }
        }
        if self.phase == Phase::Shutdown {
            match Pin::new(&mut self.io).poll_shutdown(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => self.phase = Phase::Linger,
            }
        }
        if self.phase == Phase::Linger {
            if let Poll::Ready(r) = self.poll_discard(cx) {
                return Poll::Ready(self.closing_reason().unwrap_or(r));
            }
        }
        Poll::Pending
    }

    fn closing_reason(&self) -> Option<Disconnect> {
        self.conn.out.borrow().closing().map(|c| c.reason)
    }

    fn reset_timer(&mut self, at: Instant) {
        self.timer.as_mut().reset(at.into());
    }

    /// Ping/idle while open; the close deadline while closing. Returns a
    /// reason when the connection must end now.
    fn on_timer(&mut self) -> Option<Disconnect> {
        let now = Instant::now();
        if self.phase != Phase::Open {
            return Some(self.closing_reason().unwrap_or(Disconnect::IoError));
        }
        let cfg = &self.shard.inner.config;
        let (ping, idle) = (Config::dur(cfg.ping_interval_ms), Config::dur(cfg.idle_timeout_ms));
        let last_rx = self.conn.last_rx.get();
        if now.saturating_duration_since(last_rx) >= idle {
            self.conn.close(Disconnect::IdleTimeout, false, Some(frame::encode_close(1001, "idle timeout")));
            self.reset_timer(now + Config::dur(cfg.close_timeout_ms));
            return None;
        }
        if now.saturating_duration_since(last_rx) >= ping && now.saturating_duration_since(self.last_ping) >= ping {
            self.shard.send_to(&self.conn, frame::encode_frame(OpCode::Ping, b""));
            self.last_ping = now;
        }
        let next = (last_rx + idle).min(last_rx.max(self.last_ping) + ping);
        self.reset_timer(next.max(now + std::time::Duration::from_millis(1)));
        None
    }

    /// Reads and handles client frames until the socket has nothing more.
    /// Ready means the connection is over (EOF or error).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        for _ in 0..READS_PER_POLL {
            let shard = Rc::clone(&self.shard);
            let mut scratch = shard.scratch.borrow_mut();
            let n = {
                let mut rb = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(classify(&e)),
                    Poll::Ready(Ok(())) => rb.filled().len(),
                }
            };
            if n == 0 {
                return Poll::Ready(Disconnect::Client);
            }
            self.conn.last_rx.set(Instant::now());
            if self.inbuf.is_empty() {
                let used = process(&mut scratch[..n], &mut self.assembler, &self.shard, &self.conn);
                self.inbuf.extend_from_slice(&scratch[used..n]);
            } else {
                self.inbuf.extend_from_slice(&scratch[..n]);
                let used = process(&mut self.inbuf, &mut self.assembler, &self.shard, &self.conn);
                self.inbuf.drain(..used);
                if self.inbuf.is_empty() {
                    self.inbuf = Vec::new();
                }
            }
            if self.closing_reason().is_some() {
                self.inbuf = Vec::new();
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reads and drops whatever the client sends; Ready at EOF or error.
    fn poll_discard(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        for _ in 0..READS_PER_POLL {
            let shard = Rc::clone(&self.shard);
            let mut scratch = shard.scratch.borrow_mut();
            let mut rb = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(classify(&e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Disconnect::Client),
                Poll::Ready(Ok(())) => {}
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes the outbound queue until it is empty or the socket is full.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let metrics = self.shard.metrics();
        loop {
            let mut out = self.conn.out.borrow_mut();
            if out.is_empty() {
                drop(out);
                // A subscriber that dropped frames and caught up is told.
                self.conn.caught_up(self.shard.inner.config.outbound_queue_bytes, metrics);
                if self.conn.out.borrow().is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = out.slices(&mut slices);
            let res = Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]);
            match res {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => out.advance(written, metrics, self.conn.transport),
            }
        }
    }
}

fn classify(e: &io::Error) -> Disconnect {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted | io::ErrorKind::UnexpectedEof => {
            Disconnect::Client
        }
        _ => Disconnect::IoError,
    }
}

/// Decodes and handles every complete frame in `buf`; returns the bytes
/// used. A protocol violation starts the close and uses everything.
fn process(buf: &mut [u8], asm: &mut Assembler, shard: &Shard, conn: &Rc<Conn>) -> usize {
    let max_frame = shard.inner.config.max_message_bytes + COMMAND_OVERHEAD_BYTES;
    let mut pos = 0;
    while conn.out.borrow().closing().is_none() {
        let head = match frame::decode_head(&buf[pos..], max_frame) {
            Ok(Some(h)) if buf.len() - pos >= h.total_len() => h,
            Ok(_) => break,
            Err(e) => {
                protocol_close(conn, e);
                return buf.len();
            }
        };
        let payload = &mut buf[pos + head.header_len..pos + head.total_len()];
        frame::apply_mask(payload, head.mask);
        match asm.push(&head, payload) {
            Ok(Some(msg)) => handle(shard, conn, msg),
            Ok(None) => {}
            Err(e) => {
                protocol_close(conn, e);
                return buf.len();
            }
        }
        pos += head.total_len();
    }
    pos
}

fn protocol_close(conn: &Conn, e: ProtocolError) {
    let reason = match e {
        ProtocolError::TooLarge => Disconnect::TooLarge,
        ProtocolError::InvalidUtf8 => Disconnect::InvalidUtf8,
        _ => Disconnect::ProtocolError,
    };
    conn.close(reason, false, Some(frame::encode_close(e.close_code(), &e.to_string())));
}

fn handle(shard: &Shard, conn: &Rc<Conn>, msg: Incoming<'_>) {
    match msg {
        Incoming::Text(text) => match conn.format {
            Format::Json => command(shard, conn, text),
            Format::Echo => {
                shard.send_to(conn, frame::encode_frame(OpCode::Text, text.as_bytes()));
            }
            Format::Raw => {
                error(shard, conn, ErrorCode::BadRequest, "a format=raw connection takes its channels from the query only", None)
            }
        },
        Incoming::Binary(data) => match conn.format {
            Format::Echo => {
                shard.send_to(conn, frame::encode_frame(OpCode::Binary, data));
            }
            _ => error(shard, conn, ErrorCode::BadRequest, "binary frames are not accepted", None),
        },
        Incoming::Ping(payload) => {
            shard.send_to(conn, frame::encode_frame(OpCode::Pong, payload));
        }
        Incoming::Pong => {}
        Incoming::Close(code) => {
            let reply = match code {
                Some((code, _)) => frame::encode_close(code, ""),
                None => frame::encode_frame(OpCode::Close, b""),
            };
            conn.close(Disconnect::Client, false, Some(reply));
        }
    }
}

fn error(shard: &Shard, conn: &Conn, code: ErrorCode, message: &str, id: Option<&str>) {
    shard.metrics().error(code);
    shard.send_to(conn, json::reply_error(code, message, id));
}

fn command(shard: &Shard, conn: &Rc<Conn>, text: &str) {
    let cfg = &shard.inner.config;
    let parsed = command::parse(text, cfg.max_message_bytes);
    let id = parsed.id;
    let reply = match parsed.command {
        Err(e) => return error(shard, conn, e.code, &e.message, id),
        Ok(Command::Subscribe { channel }) => match subscribe_new(shard, conn, &channel) {
            Ok((epoch, _)) if shard.inner.broker.is_none() => json::reply_subscribed(&channel, epoch.as_str(), id),
            // Redis broker: the reply waits for Redis to confirm the node's
            // subscription, so that everything published after it arrives.
            Ok((_, created)) => match shard.inner.channels.broker_epoch(&channel) {
                Some(epoch) => json::reply_subscribed(&channel, epoch.as_str(), id),
                None => return reply_when_confirmed(shard, conn, channel.into_owned(), id.map(str::to_owned), created),
            },
            Err(code) => {
                let msg = if conn.subs.borrow().len() >= cfg.max_subscriptions {
                    format!("subscription limit reached ({} per connection)", cfg.max_subscriptions)
                } else {
                    "channel limit reached".to_string()
                };
                return error(shard, conn, code, &msg, id);
            }
        },
        Ok(Command::Unsubscribe { channel }) => {
            shard.unsubscribe(conn, &channel);
            json::reply_unsubscribed(&channel, id)
        }
        Ok(Command::Publish { channel, data }) => {
            if !cfg.client_publish {
                return error(shard, conn, ErrorCode::Forbidden, "publishing from clients is disabled on this server", id);
            }
            let payload = Payload::json_prevalidated(Bytes::copy_from_slice(data.as_bytes()));
            if shard.inner.broker.is_some() {
                return publish_through_broker(shard, conn, channel.into_owned(), payload, id.map(str::to_owned));
            }
            match shard.inner.publish_now(&channel, payload, shard.metrics()) {
                Ok(p) => json::reply_published(&p.channel, p.offset, p.epoch.as_str(), id),
                Err(e) => return error(shard, conn, e.code(), &e.to_string(), id),
            }
        }
    };
    shard.send_to(conn, reply);
}

/// Subscribes `conn`; also says whether this created the subscription.
fn subscribe_new(shard: &Shard, conn: &Rc<Conn>, channel: &str) -> Result<(crate::message::Epoch, bool), ErrorCode> {
    let had = conn.subs.borrow().iter().any(|c| **c == *channel);
    shard.subscribe(conn, channel).map(|e| (e, !had))
}

/// Publishes waiting for Redis at once on one connection, at most; more
/// get error `overloaded`.
const MAX_PUBLISHES_IN_FLIGHT: u32 = 256;

/// Publishes through the Redis broker and replies when Redis answered.
fn publish_through_broker(shard: &Shard, conn: &Rc<Conn>, channel: String, payload: Payload, id: Option<String>) {
    if conn.in_flight.get() >= MAX_PUBLISHES_IN_FLIGHT {
        let msg = format!("more than {MAX_PUBLISHES_IN_FLIGHT} publishes are waiting for the broker on this connection");
        return error(shard, conn, ErrorCode::Overloaded, &msg, id.as_deref());
    }
    conn.in_flight.set(conn.in_flight.get() + 1);
    let (inner, conn, shard_id) = (Arc::clone(&shard.inner), Rc::clone(conn), shard.id);
    tokio::task::spawn_local(async move {
        let r = inner.publish(&channel, payload, inner.metrics.shard(shard_id)).await;
        conn.in_flight.set(conn.in_flight.get() - 1);
        let Some(shard) = super::current(&inner) else { return };
        match r {
            Ok(p) => {
                shard.send_to(&conn, json::reply_published(&p.channel, p.offset, p.epoch.as_str(), id.as_deref()));
            }
            Err(e) => error(&shard, &conn, e.code(), &e.to_string(), id.as_deref()),
        }
    });
}

/// Sends the `subscribed` reply once Redis confirmed the node's
/// subscription. If it does not in time, the client gets error
/// `unavailable`, and the subscription is undone if this command created it
/// (a repeated subscribe leaves the existing one alone).
fn reply_when_confirmed(shard: &Shard, conn: &Rc<Conn>, channel: String, id: Option<String>, created: bool) {
    let (inner, conn) = (Arc::clone(&shard.inner), Rc::clone(conn));
    tokio::task::spawn_local(async move {
        let Some(broker) = inner.broker.as_ref() else { return };
        let epoch = broker.wait_confirmed(&inner, &channel).await;
        let Some(shard) = super::current(&inner) else { return };
        if conn.out.borrow().closing().is_some() {
            return;
        }
        let subscribed = conn.subs.borrow().iter().any(|c| **c == *channel);
        match epoch {
            Some(e) if subscribed => {
                shard.send_to(&conn, json::reply_subscribed(&channel, e.as_str(), id.as_deref()));
            }
            _ => {
                if created && subscribed {
                    shard.unsubscribe(&conn, &channel);
                }
                let msg = "the broker (Redis) did not confirm the subscription in time; retry";
                error(&shard, &conn, ErrorCode::Unavailable, msg, id.as_deref());
            }
        }
    });
}
