//! `probe`: quick measurements against a running Herald.
//!
//! ```text
//! probe fanout --addr 127.0.0.1:8080 --subscribers 1000 --rate 2000 --duration 10
//! probe idle   --addr 127.0.0.1:8080 --connections 10000 --server-pid PID
//! ```
//!
//! The subscriber side is lean on purpose: it parses only WebSocket frame
//! headers and counts frames, so it costs the shared cores little.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// N WebSocket subscribers on one channel, a paced HTTP publisher.
    Fanout {
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Messages per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Sample this server process's CPU time.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Opens N idle WebSocket connections and reports the server's RSS growth.
    Idle {
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long)]
        server_pid: u32,
    },
}

async fn handshake(addr: SocketAddr, path: &str) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let mut tmp = [0u8; 512];
    loop {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            bail!("closed during handshake");
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                bail!("handshake refused: {}", String::from_utf8_lossy(&buf[..i]));
            }
            return Ok((s, buf[i + 4..].to_vec()));
        }
    }
}

/// Counts server frames (unmasked) in a byte stream.
struct FrameCounter {
    /// Payload bytes still to skip of the current frame.
    skip: usize,
    head: Vec<u8>,
}

impl FrameCounter {
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut frames = 0;
        loop {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                if self.skip > 0 {
                    return frames;
                }
            }
            if data.is_empty() {
                return frames;
            }
            self.head.push(data[0]);
            data = &data[1..];
            if self.head.len() < 2 {
                continue;
            }
            let need = match self.head[1] & 0x7F {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            if self.head.len() < need {
                continue;
            }
            let len = match need {
                2 => (self.head[1] & 0x7F) as usize,
                4 => u16::from_be_bytes([self.head[2], self.head[3]]) as usize,
                _ => u64::from_be_bytes(self.head[2..10].try_into().unwrap_or([0; 8])) as usize,
            };
            if self.head[0] & 0x0F == 0x1 {
                frames += 1;
            }
            self.head.clear();
            self.skip = len;
        }
    }
}

async fn fanout(
    addr: SocketAddr,
    subscribers: usize,
    rate: u64,
    duration: u64,
    payload: usize,
    server_pid: Option<u32>,
) -> anyhow::Result<()> {
    let received = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let (mut s, rest) = handshake(addr, "/ws?channel=probe").await?;
        let received = Arc::clone(&received);
        subs.push(tokio::spawn(async move {
            let mut c = FrameCounter { skip: 0, head: Vec::with_capacity(10) };
            received.fetch_add(c.feed(&rest), Ordering::Relaxed);
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                received.fetch_add(c.feed(&buf[..n]), Ordering::Relaxed);
            }
        }));
    }
    println!("{subscribers} subscribers connected");
    let body = "x".repeat(payload);
    let request = format!("POST /publish/probe HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let mut publ = TcpStream::connect(addr).await?;
    publ.set_nodelay(true)?;
    let total = rate * duration;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let cpu0 = cpu_seconds();
    let server_cpu = || server_pid.map(|p| proc_cpu(&format!("/proc/{p}/stat")));
    let server0 = server_cpu();
    let start = Instant::now();
    let mut resp = vec![0u8; 4096];
    let mut refused = 0u64;
    for i in 0..total {
        // Open loop: each message has its slot; a late publisher catches up.
        let due = start + interval.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        publ.write_all(request.as_bytes()).await?;
        let n = publ.read(&mut resp).await?;
        if !resp[..n].starts_with(b"HTTP/1.1 200") {
            refused += 1;
        }
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let expected = (total - refused) * subscribers as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    println!("published {total} msgs in {publish_secs:.2}s ({:.0} msg/s), refused {refused}", total as f64 / publish_secs);
    println!(
        "deliveries {got} / {expected} expected ({} lost) in {secs:.2}s: {:.0} deliveries/s",
        expected.saturating_sub(got),
        got as f64 / secs
    );
    if let (Some(a), Some(b)) = (server0, server_cpu()) {
        println!("server CPU: {:.2}s ({:.2} us per delivery)", b - a, (b - a) * 1e6 / got.max(1) as f64);
    }
    println!("probe CPU: {:.2}s ({:.2} us per delivery)", cpu_seconds() - cpu0, (cpu_seconds() - cpu0) * 1e6 / got.max(1) as f64);
    for s in subs {
        s.abort();
    }
    Ok(())
}

fn cpu_seconds() -> f64 {
    proc_cpu("/proc/self/stat")
}

fn proc_cpu(path: &str) -> f64 {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn idle(addr: SocketAddr, connections: usize, pid: u32) -> anyhow::Result<()> {
    let before = rss_kib(pid);
    let mut conns = Vec::with_capacity(connections);
    for i in 0..connections {
        let (s, _) = handshake(addr, &format!("/ws?channel=idle{}", i % 100)).await?;
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    println!("server RSS before {before} KiB, after {connections} idle connections {after} KiB");
    println!("per connection: {:.2} KiB", (after.saturating_sub(before)) as f64 / connections as f64);
    drop(conns);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        match args.cmd {
            Cmd::Fanout { addr, subscribers, rate, duration, payload, server_pid } => {
                fanout(addr, subscribers, rate, duration, payload, server_pid).await
            }
            Cmd::Idle { addr, connections, server_pid } => idle(addr, connections, server_pid).await,
        }
    })
}
