//! The careful baseline: the fan-out server a careful engineer writes by
//! hand with axum, its WebSocket support (tungstenite) and
//! `tokio::sync::broadcast` — what Herald should be compared with.
//!
//! What makes it careful, against [`crate::naive`]:
//!
//! - **Encode once.** A publish builds the envelope
//!   `{"channel":…,"offset":N,"data":…}` once, into a [`Utf8Bytes`]; every
//!   subscriber sends a refcount clone of it as its text frame. The SSE
//!   form (`data: …\n\n`) is built once too, on first use, into [`Bytes`].
//!   Nothing is formatted or allocated per subscriber per message.
//! - **Offsets per channel, in order.** The offset is taken and the message
//!   sent under the channel's shard lock, so receivers see offsets in
//!   order with no gap, and the publish reply carries the message's offset.
//! - **Batched writes.** A subscriber's task takes what the broadcast
//!   channel already holds (up to [`BATCH`] messages), `feed`s each to
//!   tungstenite's write buffer and flushes once when the channel is
//!   empty: one `write` for a burst, not one per message.
//! - **Bounded, and a lagging subscriber is closed.** The broadcast ring
//!   holds [`CAPACITY`] messages per channel; a subscriber that falls
//!   further behind is closed (WebSocket close 1008 "slow consumer", or
//!   the SSE stream ends) and counted ([`Careful::lagged_closes`]), as
//!   Herald's `disconnect` policy does — never a silent gap. Per
//!   connection, tungstenite reads into [`READ_BUFFER`] bytes and writes
//!   through at most [`MAX_WRITE_BUFFER`] bytes. A subscriber whose
//!   socket stays full waits in its write with that bounded buffer (the
//!   ring moves on without it) and is closed as lagging once it reads
//!   again; there is no write timeout, so a peer that never reads is only
//!   dropped when TCP gives up on it.
//! - TCP_NODELAY on every connection; channel state sharded over
//!   [`SHARDS`] mutexes so publishers to different channels rarely meet.
//!
//! Endpoints (Herald's v1 shapes for what `loadgen` uses):
//! `GET /ws?channel=X`, `GET /sse?channel=X` (one channel per connection),
//! `POST /publish/{channel}` (UTF-8 text, or JSON with
//! `Content-Type: application/json`; answers
//! `{"channel":…,"offset":…,"epoch":…}`), `GET /healthz`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use futures_util::SinkExt;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

/// Messages a subscriber may fall behind before it is closed. The ring is
/// allocated when a channel gets its first subscriber and freed with its
/// last: about 48 bytes a slot, plus the messages it still holds.
pub const CAPACITY: usize = 1024;

/// Most messages written to a socket's buffer before it is flushed.
pub const BATCH: usize = 64;

/// Largest payload a publish accepts (Herald's default `max_message_bytes`).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Largest envelope: a text payload of control characters escapes to six
/// times its size, plus the channel name and the fixed fields.
const MAX_ENVELOPE: usize = 6 * MAX_MESSAGE + 2 * MAX_CHANNEL + 64;

/// tungstenite's read buffer per connection, allocated up front:
/// subscribers send little more than pings and a close.
pub const READ_BUFFER: usize = 4 * 1024;

/// Bytes tungstenite buffers before it writes to the socket without a
/// flush: the largest batch one `write` carries.
pub const WRITE_BUFFER: usize = 16 * 1024;

/// Bound on tungstenite's write buffer: one batch plus the largest frame.
/// The buffer only grows past [`WRITE_BUFFER`] while the socket refuses
/// writes, and then the task waits instead of feeding more.
pub const MAX_WRITE_BUFFER: usize = WRITE_BUFFER + MAX_ENVELOPE + 16;

/// Longest channel name, as in Herald.
pub const MAX_CHANNEL: usize = 255;

