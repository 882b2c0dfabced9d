//! One subscriber connection to one Redis node: keeps the channels routed
//! to it subscribed across reconnects, and delivers what it reads.
//!
//! The connection is read by Herald itself ([`crate::proto::resp`]) rather
//! than through redis-rs, whose push sender silently drops on a full
//! bounded channel: here a message is queued on the shards, or reading
//! waits while their queues are full (TCP pushes back to Redis), or it is
//! counted as dropped by reason. Gaps ([`super::channels`]) are filled
//! from the channel's stream by a task of their own; the connection goes
//! on reading meanwhile.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::channels::{fill_messages, Delivered, Fill, Incoming, Step};
use super::script::Read;
use super::{wire, Backoff, Shared};
use crate::proto::resp::{self, Resp};
use crate::router::Routed;

/// Channels per SUBSCRIBE command when resubscribing.
const SUBSCRIBE_BATCH: usize = 256;
/// Read buffer of a subscriber connection (it grows for a larger message).
const READ_BYTES: usize = 64 * 1024;
/// Subscribe commands a connection has in flight at most: Redis buffers
/// the confirmations (and messages) in its pub/sub output buffer, so a
/// reconnect with many channels subscribes them a window at a time.
const MAX_UNACKED: usize = 4096;
/// Epoch fetches (one round trip each) running at once, per connection.
const MAX_FETCHES: usize = 32;

/// A command for a subscriber connection.
#[derive(Debug)]
pub(crate) enum NodeCmd {
    /// Subscribe; the generation the coordinator gave the subscription.
    Subscribe(Arc<str>, u64),
    Unsubscribe(Arc<str>),
}

/// How a connection ended.
enum Session {
    /// The command channel closed: the broker is stopping.
    Closed,
    /// Could not connect.
    NoConnect(LinkError),
    /// Connected, then lost the connection.
    Failed(LinkError),
}

/// Why a subscriber connection could not be made or was lost.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("no answer to AUTH")]
    NoAuthAnswer,
    #[error("AUTH refused: {0}")]
    AuthRefused(String),
    #[error("Redis closed the connection")]
    Closed,
    #[error("unreadable reply: {0}")]
    Resp(#[from] resp::RespError),
    #[error("no answer to PING within {0} ms")]
    NoPong(u128),
}

/// A subscriber connection's state across its reconnects.
struct Subscriber {
    shared: Arc<Shared>,
    node: (String, u16),
    cmds: mpsc::Receiver<NodeCmd>,
    /// Channel → generation of its subscription.
    want: HashMap<Arc<str>, u64>,
    backoff: Backoff,
    ever_up: bool,
    fetches: Rc<tokio::sync::Semaphore>,
}

/// One connection's view of its subscriptions.
#[derive(Default)]
struct Live {
    /// Confirmed by Redis on this connection.
    confirmed: HashSet<Arc<str>>,
    /// To subscribe, in order (checked against `want` when sent).
    backlog: VecDeque<Arc<str>>,
    /// Subscribe commands sent and not yet answered.
    unacked: usize,
    /// Unsubscribe commands sent and not yet answered, per channel: their
    /// answers are not Redis dropping a subscription.
    unsubscribing: HashMap<Arc<str>, u32>,
    /// False once the connection is gone (late epoch fetches then do not
    /// confirm anything).
    alive: Rc<Cell<bool>>,
}

/// Runs one node's subscriber connection until the broker stops.
pub(crate) async fn run(shared: Arc<Shared>, node: (String, u16), cmds: mpsc::Receiver<NodeCmd>, mut stop: watch::Receiver<bool>) {
    let mut s = Subscriber {
        shared,
        node,
        cmds,
        want: HashMap::new(),
        backoff: Backoff::default(),
        ever_up: false,
        fetches: Rc::new(tokio::sync::Semaphore::new(MAX_FETCHES)),
    };
    let addr = format!("{}:{}", s.node.0, s.node.1);
    loop {
        let outcome = tokio::select! {
            r = s.session() => r,
            _ = stop.changed() => return,
        };
        if s.shared.cluster && !matches!(outcome, Session::Closed) {
            // The cluster may have changed: read its slot map again.
            s.shared.request_resync();
        }
        match outcome {
            Session::Closed => return,
            Session::Failed(e) => {
                tracing::warn!(node = %addr, error = %e, channels = s.want.len(), "Redis subscriber connection lost; reconnecting");
            }
            Session::NoConnect(e) => tracing::debug!(node = %addr, error = %e, "cannot connect to Redis"),
        }
        // Commands keep coming while disconnected: apply them to `want`.
        let pause = tokio::time::sleep(s.backoff.next());
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                c = s.cmds.recv() => match c {
                    Some(NodeCmd::Subscribe(ch, gen)) => { s.want.insert(ch, gen); }
                    Some(NodeCmd::Unsubscribe(ch)) => { s.want.remove(&ch); }
                    None => return,
                },
                _ = stop.changed() => return,
            }
        }
    }
}

