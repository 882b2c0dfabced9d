//! Herald: a WebSocket + Server-Sent-Events fan-out engine.
//!
//! One published message reaches every subscriber of its channel. It is
//! encoded once into each wire form it needs (a complete WebSocket frame,
//! a complete SSE event) and the same bytes are queued, by refcount, for
//! every subscriber. Connections live on per-core shards; messages cross to
//! the shards through lock-free queues.
//!
//! # Use
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use herald::{Config, Herald, Payload};
//!
//! let herald = Herald::start(Config::default())?; // serves 127.0.0.1:8080
//! herald.publish("news", Payload::text("hello")).await?;
//! herald.shutdown(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```
//!
//! To serve Herald's endpoints from your own hyper or axum server, start it
//! with [`Herald::start_embedded`] and mount [`Herald::service`] (see
//! `examples/embed_axum.rs`).
//!
//! # Layout
//!
//! - [`proto`]: sans-I/O framing, SSE and JSON encoders, the command parser
//!   and the channel rules.
//! - `shard`: per-core threads; each owns its connections, its channel
//!   index and every connection's outbound queue.
//! - `broker`: where a publish is ordered and given its offset: the local
//!   channel table, or Redis (`redis`, `redis-cluster`) for several nodes.
//! - `http`: the acceptor and the endpoints.
//! - [`config`], `metrics`: limits and counters.

#![warn(missing_docs)]

mod broker;
pub mod config;
mod http;
mod message;
mod metrics;
pub mod proto;
mod shard;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

pub use broker::{PublishError, Published};
pub use config::{Config, ConfigError, SlowConsumerPolicy};
pub use http::{Body, BodyError};
pub use message::Epoch;
pub use proto::json::{InvalidJson, Payload};
pub use proto::ErrorCode;
#[doc(hidden)]
pub use shard::FanoutBench;

use broker::local::ChannelTable;
use broker::redis::RedisBroker;
use metrics::{Metrics, ShardMetrics};
use shard::inbox::Dispatch;
use shard::{Control, Permit};

/// Control messages waiting for one shard at most.
const CONTROL_QUEUE: usize = 1024;

