//! The open-loop publisher: message `g` is due at `start + g / rate`, is
//! stamped with that intended time, and is sent then whatever happened to
//! earlier messages. It never waits for deliveries; when it falls behind,
//! the lag is measured and latency still counts from the intended time.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use herald::proto::frame::OpCode;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

use crate::clock;
use crate::net::{self, Url};
use crate::payload;
use crate::stats::{self, Live, Plan};
use crate::ws;

/// Messages waiting for one publisher connection at most; past it a
/// message is refused as `backlog` (the target cannot keep up).
const BACKLOG: usize = 4096;

/// How messages are published.
#[derive(Debug, Clone)]
pub enum Method {
    /// `POST` the payload to this URL template (`{channel}` replaced), over
    /// `connections` pipelined keep-alive connections (a channel always on
    /// the same one).
    Http { url: Url, connections: usize },
    /// Herald's `publish` command on one WebSocket connection.
    Ws { url: Url },
    /// The payload as a text frame, on one connection per channel (the URL
    /// template with `{channel}` replaced).
    WsRaw { url: Url },
    /// `PUBLISH` to Redis, on the channel named by the template.
    Redis { url: String, channel: String },
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Http { .. } => "http",
            Method::Ws { .. } => "ws",
            Method::WsRaw { .. } => "ws-raw",
            Method::Redis { .. } => "redis",
        }
    }
}

/// What the publisher did.
#[derive(Debug)]
pub struct Outcome {
    /// Per message: whether the target took it.
    pub ok: Vec<bool>,
    pub lag: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    /// Messages scheduled (some may have been refused).
    pub scheduled: u64,
}

/// Message status while the run goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Unsent,
    /// Handed to the connection; no answer yet.
    Sent,
    Ok,
    Failed,
}

struct State {
    status: Vec<Status>,
    errors: BTreeMap<String, u64>,
}

impl State {
    /// The connection took message `g`.
    fn sent(&mut self, g: u64) {
        if let Some(s) = self.status.get_mut(g as usize) {
            *s = Status::Sent;
        }
    }

    fn done(&mut self, g: u64, result: Result<(), String>) {
        let s = &mut self.status[g as usize];
        match result {
            Ok(()) => *s = Status::Ok,
            Err(kind) => {
                *s = Status::Failed;
                *self.errors.entry(kind).or_default() += 1;
            }
        }
    }
}

/// Everything the publisher thread needs.
#[derive(Debug)]
pub struct Job {
    pub method: Method,
    pub plan: Plan,
    pub rate: f64,
    pub payload_bytes: usize,
    pub channel_names: Vec<String>,
    /// How long after the publisher is connected message 0 is due.
    pub lead: Duration,
    pub live: Arc<Live>,
    pub abort: Arc<AtomicBool>,
}

/// Connects the publisher (before the run starts, so its set-up is not
/// measured) and starts the thread that publishes on schedule.
///
/// Two threads: the timing thread sleeps precisely until each message is
/// due, stamps it and hands it over without ever blocking; the I/O thread
/// (a current-thread runtime) writes it and settles the answers. A slow
/// target therefore never delays the schedule: it fills the connection's
/// queue, and what does not fit is refused as `backlog`.
/// Returns that thread and when message 0 is due (nanoseconds, process
/// epoch): `lead` after the connections are ready, so a slow handshake
/// never eats into the schedule.
pub fn spawn(job: Job) -> anyhow::Result<(std::thread::JoinHandle<anyhow::Result<Outcome>>, u64)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let total = job.plan.total as usize;
    let io_job = IoJob { method: job.method.clone(), plan: job.plan, channel_names: job.channel_names.clone(), total };
    let io = std::thread::Builder::new().name("lg-publisher-io".into()).spawn(
        move || -> anyhow::Result<(Vec<Status>, BTreeMap<String, u64>)> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, io_run(io_job, ready_tx))
        },
    )?;
    let queues = match ready_rx.recv() {
        Ok(Ok(q)) => q,
        Ok(Err(e)) => {
            let _ = io.join();
            anyhow::bail!("publisher: {e}");
        }
        Err(_) => match io.join() {
            Ok(Err(e)) => return Err(e),
            _ => anyhow::bail!("the publisher thread failed"),
        },
    };
    let start_ns = clock::now_ns() + job.lead.as_nanos() as u64;
    let thread = std::thread::Builder::new().name("lg-publisher".into()).spawn(move || {
        let (lag, refused, scheduled) = schedule(&job, queues, start_ns);
        let (mut status, mut errors) = io.join().map_err(|_| anyhow::anyhow!("the publisher I/O thread failed"))??;
        for g in refused {
            status[g as usize] = Status::Failed;
            *errors.entry("backlog".into()).or_default() += 1;
        }
        // A message sent without an answer (ws-raw has none; a ws reply may
        // be missing) counts as published: if it was not, the loss shows.
        let ok = status.iter().map(|s| matches!(s, Status::Ok | Status::Sent)).collect();
        Ok(Outcome { ok, lag, errors, scheduled })
    })?;
    Ok((thread, start_ns))
}