/// Channel names remembered (with their offset counters). When full, a
/// publish or subscription to a new channel is refused. About 100 bytes
/// each plus twice the name.
pub const MAX_CHANNELS: usize = 1_000_000;

/// Mutexes the channel map is split over.
pub const SHARDS: usize = 16;

/// How long a close frame to a lagging subscriber may take to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// One published message, encoded once and shared by every subscriber.
#[derive(Debug)]
struct Frame {
    /// The envelope, sent as a WebSocket text frame.
    text: Utf8Bytes,
    /// `data: <envelope>\n\n`, built by the first SSE subscriber.
    sse: OnceLock<Bytes>,
}

impl Frame {
    fn sse(&self) -> Bytes {
        self.sse
            .get_or_init(|| {
                let env = self.text.as_str().as_bytes();
                let mut v = Vec::with_capacity(env.len() + 8);
                v.extend_from_slice(b"data: ");
                v.extend_from_slice(env);
                v.extend_from_slice(b"\n\n");
                Bytes::from(v)
            })
            .clone()
    }
}

#[derive(Debug)]
struct Channel {
    /// `{"channel":"<name>","offset":` — the envelope's start, built once.
    head: Box<str>,
    /// Offset of the last message published.
    last: u64,
    /// Present while the channel has subscribers.
    tx: Option<broadcast::Sender<Arc<Frame>>>,
}

#[derive(Debug)]
struct Shared {
    shards: [Mutex<HashMap<Box<str>, Channel>>; SHARDS],
    hasher: RandomState,
    channels: AtomicU64,
    epoch: Box<str>,
    lagged: AtomicU64,
}

/// A payload, as the JSON value the envelope embeds.
#[derive(Debug, Clone)]
pub struct Data(String);

/// Why a payload or a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The channel name is empty or longer than [`MAX_CHANNEL`].
    #[error("channel name must be 1 to {MAX_CHANNEL} bytes")]
    BadChannel,
    /// [`MAX_CHANNELS`] channels are remembered already.
    #[error("too many channels")]
    Limit,
    /// The payload given as JSON is not valid JSON.
    #[error("payload is not valid JSON: {0}")]
    InvalidJson(String),
}

impl Data {
    /// A text payload, embedded as a JSON string.
    pub fn text(s: &str) -> Data {
        let mut out = String::with_capacity(s.len() + 2);
        push_json_str(&mut out, s);
        Data(out)
    }

    /// A JSON payload, embedded verbatim once validated; line breaks
    /// between tokens become spaces so the envelope (and its SSE line)
    /// stays one line.
    pub fn json(s: &str) -> Result<Data, PublishError> {
        serde_json::from_str::<serde::de::IgnoredAny>(s).map_err(|e| PublishError::InvalidJson(e.to_string()))?;
        Ok(Data(s.replace(['\n', '\r'], " ")))
    }
}