/// Herald could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding the listener or starting a shard thread failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// State shared by the handle, the shards and the HTTP handlers.
pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) dispatch: Dispatch,
    pub(crate) channels: ChannelTable,
    /// The Redis broker, unless the broker is local.
    pub(crate) broker: Option<RedisBroker>,
    controls: Box<[mpsc::Sender<Control>]>,
    open: Arc<AtomicUsize>,
    rr: AtomicUsize,
    shutting_down: AtomicBool,
    local_addr: Option<SocketAddr>,
    done: Mutex<Vec<oneshot::Receiver<()>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("shards", &self.config.shards).field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl Inner {
    /// The metrics slot of the shard running this thread, or the global one.
    pub(crate) fn metrics_here(&self) -> &ShardMetrics {
        match shard::current(self) {
            Some(s) => self.metrics.shard(s.id),
            None => self.metrics.global(),
        }
    }

    pub(crate) fn acquire_permit(&self) -> Option<Permit> {
        Permit::acquire(&self.open, self.config.max_connections)
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// The next shard in round-robin order.
    pub(crate) fn next_shard(&self) -> (usize, bool) {
        (self.rr.fetch_add(1, Ordering::Relaxed) % self.config.shards, false)
    }

    /// The shard for a new connection: this thread's shard if the request
    /// is served by one (its socket is already there), else round-robin.
    /// The flag says whether the socket is already on the chosen shard.
    pub(crate) fn pick_shard(&self) -> (usize, bool) {
        match shard::current(self) {
            Some(s) => (s.id, true),
            None => self.next_shard(),
        }
    }

    pub(crate) async fn send_control(&self, shard: usize, ctl: Control) -> Result<(), ()> {
        self.controls[shard].send(ctl).await.map_err(|_| ())
    }

    /// Runs `f` on shard `target`: at once if this thread is that shard.
    pub(crate) async fn on_shard(&self, target: usize, f: impl FnOnce(&std::rc::Rc<shard::Shard>) + Send + 'static) -> Result<(), ()> {
        let f = match shard::current(self) {
            Some(s) if s.id == target => {
                f(&s);
                return Ok(());
            }
            _ => f,
        };
        self.send_control(target, Control::Run(Box::new(f))).await
    }

    /// A shard gained the node's first subscriber to `channel` or lost the
    /// last one: the Redis broker follows.
    pub(crate) fn interest_changed(&self, channel: &Arc<str>) {
        if let Some(b) = &self.broker {
            b.interest_changed(channel);
        }
    }

    fn check_publish(&self, channel: &str, payload: &Payload) -> Result<(), PublishError> {
        proto::channel::validate(channel)?;
        if payload.len() > self.config.max_message_bytes {
            return Err(PublishError::TooLarge { size: payload.len(), max: self.config.max_message_bytes });
        }
        if self.is_shutting_down() {
            return Err(PublishError::ShuttingDown);
        }
        Ok(())
    }

    /// Publishes through whichever broker is configured.
    pub(crate) async fn publish(&self, channel: &str, payload: Payload, metrics: &ShardMetrics) -> Result<Published, PublishError> {
        let Some(broker) = &self.broker else { return self.publish_now(channel, payload, metrics) };
        self.check_publish(channel, &payload)?;
        let r = broker.publish(channel, &payload).await;
        if r.is_ok() {
            metrics.published.inc();
        }
        r
    }

    /// Publishes through the local broker (the Redis broker needs
    /// [`Inner::publish`]).
    pub(crate) fn publish_now(&self, channel: &str, payload: Payload, metrics: &ShardMetrics) -> Result<Published, PublishError> {
        self.check_publish(channel, &payload)?;
        let r = self.channels.publish(&self.dispatch, channel, payload);
        match &r {
            Ok(_) => metrics.published.inc(),
            Err(PublishError::Overloaded) => metrics.publish_overloaded.inc(),
            Err(_) => {}
        }
        r
    }

    pub(crate) fn metrics_text(&self) -> String {
        let open = self.open.load(Ordering::Relaxed) as u64;
        let channels = self.channels.len() as u64;
        let mut out = self.metrics.render(&[
            ("herald_open_permits", "Client connections counted against max_connections.", open),
            ("herald_channels", "Channels in the channel table.", channels),
        ]);
        if let Some(b) = &self.broker {
            b.render(&mut out);
        }
        out
    }
}

/// A running Herald: shard threads, and an acceptor unless embedded.
/// Cloning gives another handle to the same engine.
#[derive(Clone, Debug)]
pub struct Herald {
    inner: Arc<Inner>,
}

impl Herald {
    /// Binds `config.listen` and serves on it.
    pub fn start(config: Config) -> Result<Herald, StartError> {
        let listener = TcpListener::bind(config.listen)
            .map_err(|source| StartError::Io { what: format!("cannot listen on {}", config.listen), source })?;
        Herald::start_on(listener, config)
    }

    /// Serves on a listener the caller bound (for example on port 0).
    pub fn start_on(listener: TcpListener, config: Config) -> Result<Herald, StartError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| StartError::Io { what, source }
        };
        listener.set_nonblocking(true).map_err(io("cannot configure the listener"))?;
        let addr = listener.local_addr().map_err(io("cannot read the listener's address"))?;
        Herald::launch(config, Some(listener), Some(addr))
    }

    /// Starts the shards without a listener: serve the endpoints from your
    /// own server through [`Herald::service`].
    pub fn start_embedded(config: Config) -> Result<Herald, StartError> {
        Herald::launch(config, None, None)
    }

    fn launch(config: Config, listener: Option<TcpListener>, local_addr: Option<SocketAddr>) -> Result<Herald, StartError> {
        let config = config.validated()?;
        let broker = RedisBroker::from_config(&config).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let n = config.shards;
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel(CONTROL_QUEUE)).unzip();
        let (done_tx, done_rx): (Vec<_>, Vec<_>) = (0..n).map(|_| oneshot::channel()).unzip();
        let inner = Arc::new(Inner {
            metrics: Metrics::new(n),
            dispatch: Dispatch::new(n, config.shard_queue_capacity),
            channels: ChannelTable::new(config.max_channels),
            broker,
            controls: senders.into_boxed_slice(),
            open: Arc::new(AtomicUsize::new(0)),
            rr: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            local_addr,
            done: Mutex::new(done_rx),
            config,
        });
        RedisBroker::start(&inner).map_err(|source| StartError::Io { what: "cannot start the broker thread".into(), source })?;
        let mut listener = listener;
        for (id, (rx, done)) in receivers.into_iter().zip(done_tx).enumerate() {
            let l = if id == 0 { listener.take() } else { None };
            shard::spawn(id, Arc::clone(&inner), rx, l, done)
                .map_err(|source| StartError::Io { what: "cannot start a shard thread".into(), source })?;
        }
        let broker = inner.broker.as_ref().map_or("local", |b| b.mode());
        tracing::info!(shards = n, addr = ?local_addr, broker, "herald started");
        Ok(Herald { inner })
    }

    /// The address served, unless embedded.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local_addr
    }

    /// The configuration in force (with `shards` resolved).
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Publishes `payload` to `channel`; every current subscriber gets it
    /// (on every node, with a Redis broker). With Redis, the error
    /// [`PublishError::Unavailable`] means nothing was published.
    pub async fn publish(&self, channel: &str, payload: Payload) -> Result<Published, PublishError> {
        self.inner.publish(channel, payload, self.inner.metrics_here()).await
    }

    /// The Prometheus text exposition that `/metrics` serves.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics_text()
    }

    /// A `tower` / `hyper` service answering Herald's endpoints, to mount
    /// in your own server.
    pub fn service(&self) -> HeraldService {
        HeraldService { inner: Arc::clone(&self.inner) }
    }

    /// Stops accepting, closes WebSockets with 1001 "going away" and ends
    /// SSE streams after flushing what is queued, waiting at most `grace`;
    /// then stops the shard threads. New requests get 503 meanwhile.
    pub async fn shutdown(&self, grace: Duration) {
        if self.inner.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        let deadline = Instant::now() + grace;
        for i in 0..self.inner.config.shards {
            let _ = self.inner.send_control(i, Control::Shutdown(deadline)).await;
        }
        let done = std::mem::take(&mut *self.inner.done.lock().unwrap_or_else(|e| e.into_inner()));
        for d in done {
            let _ = d.await;
        }
        if let Some(b) = &self.inner.broker {
            b.stop().await;
        }
        tracing::info!("herald stopped");
    }

    /// A future that waits for `signal`, then runs [`Herald::shutdown`]
    /// with `grace` (WebSockets get 1001, SSE streams end) and resolves:
    /// the graceful-shutdown signal to give your own server.
    ///
    /// The order matters. A server's graceful shutdown (axum's
    /// `with_graceful_shutdown`, hyper-util's `GracefulShutdown`) waits for
    /// every open response body, and an SSE stream is a body that ends only
    /// when Herald ends it. Calling `shutdown` after the server returned
    /// therefore never happens while an SSE client is connected: the
    /// process hangs. Handing this future to the server ends Herald's
    /// streams first, and the server's wait then finishes at once.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// use std::time::Duration;
    /// use herald::{Config, Herald};
    ///
    /// let herald = Herald::start_embedded(Config::default()).map_err(std::io::Error::other)?;
    /// let app = axum::Router::new().nest_service("/realtime", herald.service());
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// let ctrl_c = async {
    ///     let _ = tokio::signal::ctrl_c().await;
    /// };
    /// axum::serve(listener, app).with_graceful_shutdown(herald.shutdown_on(ctrl_c, Duration::from_secs(5))).await?;
    /// // Herald is stopped here: nothing is left to shut down.
    /// # Ok(()) }
    /// ```
    pub fn shutdown_on<F>(&self, signal: F, grace: Duration) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let herald = self.clone();
        async move {
            signal.await;
            herald.shutdown(grace).await;
        }
    }
}

/// Herald's endpoints as a service (`tower_service::Service` and
/// `hyper::service::Service`), for any request body type.
#[derive(Clone, Debug)]
pub struct HeraldService {
    inner: Arc<Inner>,
}

/// The future of [`HeraldService`]'s response.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<::http::Response<Body>, std::convert::Infallible>> + Send>>;

impl<B> tower_service::Service<::http::Request<B>> for HeraldService
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = ::http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ::http::Request<B>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { Ok(http::handle(inner, req).await) })
    }
}

impl<B> hyper::service::Service<::http::Request<B>> for HeraldService
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = ::http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: ::http::Request<B>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { Ok(http::handle(inner, req).await) })
    }
}
