//! `herald-client`: a client of the Herald fan-out server, with the
//! behaviour of herald.js.
//!
//! ```no_run
//! # async fn run() -> Result<(), herald_client::Error> {
//! use herald_client::{Client, Config, Event};
//! let client = Client::connect(Config::new("ws://127.0.0.1:8080/ws"));
//! let mut sub = client.subscribe("news", None).await?;
//! let published = client.publish("news", serde_json::json!({"hello": "world"})).await?;
//! while let Some(event) = sub.next().await {
//!     match event {
//!         Event::Message { offset, data, .. } => println!("{offset}: {data}"),
//!         Event::Gap { reason, .. } => println!("missed messages ({reason}): reload"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! - One task owns the connection. It reconnects with full-jitter backoff
//!   (`min_delay` doubling to `max_delay`, the first attempt jittered too)
//!   and resubscribes every channel with `since` = its last position: what
//!   was published meanwhile arrives once, in order; what cannot be
//!   recovered is an [`Event::Gap`].
//! - With [`Config::get_token`] a token is fetched before each connect and
//!   again 30 s before its `exp` (sent with `auth`, on the same connection).
//! - Bounded: each subscription's events wait in a queue of
//!   [`Config::queue`]; a consumer that lets it fill loses the overflow and
//!   is told with [`Event::Gap`] (`reason` `"client_queue_full"`) where the
//!   loss began (the queue's last slot is kept for it).
//!   Commands waiting for a connection are bounded by the same number.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;

mod deflate;

/// A token source: called before each connect and before a token expires.
pub type TokenSource = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

/// How to reach Herald, and the client's bounds.
#[derive(Clone)]
pub struct Config {
    /// `ws://host/ws` (no TLS: put a TLS-terminating proxy in front).
    pub url: String,
    /// A connection token.
    pub token: Option<String>,
    /// Fetches fresh tokens.
    pub get_token: Option<TokenSource>,
    /// The first reconnect delay's cap (500 ms).
    pub min_delay: Duration,
    /// The longest reconnect delay (20 s).
    pub max_delay: Duration,
    /// Events per subscription, and commands waiting for a connection, at
    /// most (1,024).
    pub queue: usize,
    /// A command without a reply for this long fails (10 s).
    pub command_timeout: Duration,
    /// Offer permessage-deflate (`server_no_context_takeover`): a server
    /// with `compression = true` then sends messages compressed, and they
    /// are inflated here (at most 64 MiB each). Off by default.
    pub compression: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config").field("url", &self.url).field("token", &self.token.as_ref().map(|_| "<redacted>")).finish_non_exhaustive()
    }
}

impl Config {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Config {
        Config {
            url: url.into(),
            token: None,
            get_token: None,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(20),
            queue: 1024,
            command_timeout: Duration::from_secs(10),
            compression: false,
        }
    }
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Herald answered an error (`code` is its error code).
    #[error("{code}: {message}")]
    Herald { code: String, message: String },
    /// The connection went before the reply: a publish may or may not have
    /// happened (retry it with its idempotency key).
    #[error("the connection closed before the reply")]
    Disconnected,
    #[error("no reply in time")]
    Timeout,
    /// Too many commands wait for a connection.
    #[error("too many commands wait for a connection")]
    Overloaded,
    /// The client was closed, or the server closed it for good (4002, 4003).
    #[error("the client is closed")]
    Closed,
}

/// What a subscription receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Message {
        channel: String,
        offset: u64,
        data: Value,
    },
    /// Messages were missed and cannot be replayed: `not_recovered`,
    /// `epoch`, `lagged`, `client_queue_full`.
    Gap {
        channel: String,
        reason: String,
    },
    Join {
        channel: String,
        user: String,
    },
    Leave {
        channel: String,
        user: String,
    },
}

/// A publish's place in its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub offset: u64,
    pub epoch: String,
}

/// The connection's state, as [`Client::state`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting,
    Connected,
    Closed,
}

