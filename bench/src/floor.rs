//! The floor: a server with no engine. It accepts WebSocket handshakes,
//! then writes pre-encoded frame bytes to every socket, one `write` per
//! socket, from one thread per core. No queues, no channels (every
//! subscriber gets every message), no per-connection state beyond the
//! socket; a socket whose kernel buffer is full loses the frame.
//!
//! In-process benches call [`Floor::publish`]; for `loadgen`, the binary
//! `floor` also takes `POST /publish/{anything}` on keep-alive HTTP
//! connections and sends the body as one text frame (`--format raw`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

enum Cmd {
    Adopt(TcpStream),
    Write(Arc<[u8]>),
}

/// A running floor server.
#[derive(Debug)]
pub struct Floor {
    addr: SocketAddr,
    workers: Vec<mpsc::Sender<Cmd>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

impl Floor {
    /// Starts on a free loopback port with `threads` writer threads.
    pub fn start(threads: usize) -> std::io::Result<Floor> {
        Floor::start_on(TcpListener::bind("127.0.0.1:0")?, threads)
    }

    /// Starts on `listener` with `threads` writer threads.
    pub fn start_on(listener: TcpListener, threads: usize) -> std::io::Result<Floor> {
        let addr = listener.local_addr()?;
        let mut workers = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..threads.max(1) {
            let (tx, rx) = mpsc::channel::<Cmd>();
            workers.push(tx);
            handles.push(std::thread::spawn(move || {
                let mut socks: Vec<TcpStream> = Vec::new();
                for cmd in rx {
                    match cmd {
                        Cmd::Adopt(s) => socks.push(s),
                        // A socket whose peer left fails its write and is
                        // dropped: dead sockets must not cost later runs.
                        Cmd::Write(frame) => socks.retain_mut(|s| s.write(&frame).is_ok()),
                    }
                }
            }));
        }
        let adopt = workers.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        listener.set_nonblocking(true)?;
        handles.push(std::thread::spawn(move || {
            let mut next = 0;
            while !stopping.load(Ordering::Relaxed) {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = stream.set_nonblocking(false);
                match handshake(stream) {
                    Ok(Accepted::WebSocket(s)) => {
                        if adopt[next % adopt.len()].send(Cmd::Adopt(s)).is_err() {
                            return;
                        }
                        next += 1;
                    }
                    Ok(Accepted::Publish(reader, len)) => {
                        let workers = adopt.clone();
                        std::thread::spawn(move || publisher(reader, len, &workers));
                    }
                    Err(_) => {}
                }
            }
        }));
        Ok(Floor { addr, workers, threads: handles, stop })
    }

    /// The address to connect to (any path).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes `frame` (a complete WebSocket frame) to every socket.
    pub fn publish(&self, frame: Arc<[u8]>) {
        for w in &self.workers {
            let _ = w.send(Cmd::Write(Arc::clone(&frame)));
        }
    }

    /// Stops the acceptor and the writer threads (the sockets close).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.workers);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

enum Accepted {
    /// A WebSocket subscriber, upgraded and non-blocking.
    WebSocket(TcpStream),
    /// A `POST` with this body length: a publisher connection.
    Publish(BufReader<TcpStream>, usize),
}

/// Reads a request head: the request line, `Sec-WebSocket-Key` and
/// `Content-Length`. `None` at EOF.
fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<(String, Option<String>, usize)>> {
    let (mut first, mut key, mut len) = (String::new(), None, 0);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if line == "\r\n" {
            break;
        }
        if first.is_empty() {
            first = line;
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("sec-websocket-key") {
                key = Some(value.trim().to_string());
            } else if name.eq_ignore_ascii_case("content-length") {
                len = value.trim().parse().unwrap_or(0);
            }
        }
    }
    Ok(Some((first, key, len)))
}

/// Answers a WebSocket upgrade, or hands over a publisher connection.
fn handshake(stream: TcpStream) -> std::io::Result<Accepted> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let (first, key, len) = read_head(&mut reader)?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
    if first.starts_with("POST ") {
        return Ok(Accepted::Publish(reader, len));
    }
    let key = key.ok_or(std::io::ErrorKind::InvalidData)?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut s = stream;
    write!(s, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")?;
    s.set_nonblocking(true)?;
    Ok(Accepted::WebSocket(s))
}

/// Serves one keep-alive (pipelined) publisher connection: each body is
/// framed once and written to every subscriber.
fn publisher(mut reader: BufReader<TcpStream>, mut len: usize, workers: &[mpsc::Sender<Cmd>]) {
    use std::io::Read;
    let Ok(mut out) = reader.get_ref().try_clone() else { return };
    loop {
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let frame: Arc<[u8]> = herald::proto::frame::encode_frame(herald::proto::frame::OpCode::Text, &body).to_vec().into();
        for w in workers {
            let _ = w.send(Cmd::Write(Arc::clone(&frame)));
        }
        if out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").is_err() {
            return;
        }
        match read_head(&mut reader) {
            Ok(Some((_, _, l))) => len = l,
            _ => return,
        }
    }
}
