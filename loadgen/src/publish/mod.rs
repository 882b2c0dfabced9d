//! The open-loop publisher: message `g` is due at `start + g / rate`, is
//! stamped with that intended time, and is sent then whatever happened to
//! earlier messages. It never waits for deliveries; when it falls behind,
//! the lag is measured and latency still counts from the intended time.
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
                tasks.push(tokio::task::spawn_local(http::http_conn(
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
            let (q, t) = ws::ws_conn(url, &path, Rc::clone(state), true).await?;
            queues.push(q);
            tasks.push(t);
        }
        Method::WsRaw { url } => {
            for name in &job.channel_names {
                let (q, t) = ws::ws_conn(url, &url.path_for(name), Rc::clone(state), false).await?;
                queues.push(q);
                tasks.push(t);
            }
        }
        Method::Redis { url, channel } => {
            let client = ::redis::Client::open(url.as_str()).with_context(|| format!("bad Redis URL {url:?}"))?;
            let conn = client.get_multiplexed_async_connection().await.with_context(|| format!("cannot connect to Redis at {url}"))?;
            let (tx, rx) = mpsc::channel(BACKLOG);
            let names: Vec<String> = job.channel_names.iter().map(|n| channel.replace("{channel}", n)).collect();
            tasks.push(tokio::task::spawn_local(redis::redis_conn(conn, names, job.plan.channels, rx, Rc::clone(state))));
            queues.push(tx);
        }
    }
    Ok((queues, tasks))
}