/// A connection's queue of `(message, bytes to send)`.
type Queue = mpsc::Sender<(u64, Bytes)>;

struct IoJob {
    method: Method,
    plan: Plan,
    channel_names: Vec<String>,
    total: usize,
}

/// The timing loop: returns the lag histogram, the messages refused for
/// backlog and how many were scheduled.
fn schedule(job: &Job, queues: Vec<Queue>, start_ns: u64) -> (Histogram<u64>, Vec<u64>, u64) {
    let mut lag = stats::histogram();
    let mut refused = Vec::new();
    let mut buf = Vec::with_capacity(job.payload_bytes + 64);
    let mut masker = ws::Masker::new(start_ns);
    let mut frame = Vec::new();
    let interval_ns = 1e9 / job.rate;
    let mut g = 0u64;
    while g < job.plan.total {
        if job.abort.load(Ordering::Relaxed) {
            break;
        }
        let due = start_ns + (g as f64 * interval_ns) as u64;
        let now = clock::now_ns();
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        // Send everything due by now (a late wake-up catches up at once).
        let now = clock::now_ns();
        while g < job.plan.total {
            let due = start_ns + (g as f64 * interval_ns) as u64;
            if due > now {
                break;
            }
            let _ = lag.record(now.saturating_sub(due).max(1));
            let c = (g % job.plan.channels) as usize;
            payload::encode(&mut buf, job.plan.nonce, g, due, job.payload_bytes);
            let bytes = match &job.method {
                Method::Http { .. } | Method::Redis { .. } => Bytes::copy_from_slice(&buf),
                Method::Ws { .. } => {
                    let text = format!(
                        r#"{{"op":"publish","channel":"{}","data":"{}","id":{g}}}"#,
                        job.channel_names[c],
                        std::str::from_utf8(&buf).unwrap_or("")
                    );
                    frame.clear();
                    ws::client_frame(&mut frame, OpCode::Text, text.as_bytes(), masker.next());
                    Bytes::copy_from_slice(&frame)
                }
                Method::WsRaw { .. } => {
                    frame.clear();
                    ws::client_frame(&mut frame, OpCode::Text, &buf, masker.next());
                    Bytes::copy_from_slice(&frame)
                }
            };
            // A channel always takes the same connection: its order holds.
            if queues[c % queues.len()].try_send((g, bytes)).is_err() {
                refused.push(g);
            }
            job.live.sent.fetch_add(1, Ordering::Relaxed);
            g += 1;
        }
    }
    (lag, refused, g)
}

async fn io_run(
    job: IoJob,
    ready: std::sync::mpsc::Sender<Result<Vec<Queue>, String>>,
) -> anyhow::Result<(Vec<Status>, BTreeMap<String, u64>)> {
    let state = Rc::new(RefCell::new(State { status: vec![Status::Unsent; job.total], errors: BTreeMap::new() }));
    let tasks = match connect(&job, &state).await {
        Ok((queues, tasks)) => {
            let _ = ready.send(Ok(queues));
            tasks
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return Err(e);
        }
    };
    // The connection tasks end when the timing thread drops the queues and
    // their last answers are in.
    for t in tasks {
        let _ = t.await;
    }
    // Answers still on their way (ws replies, Redis): wait a little.
    let deadline = clock::now_ns() + 5_000_000_000;
    while clock::now_ns() < deadline && state.borrow().status.contains(&Status::Sent) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = state.borrow();
    Ok((st.status.clone(), st.errors.clone()))
}

