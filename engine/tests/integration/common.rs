//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::{Config, Herald};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub const WAIT: Duration = Duration::from_secs(10);

/// The HMAC secret of the tests' connection tokens.
pub const SECRET: &str = "a-test-secret-of-32-bytes-or-so!";

/// An HS256 connection token of `user`, expiring in `exp_in_s` seconds,
/// granted every channel.
pub fn user_token(user: &str, exp_in_s: u64) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + exp_in_s;
    let claims = serde_json::json!({"sub": user, "exp": exp, "subscribe": ["*"], "publish": ["*"]});
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// Starts Herald on a free loopback port.
pub fn start(shards: usize, tweak: impl FnOnce(&mut Config)) -> Herald {
    let mut c = Config::default();
    c.shards(shards);
    tweak(&mut c);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Herald::start_on(listener, c).unwrap()
}

/// Herald embedded in an axum router as a user mounts it: the embedder's
/// own `/hello` beside Herald's endpoints under `/rt`, and a listener on a
/// free loopback port for `axum::serve`.
pub async fn embedded_in_axum() -> (Herald, axum::Router, tokio::net::TcpListener, SocketAddr) {
    let mut config = Config::default();
    config.shards(2);
    let herald = Herald::start_embedded(config).unwrap();
    let app = axum::Router::new()
        .route("/hello", axum::routing::get(|| async { "hello from the embedder" }))
        .nest_service("/rt", herald.service());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    (herald, app, listener, a)
}

/// A `herald` binary started by [`spawn_herald`].
pub struct Spawned {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    /// What it wrote to stderr before its start line, that line included.
    pub startup: Vec<String>,
    /// What it writes to stderr after its start line, once it closes stderr
    /// (when it exits).
    pub log: tokio::task::JoinHandle<String>,
}

/// The `herald` binary on `127.0.0.1:0` with `args`, once it accepts
/// connections: the port comes from its start line (`herald started
/// addr=…`), so no other process can take it in between. It is killed
/// when dropped.
pub async fn spawn_herald(args: &[&str]) -> Spawned {
    spawn_herald_on("127.0.0.1:0", args).await
}

/// [`spawn_herald`] with `--listen listen`.
pub async fn spawn_herald_on(listen: &str, args: &[&str]) -> Spawned {
    spawn_herald_logging(listen, "info", args).await
}

/// [`spawn_herald_on`] with `HERALD_LOG=filter`.
pub async fn spawn_herald_logging(listen: &str, filter: &str, args: &[&str]) -> Spawned {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["--listen", listen])
        .args(args)
        .env("HERALD_LOG", filter)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let mut startup = Vec::new();
    let addr = tokio::time::timeout(WAIT, async {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(lines.read_line(&mut line).await.unwrap() > 0, "herald exited before it started");
            startup.push(line.trim_end().to_string());
            if let Some(rest) = line.split_once("herald started").map(|(_, r)| r) {
                let addr = rest.split_whitespace().find_map(|f| f.strip_prefix("addr=")).expect("an addr= field");
                break addr.parse::<SocketAddr>().unwrap();
            }
        }
    })
    .await
    .expect("herald did not start");
    let log = tokio::spawn(async move {
        let mut rest = String::new();
        let _ = lines.read_to_string(&mut rest).await;
        rest
    });
    Spawned { child, addr, startup, log }
}

