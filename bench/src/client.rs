//! The subscriber side of the `fanout` bench, the same for every server:
//! N WebSocket connections over loopback, each read by a task that parses
//! frame headers, skips payloads and counts data frames. A fan-out is done
//! when every subscriber has counted one more frame.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::proto::frame::{decode_server_head, OpCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// N connected subscribers.
#[derive(Debug)]
pub struct Subscribers {
    n: usize,
    remaining: Arc<AtomicUsize>,
    done: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Opens a WebSocket to `addr` at `path` (with query) and returns the
/// stream once the server answered 101.
pub async fn connect(addr: SocketAddr, path: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
        if head.len() > 8192 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other(String::from_utf8_lossy(&head).into_owned()));
    }
    Ok(s)
}

impl Subscribers {
    /// Connects `n` subscribers (tasks on the current runtime).
    pub async fn connect(addr: SocketAddr, path: &str, n: usize) -> std::io::Result<Subscribers> {
        let remaining = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Notify::new());
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let s = connect(addr, path).await?;
            tasks.push(tokio::spawn(read(s, Arc::clone(&remaining), Arc::clone(&done))));
        }
        Ok(Subscribers { n, remaining, done, tasks })
    }

    /// Runs `publish` and waits until every subscriber received one more
    /// data frame (at most `timeout`); returns the time taken.
    pub async fn fanout(&self, publish: impl std::future::Future<Output = ()>, timeout: Duration) -> Option<Duration> {
        self.remaining.store(self.n, Ordering::SeqCst);
        let done = self.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        let start = Instant::now();
        publish.await;
        tokio::time::timeout(timeout, done).await.ok()?;
        Some(start.elapsed())
    }
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Largest server frame accepted: far over any bench payload.
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Counts data frames on one connection: headers are decoded, payloads
/// skipped without being buffered.
async fn read(mut s: TcpStream, remaining: Arc<AtomicUsize>, done: Arc<Notify>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0;
    // Payload bytes of the current frame still to skip.
    let mut skip: usize = 0;
    loop {
        let n = match s.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        have += n;
        let mut at = 0;
        loop {
            if skip > 0 {
                let k = skip.min(have - at);
                skip -= k;
                at += k;
                if skip > 0 {
                    break;
                }
            }
            let head = match decode_server_head(&buf[at..have], MAX_FRAME) {
                Ok(Some(head)) => head,
                Ok(None) => break,
                // Not a WebSocket stream any more.
                Err(_) => return,
            };
            at += head.header_len;
            skip = head.payload_len;
            if matches!(head.opcode, OpCode::Text | OpCode::Binary)
                && remaining.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1)) == Ok(1)
            {
                done.notify_one();
            }
        }
        buf.copy_within(at..have, 0);
        have -= at;
    }
}