async fn connect(job: &IoJob, state: &Rc<RefCell<State>>) -> anyhow::Result<(Vec<Queue>, Vec<tokio::task::JoinHandle<()>>)> {
    let mut queues = Vec::new();
    let mut tasks = Vec::new();
    match &job.method {
        Method::Http { url, connections } => {
            let addr = url.resolve().await?;
            // Fail early, with a clear message, if nothing listens there.
            drop(net::connect(addr, None, Duration::from_secs(10)).await.map_err(|e| anyhow::anyhow!("cannot connect to {url}: {e}"))?);
            for _ in 0..(*connections).clamp(1, job.channel_names.len()) {
                let (tx, rx) = mpsc::channel(BACKLOG);
                tasks.push(tokio::task::spawn_local(http_conn(
                    addr,
                    url.clone(),
                    job.channel_names.clone(),
                    job.plan.channels,
                    rx,
                    Rc::clone(state),
                )));
                queues.push(tx);
            }
        }
        Method::Ws { url } => {
            let path = url.path_for(&job.channel_names[0]);
            let (q, t) = ws_conn(url, &path, Rc::clone(state), true).await?;
            queues.push(q);
            tasks.push(t);
        }
        Method::WsRaw { url } => {
            for name in &job.channel_names {
                let (q, t) = ws_conn(url, &url.path_for(name), Rc::clone(state), false).await?;
                queues.push(q);
                tasks.push(t);
            }
        }
        Method::Redis { url, channel } => {
            let client = redis::Client::open(url.as_str()).with_context(|| format!("bad Redis URL {url:?}"))?;
            let conn = client.get_multiplexed_async_connection().await.with_context(|| format!("cannot connect to Redis at {url}"))?;
            let (tx, rx) = mpsc::channel(BACKLOG);
            let names: Vec<String> = job.channel_names.iter().map(|n| channel.replace("{channel}", n)).collect();
            tasks.push(tokio::task::spawn_local(redis_conn(conn, names, job.plan.channels, rx, Rc::clone(state))));
            queues.push(tx);
        }
    }
    Ok((queues, tasks))
}

/// Requests in flight on one HTTP connection at most; past it the
/// connection stops writing and its queue fills up.
const MAX_IN_FLIGHT: usize = 4096;