/// Sends a WebSocket upgrade for `path`, with `extra` header lines
/// (`name: value`), on a connected socket; returns the socket and the
/// response head, whatever its status, read to its end and no further.
pub async fn handshake(mut s: TcpStream, path: &str, extra: &[String]) -> (TcpStream, String) {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// Sends a WebSocket upgrade for `path` on a connected socket and returns
/// it once the server answered 101, for hand-made frames.
pub async fn upgrade(s: TcpStream, path: &str) -> TcpStream {
    let (s, head) = handshake(s, path, &[]).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// A WebSocket handshake over raw TCP, for sending hand-made frames.
pub async fn raw_ws(a: SocketAddr, path: &str) -> TcpStream {
    upgrade(TcpStream::connect(a).await.unwrap(), path).await
}

pub fn addr(h: &Herald) -> SocketAddr {
    h.local_addr().unwrap()
}

pub async fn ws(addr: SocketAddr, path_and_query: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}{path_and_query}")).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// Next text frame as JSON (skipping pings), within [`WAIT`].
pub async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("timed out waiting for a frame") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap_or_else(|e| panic!("bad JSON {t:?}: {e}")),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

pub async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("timed out waiting for a frame") {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The request headers of a WebSocket upgrade, for [`http`].
pub const WS_UPGRADE: [(&str, &str); 4] = [
    ("upgrade", "websocket"),
    ("connection", "upgrade"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// Sends a command and returns the reply.
pub async fn command(ws: &mut Ws, v: Value) -> Value {
    send(ws, v).await;
    next_json(ws).await
}

/// Waits for the close frame and returns its code and reason.
pub async fn close_of(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("timed out waiting for close") {
            Some(Ok(Message::Close(Some(f)))) => return (f.code.into(), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// A minimal HTTP/1.1 request; returns status, headers (lowercase) and body.
pub async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("timed out").unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_lowercase(), body.to_string())
}

pub async fn publish(addr: SocketAddr, channel: &str, body: &str, json: bool) -> (u16, Value) {
    let ct = if json { "application/json" } else { "text/plain" };
    let (status, _, body) = http(addr, "POST", &format!("/publish/{channel}"), &[("content-type", ct)], body.as_bytes()).await;
    (status, serde_json::from_str(body.trim()).unwrap_or(Value::Null))
}

/// The value of one metric series from `/metrics` text.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or_else(|| panic!("no series {series} in metrics"))
}

/// Polls a metric until `ok(value)` holds, within [`WAIT`].
pub async fn wait_metric(h: &Herald, series: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = metric(&h.metrics_text(), series);
        if ok(v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{series} stuck at {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An SSE subscriber over raw TCP.
pub struct Sse {
    reader: BufReader<TcpStream>,
    pending: String,
}

impl Sse {
    pub async fn open(addr: SocketAddr, query: &str) -> Sse {
        Sse::open_at(addr, &format!("/sse?{query}")).await
    }

    pub async fn open_at(addr: SocketAddr, path: &str) -> Sse {
        Sse::open_with(addr, path, &[]).await
    }

    /// Opens with extra request headers (`Last-Event-ID`, say).
    pub async fn open_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\naccept: text/event-stream\r\n{extra}\r\n").as_bytes()).await.unwrap();
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).await.unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut chunked = false;
        let mut ct = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            let l = line.to_lowercase();
            chunked |= l.starts_with("transfer-encoding: chunked");
            if l.starts_with("content-type:") {
                ct = l.clone();
            }
            if line == "\r\n" {
                break;
            }
        }
        assert!(chunked, "SSE is streamed with chunked encoding");
        assert!(ct.contains("text/event-stream"), "{ct}");
        let mut sse = Sse { reader, pending: String::new() };
        // The first event-stream bytes are the ":ok" comment.
        assert_eq!(sse.next_block().await.as_deref(), Some(":ok"));
        sse
    }

    async fn chunk(&mut self) -> Option<Vec<u8>> {
        let mut size = String::new();
        if self.reader.read_line(&mut size).await.ok()? == 0 {
            return None;
        }
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        let mut data = vec![0u8; n + 2];
        self.reader.read_exact(&mut data).await.ok()?;
        data.truncate(n);
        (n > 0).then_some(data)
    }

    /// The next event block (text up to a blank line), without the final
    /// newlines; None when the stream ends.
    pub async fn next_block(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.pending.find("\n\n") {
                let block = self.pending[..i].to_string();
                self.pending.drain(..i + 2);
                return Some(block);
            }
            let c = tokio::time::timeout(WAIT, self.chunk()).await.expect("timed out waiting for SSE")?;
            self.pending.push_str(std::str::from_utf8(&c).unwrap());
        }
    }

    /// The next message event's data (data: lines joined with \n), skipping
    /// comments and named events (`event: subscribed`, `lagged`), as an
    /// EventSource's `onmessage` does.
    pub async fn next_data(&mut self) -> Option<String> {
        loop {
            let block = self.next_block().await?;
            if block.lines().any(|l| l.starts_with("event:")) {
                continue;
            }
            let lines: Vec<&str> = block.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            if !lines.is_empty() {
                return Some(lines.join("\n"));
            }
        }
    }

    /// The next event: its name (`message` when unnamed), its `id` and its
    /// data, skipping comments.
    pub async fn next_event(&mut self) -> Option<(String, Option<String>, String)> {
        loop {
            let block = self.next_block().await?;
            let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::to_owned);
            let data: Vec<&str> = block.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            if data.is_empty() {
                continue;
            }
            return Some((field("event: ").unwrap_or_else(|| "message".into()), field("id: "), data.join("\n")));
        }
    }
}

/// A TCP proxy in front of Herald whose connections the test can cut, as
/// a network would.
pub struct Proxy {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(to: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let list = Arc::clone(&conns);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(to).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                list.lock().unwrap().push(task);
            }
        });
        Proxy { addr, conns }
    }

    /// Drops every connection through the proxy.
    pub fn cut(&self) {
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}