/// Appends `s` as a quoted JSON string, escaped as serde_json (and Herald)
/// escape: `"`, `\\`, the short forms, `\u00XX` for other controls.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0C => "\\f",
            0..=0x1F => "",
            _ => continue,
        };
        // Escaped bytes are ASCII, so `i` is on a char boundary.
        out.push_str(&s[start..i]);
        if short.is_empty() {
            // Writing to a `String` cannot fail.
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn envelope(head: &str, offset: u64, data: &Data) -> Utf8Bytes {
    const DATA: &str = ",\"data\":";
    let mut digits = itoa::Buffer::new();
    let offset = digits.format(offset);
    let mut s = String::with_capacity(head.len() + offset.len() + DATA.len() + data.0.len() + 1);
    s.push_str(head);
    s.push_str(offset);
    s.push_str(DATA);
    s.push_str(&data.0);
    s.push('}');
    Utf8Bytes::from(s)
}

/// The careful server's state; clones share it.
#[derive(Debug, Clone)]
pub struct Careful {
    shared: Arc<Shared>,
}

impl Default for Careful {
    fn default() -> Careful {
        Careful {
            shared: Arc::new(Shared {
                shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
                hasher: RandomState::new(),
                channels: AtomicU64::new(0),
                epoch: epoch(),
                lagged: AtomicU64::new(0),
            }),
        }
    }
}

/// Eight base-36 characters that differ between runs, like Herald's epoch.
fn epoch() -> Box<str> {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = RandomState::new().hash_one(std::time::SystemTime::now());
    (0..8)
        .map(|_| {
            let d = DIGITS[(n % 36) as usize] as char;
            n /= 36;
            d
        })
        .collect()
}

impl Careful {
    /// The epoch named in publish replies.
    pub fn epoch(&self) -> &str {
        &self.shared.epoch
    }

    /// Subscribers closed because they fell more than [`CAPACITY`]
    /// messages behind.
    pub fn lagged_closes(&self) -> u64 {
        self.shared.lagged.load(Ordering::Relaxed)
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, HashMap<Box<str>, Channel>> {
        let i = (self.shared.hasher.hash_one(channel) % SHARDS as u64) as usize;
        // A panic under the lock leaves the map consistent: every update is
        // a single assignment.
        self.shared.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on `channel`'s entry, created if new.
    fn with_channel<T>(&self, channel: &str, f: impl FnOnce(&mut Channel) -> T) -> Result<T, PublishError> {
        if channel.is_empty() || channel.len() > MAX_CHANNEL {
            return Err(PublishError::BadChannel);
        }
        let mut map = self.shard(channel);
        if let Some(c) = map.get_mut(channel) {
            return Ok(f(c));
        }
        if self.shared.channels.fetch_add(1, Ordering::Relaxed) >= MAX_CHANNELS as u64 {
            self.shared.channels.fetch_sub(1, Ordering::Relaxed);
            return Err(PublishError::Limit);
        }
        let mut head = String::with_capacity(channel.len() + 24);
        head.push_str("{\"channel\":");
        push_json_str(&mut head, channel);
        head.push_str(",\"offset\":");
        let c = map.entry(channel.into()).or_insert(Channel { head: head.into(), last: 0, tx: None });
        Ok(f(c))
    }

    /// Publishes `data` to `channel`; returns its offset (1 for a
    /// channel's first message). The envelope is encoded only when the
    /// channel has subscribers.
    pub fn publish(&self, channel: &str, data: &Data) -> Result<u64, PublishError> {
        self.with_channel(channel, |c| {
            c.last += 1;
            if let Some(tx) = &c.tx {
                let frame = Frame { text: envelope(&c.head, c.last, data), sse: OnceLock::new() };
                // Fails only if every receiver is gone: nobody to deliver to.
                let _ = tx.send(Arc::new(frame));
            }
            c.last
        })
    }

    fn subscribe(&self, channel: &str) -> Result<broadcast::Receiver<Arc<Frame>>, PublishError> {
        self.with_channel(channel, |c| c.tx.get_or_insert_with(|| broadcast::channel(CAPACITY).0).subscribe())
    }

    /// Frees `channel`'s ring when its last subscriber (whose receiver is
    /// already dropped) is gone.
    fn unsubscribed(&self, channel: &str) {
        let mut map = self.shard(channel);
        if let Some(c) = map.get_mut(channel) {
            if c.tx.as_ref().is_some_and(|tx| tx.receiver_count() == 0) {
                c.tx = None;
            }
        }
    }

    /// The axum router.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/ws", get(ws))
            .route("/sse", get(sse))
            .route("/publish/{channel}", post(publish))
            .route("/healthz", get(|| async { ([(header::CONTENT_TYPE, "text/plain")], "ok\n") }))
            .layer(DefaultBodyLimit::max(MAX_MESSAGE))
            .with_state(self.clone())
    }

    /// Serves on `listener`, with TCP_NODELAY on every connection, until
    /// the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let listener = listener.tap_io(|tcp| {
            // Only latency is at stake: a socket that refuses it still works.
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, self.router()).await
    }
}