/// One pipelined HTTP/1.1 connection: requests are written as they come,
/// without waiting for answers, and the answers settle them in order.
/// Each channel always uses the same connection, so the target receives a
/// channel's messages in order.
async fn http_conn(
    addr: SocketAddr,
    url: Url,
    names: Vec<String>,
    channels: u64,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    state: Rc<RefCell<State>>,
) {
    // A server may close a keep-alive connection (a request limit, an
    // error): reconnect and go on; what was in flight is counted failed.
    loop {
        let stream = match net::connect(addr, None, Duration::from_secs(10)).await {
            Ok(s) => s,
            Err(e) => {
                // Nothing to talk to: refuse one message, then try again.
                let Some((g, _)) = rx.recv().await else { return };
                state.borrow_mut().done(g, Err(format!("connect_{}", e.kind)));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if http_session(stream, &url, &names, channels, &mut rx, &state).await {
            return;
        }
    }
}

/// Serves one connection; returns true when the queue closed (the run is
/// over), false when the connection failed.
async fn http_session(
    stream: tokio::net::TcpStream,
    url: &Url,
    names: &[String],
    channels: u64,
    rx: &mut mpsc::Receiver<(u64, Bytes)>,
    state: &Rc<RefCell<State>>,
) -> bool {
    let host = url.authority();
    let (mut read, mut write) = stream.into_split();
    let in_flight: Rc<RefCell<VecDeque<u64>>> = Rc::default();
    let room = Rc::new(tokio::sync::Notify::new());
    let reader = {
        let in_flight = Rc::clone(&in_flight);
        let state = Rc::clone(state);
        let room = Rc::clone(&room);
        tokio::task::spawn_local(async move {
            use tokio::io::AsyncReadExt;
            let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
            let mut ended = "io_closed";
            'read: loop {
                // Settle every complete response in `buf`.
                loop {
                    match parse_response(&buf) {
                        Ok(Some((status, used))) => {
                            buf.drain(..used);
                            let Some(g) = in_flight.borrow_mut().pop_front() else {
                                ended = "unexpected_response";
                                break 'read;
                            };
                            let r = if (200..300).contains(&status) { Ok(()) } else { Err(format!("http_{status}")) };
                            state.borrow_mut().done(g, r);
                            room.notify_one();
                        }
                        Ok(None) => break,
                        Err(e) => {
                            ended = e;
                            break 'read;
                        }
                    }
                }
                buf.reserve(16 * 1024);
                match read.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            for g in in_flight.borrow_mut().drain(..) {
                state.borrow_mut().done(g, Err(ended.to_string()));
            }
            room.notify_one();
        })
    };
    let mut out = Vec::with_capacity(64 * 1024);
    let mut itoa = itoa::Buffer::new();
    let closed = loop {
        let Some(first) = rx.recv().await else { break true };
        let mut next = Some(first);
        // Coalesce what is queued into one write.
        while let Some((g, body)) = next.take() {
            let path = url.path_for(&names[(g % channels) as usize]);
            out.extend_from_slice(b"POST ");
            out.extend_from_slice(path.as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
            out.extend_from_slice(host.as_bytes());
            out.extend_from_slice(b"\r\nContent-Type: text/plain\r\nContent-Length: ");
            out.extend_from_slice(itoa.format(body.len()).as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(&body);
            state.borrow_mut().sent(g);
            in_flight.borrow_mut().push_back(g);
            if out.len() < 64 * 1024 && in_flight.borrow().len() < MAX_IN_FLIGHT {
                next = rx.try_recv().ok();
            }
        }
        if reader.is_finished() || write.write_all(&out).await.is_err() {
            break false;
        }
        out.clear();
        while in_flight.borrow().len() >= MAX_IN_FLIGHT && !reader.is_finished() {
            room.notified().await;
        }
    };
    // Keep the connection open until the last answers are in: closing the
    // write side early can make a server drop the requests it has not read.
    while closed && !in_flight.borrow().is_empty() && !reader.is_finished() {
        room.notified().await;
    }
    drop(write);
    reader.abort();
    for g in in_flight.borrow_mut().drain(..) {
        state.borrow_mut().done(g, Err("io".into()));
    }
    closed
}

/// Parses one HTTP response at the start of `buf`: its status and length
/// (head and body), or `None` if incomplete.
fn parse_response(buf: &[u8]) -> Result<Option<(u16, usize)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > 64 * 1024 => return Err("response_head_too_large"),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("bad_response"),
    };
    let status = resp.code.unwrap_or(0);
    let mut length = 0usize;
    let mut chunked = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok()).ok_or("bad_content_length")?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.eq_ignore_ascii_case(b"chunked");
        }
    }
    if chunked {
        let mut d = ws::Dechunker::default();
        let mut sink = Vec::new();
        // Feed byte ranges until the body ends to find its length.
        let body = &buf[head..];
        let mut at = 0;
        while at < body.len() {
            let end = (at + 4096).min(body.len());
            let done = d.feed(&body[at..end], &mut sink).map_err(|_| "bad_chunked_body")?;
            sink.clear();
            if done {
                return Ok(Some((status, head + d.consumed_total())));
            }
            at = end;
        }
        return Ok(None);
    }
    if buf.len() < head + length {
        return Ok(None);
    }
    Ok(Some((status, head + length)))
}