/// A subscription: a stream of its events (kept across reconnects until
/// dropped or [`Subscription::unsubscribe`]d).
#[derive(Debug)]
pub struct Subscription {
    channel: String,
    id: u64,
    rx: mpsc::Receiver<Event>,
    ctl: mpsc::Sender<Ctl>,
    /// The `subscribed` reply's epoch and top.
    pub epoch: String,
    pub offset: u64,
}

impl Subscription {
    /// The next event; `None` once unsubscribed or closed.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Ends the subscription (dropping it does the same).
    pub async fn unsubscribe(self) {}
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Only this subscription: a later one to the channel stays.
        let _ = self.ctl.try_send(Ctl::Unsubscribe(std::mem::take(&mut self.channel), self.id));
    }
}

impl futures_util::Stream for Subscription {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

type Reply = oneshot::Sender<Result<Value, Error>>;

/// A connect (TCP and handshake) that takes longer is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that lived less than this did not really succeed.
const STABLE: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Ctl {
    Command(Value, Reply),
    Subscribe {
        channel: String,
        id: u64,
        since: Option<String>,
        events: mpsc::Sender<Event>,
        reply: Reply,
    },
    /// Unsubscribes the subscription `id` of the channel, if still that one.
    Unsubscribe(String, u64),
    Close,
}

/// The client: cheap to clone; the connection lives while a clone does.
#[derive(Debug, Clone)]
pub struct Client {
    ctl: mpsc::Sender<Ctl>,
    state: watch::Receiver<State>,
    timeout: Duration,
}

impl Client {
    /// Starts connecting (on the current tokio runtime).
    pub fn connect(config: Config) -> Client {
        let (ctl, rx) = mpsc::channel(config.queue.max(1));
        let (state_tx, state) = watch::channel(State::Connecting);
        let timeout = config.command_timeout;
        tokio::spawn(Task::new(config, rx, state_tx).run());
        Client { ctl, state, timeout }
    }

    /// The connection's state now.
    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Waits until the state is `want`.
    pub async fn wait_for(&self, want: State) {
        let mut s = self.state.clone();
        let _ = s.wait_for(|v| *v == want).await;
    }

