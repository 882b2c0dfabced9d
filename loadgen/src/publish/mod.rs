//! The publisher: message `g` is due at `start + g / rate` and is stamped
//! with that intended time. By default it is open loop: `g` is sent then
//! whatever happened to earlier messages (pipelined, never waiting for
//! replies or deliveries). With an in-flight limit (`--publish-inflight`)
//! a connection holds at most that many requests awaiting their reply, so
//! `g` may go out late (1: closed loop, as an application backend
//! publishes). Either way the lag is measured and latency still counts
//! from the intended time, and each reply's round trip is recorded.
//!
//! - [`http`]: pipelined `POST`s on keep-alive HTTP/1.1 connections.
//! - [`ws`]: Herald's `publish` command, or raw text frames, on WebSockets.
//! - [`redis`]: `PUBLISH` to Redis.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use herald::proto::frame::OpCode;
use tokio::sync::mpsc;

use crate::clock;
use crate::net::{self, Url};
use crate::payload;
use crate::stats::{self, Live, Plan};

mod http;
mod redis;
mod ws;

/// Messages waiting for one publisher connection at most; past it a
/// message is refused as `backlog` (the target cannot keep up).
const BACKLOG: usize = 4096;

/// The largest `--publish-inflight`: the HTTP publisher's own bound on
/// requests in flight (see `http::MAX_IN_FLIGHT`).
pub const MAX_INFLIGHT: usize = 4096;

/// How messages are published.
#[derive(Debug, Clone)]
pub enum Method {
    /// `POST` the payload to this URL template (`{channel}` replaced), over
    /// `connections` pipelined keep-alive connections (a channel always on
    /// the same one); the body is `body` with `{channel}` and `{payload}`
    /// replaced, or the payload alone; `sign` adds a signature.
    Http { url: Url, connections: usize, body: Option<String>, content_type: String, sign: Option<Sign> },
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

/// How an HTTP publish is signed.
#[derive(Debug, Clone)]
pub enum Sign {
    /// The Pusher HTTP API: `auth_key`, `auth_timestamp`, `auth_version`,
    /// `body_md5` and an HMAC-SHA256 `auth_signature` of
    /// `POST\n<path>\n<those parameters, sorted>`.
    Pusher { key: String, secret: String },
}

impl Sign {
    /// `pusher:KEY:SECRET`.
    pub fn parse(s: &str) -> anyhow::Result<Sign> {
        match s.split_once(':') {
            Some(("pusher", rest)) => match rest.split_once(':') {
                Some((key, secret)) if !key.is_empty() && !secret.is_empty() => {
                    Ok(Sign::Pusher { key: key.to_string(), secret: secret.to_string() })
                }
                _ => anyhow::bail!("--publish-sign pusher needs pusher:KEY:SECRET"),
            },
            _ => anyhow::bail!("--publish-sign must be pusher:KEY:SECRET (the one signing scheme loadgen knows)"),
        }
    }