/// Herald's HTTP error body: `{"code":…,"message":…}`.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut body = String::with_capacity(message.len() + 32);
    body.push_str("{\"code\":");
    push_json_str(&mut body, code);
    body.push_str(",\"message\":");
    push_json_str(&mut body, message);
    body.push_str("}\n");
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn refused(e: &PublishError) -> Response {
    match e {
        PublishError::BadChannel => error(StatusCode::BAD_REQUEST, "bad_channel", &e.to_string()),
        PublishError::Limit => error(StatusCode::SERVICE_UNAVAILABLE, "limit", &e.to_string()),
        PublishError::InvalidJson(_) => error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    }
}

/// The one `channel` of a subscription query, or why there is none.
fn channel_of(query: Option<&str>) -> Result<String, &'static str> {
    let mut found = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if k == "channel" {
            if found.is_some() {
                return Err("one channel per connection");
            }
            found = Some(v.into_owned());
        }
    }
    found.ok_or("missing channel")
}

/// Subscribes to the query's channel, or the error answer.
#[allow(clippy::result_large_err)]
fn open_sub(s: Careful, query: Option<&str>) -> Result<Sub, Response> {
    let channel = channel_of(query).map_err(|why| error(StatusCode::BAD_REQUEST, "bad_request", why))?;
    let rx = s.subscribe(&channel).map_err(|e| refused(&e))?;
    Ok(Sub { rx, unsub: Unsub { s, channel } })
}

async fn ws(State(s): State<Careful>, RawQuery(q): RawQuery, up: WebSocketUpgrade) -> Response {
    // Subscribed before the 101 goes out: a client that sees it gets every
    // later message.
    let sub = match open_sub(s, q.as_deref()) {
        Ok(sub) => sub,
        Err(r) => return r,
    };
    up.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| subscriber(socket, sub))
}

/// One connection's subscription, dropped when its connection ends (or
/// its upgrade fails).
struct Sub {
    // Fields drop in order: the receiver is gone before `Unsub` counts
    // the channel's receivers.
    rx: broadcast::Receiver<Arc<Frame>>,
    unsub: Unsub,
}

/// Why a subscriber's loop ended.
enum End {
    /// The peer closed or the socket failed.
    Gone,
    /// It fell more than [`CAPACITY`] messages behind.
    Lagged,
}

async fn subscriber(mut socket: WebSocket, mut sub: Sub) {
    let rx = &mut sub.rx;
    let end = loop {
        tokio::select! {
            m = rx.recv() => match m {
                Ok(first) => {
                    if let Err(end) = forward(&mut socket, rx, &first).await {
                        break end;
                    }
                }
                Err(RecvError::Lagged(_)) => break End::Lagged,
                Err(RecvError::Closed) => break End::Gone,
            },
            // Pings are answered inside tungstenite; data frames are ignored.
            r = socket.recv() => match r {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break End::Gone,
                Some(Ok(_)) => {}
            },
        }
    };
    if let End::Lagged = end {
        sub.unsub.s.shared.lagged.fetch_add(1, Ordering::Relaxed);
        let close = Message::Close(Some(CloseFrame { code: 1008, reason: Utf8Bytes::from_static("slow consumer") }));
        // A socket that cannot take the close within the bound is dropped.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(close)).await;
    }
}

/// Writes `first` and whatever else the channel already holds (up to
/// [`BATCH`]), then flushes once.
async fn forward(socket: &mut WebSocket, rx: &mut broadcast::Receiver<Arc<Frame>>, first: &Frame) -> Result<(), End> {
    socket.feed(Message::Text(first.text.clone())).await.map_err(|_| End::Gone)?;
    for _ in 1..BATCH {
        match rx.try_recv() {
            Ok(f) => socket.feed(Message::Text(f.text.clone())).await.map_err(|_| End::Gone)?,
            Err(TryRecvError::Lagged(_)) => return Err(End::Lagged),
            // Closed: flush what is fed; the next `recv` ends the loop.
            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
        }
    }
    socket.flush().await.map_err(|_| End::Gone)
}