    async fn ask(&self, ctl: impl FnOnce(Reply) -> Ctl) -> Result<Value, Error> {
        let (tx, rx) = oneshot::channel();
        self.ctl.try_send(ctl(tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded,
            mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Subscribes to `channel` (from `since`, a saved `epoch:offset`).
    pub async fn subscribe(&self, channel: &str, since: Option<String>) -> Result<Subscription, Error> {
        let (events, rx) = mpsc::channel(self.queue_len());
        let id = fastrand::u64(..);
        let r = self.ask(|reply| Ctl::Subscribe { channel: channel.into(), id, since, events, reply }).await?;
        Ok(Subscription {
            channel: channel.into(),
            id,
            rx,
            ctl: self.ctl.clone(),
            epoch: r["epoch"].as_str().unwrap_or_default().into(),
            offset: r["offset"].as_u64().unwrap_or(0),
        })
    }

    fn queue_len(&self) -> usize {
        self.ctl.max_capacity()
    }

    /// Publishes `data` to `channel`.
    pub async fn publish(&self, channel: &str, data: Value) -> Result<Published, Error> {
        self.publish_with_key(channel, data, None).await
    }

    /// Publishes once per `key` (a retry with the same key is not published again).
    pub async fn publish_with_key(&self, channel: &str, data: Value, key: Option<&str>) -> Result<Published, Error> {
        let mut cmd = json!({"op": "publish", "channel": channel, "data": data});
        if let Some(k) = key {
            cmd["idempotency_key"] = k.into();
        }
        let r = self.ask(|reply| Ctl::Command(cmd, reply)).await?;
        Ok(Published { offset: r["offset"].as_u64().unwrap_or(0), epoch: r["epoch"].as_str().unwrap_or_default().into() })
    }

    /// A page of `channel`'s history (the `history` reply).
    pub async fn history(&self, channel: &str, since: Option<&str>, limit: Option<u64>) -> Result<Value, Error> {
        let mut cmd = json!({"op": "history", "channel": channel});
        if let Some(s) = since {
            cmd["since"] = s.into();
        }
        if let Some(l) = limit {
            cmd["limit"] = l.into();
        }
        self.ask(|reply| Ctl::Command(cmd, reply)).await
    }

    /// Who is subscribed to `channel` (the `presence` reply).
    pub async fn presence(&self, channel: &str) -> Result<Value, Error> {
        self.ask(|reply| Ctl::Command(json!({"op": "presence", "channel": channel}), reply)).await
    }

    /// Closes for good.
    pub async fn close(&self) {
        let _ = self.ctl.send(Ctl::Close).await;
    }
}

/// One subscription as the task keeps it.
struct Sub {
    id: u64,
    events: mpsc::Sender<Event>,
    /// Last position received.
    epoch: Option<String>,
    offset: u64,
    /// Events were lost to a full queue: a gap is due.
    overflowed: bool,
    /// The caller's `subscribe` waits for the first reply.
    first: Option<Reply>,
}

impl Sub {
    fn since(&self) -> Option<String> {
        self.epoch.as_ref().map(|e| format!("{e}:{}", self.offset))
    }

    /// Queues `event`; false when the receiver is gone. The queue's last
    /// slot is kept for a gap: when only it is left, the gap goes there and
    /// later events are dropped until the consumer made room, so the gap
    /// sits exactly where the loss began.
    fn offer(&mut self, channel: &str, event: Event) -> bool {
        if self.events.is_closed() {
            return false;
        }
        if self.overflowed {
            if self.events.capacity() < 2 {
                return true;
            }
            self.overflowed = false;
        }
        if self.events.capacity() >= 2 {
            let _ = self.events.try_send(event);
        } else {
            let _ = self.events.try_send(Event::Gap { channel: channel.into(), reason: "client_queue_full".into() });
            self.overflowed = true;
        }
        true
    }
}

/// What a connection ended with.
enum Ended {
    Lost,
    Final,
    Closed,
    TokenExpired,
}

struct Task {
    config: Config,
    ctl: mpsc::Receiver<Ctl>,
    state: watch::Sender<State>,
    subs: HashMap<String, Sub>,
    /// Commands waiting for a connection.
    queued: Vec<(Value, Reply)>,
    pending: HashMap<u64, Reply>,
    /// Replies that set a subscription's position: id → channel.
    subscribing: HashMap<u64, (String, bool)>,
    next_id: u64,
    token: Option<String>,
}

/// The WebSocket: over the socket as it is, or over one that inflates
/// compressed messages ([`deflate`]).
type Ws = tokio_tungstenite::WebSocketStream<deflate::Inflating<tokio::net::TcpStream>>;

/// Opens the WebSocket at `url` (`ws://host[:port]/…`), offering
/// compression when asked.
async fn open(url: &str, compression: bool) -> Result<Ws, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    if compression {
        request.headers_mut().insert("sec-websocket-extensions", http::HeaderValue::from_static(deflate::OFFER));
    }
    let uri = request.uri();
    let host = uri.host().ok_or("no host in the URL")?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (ws, _) = tokio_tungstenite::client_async(request, deflate::Inflating::new(tcp)).await.map_err(|e| e.to_string())?;
    Ok(ws)
}

/// A JWT's `exp`, if it has one.
fn expiry(token: &str) -> Option<u64> {
    use base64::Engine as _;
    let part = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?["exp"].as_u64()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Task {
    fn new(config: Config, ctl: mpsc::Receiver<Ctl>, state: watch::Sender<State>) -> Task {
        let token = config.token.clone();
        Task {
            config,
            ctl,
            state,
            subs: HashMap::new(),
            queued: Vec::new(),
            pending: HashMap::new(),
            subscribing: HashMap::new(),
            next_id: 1,
            token,
        }
    }

    /// Full jitter: a random delay up to min_delay × 2^(n−1), capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self.config.min_delay.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(self.config.max_delay);
        cap.mul_f64(fastrand::f64())
    }

    async fn fresh_token(&mut self) -> Option<String> {
        if let Some(get) = &self.config.get_token {
            match get().await {
                Ok(t) => self.token = Some(t),
                Err(e) => tracing::warn!(error = %e, "cannot get a token"),
            }
        }
        self.token.clone()
    }

    async fn run(mut self) {
        if self.config.url.starts_with("wss://") {
            tracing::error!(url = %self.config.url, "herald-client speaks ws:// only (no TLS): put a TLS-terminating proxy in front, or use herald.js");
            self.shut();
            return;
        }
        let mut attempt = 0u32;
        loop {
            let url = match self.fresh_token().await {
                Some(t) => {
                    let sep = if self.config.url.contains('?') { '&' } else { '?' };
                    let t = percent_encoding::utf8_percent_encode(&t, percent_encoding::NON_ALPHANUMERIC);
                    format!("{}{sep}token={t}", self.config.url)
                }
                None => self.config.url.clone(),
            };
            let mut lasted = false;
            let ended = match tokio::time::timeout(CONNECT_TIMEOUT, open(&url, self.config.compression)).await {
                Ok(Ok(ws)) => {
                    let opened = tokio::time::Instant::now();
                    let ended = self.serve(ws).await;
                    // Only a connection that lasted resets the backoff: a
                    // server that accepts and closes at once is not hit in a loop.
                    lasted = opened.elapsed() >= STABLE;
                    if lasted {
                        attempt = 0;
                    }
                    ended
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot connect to Herald");
                    Ended::Lost
                }
                Err(_) => {
                    tracing::debug!("connecting to Herald timed out");
                    Ended::Lost
                }
            };
            for (_, reply) in self.pending.drain() {
                let _ = reply.send(Err(Error::Disconnected));
            }
            self.subscribing.clear();
            let _ = self.state.send(State::Connecting);
            match ended {
                Ended::Closed | Ended::Final => break,
                // The token expired after a while: a new one, at once.
                Ended::TokenExpired if lasted => continue,
                Ended::TokenExpired | Ended::Lost => {}
            }
            attempt += 1;
            let pause = tokio::time::sleep(self.backoff(attempt));
            tokio::pin!(pause);
            // Commands keep coming while disconnected.
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    c = self.ctl.recv() => match c {
                        None | Some(Ctl::Close) => {
                            self.shut();
                            return;
                        }
                        Some(c) => self.offline(c),
                    },
                }
            }
        }
        self.shut();
    }

