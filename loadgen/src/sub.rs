//! Subscribers, run on a few worker threads (one current-thread runtime
//! each). A worker's subscribers share its read buffer and its statistics,
//! so the receive path takes no lock and allocates nothing per message.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::clock;
use crate::net::{self, ConnectError, Stream, Url};
use crate::payload;
use crate::stats::{Live, Plan, Seq, WorkerStats};
use herald::proto::deflate::Agreed;
use herald::proto::frame::OpCode;

use crate::http1::{self, Dechunker};
use crate::ws;

/// Bytes read per `read` call at most.
const READ_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Sse,
}

/// Where and how one subscriber connects.
#[derive(Debug, Clone)]
pub struct SubSpec {
    pub transport: Transport,
    pub url: Arc<Url>,
    pub addr: SocketAddr,
    pub path: String,
    pub channel: u64,
    pub source: Option<IpAddr>,
    pub connect_timeout: Duration,
    /// Sent as a text frame right after the WebSocket handshake.
    pub subscribe: Option<String>,
    /// Offer permessage-deflate (WebSocket).
    pub compression: bool,
}

enum Job {
    Subscribe(SubSpec),
    Stop,
}

/// A worker thread and the way to hand it subscribers.
#[derive(Debug)]
pub struct Worker {
    plan: Plan,
    tx: mpsc::UnboundedSender<Job>,
    thread: std::thread::JoinHandle<WorkerStats>,
}

struct Ctx {
    stats: RefCell<WorkerStats>,
    scratch: RefCell<Box<[u8]>>,
    live: Arc<Live>,
    finder: memchr::memmem::Finder<'static>,
}

impl Worker {
    pub fn spawn(id: usize, plan: Plan, live: Arc<Live>) -> anyhow::Result<Worker> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new().name(format!("lg-worker-{id}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("runtime: {e}"));
            let local = tokio::task::LocalSet::new();
            let ctx = Rc::new(Ctx {
                stats: RefCell::new(WorkerStats::new(plan)),
                scratch: RefCell::new(vec![0u8; READ_BYTES].into_boxed_slice()),
                live,
                finder: payload::finder(),
            });
            local.block_on(&rt, async {
                let flusher = Rc::clone(&ctx);
                tokio::task::spawn_local(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(200));
                    loop {
                        tick.tick().await;
                        flusher.stats.borrow_mut().flush(&flusher.live);
                    }
                });
                while let Some(job) = rx.recv().await {
                    match job {
                        Job::Subscribe(spec) => {
                            tokio::task::spawn_local(subscriber(Rc::clone(&ctx), spec));
                        }
                        Job::Stop => break,
                    }
                }
            });
            drop(local);
            drop(rt);
            let stats = std::mem::replace(
                &mut *ctx.stats.borrow_mut(),
                WorkerStats::new(Plan { total: 0, first_measured: 0, channels: 1, nonce: 0 }),
            );
            stats
        })?;
        Ok(Worker { plan, tx, thread })
    }

    pub fn subscribe(&self, spec: SubSpec) {
        let _ = self.tx.send(Job::Subscribe(spec));
    }

    /// Closes every subscriber of the worker and returns what they saw.
    pub fn stop(self) -> WorkerStats {
        let _ = self.tx.send(Job::Stop);
        let plan = self.plan;
        self.thread.join().unwrap_or_else(|_| WorkerStats::new(plan))
    }
}

/// Opens a connection and completes the handshake; returns the stream and
/// the bytes that followed the response head.
/// The stream, the bytes after the head, whether an SSE body is chunked,
/// and the compression a WebSocket agreed.
pub async fn open(spec: &SubSpec) -> Result<(Stream, Vec<u8>, bool, Option<Agreed>), ConnectError> {
    let fut = async {
        let mut s = net::open(&spec.url, spec.addr, spec.source, spec.connect_timeout).await?;
        match spec.transport {
            Transport::Ws => ws::upgrade(&mut s, &spec.url, &spec.path, spec.compression).await.map(|(rest, a)| (s, rest, false, a)),
            Transport::Sse => http1::sse_open(&mut s, &spec.url, &spec.path).await.map(|(chunked, rest)| (s, rest, chunked, None)),
        }
    };
    match tokio::time::timeout(spec.connect_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::new("timeout", "no handshake within the connect timeout")),
    }
}

