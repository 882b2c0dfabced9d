//! The floor: a server with no engine. It accepts WebSocket handshakes,
//! then writes pre-encoded frame bytes to every socket, one `write` per
//! socket, from one thread per core. No queues, no channel index, no
//! per-connection state beyond the socket; a socket whose kernel buffer is
//! full loses the frame. Only for in-process benches.

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
        let listener = TcpListener::bind("127.0.0.1:0")?;
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
                        Cmd::Write(frame) => {
                            for s in &mut socks {
                                let _ = s.write(&frame);
                            }
                        }
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
                if let Ok(s) = handshake(stream) {
                    if adopt[next % adopt.len()].send(Cmd::Adopt(s)).is_err() {
                        return;
                    }
                    next += 1;
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

/// Answers a WebSocket upgrade; returns the socket, non-blocking.
fn handshake(stream: TcpStream) -> std::io::Result<TcpStream> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut key = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("sec-websocket-key") {
                key = Some(value.trim().to_string());
            }
        }
    }
    let key = key.ok_or(std::io::ErrorKind::InvalidData)?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut s = stream;
    write!(s, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")?;
    s.set_nonblocking(true)?;
    Ok(s)
}