    fn shut(&mut self) {
        let _ = self.state.send(State::Closed);
        for (_, r) in self.queued.drain(..) {
            let _ = r.send(Err(Error::Closed));
        }
        for (_, s) in self.subs.drain() {
            if let Some(r) = s.first {
                let _ = r.send(Err(Error::Closed));
            }
        }
    }

    /// A command while there is no connection.
    fn offline(&mut self, c: Ctl) {
        match c {
            Ctl::Command(cmd, reply) => {
                if self.queued.len() >= self.config.queue {
                    let _ = reply.send(Err(Error::Overloaded));
                } else {
                    self.queued.push((cmd, reply));
                }
            }
            Ctl::Subscribe { channel, id, since, events, reply } => {
                let (epoch, offset) = since.as_deref().and_then(parse_position).map_or((None, 0), |(e, o)| (Some(e), o));
                self.subs.insert(channel, Sub { id, events, epoch, offset, overflowed: false, first: Some(reply) });
            }
            Ctl::Unsubscribe(ch, id) => {
                if self.subs.get(&ch).is_some_and(|s| s.id == id) {
                    self.subs.remove(&ch);
                }
            }
            Ctl::Close => {}
        }
    }

    fn command(&mut self, mut cmd: Value) -> (u64, String) {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = id.into();
        (id, cmd.to_string())
    }

