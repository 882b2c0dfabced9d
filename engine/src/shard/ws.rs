//! A WebSocket connection's task: one hand-polled future that moves bytes
//! between the socket and the connection's [`Session`] (the protocol state
//! machine in `proto`), writes the outbound queue with vectored I/O, and
//! runs the commands the session hands over.
//!
//! Reads land in the shard's shared scratch buffer; the session keeps
//! bytes of its own only while a frame or fragmented message is partly
//! received, so an idle connection holds no read buffer. Polling by hand
//! (no `select!` over non-cancel-safe futures) keeps every step resumable.

use std::borrow::Cow;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::conn::{Access, Conn, Format, Pending, MAX_IOV};
use super::Shard;
use crate::broker::{HistoryError, Pending as Answer};
use crate::config::{Config, COMMAND_OVERHEAD_BYTES};
use crate::message::{Position, PublishError, Published};
use crate::metrics::Disconnect;
use crate::proto::command::{self, Command};
use crate::proto::frame::{self, OpCode, ProtocolError};
use crate::proto::json::{self, Payload};
use crate::proto::session::{CloseCause, Event, Session, SessionConfig, Timer};
use crate::proto::ErrorCode;

/// Reads per poll before the task yields to others.
const READS_PER_POLL: usize = 16;
/// Publishes waiting for the broker at once on one connection, at most;
/// more get error `overloaded`.
const MAX_PUBLISHES_IN_FLIGHT: u32 = 256;

/// The write side's progress once the session is closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// Writing frames as they come.
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
    session: Session,
    timer: Pin<Box<Sleep>>,
    /// What `timer` is set to.
    armed: Instant,
    write: Write,
}

/// Serves a WebSocket over a plain TCP socket, which the shard's fan-out
/// may also write message frames to directly (see [`Conn::write_now`]).
pub(crate) async fn run_tcp(shard: Rc<Shard>, conn: Rc<Conn>, tcp: TcpStream, leftover: Bytes) {
    let tcp = Rc::new(tcp);
    conn.set_direct(Some(Rc::clone(&tcp)));
    // The task ends by removing the connection; the socket must not outlive
    // it in the connection (a fan-out could still hold the connection).
    struct Undirect(Rc<Conn>);
    impl Drop for Undirect {
        fn drop(&mut self) {
            self.0.set_direct(None);
        }
    }
    let _undirect = Undirect(Rc::clone(&conn));
    run(shard, conn, SharedTcp(tcp), leftover).await;
}