impl Subscriber {
    /// Connects, subscribes everything wanted, and serves until the
    /// connection fails.
    async fn session(&mut self) -> Session {
        let stream = match connect(&self.shared, &self.node).await {
            Ok(s) => s,
            Err(e) => return Session::NoConnect(e),
        };
        let (mut rd, mut wr) = tokio::io::split(stream);
        self.backoff.reset();
        let m = &self.shared.metrics;
        if self.ever_up {
            m.reconnects.fetch_add(1, Ordering::Relaxed);
            let node = format!("{}:{}", self.node.0, self.node.1);
            tracing::info!(node = %node, channels = self.want.len(), "reconnected to Redis; subscribing again");
        }
        self.ever_up = true;
        m.nodes_up.fetch_add(1, Ordering::Relaxed);
        let mut live = Live { alive: Rc::new(Cell::new(true)), ..Live::default() };
        live.backlog.extend(self.want.keys().cloned());
        let r = self.serve(&mut live, &mut rd, &mut wr).await;
        live.alive.set(false);
        let m = &self.shared.metrics;
        m.nodes_up.fetch_sub(1, Ordering::Relaxed);
        // The subscriptions on that connection are gone.
        m.subscribed.fetch_sub(live.confirmed.len() as u64, Ordering::Relaxed);
        for (ch, gen) in &self.want {
            self.shared.channels.confirm(ch, *gen, None);
        }
        r
    }