    async fn serve(&mut self, mut ws: Ws) -> Ended {
        let _ = self.state.send(State::Connected);
        let mut out: Vec<String> = Vec::new();
        let channels: Vec<String> = self.subs.keys().cloned().collect();
        for ch in channels {
            out.push(self.subscribe_cmd(&ch));
        }
        for (cmd, reply) in std::mem::take(&mut self.queued) {
            // Its caller gave up (timed out): not sent late.
            if reply.is_closed() {
                continue;
            }
            let (id, text) = self.command(cmd);
            self.pending.insert(id, reply);
            out.push(text);
        }
        for text in out {
            if ws.send(WsMessage::Text(text.into())).await.is_err() {
                return Ended::Lost;
            }
        }
        let refresh = self.refresh_due();
        tokio::pin!(refresh);
        loop {
            tokio::select! {
                frame = ws.next() => match frame {
                    Some(Ok(WsMessage::Text(t))) => self.receive(&t),
                    Some(Ok(WsMessage::Close(f))) => {
                        let code: u16 = f.map_or(1005, |f| f.code.into());
                        return match code {
                            4002 | 4003 => Ended::Final,
                            4001 => Ended::TokenExpired,
                            _ => Ended::Lost,
                        };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Ended::Lost,
                },
                c = self.ctl.recv() => {
                    let text = match c {
                        None | Some(Ctl::Close) => {
                            let _ = ws.close(None).await;
                            return Ended::Closed;
                        }
                        Some(Ctl::Command(cmd, reply)) => {
                            let (id, text) = self.command(cmd);
                            self.pending.insert(id, reply);
                            text
                        }
                        Some(Ctl::Subscribe { channel, id, since, events, reply }) => {
                            let (epoch, offset) = since.as_deref().and_then(parse_position).map_or((None, 0), |(e, o)| (Some(e), o));
                            self.subs.insert(channel.clone(), Sub { id, events, epoch, offset, overflowed: false, first: Some(reply) });
                            self.subscribe_cmd(&channel)
                        }
                        Some(Ctl::Unsubscribe(ch, id)) => {
                            if self.subs.get(&ch).is_none_or(|s| s.id != id) {
                                continue;
                            }
                            self.subs.remove(&ch);
                            self.command(json!({"op": "unsubscribe", "channel": ch})).1
                        }
                    };
                    if ws.send(WsMessage::Text(text.into())).await.is_err() {
                        return Ended::Lost;
                    }
                }
                _ = &mut refresh => {
                    let token = self.fresh_token().await;
                    if let Some(t) = token {
                        let (_, text) = self.command(json!({"op": "auth", "token": t}));
                        if ws.send(WsMessage::Text(text.into())).await.is_err() {
                            return Ended::Lost;
                        }
                    }
                    refresh.set(self.refresh_due());
                }
            }
        }
    }

    /// Resolves 30 s before the token's `exp` (never without `get_token`).
    fn refresh_due(&self) -> Pin<Box<tokio::time::Sleep>> {
        let far = Duration::from_secs(365 * 24 * 3600);
        let wait = match (&self.config.get_token, self.token.as_deref().and_then(expiry)) {
            (Some(_), Some(exp)) => Duration::from_secs(exp.saturating_sub(30).saturating_sub(unix_now()).max(1)),
            _ => far,
        };
        Box::pin(tokio::time::sleep(wait))
    }

    fn subscribe_cmd(&mut self, channel: &str) -> String {
        let since = self.subs.get(channel).and_then(Sub::since);
        let mut cmd = json!({"op": "subscribe", "channel": channel});
        if let Some(s) = &since {
            cmd["since"] = s.as_str().into();
        }
        let (id, text) = self.command(cmd);
        self.subscribing.insert(id, (channel.into(), since.is_some()));
        text
    }

    fn receive(&mut self, text: &str) {
        let Ok(m) = serde_json::from_str::<Value>(text) else { return };
        if let Some(id) = m.get("id").and_then(Value::as_u64) {
            if let Some((channel, asked)) = self.subscribing.remove(&id) {
                return self.subscribed(&channel, asked, m);
            }
            if let Some(reply) = self.pending.remove(&id) {
                let r = if m["op"] == "error" {
                    Err(Error::Herald {
                        code: m["code"].as_str().unwrap_or("").into(),
                        message: m["message"].as_str().unwrap_or("").into(),
                    })
                } else {
                    Ok(m)
                };
                let _ = reply.send(r);
            }
            return;
        }
        let Some(channel) = m["channel"].as_str().map(str::to_owned) else { return };
        let Some(sub) = self.subs.get_mut(&channel) else { return };
        let event = match (m["op"].as_str(), m["offset"].as_u64()) {
            (None, Some(offset)) => {
                // Delivered already (a replay overlapping what came live).
                if sub.epoch.is_some() && offset <= sub.offset {
                    return;
                }
                sub.offset = offset;
                Event::Message { channel: channel.clone(), offset, data: m["data"].clone() }
            }
            (Some("epoch"), _) => {
                sub.epoch = m["epoch"].as_str().map(str::to_owned);
                sub.offset = 0;
                Event::Gap { channel: channel.clone(), reason: "epoch".into() }
            }
            (Some("lagged"), _) => {
                sub.offset = sub.offset.max(m["missed_to"].as_u64().unwrap_or(0));
                Event::Gap { channel: channel.clone(), reason: "lagged".into() }
            }
            (Some("join"), _) => Event::Join { channel: channel.clone(), user: m["user"].as_str().unwrap_or("").into() },
            (Some("leave"), _) => Event::Leave { channel: channel.clone(), user: m["user"].as_str().unwrap_or("").into() },
            (Some("unsubscribed"), _) => {
                // The server removed it (the server API): its stream ends.
                self.subs.remove(&channel);
                return;
            }
            _ => return,
        };
        if !sub.offer(&channel, event) {
            self.subs.remove(&channel);
        }
    }

    fn subscribed(&mut self, channel: &str, asked: bool, m: Value) {
        let Some(sub) = self.subs.get_mut(channel) else { return };
        if m["op"] == "error" {
            let e = Error::Herald { code: m["code"].as_str().unwrap_or("").into(), message: m["message"].as_str().unwrap_or("").into() };
            if let Some(r) = sub.first.take() {
                let _ = r.send(Err(e));
            }
            self.subs.remove(channel);
            return;
        }
        let epoch = m["epoch"].as_str().map(str::to_owned);
        let gap = asked && m["recovered"] == false;
        if sub.epoch.is_none() || gap || sub.epoch != epoch {
            sub.epoch = epoch;
            sub.offset = m["offset"].as_u64().unwrap_or(0);
        }
        if let Some(r) = sub.first.take() {
            let _ = r.send(Ok(m));
        }
        if gap && !sub.offer(channel, Event::Gap { channel: channel.into(), reason: "not_recovered".into() }) {
            self.subs.remove(channel);
        }
    }
}

fn parse_position(s: &str) -> Option<(String, u64)> {
    let (e, o) = s.rsplit_once(':')?;
    Some((e.to_owned(), o.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(tx);
        let t = super::Task::new(super::Config::new("ws://x"), rx, tokio::sync::watch::channel(super::State::Connecting).0);
        for attempt in 1..20 {
            let cap =
                std::time::Duration::from_millis(500).saturating_mul(1 << (attempt - 1).min(16)).min(std::time::Duration::from_secs(20));
            for _ in 0..100 {
                assert!(t.backoff(attempt) <= cap);
            }
        }
    }

    #[test]
    fn reads_a_tokens_expiry() {
        // {"sub":"42","exp":1767225600}
        let t = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiIsImV4cCI6MTc2NzIyNTYwMH0.sig";
        assert_eq!(super::expiry(t), Some(1_767_225_600));
        assert_eq!(super::expiry("nonsense"), None);
    }
}