    /// The query string to append to `path` for a request with `body`,
    /// sent at Unix time `now_s`.
    pub fn query(&self, path: &str, body: &[u8], now_s: u64) -> String {
        use hmac::Mac;
        use md5::Digest;
        match self {
            Sign::Pusher { key, secret } => {
                let md5 = hex(&md5::Md5::digest(body));
                let params = format!("auth_key={key}&auth_timestamp={now_s}&auth_version=1.0&body_md5={md5}");
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
                mac.update(format!("POST\n{path}\n{params}").as_bytes());
                format!("{params}&auth_signature={}", hex(&mac.finalize().into_bytes()))
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What the publisher did.
#[derive(Debug)]
pub struct Outcome {
    /// Per message: whether the target took it.
    pub ok: Vec<bool>,
    pub lag: Histogram<u64>,
    /// Write of a request to read of its reply, per measured message that
    /// had one (ns).
    pub rtt: Histogram<u64>,
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
    /// Round trips of measured messages.
    rtt: Histogram<u64>,
    first_measured: u64,
    /// Lag taken when a message is written, not when it is handed over:
    /// with an in-flight limit the connection may hold it back.
    lag: Option<Histogram<u64>>,
}

impl State {
    /// The connection writes message `g`, due at `due_ns`, at `now_ns`.
    fn sent(&mut self, g: u64, due_ns: u64, now_ns: u64) {
        if let Some(s) = self.status.get_mut(g as usize) {
            *s = Status::Sent;
        }
        if let Some(lag) = &mut self.lag {
            let _ = lag.record(now_ns.saturating_sub(due_ns).max(1));
        }
    }

    /// The reply to message `g`, written at `written_ns`, was read at `now_ns`.
    fn round_trip(&mut self, g: u64, written_ns: u64, now_ns: u64) {
        if g >= self.first_measured {
            let _ = self.rtt.record(now_ns.saturating_sub(written_ns).max(1));
        }
    }

    /// Whether `g` was written and awaits its answer.
    fn awaiting(&self, g: u64) -> bool {
        self.status.get(g as usize) == Some(&Status::Sent)
    }

    /// Whether any message awaits its answer.
    fn any_awaiting(&self) -> bool {
        self.status.contains(&Status::Sent)
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
    /// JSON payloads ([`payload::encode_json`]).
    pub payload_json: bool,
    /// Requests awaiting their reply on one connection at most; `None`:
    /// unlimited (pipelined, open loop).
    pub inflight: Option<usize>,
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
/// queue, and what does not fit is refused as `backlog`. With an in-flight
/// limit, a message waits in that queue until a reply makes room, and its
/// lag is taken when it is written.
/// Returns that thread and when message 0 is due (nanoseconds, process
/// epoch): `lead` after the connections are ready, so a slow handshake
/// never eats into the schedule.
pub fn spawn(job: Job) -> anyhow::Result<(std::thread::JoinHandle<anyhow::Result<Outcome>>, u64)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let total = job.plan.total as usize;
    let io_job =
        IoJob { method: job.method.clone(), plan: job.plan, inflight: job.inflight, channel_names: job.channel_names.clone(), total };
    let io = std::thread::Builder::new().name("lg-publisher-io".into()).spawn(move || -> anyhow::Result<IoOutcome> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, io_run(io_job, ready_tx))
    })?;
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
        let (handover_lag, refused, scheduled) = schedule(&job, queues, start_ns);
        let IoOutcome { mut status, mut errors, rtt, write_lag } =
            io.join().map_err(|_| anyhow::anyhow!("the publisher I/O thread failed"))??;
        let lag = write_lag.unwrap_or(handover_lag);
        for g in refused {
            status[g as usize] = Status::Failed;
            *errors.entry("backlog".into()).or_default() += 1;
        }
        // A message sent without an answer (ws-raw has none; a ws reply may
        // be missing) counts as published: if it was not, the loss shows.
        let ok = status.iter().map(|s| matches!(s, Status::Ok | Status::Sent)).collect();
        Ok(Outcome { ok, lag, rtt, errors, scheduled })
    })?;
    Ok((thread, start_ns))
}

/// One message handed to a connection.
struct Item {
    g: u64,
    /// Its intended send time (process-epoch ns).
    due_ns: u64,
    bytes: Bytes,
}

/// A connection's queue of messages to send.
type Queue = mpsc::Sender<Item>;

struct IoJob {
    method: Method,
    plan: Plan,
    inflight: Option<usize>,
    channel_names: Vec<String>,
    total: usize,
}

impl IoJob {
    /// Requests a connection may have awaiting their reply.
    fn limit(&self) -> usize {
        self.inflight.unwrap_or(usize::MAX)
    }
}

/// What the I/O thread observed.
struct IoOutcome {
    status: Vec<Status>,
    errors: BTreeMap<String, u64>,
    rtt: Histogram<u64>,
    /// Lag taken at the write (with an in-flight limit only).
    write_lag: Option<Histogram<u64>>,
}

/// The timing loop: returns the lag histogram (at handover: recorded only
/// without an in-flight limit, when handing over is sending), the
/// messages refused for backlog and how many were scheduled.
fn schedule(job: &Job, queues: Vec<Queue>, start_ns: u64) -> (Histogram<u64>, Vec<u64>, u64) {
    let mut lag = stats::histogram();
    let mut refused = Vec::new();
    let mut buf = Vec::with_capacity(job.payload_bytes + 64);
    let mut masker = crate::ws::Masker::new(start_ns);
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
            if job.inflight.is_none() {
                let _ = lag.record(now.saturating_sub(due).max(1));
            }
            let c = (g % job.plan.channels) as usize;
            if job.payload_json {
                payload::encode_json(&mut buf, job.plan.nonce, g, due, job.payload_bytes);
            } else {
                payload::encode(&mut buf, job.plan.nonce, g, due, job.payload_bytes);
            }
            let bytes = match &job.method {
                Method::Http { body: Some(t), .. } => {
                    let p = std::str::from_utf8(&buf).unwrap_or("");
                    Bytes::from(t.replace("{channel}", &job.channel_names[c]).replace("{payload}", p))
                }
                Method::Http { .. } | Method::Redis { .. } => Bytes::copy_from_slice(&buf),
                Method::Ws { .. } => {
                    let p = std::str::from_utf8(&buf).unwrap_or("");
                    let text = if job.payload_json {
                        format!(r#"{{"op":"publish","channel":"{}","data":{p},"id":{g}}}"#, job.channel_names[c])
                    } else {
                        format!(r#"{{"op":"publish","channel":"{}","data":"{p}","id":{g}}}"#, job.channel_names[c])
                    };
                    frame.clear();
                    crate::ws::client_frame(&mut frame, OpCode::Text, text.as_bytes(), masker.next());
                    Bytes::copy_from_slice(&frame)
                }
                Method::WsRaw { .. } => {
                    frame.clear();
                    crate::ws::client_frame(&mut frame, OpCode::Text, &buf, masker.next());
                    Bytes::copy_from_slice(&frame)
                }
            };
            // A channel always takes the same connection: its order holds.
            if queues[c % queues.len()].try_send(Item { g, due_ns: due, bytes }).is_err() {
                refused.push(g);
            }
            job.live.sent.fetch_add(1, Ordering::Relaxed);
            g += 1;
        }
    }
    (lag, refused, g)
}

async fn io_run(job: IoJob, ready: std::sync::mpsc::Sender<Result<Vec<Queue>, String>>) -> anyhow::Result<IoOutcome> {
    let state = Rc::new(RefCell::new(State {
        status: vec![Status::Unsent; job.total],
        errors: BTreeMap::new(),
        rtt: stats::histogram(),
        first_measured: job.plan.first_measured,
        lag: job.inflight.map(|_| stats::histogram()),
    }));
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
    while clock::now_ns() < deadline && state.borrow().any_awaiting() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut st = state.borrow_mut();
    Ok(IoOutcome {
        status: std::mem::take(&mut st.status),
        errors: std::mem::take(&mut st.errors),
        rtt: st.rtt.clone(),
        write_lag: st.lag.take(),
    })
}

async fn connect(job: &IoJob, state: &Rc<RefCell<State>>) -> anyhow::Result<(Vec<Queue>, Vec<tokio::task::JoinHandle<()>>)> {
    let mut queues = Vec::new();
    let mut tasks = Vec::new();
    match &job.method {
        Method::Http { url, connections, content_type, sign, .. } => {
            let addr = url.resolve().await?;
            // Fail early, with a clear message, if nothing listens there.
            drop(net::open(url, addr, None, Duration::from_secs(10)).await.map_err(|e| anyhow::anyhow!("cannot connect to {url}: {e}"))?);
            for _ in 0..(*connections).clamp(1, job.channel_names.len()) {
                let (tx, rx) = mpsc::channel(BACKLOG);
                tasks.push(tokio::task::spawn_local(http::http_conn(
                    addr,
                    http::Target {
                        url: url.clone(),
                        names: job.channel_names.clone(),
                        content_type: content_type.clone(),
                        sign: sign.clone(),
                        limit: job.limit(),
                    },
                    rx,
                    Rc::clone(state),
                )));
                queues.push(tx);
            }
        }
        Method::Ws { url } => {
            let path = url.path_for(&job.channel_names[0]);
            let (q, t) = ws::ws_conn(url, &path, Rc::clone(state), Some(job.limit())).await?;
            queues.push(q);
            tasks.push(t);
        }
        Method::WsRaw { url } => {
            for name in &job.channel_names {
                let (q, t) = ws::ws_conn(url, &url.path_for(name), Rc::clone(state), None).await?;
                queues.push(q);
                tasks.push(t);
            }
        }
        Method::Redis { url, channel } => {
            let client = ::redis::Client::open(url.as_str()).with_context(|| format!("bad Redis URL {url:?}"))?;
            let conn = client.get_multiplexed_async_connection().await.with_context(|| format!("cannot connect to Redis at {url}"))?;
            let (tx, rx) = mpsc::channel(BACKLOG);
            let names: Vec<String> = job.channel_names.iter().map(|n| channel.replace("{channel}", n)).collect();
            tasks.push(tokio::task::spawn_local(redis::redis_conn(conn, names, job.plan.channels, job.inflight, rx, Rc::clone(state))));
            queues.push(tx);
        }
    }
    Ok((queues, tasks))
}

#[cfg(test)]
mod tests {
    use super::Sign;

    /// The worked example of Pusher's HTTP API authentication docs.
    #[test]
    fn pusher_signature_matches_the_documented_example() {
        let sign = Sign::parse("pusher:278d425bdf160c739803:7ad3773142a6692b25b8").unwrap();
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(
            sign.query("/apps/3/events", body, 1_353_088_179),
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn a_sign_spec_names_its_scheme_key_and_secret() {
        for bad in ["pusher", "pusher:key", "pusher::secret", "hmac:k:s"] {
            assert!(Sign::parse(bad).is_err(), "{bad}");
        }
    }
}