    async fn serve(&mut self, live: &mut Live, rd: &mut ReadHalf<Link>, wr: &mut WriteHalf<Link>) -> Session {
        let fail = |e: std::io::Error| Session::Failed(e.into());
        let mut buf = BytesMut::with_capacity(READ_BYTES);
        let ping_every = self.shared.timeout.max(Duration::from_millis(200));
        let mut ping = tokio::time::interval(ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut awaiting_pong = false;
        loop {
            if let Err(e) = self.send_backlog(live, wr).await {
                return fail(e);
            }
            tokio::select! {
                r = rd.read_buf(&mut buf) => {
                    match r {
                        Ok(0) => return Session::Failed(LinkError::Closed),
                        Ok(_) => {}
                        Err(e) => return fail(e),
                    }
                    loop {
                        let v = match resp::decode(&mut buf) {
                            Ok(Some(v)) => v,
                            Ok(None) => break,
                            Err(e) => return Session::Failed(e.into()),
                        };
                        awaiting_pong = false;
                        self.on_value(v, live).await;
                    }
                    if buf.capacity() - buf.len() < 4096 {
                        buf.reserve(READ_BYTES);
                    }
                }
                c = self.cmds.recv() => match c {
                    None => return Session::Closed,
                    Some(NodeCmd::Subscribe(ch, gen)) => {
                        // A new generation: confirmed again when Redis answers.
                        if live.confirmed.remove(&ch) {
                            self.shared.metrics.subscribed.fetch_sub(1, Ordering::Relaxed);
                        }
                        self.want.insert(Arc::clone(&ch), gen);
                        live.backlog.push_back(ch);
                    }
                    Some(NodeCmd::Unsubscribe(ch)) => {
                        self.want.remove(&ch);
                        if live.confirmed.remove(&ch) {
                            self.shared.metrics.subscribed.fetch_sub(1, Ordering::Relaxed);
                        }
                        *live.unsubscribing.entry(Arc::clone(&ch)).or_default() += 1;
                        if let Err(e) = write_flushed(wr, &self.shared.scripts.names.sub_command(self.shared.cluster, false, &[ch])).await {
                            return fail(e);
                        }
                    }
                },
                _ = ping.tick() => {
                    if awaiting_pong {
                        return Session::Failed(LinkError::NoPong(ping_every.as_millis()));
                    }
                    let mut cmd = Vec::new();
                    resp::command(&mut cmd, &[b"PING"]);
                    if let Err(e) = write_flushed(wr, &cmd).await {
                        return fail(e);
                    }
                    awaiting_pong = true;
                }
            }
        }
    }

    /// Subscribes what is waiting, a window at a time (sharded pub/sub: one
    /// channel per command, since one SSUBSCRIBE stays in one slot).
    async fn send_backlog(&self, live: &mut Live, wr: &mut WriteHalf<Link>) -> std::io::Result<()> {
        let per_command = if self.shared.cluster { 1 } else { SUBSCRIBE_BATCH };
        while live.unacked < MAX_UNACKED && !live.backlog.is_empty() {
            let mut batch = Vec::new();
            while batch.len() < per_command.min(MAX_UNACKED - live.unacked) {
                let Some(ch) = live.backlog.pop_front() else { break };
                if self.want.contains_key(&ch) && !live.confirmed.contains(&ch) {
                    batch.push(ch);
                }
            }
            if batch.is_empty() {
                continue;
            }
            live.unacked += batch.len();
            wr.write_all(&self.shared.scripts.names.sub_command(self.shared.cluster, true, &batch)).await?;
            // Over TLS the records wait in the stream until flushed.
            wr.flush().await?;
        }
        Ok(())
    }

    /// Handles one value read from the connection.
    async fn on_value(&self, v: Resp, live: &mut Live) {
        let shared = &self.shared;
        let items = match v {
            Resp::Array(Some(items)) => items,
            Resp::Error(e) => {
                // The answer to a (S)SUBSCRIBE: the node does not own the slot
                // (MOVED) or refuses. Read the slot map again and route every
                // unconfirmed channel of this connection anew.
                live.unacked = live.unacked.saturating_sub(1);
                tracing::warn!(error = %String::from_utf8_lossy(&e), "Redis refused a subscription command");
                for ch in self.want.keys().filter(|c| !live.confirmed.contains(*c)) {
                    shared.lost(ch);
                }
                shared.request_resync();
                return;
            }
            _ => return,
        };
        let kind = items.first().and_then(Resp::as_bytes).map(|b| b.as_ref()).unwrap_or_default();
        let name = || items.get(1).and_then(Resp::as_bytes).and_then(|c| shared.scripts.names.herald_channel(c));
        match kind {
            b"message" | b"smessage" => {
                let (Some(ch), Some(body)) = (items.get(1).and_then(Resp::as_bytes), items.get(2).and_then(Resp::as_bytes)) else { return };
                shared.metrics.received.fetch_add(1, Ordering::Relaxed);
                deliver(shared, ch, body.clone()).await;
            }
            b"subscribe" | b"ssubscribe" => {
                live.unacked = live.unacked.saturating_sub(1);
                let Some((ch, &gen)) = name().and_then(|n| self.want.get_key_value(n)) else { return };
                if live.confirmed.insert(Arc::clone(ch)) {
                    shared.metrics.subscribed.fetch_add(1, Ordering::Relaxed);
                }
                shared.channels.acked(ch, gen);
                self.confirm_later(Arc::clone(ch), gen, Rc::clone(&live.alive));
            }
            b"sunsubscribe" | b"unsubscribe" => {
                let Some(name) = name() else { return };
                if let Some(n) = live.unsubscribing.get_mut(name) {
                    // The answer to our own UNSUBSCRIBE.
                    *n -= 1;
                    if *n == 0 {
                        live.unsubscribing.remove(name);
                    }
                    return;
                }
                // Redis dropped a subscription by itself (its slot moved):
                // route the channel again.
                let Some((ch, &gen)) = self.want.get_key_value(name) else { return };
                if live.confirmed.remove(name) {
                    shared.metrics.subscribed.fetch_sub(1, Ordering::Relaxed);
                }
                shared.channels.confirm(ch, gen, None);
                shared.lost(ch);
                shared.request_resync();
            }
            _ => {}
        }
    }

    /// Confirms subscription `gen` once the channel's epoch and top are
    /// read (after Redis answered the subscribe, so every later message
    /// reaches this node), and fills what was published while the node was
    /// not subscribed. The read goes through the publisher connection
    /// (which may be reconnecting too): reading is not held up, and the read
    /// is retried until this connection ends. The generation keeps a late
    /// answer from confirming a later subscription.
    fn confirm_later(&self, ch: Arc<str>, gen: u64, alive: Rc<Cell<bool>>) {
        let (shared, fetches) = (Arc::clone(&self.shared), Rc::clone(&self.fetches));
        tokio::task::spawn_local(async move {
            let mut backoff = Backoff::default();
            while alive.get() && shared.router.has_interest(&ch) {
                let snap = {
                    let Ok(_permit) = fetches.acquire().await else { return };
                    match shared.publisher.get() {
                        Some(p) => shared.scripts.read(p, &ch, Read::Top).await.ok(),
                        None => None,
                    }
                };
                if let Some(snap) = snap {
                    if alive.get() {
                        shared.channels.confirm(&ch, gen, Some(snap.epoch));
                        shared.confirmed.send_modify(|n| *n += 1);
                        let (fill, went_back) = shared.channels.at_top(&ch, gen, snap.epoch, snap.top);
                        if went_back {
                            shared.metrics.gaps.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(channel = %ch, top = snap.top, "a channel's offsets went back in Redis (restored from an older snapshot?)");
                        }
                        if let Some(fill) = fill {
                            start_fill(&shared, fill);
                        }
                    }
                    return;
                }
                tokio::time::sleep(backoff.next()).await;
            }
        });
    }
}

/// Counts a gap and fills it on the broker thread.
fn start_fill(shared: &Arc<Shared>, fill: Fill) {
    shared.metrics.gaps.fetch_add(1, Ordering::Relaxed);
    tracing::info!(channel = %fill.channel, from = fill.from, to = fill.to, new_epoch = fill.announce, "filling a gap in a channel from its stream");
    tokio::task::spawn_local(run_fill(Arc::clone(shared), fill));
}

/// Reads each gap of a channel from its stream and delivers it (with an
/// epoch notice first when the epoch is new, `lagged` for what the stream
/// lost), then what waited behind it; next gaps found in what waited are
/// filled in turn.
async fn run_fill(shared: Arc<Shared>, mut fill: Fill) {
    let m = &shared.metrics;
    loop {
        let Some(read) = read_range(&shared, &fill).await else {
            shared.channels.abandon(&fill);
            return;
        };
        let (messages, found, lost) = fill_messages(&fill, &read);
        m.filled.fetch_add(found, Ordering::Relaxed);
        m.missed.fetch_add(lost, Ordering::Relaxed);
        if fill.announce {
            m.epochs.fetch_add(1, Ordering::Relaxed);
        }
        if lost > 0 {
            tracing::warn!(channel = %fill.channel, lost, from = fill.from, to = fill.to, "messages lost: no longer in the channel's stream");
        }
        for msg in &messages {
            loop {
                match shared.channels.deliver_filled(&shared.router, &fill, msg) {
                    None => {
                        shared.channels.abandon(&fill);
                        return;
                    }
                    Some(Routed::Full) => tokio::time::sleep(Duration::from_millis(1)).await,
                    Some(_) => break,
                }
            }
        }
        loop {
            match shared.channels.drain(&shared.router, &fill) {
                Step::Done => return,
                Step::Full => tokio::time::sleep(Duration::from_millis(1)).await,
                Step::Fill(next) => {
                    m.gaps.fetch_add(1, Ordering::Relaxed);
                    fill = next;
                    break;
                }
            }
        }
    }
}

/// The messages of `fill`'s range the stream holds. A read that fails
/// (Redis away) is retried while the channel has subscribers here, the
/// messages behind it waiting (bounded): a failure to read is not a loss.
/// `None` once nobody here wants the channel.
async fn read_range(shared: &Shared, fill: &Fill) -> Option<Vec<Arc<crate::message::Message>>> {
    if fill.from > fill.to {
        return Some(Vec::new());
    }
    let what = Read::After {
        since: crate::message::Position { epoch: fill.epoch, offset: fill.from - 1 },
        count: usize::try_from(fill.to - fill.from + 1).unwrap_or(usize::MAX),
        capped: false,
    };
    let mut backoff = Backoff::default();
    while shared.router.has_interest(&fill.channel) {
        if let Some(p) = shared.publisher.get() {
            match shared.scripts.read(p, &fill.channel, what).await {
                Ok(snap) => return Some(snap.history.into_iter().collect()),
                Err(e) => tracing::debug!(channel = %fill.channel, error = %e, "cannot read a channel's stream; retrying"),
            }
        }
        tokio::time::sleep(backoff.next()).await;
    }
    None
}

/// Writes `bytes` and flushes them (a TLS stream holds records until then).
async fn write_flushed(wr: &mut WriteHalf<Link>, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// A subscriber connection: plain TCP, or TLS over it (`rediss://`).
pub(crate) enum Link {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Link {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Link::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Link::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Link::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Link::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Link::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

async fn connect(shared: &Shared, node: &(String, u16)) -> Result<Link, LinkError> {
    let connect = TcpStream::connect((node.0.as_str(), node.1));
    let tcp = tokio::time::timeout(shared.timeout, connect).await.map_err(|_| LinkError::ConnectTimeout)??;
    let _ = tcp.set_nodelay(true);
    let mut stream = match &shared.tls {
        None => Link::Plain(tcp),
        Some(tls) => {
            let name = rustls_pki_types::ServerName::try_from(node.0.clone())
                .map_err(|_| LinkError::Tls(format!("{:?} is not a host name for TLS", node.0)))?;
            let handshake = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client)).connect(name, tcp);
            let s = tokio::time::timeout(shared.timeout, handshake)
                .await
                .map_err(|_| LinkError::ConnectTimeout)?
                .map_err(|e| LinkError::Tls(e.to_string()))?;
            Link::Tls(Box::new(s))
        }
    };
    let info = shared.seeds[0].redis_settings();
    if let Some(pass) = info.password() {
        let mut cmd = Vec::new();
        match info.username() {
            Some(user) => resp::command(&mut cmd, &[b"AUTH", user.as_bytes(), pass.as_bytes()]),
            None => resp::command(&mut cmd, &[b"AUTH", pass.as_bytes()]),
        }
        stream.write_all(&cmd).await?;
        stream.flush().await?;
        let mut buf = BytesMut::with_capacity(256);
        let reply = loop {
            if let Some(v) = resp::decode(&mut buf)? {
                break v;
            }
            match tokio::time::timeout(shared.timeout, stream.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(LinkError::NoAuthAnswer),
                Ok(Ok(_)) => {}
            }
        };
        if let Resp::Error(e) = reply {
            return Err(LinkError::AuthRefused(String::from_utf8_lossy(&e).into_owned()));
        }
    }
    Ok(stream)
}

async fn deliver(shared: &Arc<Shared>, redis_channel: &Bytes, body: Bytes) {
    let m = &shared.metrics;
    if let Some((join, node, user)) = super::presence::parse_event(&body) {
        // Not positioned: straight to the shards, beside the channel's
        // order. This node's own events were delivered when they were made.
        if let (Some(channel), false) = (shared.scripts.names.herald_channel(redis_channel), node == &*shared.node) {
            shared.presence_event(channel, user, join);
        }
        return;
    }
    let (Some(channel), Some((epoch, offset, payload))) = (shared.scripts.names.herald_channel(redis_channel), wire::parse_body(&body))
    else {
        m.dropped_malformed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let incoming = Incoming { epoch, offset, payload };
    let mut waited = false;
    loop {
        match shared.channels.deliver(&shared.router, channel, &incoming) {
            Delivered::Queued | Delivered::Held => return,
            Delivered::Duplicate => {
                m.duplicates.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Delivered::Gap(fill) => return start_fill(shared, fill),
            Delivered::NoInterest => {
                m.dropped_no_interest.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Delivered::Full => {
                // The shards are behind: stop reading until they catch up
                // (Redis buffers meanwhile, up to its pub/sub output limit).
                if !waited {
                    m.backpressure.fetch_add(1, Ordering::Relaxed);
                    waited = true;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}