async fn sse(State(s): State<Careful>, RawQuery(q): RawQuery) -> Response {
    let sub = match open_sub(s, q.as_deref()) {
        Ok(sub) => sub,
        Err(r) => return r,
    };
    // hyper polls the body until it is pending before it writes, so
    // messages that are already queued go out in one write.
    let stream = futures_util::stream::unfold(sub, |mut sub| async move {
        match sub.rx.recv().await {
            Ok(f) => Some((Ok::<_, Infallible>(f.sse()), sub)),
            Err(RecvError::Lagged(_)) => {
                sub.unsub.s.shared.lagged.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(RecvError::Closed) => None,
        }
    });
    let mut r = Body::from_stream(stream).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Frees a channel's ring, on drop, if its last subscriber is gone.
struct Unsub {
    s: Careful,
    channel: String,
}

impl Drop for Unsub {
    fn drop(&mut self) {
        self.s.unsubscribed(&self.channel);
    }
}

async fn publish(State(s): State<Careful>, Path(channel): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"));
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "body is not UTF-8 (send JSON with Content-Type: application/json)");
    };
    let data = if is_json {
        match Data::json(text) {
            Ok(d) => d,
            Err(e) => return refused(&e),
        }
    } else {
        Data::text(text)
    };
    match s.publish(&channel, &data) {
        Ok(offset) => {
            let mut body = String::with_capacity(channel.len() + 64);
            body.push_str("{\"channel\":");
            push_json_str(&mut body, &channel);
            body.push_str(",\"offset\":");
            body.push_str(itoa::Buffer::new().format(offset));
            body.push_str(",\"epoch\":");
            push_json_str(&mut body, s.epoch());
            body.push_str("}\n");
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => refused(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_escape_as_serde_json_does() {
        let all: String = (0u8..0x80).map(char::from).chain("é€😀".chars()).collect();
        for s in [all.as_str(), "", "plain", "\"\\\"", "a\u{1f}b\u{7f}"] {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap());
        }
    }

    #[test]
    fn envelope_and_offsets_per_channel() {
        let c = Careful::default();
        let mut rx = c.subscribe("a").unwrap();
        assert_eq!(c.publish("a", &Data::text("x")), Ok(1));
        assert_eq!(c.publish("b", &Data::json("[1,\n2]").unwrap()), Ok(1));
        assert_eq!(c.publish("a", &Data::json("{\"k\":null}").unwrap()), Ok(2));
        assert_eq!(rx.try_recv().unwrap().text.as_str(), r#"{"channel":"a","offset":1,"data":"x"}"#);
        let second = rx.try_recv().unwrap();
        assert_eq!(second.text.as_str(), r#"{"channel":"a","offset":2,"data":{"k":null}}"#);
        assert_eq!(&second.sse()[..], b"data: {\"channel\":\"a\",\"offset\":2,\"data\":{\"k\":null}}\n\n");
        assert_eq!(c.publish("", &Data::text("x")), Err(PublishError::BadChannel));
    }

    #[test]
    fn the_ring_lives_while_there_are_subscribers() {
        let c = Careful::default();
        let has_ring = |c: &Careful| c.with_channel("a", |ch| ch.tx.is_some()).unwrap();
        let rx = c.subscribe("a").unwrap();
        c.unsubscribed("a");
        assert!(has_ring(&c), "a receiver is left");
        drop(rx);
        c.unsubscribed("a");
        assert!(!has_ring(&c));
        // The offset survives the ring.
        assert_eq!(c.publish("a", &Data::text("x")), Ok(1));
        assert_eq!(c.publish("a", &Data::text("x")), Ok(2));
    }
}