/// Opens a publisher WebSocket; its reader settles replies (`herald`:
/// `published` / `error` with the message's `id`) and answers pings.
async fn ws_conn(url: &Url, path: &str, state: Rc<RefCell<State>>, replies: bool) -> anyhow::Result<(Queue, tokio::task::JoinHandle<()>)> {
    let addr = url.resolve().await?;
    let mut stream =
        net::connect(addr, None, Duration::from_secs(10)).await.map_err(|e| anyhow::anyhow!("cannot connect to {url}: {e}"))?;
    let first = match tokio::time::timeout(Duration::from_secs(10), ws::upgrade(&mut stream, url, path)).await {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("publisher handshake with {url}{path}: {e}"))?,
        Err(_) => anyhow::bail!("publisher handshake with {url}{path}: no answer within 10 s"),
    };
    let (mut read, write) = stream.into_split();
    let (tx, rx) = mpsc::channel::<(u64, Bytes)>(BACKLOG);
    let (pong_tx, pong_rx) = mpsc::channel::<Bytes>(16);
    let writer = tokio::task::spawn_local(ws_writer(write, rx, pong_rx, Rc::clone(&state), replies));
    tokio::task::spawn_local(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = first;
        let mut masker = ws::Masker::new(7);
        let id_finder = memchr::memmem::Finder::new(br#""id":"#);
        let mut tmp = vec![0u8; 64 * 1024];
        loop {
            let mut at = 0;
            loop {
                let (f, used) = match ws::parse_frame(&buf[at..]) {
                    Ok(Some(x)) => x,
                    Ok(None) => break,
                    // Not a WebSocket stream any more: stop reading it.
                    Err(_) => return,
                };
                at += used;
                match f.op {
                    OpCode::Text if replies => {
                        let failed = memchr::memmem::find(f.payload, br#""op":"error""#).is_some();
                        let id = id_finder.find(f.payload).and_then(|i| {
                            let digits: &[u8] = &f.payload[i + 5..];
                            let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
                            std::str::from_utf8(&digits[..end]).ok()?.parse::<u64>().ok()
                        });
                        if let Some(g) = id {
                            let kind = if failed { Err(reply_code(f.payload)) } else { Ok(()) };
                            if (g as usize) < state.borrow().status.len() {
                                state.borrow_mut().done(g, kind);
                            }
                        }
                    }
                    OpCode::Ping => {
                        let mut pong = Vec::new();
                        ws::client_frame(&mut pong, OpCode::Pong, f.payload, masker.next());
                        let _ = pong_tx.try_send(Bytes::from(pong));
                    }
                    OpCode::Close => return,
                    _ => {}
                }
            }
            buf.drain(..at);
            match read.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
    });
    Ok((tx, writer))
}

fn reply_code(reply: &[u8]) -> String {
    let Some(i) = memchr::memmem::find(reply, br#""code":""#) else { return "error".into() };
    let rest = &reply[i + 8..];
    let end = memchr::memchr(b'"', rest).unwrap_or(0);
    format!("error_{}", String::from_utf8_lossy(&rest[..end]))
}

async fn ws_writer(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    mut pongs: mpsc::Receiver<Bytes>,
    state: Rc<RefCell<State>>,
    replies: bool,
) {
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some((g, frame)) = m else { return };
                state.borrow_mut().sent(g);
                let r = write.write_all(&frame).await;
                if r.is_err() {
                    state.borrow_mut().done(g, Err("io".into()));
                } else if !replies {
                    state.borrow_mut().done(g, Ok(()));
                }
            }
            Some(p) = pongs.recv() => {
                let _ = write.write_all(&p).await;
            }
        }
    }
}

async fn redis_conn(
    conn: redis::aio::MultiplexedConnection,
    names: Vec<String>,
    channels: u64,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    state: Rc<RefCell<State>>,
) {
    // Requests are pipelined on the one connection; each answer settles
    // its message.
    while let Some((g, body)) = rx.recv().await {
        state.borrow_mut().sent(g);
        let mut conn = conn.clone();
        let name = names[(g % channels) as usize].clone();
        let state = Rc::clone(&state);
        tokio::task::spawn_local(async move {
            let r: redis::RedisResult<i64> = redis::cmd("PUBLISH").arg(&name).arg(&body[..]).query_async(&mut conn).await;
            state.borrow_mut().done(g, r.map(|_| ()).map_err(|_| "redis".to_string()));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::parse_response;

    #[test]
    fn pipelined_responses_are_split_by_length() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n";
        let (status, n) = parse_response(two).unwrap().unwrap();
        assert_eq!((status, &two[n..n + 8]), (200, &b"HTTP/1.1"[..]));
        let rest = &two[n..];
        assert_eq!(parse_response(rest).unwrap(), Some((503, rest.len())));
        assert_eq!(parse_response(&rest[..rest.len() - 1]).unwrap(), None);
        assert_eq!(parse_response(&two[..n - 1]).unwrap(), None);
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