async fn subscriber(ctx: Rc<Ctx>, spec: SubSpec) {
    let t0 = clock::now_ns();
    let (stream, rest, chunked, agreed) = match open(&spec).await {
        Ok(v) => v,
        Err(e) => {
            *ctx.stats.borrow_mut().connect_errors.entry(e.kind.to_string()).or_default() += 1;
            ctx.live.connect_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
    };
    let _ = ctx.stats.borrow_mut().connect.record((clock::now_ns() - t0).max(1));
    if agreed.is_some() {
        ctx.stats.borrow_mut().compressed_conns += 1;
    }
    ctx.live.connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(c) = ctx.live.connected_per_channel.get(spec.channel as usize) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let end = match spec.transport {
        Transport::Ws => read_ws(&ctx, stream, rest, spec.channel, spec.subscribe.as_deref(), agreed).await,
        Transport::Sse => read_sse(&ctx, stream, rest, chunked, spec.channel).await,
    };
    *ctx.stats.borrow_mut().disconnects.entry(end).or_default() += 1;
    ctx.live.connected.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    ctx.live.disconnected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Why a subscriber's stream ended.
fn io_end(e: &std::io::Error) -> String {
    format!("io_{}", ConnectError::io(e).kind)
}

/// What a WebSocket subscriber reads with: its sequence checks, its reply
/// buffer and masks, its compression state.
struct WsReader {
    seq: Seq,
    reply: Vec<u8>,
    masker: ws::Masker,
    inflate: Option<ws::Inflate>,
    inflated: Vec<u8>,
}

/// Handles the complete frames at the start of `data`, whose last `fresh`
/// bytes were just read; returns the bytes used and, if the stream must
/// end, why.
fn ws_frames(ctx: &Ctx, r: &mut WsReader, channel: u64, data: &[u8], fresh: usize) -> (usize, Option<String>) {
    let now = clock::now_ns();
    let in_window = ctx.live.in_window(now);
    let mut stats = ctx.stats.borrow_mut();
    if in_window {
        stats.wire_bytes += fresh as u64;
    }
    let (seq, reply, masker) = (&mut r.seq, &mut r.reply, &mut r.masker);
    let mut at = 0;
    loop {
        match ws::parse_frame(&data[at..], r.inflate.is_some()) {
            Ok(Some((f, used))) => {
                at += used;
                match f.op {
                    OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                        let message = match &mut r.inflate {
                            None => Some(f.payload),
                            Some(inf) => {
                                if f.compressed && in_window {
                                    stats.compressed_frames += 1;
                                }
                                match inf.frame(&f, &mut r.inflated) {
                                    Ok(m) => m,
                                    Err(e) => return (at, Some(format!("protocol_error: {e}"))),
                                }
                            }
                        };
                        if let Some(m) = message {
                            payload::find_all(&ctx.finder, m, |found| stats.record(seq, channel, found, now, in_window));
                        }
                    }
                    OpCode::Ping => ws::client_frame(reply, OpCode::Pong, f.payload, masker.next()),
                    OpCode::Close => {
                        let code = f.payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                        ws::client_frame(reply, OpCode::Close, &f.payload[..f.payload.len().min(2)], masker.next());
                        return (at, Some(format!("closed_{code}")));
                    }
                    OpCode::Pong => {}
                }
            }
            Ok(None) => return (at, None),
            Err(e) => return (at, Some(format!("protocol_error: {e}"))),
        }
    }
}

async fn read_ws(ctx: &Ctx, mut stream: Stream, first: Vec<u8>, channel: u64, subscribe: Option<&str>, agreed: Option<Agreed>) -> String {
    let mut r = WsReader {
        seq: Seq::default(),
        masker: ws::Masker::new(clock::now_ns() ^ channel),
        reply: Vec::new(),
        inflate: agreed.as_ref().map(ws::Inflate::new),
        inflated: Vec::new(),
    };
    if let Some(m) = subscribe {
        let mask = r.masker.next();
        ws::client_frame(&mut r.reply, OpCode::Text, m.as_bytes(), mask);
    }
    // Bytes of a frame not yet complete.
    let mut pending: Vec<u8> = Vec::new();
    let (used, mut ended) = ws_frames(ctx, &mut r, channel, &first, first.len());
    pending.extend_from_slice(&first[used..]);
    drop(first);
    loop {
        if !r.reply.is_empty() {
            let written = async {
                stream.write_all(&r.reply).await?;
                stream.flush().await
            };
            if written.await.is_err() && ended.is_none() {
                ended = Some("io_write".into());
            }
            r.reply.clear();
        }
        if let Some(e) = ended {
            return e;
        }
        let tcp = match &mut stream {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => {
                // TLS: decrypted into the connection's own buffer.
                pending.reserve(4096);
                let fresh = match tls.read_buf(&mut pending).await {
                    Ok(0) => return "eof".into(),
                    Ok(n) => n,
                    Err(e) => return io_end(&e),
                };
                let (used, e) = ws_frames(ctx, &mut r, channel, &pending, fresh);
                pending.drain(..used);
                ended = e;
                continue;
            }
        };
        if let Err(e) = tcp.readable().await {
            return io_end(&e);
        }
        let stream = &*tcp;
        let mut scratch = ctx.scratch.borrow_mut();
        let p = pending.len();
        if p + 4096 > scratch.len() {
            // A frame larger than the read buffer: gather it in `pending`.
            pending.reserve(READ_BYTES);
            let fresh = match stream.try_read_buf(&mut pending) {
                Ok(0) => return "eof".into(),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return io_end(&e),
            };
            let (used, e) = ws_frames(ctx, &mut r, channel, &pending, fresh);
            pending.drain(..used);
            ended = e;
        } else {
            scratch[..p].copy_from_slice(&pending);
            let len = match read_drained(stream, &mut scratch[p..]) {
                Ok(0) => return "eof".into(),
                Ok(n) => p + n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return io_end(&e),
            };
            let (used, e) = ws_frames(ctx, &mut r, channel, &scratch[..len], len - p);
            pending.clear();
            pending.extend_from_slice(&scratch[used..len]);
            ended = e;
        }
    }
}

/// Reads what the socket holds into `buf`, like `try_read`, but a short
/// read also clears the socket's readiness: the kernel had no more bytes,
/// so the `recv` that would only answer `EAGAIN` is skipped. That is one
/// system call in two at low rates, where each delivery is read alone.
/// (Readiness set by data that arrives meanwhile is not lost: tokio clears
/// it only if no new event came since it was reported, and an
/// edge-triggered epoll reports the new bytes on the next poll.)
fn read_drained(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut got = None;
    let r = stream.try_io(tokio::io::Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(stream)).read(buf)?;
        if n > 0 && n < buf.len() {
            got = Some(n);
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (got, r) {
        (Some(n), _) => Ok(n),
        (None, r) => r,
    }
}

async fn read_sse(ctx: &Ctx, mut stream: Stream, first: Vec<u8>, chunked: bool, channel: u64) -> String {
    let mut seq = Seq::default();
    let mut dechunker = Dechunker::default();
    // Decoded body bytes not yet ending in a line break.
    let mut text: Vec<u8> = Vec::new();
    let mut raw = first;
    loop {
        if !raw.is_empty() {
            let ended = if chunked {
                match dechunker.feed(&raw, &mut text) {
                    Ok(done) => done,
                    Err(e) => return format!("protocol_error: {e}"),
                }
            } else {
                text.extend_from_slice(&raw);
                false
            };
            raw.clear();
            let now = clock::now_ns();
            let in_window = ctx.live.in_window(now);
            let mut stats = ctx.stats.borrow_mut();
            let mut at = 0;
            while let Some(i) = memchr::memchr(b'\n', &text[at..]) {
                let line = &text[at..at + i];
                if line.starts_with(b"data:") {
                    payload::find_all(&ctx.finder, line, |found| stats.record(&mut seq, channel, found, now, in_window));
                }
                at += i + 1;
            }
            text.drain(..at);
            if text.len() > 16 * 1024 * 1024 {
                return "protocol_error: SSE line over 16 MiB".into();
            }
            if ended {
                return "eof".into();
            }
        }
        let tcp = match &mut stream {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => {
                raw.reserve(4096);
                match tls.read_buf(&mut raw).await {
                    Ok(0) => return "eof".into(),
                    Ok(_) => {}
                    Err(e) => return io_end(&e),
                }
                continue;
            }
        };
        if let Err(e) = tcp.readable().await {
            return io_end(&e);
        }
        let mut scratch = ctx.scratch.borrow_mut();
        match read_drained(tcp, &mut scratch[..]) {
            Ok(0) => return "eof".into(),
            Ok(n) => raw.extend_from_slice(&scratch[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return io_end(&e),
        }
    }
}