/// A TCP socket shared between a connection's task and its shard's
/// fan-out, driven through readiness and `try_*` calls (which take `&self`).
struct SharedTcp(Rc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// Serves a WebSocket connection whose handshake is done until it ends.
/// `leftover` holds bytes the client sent right after its handshake.
pub(crate) async fn run<S>(shard: Rc<Shard>, conn: Rc<Conn>, io: S, leftover: Bytes)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = shard.config();
    let now = Instant::now();
    let mut session = Session::new(
        SessionConfig {
            ping_interval: Config::dur(cfg.ping_interval_ms),
            idle_timeout: Config::dur(cfg.idle_timeout_ms),
            close_timeout: Config::dur(cfg.close_timeout_ms),
            max_message: cfg.max_message_bytes + COMMAND_OVERHEAD_BYTES,
        },
        now,
    );
    if let Some(agreed) = conn.deflate {
        session = session.with_deflate(agreed.client_context());
    }
    let armed = session.deadline();
    let mut task = WsTask { timer: Box::pin(tokio::time::sleep_until(armed.into())), armed, session, write: Write::Open, shard, conn, io };
    if !leftover.is_empty() {
        let mut bytes = leftover.to_vec();
        task.receive(&mut bytes, now);
    }
    // `leftover` is a slice of hyper's read buffer (8 KiB or more): release
    // it now rather than for the life of the connection.
    drop(leftover);
    let reason = poll_fn(|cx| task.poll(cx)).await;
    task.shard.remove_conn(&task.conn, reason);
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsTask<S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        // What the connection logs is in its span (when `herald::conn` is at debug).
        let logged = self.conn.log.is_some().then(|| Rc::clone(&self.conn));
        let _entered = logged.as_ref().and_then(|c| c.log.as_ref()).map(|l| l.span.enter());
        self.conn.out.borrow_mut().set_waker(cx.waker());
        loop {
            if let Poll::Ready(reason) = self.step(cx) {
                return Poll::Ready(reason);
            }
            let deadline = self.session.deadline();
            if deadline != self.armed {
                self.armed = deadline;
                self.timer.as_mut().reset(deadline.into());
            }
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => match self.session.on_timer(Instant::now()) {
                    Timer::Idle => {}
                    Timer::Ping(ping) => {
                        self.shard.send_to(&self.conn, ping);
                    }
                    Timer::Close(cause, last) => close(&self.conn, cause, last),
                    Timer::Expired => return Poll::Ready(self.closing_reason().unwrap_or(Disconnect::IoError)),
                },
            }
        }
    }

    /// Hands bytes read from the client to the session and acts on what it says.
    fn receive(&mut self, buf: &mut [u8], now: Instant) {
        let (shard, conn) = (&self.shard, &self.conn);
        self.session.receive(buf, now, |event| {
            match event {
                Event::Text(text) => match conn.format {
                    Format::Json => command(shard, conn, text),
                    Format::Echo => {
                        shard.send_to(conn, frame::encode_frame(OpCode::Text, text.as_bytes()));
                    }
                    Format::Raw => {
                        error(shard, conn, ErrorCode::BadRequest, "a format=raw connection takes its channels from the query only", None)
                    }
                },
                Event::Binary(data) => match conn.format {
                    Format::Echo => {
                        shard.send_to(conn, frame::encode_frame(OpCode::Binary, data));
                    }
                    _ => error(shard, conn, ErrorCode::BadRequest, "binary frames are not accepted", None),
                },
                Event::Send(f) => {
                    shard.send_to(conn, f);
                }
                Event::Close(cause, last) => close(conn, cause, last),
            }
            conn.out.borrow().closing().is_none()
        });
        if conn.deflate.is_some() {
            let st = self.session.take_inflate_stats();
            if st.messages > 0 {
                let m = shard.metrics();
                m.inflated.add(st.messages);
                m.inflate_in.add(st.bytes_in);
                m.inflate_out.add(st.bytes_out);
            }
        }
    }

    /// Reads, writes and closes as far as the socket allows.
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        if self.write == Write::Open {
            if let Poll::Ready(reason) = self.poll_read(cx) {
                // The client is gone (or the socket failed): nothing more can be written.
                return Poll::Ready(self.closing_reason().unwrap_or(reason));
            }
        }
        if self.write == Write::Open && self.closing_reason().is_some() {
            self.write = Write::Flushing;
            self.session.start_closing(Instant::now());
        }
        if matches!(self.write, Write::Open | Write::Flushing) {
            if let Poll::Ready(Err(e)) = self.poll_write(cx) {
                return Poll::Ready(self.closing_reason().unwrap_or(classify(&e)));
            }
            if self.write == Write::Flushing {
                // Keep reading (and discarding) so the client's close frame or
                // EOF is noticed while the rest is written.
                if let Poll::Ready(r) = self.poll_discard(cx) {
                    return Poll::Ready(self.closing_reason().unwrap_or(r));
                }
                if self.conn.out.borrow().is_empty() {
                    self.write = Write::Shutdown;
                }
            }
        }
        if self.write == Write::Shutdown {
            match Pin::new(&mut self.io).poll_shutdown(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => self.write = Write::Linger,
            }
        }
        if self.write == Write::Linger {
            if let Poll::Ready(r) = self.poll_discard(cx) {
                return Poll::Ready(self.closing_reason().unwrap_or(r));
            }
        }
        Poll::Pending
    }

    fn closing_reason(&self) -> Option<Disconnect> {
        self.conn.out.borrow().closing().map(|c| c.reason)
    }

    /// Reads and hands client bytes to the session until the socket has
    /// nothing more. Ready means the connection is over (EOF or error).
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
            self.receive(&mut scratch[..n], Instant::now());
            if self.closing_reason().is_some() {
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
                self.conn.caught_up(self.shard.config().outbound_queue_bytes, metrics);
                if self.conn.out.borrow().is_empty() {
                    // A TLS stream holds what it encrypted until flushed
                    // (a plain socket's flush does nothing).
                    return Pin::new(&mut self.io).poll_flush(cx);
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

fn close(conn: &Conn, cause: CloseCause, last: Bytes) {
    let reason = match cause {
        CloseCause::Client => Disconnect::Client,
        CloseCause::Idle => Disconnect::IdleTimeout,
        CloseCause::Protocol(ProtocolError::TooLarge) => Disconnect::TooLarge,
        CloseCause::Protocol(ProtocolError::InvalidUtf8) => Disconnect::InvalidUtf8,
        CloseCause::Protocol(_) => Disconnect::ProtocolError,
    };
    conn.close(reason, Pending::Keep, Some(last));
}

/// A command's optional `since`: a position, or the error message.
fn parse_since(since: Option<&str>) -> Result<Option<Position>, String> {
    since
        .map(|s| {
            Position::parse(s)
                .ok_or_else(|| format!("\"since\" is not a position <epoch>:<offset>: {:?}", crate::proto::truncate_str(s, 64)))
        })
        .transpose()
}

fn error(shard: &Shard, conn: &Conn, code: ErrorCode, message: &str, id: Option<&str>) {
    shard.metrics().error(code);
    shard.send_to(conn, json::reply_error(code, message, id));
}

fn command(shard: &Rc<Shard>, conn: &Rc<Conn>, text: &str) {
    let cfg = shard.config();
    let parsed = command::parse(text, cfg.max_message_bytes);
    let id = parsed.id;
    let reply = match parsed.command {
        Err(e) => return error(shard, conn, e.code, &e.message, id),
        Ok(Command::Subscribe { channel, since }) => {
            let since = match parse_since(since.as_deref()) {
                Ok(since) => since,
                Err(msg) => return error(shard, conn, ErrorCode::BadRequest, &msg, id),
            };
            // The application decides on its namespaces, but a user
            // channel stays its user's alone.
            let hook = shard.up.rules().of(&channel).subscribe_proxy && !channel.starts_with("user:");
            if hook {
                // Bounded with the publishes waiting on this connection.
                if conn.in_flight.get() >= MAX_PUBLISHES_IN_FLIGHT {
                    let msg = format!("more than {MAX_PUBLISHES_IN_FLIGHT} commands are waiting on this connection");
                    return error(shard, conn, ErrorCode::Overloaded, &msg, id);
                }
                conn.in_flight.set(conn.in_flight.get() + 1);
                let user = conn.access.borrow().user().map(str::to_owned);
                let name: Arc<str> = Arc::from(&*channel);
                let token = conn.hook_pending(&name);
                let (shard, conn, id) = (Rc::clone(shard), Rc::clone(conn), id.map(str::to_owned));
                tokio::task::spawn_local(async move {
                    let up = Arc::clone(&shard.up);
                    let Some(proxy) = up.proxy() else { return };
                    let r = proxy.subscribe(user.as_deref(), &name).await;
                    conn.in_flight.set(conn.in_flight.get() - 1);
                    if conn.out.borrow().closing().is_some() {
                        return;
                    }
                    let id = id.as_deref();
                    if !conn.hook_answered(token) {
                        // Unsubscribed while the application was asked.
                        shard.send_to(&conn, json::reply_unsubscribed(&name, id));
                        return;
                    }
                    match r {
                        Ok(()) => subscribe(&shard, &conn, name.to_string(), since, id),
                        Err(e) => hook_refused(&shard, &conn, 0, &format!("cannot subscribe to {name:?}: {e}"), &e, id),
                    }
                });
                return;
            }
            if !conn.access.borrow().may_subscribe(shard.up.rules(), &channel) {
                shard.metrics().forbidden[0].inc();
                return error(shard, conn, ErrorCode::Forbidden, &format!("not allowed to subscribe to {channel:?}"), id);
            }
            return subscribe(shard, conn, channel.into_owned(), since, id);
        }
        Ok(Command::History { channel, since, limit }) => {
            let since = match parse_since(since.as_deref()) {
                Ok(since) => since,
                Err(msg) => return error(shard, conn, ErrorCode::BadRequest, &msg, id),
            };
            if !may_read(shard, conn, &channel) {
                shard.metrics().forbidden[0].inc();
                return error(shard, conn, ErrorCode::Forbidden, &format!("not allowed to read the history of {channel:?}"), id);
            }
            let max = cfg.recovery_max;
            let Some(limit) = limit.map_or(Some(max), |l| usize::try_from(l).ok().filter(|l| *l <= max)) else {
                return error(shard, conn, ErrorCode::BadRequest, &format!("\"limit\" must be from 1 to {max}"), id);
            };
            let answer = |shard: &Shard, conn: &Conn, channel: &str, r: Result<crate::broker::Page, HistoryError>, id: Option<&str>| match r
            {
                Ok(page) => {
                    let body = page.to_json(true, channel, id, shard.config().outbound_queue_bytes / 2);
                    shard.send_to(conn, frame::encode_frame(OpCode::Text, &body));
                }
                Err(e) => error(shard, conn, e.code(), &format!("no history for {channel:?}: {e}"), id),
            };
            match shard.up.history(&channel, since, limit) {
                Answer::Ready(r) => return answer(shard, conn, &channel, r, id),
                Answer::Waiting(page) => {
                    let (shard, conn, id, channel) = (Rc::clone(shard), Rc::clone(conn), id.map(str::to_owned), channel.into_owned());
                    tokio::task::spawn_local(async move {
                        let r = page.await;
                        answer(&shard, &conn, &channel, r, id.as_deref());
                    });
                    return;
                }
            }
        }
        Ok(Command::Presence { channel }) => {
            if !shard.up.rules().of(&channel).presence {
                let msg = format!("presence is off for {channel:?} (namespace option presence)");
                return error(shard, conn, ErrorCode::BadRequest, &msg, id);
            }
            if !may_read(shard, conn, &channel) {
                shard.metrics().forbidden[0].inc();
                return error(shard, conn, ErrorCode::Forbidden, &format!("not allowed to read the presence of {channel:?}"), id);
            }
            let answer =
                |shard: &Shard, conn: &Conn, channel: &str, r: Result<crate::presence::Snapshot, HistoryError>, id: Option<&str>| match r {
                    Ok(snap) => {
                        shard.send_to(conn, snap.reply(channel, id));
                    }
                    Err(e) => error(shard, conn, e.code(), &format!("no presence for {channel:?}: {e}"), id),
                };
            match shard.up.presence(&channel) {
                Answer::Ready(r) => return answer(shard, conn, &channel, r, id),
                Answer::Waiting(read) => {
                    let (shard, conn, id, channel) = (Rc::clone(shard), Rc::clone(conn), id.map(str::to_owned), channel.into_owned());
                    tokio::task::spawn_local(async move {
                        let r = read.await;
                        answer(&shard, &conn, &channel, r, id.as_deref());
                    });
                    return;
                }
            }
        }
        Ok(Command::Auth { token }) => {
            let Some(auth) = shard.up.auth() else {
                return error(shard, conn, ErrorCode::BadRequest, "this server verifies no tokens ([auth] is not set)", id);
            };
            let identity = match auth.verify(&token) {
                Ok(identity) => identity,
                Err(e) => {
                    shard.metrics().auth[e.result()].inc();
                    return error(shard, conn, ErrorCode::Unauthorized, &format!("token refused: {e}"), id);
                }
            };
            let other = matches!(&*conn.access.borrow(), Access::User(old) if old.user() != identity.user());
            if other {
                shard.metrics().auth[crate::auth::TokenError::REJECTED].inc();
                conn.close(Disconnect::UserChanged, Pending::Keep, Some(frame::encode_close(4003, "user changed")));
                return;
            }
            shard.metrics().auth[crate::auth::TokenError::OK].inc();
            if matches!(&*conn.access.borrow(), Access::User(_)) {
                shard.metrics().auth_refreshes.inc();
            }
            let reply = json::reply_authed(identity.user(), identity.expires_at(), id);
            let was_user = matches!(&*conn.access.borrow(), Access::User(_));
            if !was_user {
                // Its subscriptions so far counted as anonymous: they are
                // this user's now.
                let subs = conn.subs.borrow().clone();
                for ch in &subs {
                    shard.up.presence_changed(ch, None, false);
                    shard.up.presence_changed(ch, Some(identity.user()), true);
                }
            }
            *conn.access.borrow_mut() = Access::User(identity);
            shard.watch_expiry(conn);
            reply
        }
        Ok(Command::Unsubscribe { channel }) => {
            conn.cancel_hooked(&channel);
            shard.unsubscribe(conn, &channel);
            json::reply_unsubscribed(&channel, id)
        }
        Ok(Command::Publish { channel, data, idempotency_key }) => {
            let rules = shard.up.rules().of(&channel);
            if !rules.client_publish {
                return error(shard, conn, ErrorCode::Forbidden, "publishing from clients is disabled on this server", id);
            }
            let hook = rules.publish_proxy;
            if !hook && !conn.access.borrow().may_publish(&channel) {
                shard.metrics().forbidden[1].inc();
                return error(shard, conn, ErrorCode::Forbidden, &format!("not allowed to publish to {channel:?}"), id);
            }
            if conn.in_flight.get() >= MAX_PUBLISHES_IN_FLIGHT {
                let msg = format!("more than {MAX_PUBLISHES_IN_FLIGHT} publishes are waiting for the broker on this connection");
                return error(shard, conn, ErrorCode::Overloaded, &msg, id);
            }
            let payload = Payload::json_prevalidated(Bytes::copy_from_slice(data.as_bytes()));
            if hook {
                // The application sees the change first: it may refuse it,
                // or store it and return the version to publish.
                conn.in_flight.set(conn.in_flight.get() + 1);
                let user = conn.access.borrow().user().map(str::to_owned);
                let key = idempotency_key.map(Cow::into_owned);
                let (shard, conn, id, channel) = (Rc::clone(shard), Rc::clone(conn), id.map(str::to_owned), channel.into_owned());
                tokio::task::spawn_local(async move {
                    let up = Arc::clone(&shard.up);
                    let asked = match up.proxy() {
                        Some(proxy) => {
                            proxy
                                .publish(
                                    user.as_deref(),
                                    &channel,
                                    std::str::from_utf8(payload.as_bytes()).unwrap_or("null"),
                                    key.as_deref(),
                                )
                                .await
                        }
                        None => Ok(None),
                    };
                    let r = match asked {
                        Ok(data) => Ok(up.publish(&channel, data.unwrap_or(payload), key.as_deref()).await),
                        Err(e) => Err(e),
                    };
                    conn.in_flight.set(conn.in_flight.get() - 1);
                    match r {
                        Ok(r) => published(&shard, &conn, r, id.as_deref()),
                        Err(e) => hook_refused(&shard, &conn, 1, &format!("not published to {channel:?}: {e}"), &e, id.as_deref()),
                    }
                });
                return;
            }
            let mut publishing = shard.up.publish(&channel, payload, idempotency_key.as_deref());
            match publishing.ready() {
                Some(r) => return published(shard, conn, r, id),
                None => {
                    // Waiting for the broker: reply when it answers.
                    conn.in_flight.set(conn.in_flight.get() + 1);
                    let (shard, conn, id) = (Rc::clone(shard), Rc::clone(conn), id.map(str::to_owned));
                    tokio::task::spawn_local(async move {
                        let r = publishing.await;
                        conn.in_flight.set(conn.in_flight.get() - 1);
                        published(&shard, &conn, r, id.as_deref());
                    });
                    return;
                }
            }
        }
    };
    shard.send_to(conn, reply);
}

/// Counts a publish's result and answers it.
fn published(shard: &Shard, conn: &Conn, r: Result<Published, PublishError>, id: Option<&str>) {
    crate::message::count_publish(shard.metrics(), &r);
    match r {
        Ok(p) => {
            shard.send_to(conn, json::reply_published(&p.channel, p.offset, p.epoch.as_str(), id));
        }
        Err(e) => error(shard, conn, e.code(), &e.to_string(), id),
    }
}

/// Whether `conn` may read `channel`'s history and presence: its
/// subscribers may (a subscribe hook may have let them in), and those who
/// may subscribe.
fn may_read(shard: &Shard, conn: &Conn, channel: &str) -> bool {
    conn.subs.borrow().iter().any(|c| **c == *channel) || conn.access.borrow().may_subscribe(shard.up.rules(), channel)
}

/// Answers a command a hook did not allow: `forbidden` (counted by
/// `action`, 0 subscribe, 1 publish) when the application refused it, else
/// `unavailable`.
fn hook_refused(shard: &Shard, conn: &Conn, action: usize, message: &str, e: &crate::proxy::HookError, id: Option<&str>) {
    if matches!(e, crate::proxy::HookError::Refused { .. }) {
        shard.metrics().forbidden[action].inc();
    }
    error(shard, conn, e.code(), message, id);
}

/// Subscribes `conn` to `channel` (allowed already) and answers once the
/// broker placed the subscription.
fn subscribe(shard: &Rc<Shard>, conn: &Rc<Conn>, channel: String, since: Option<Position>, id: Option<&str>) {
    let created = match shard.subscribe(conn, &channel) {
        Ok(created) => created,
        Err(e) => return error(shard, conn, ErrorCode::Limit, &e.to_string(), id),
    };
    // A repeated subscribe answers as a plain one.
    let since = since.filter(|_| created);
    let reply = move |channel: &str, id: Option<&str>| {
        let channel = channel.to_owned();
        let id = id.map(str::to_owned);
        move |epoch: crate::message::Epoch, top, recovered| {
            Some(json::reply_subscribed(&channel, epoch.as_str(), Some(top), recovered, id.as_deref()))
        }
    };
    match shard.up.starting_point(&channel, since) {
        Answer::Ready(Ok(start)) => shard.start_subscription(conn, &channel, start, created, reply(&channel, id)),
        Answer::Ready(Err(e)) => refuse_subscription(shard, conn, &channel, created, &e, id),
        Answer::Waiting(start) => {
            // Live messages wait until the start is read.
            let token = if created { conn.subs.borrow().iter().find(|c| ***c == *channel).map(|name| conn.hold(name)) } else { None };
            let (shard, conn, id) = (Rc::clone(shard), Rc::clone(conn), id.map(str::to_owned));
            tokio::task::spawn_local(async move {
                let r = start.await;
                if conn.out.borrow().closing().is_some() {
                    return;
                }
                // Still this command's subscription: not unsubscribed
                // (nor subscribed again) meanwhile.
                let current = match token {
                    Some(t) => conn.holding(&channel, t),
                    None => conn.subs.borrow().iter().any(|c| **c == *channel),
                };
                let id = id.as_deref();
                match r {
                    Ok(start) if current => shard.start_subscription(&conn, &channel, start, created, reply(&channel, id)),
                    // The command still gets its answer, and touches
                    // nothing: nothing was replayed for it.
                    Ok(start) => {
                        let recovered = since.map(|_| false);
                        shard.send_to(&conn, json::reply_subscribed(&channel, start.epoch.as_str(), Some(start.top), recovered, id));
                    }
                    Err(e) if current => refuse_subscription(&shard, &conn, &channel, created, &e, id),
                    Err(e) => error(&shard, &conn, e.code(), &format!("cannot subscribe to {channel:?}: {e}"), id),
                }
            });
        }
    }
}

/// Answers a subscribe whose start could not be read with an error, and
/// undoes the subscription if this command created it (a repeated
/// subscribe leaves the existing one alone).
fn refuse_subscription(shard: &Shard, conn: &Conn, channel: &str, created: bool, e: &HistoryError, id: Option<&str>) {
    if created {
        shard.unsubscribe(conn, channel);
    }
    error(shard, conn, e.code(), &format!("cannot subscribe to {channel:?}: {e}"), id);
}
