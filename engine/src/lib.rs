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
//! In data-path order; dependencies point one way (accept → http → shard
//! ← router ← broker), and [`proto`] depends on nothing of Herald's.
//!
//! - `accept`: the standalone server's acceptor, handing sockets to the
//!   shards round-robin.
//! - `http`: the endpoints (`/ws`, `/sse`, `/publish`, `/healthz`,
//!   `/metrics`, `/echo`), one file each, and hyper's per-connection
//!   service.
//! - `shard`: per-core threads; each owns its connections, its channel
//!   index and every connection's outbound queue, and writes frames with
//!   vectored I/O. It calls up only through the `Upstream` trait.
//! - `router`: channel → the shards with subscribers; the only path onto
//!   the shards' lock-free inboxes.
//! - `broker`: where a publish is ordered and given its offset: `local`,
//!   or Redis (`redis`, `redis-cluster`) for several nodes.
//! - `engine`: what the handle, the shards and the handlers share; it
//!   owns the router and the broker.
//! - [`proto`]: sans-I/O framing, SSE and JSON encoders, the command
//!   parser, channel rules and the WebSocket session state machine.
//! - `message`: a message and its wire forms, each encoded once; the
//!   result of a publish.
//! - [`config`], `metrics`: limits and counters.

#![warn(missing_docs)]

mod accept;
pub mod auth;
mod broker;
pub mod config;
mod engine;
mod http;
mod message;
mod metrics;
mod presence;
pub mod proto;
mod proxy;
mod router;
mod shard;
pub mod tls;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

pub use auth::Identity;
pub use broker::BrokerError;
pub use config::{AuthConfig, Config, ConfigError, Namespace, ProxyConfig, SlowConsumerPolicy};
pub use http::{Body, BodyError};
pub use message::{BrokerDown, Epoch, Position, PublishError, Published, Uncertain};
pub use proto::json::{InvalidJson, Payload};
pub use proto::ErrorCode;
#[doc(hidden)]
pub use shard::FanoutBench;

use broker::Broker;
use engine::Engine;
use router::Router;
use shard::{Control, Upstream};

/// Control messages waiting for one shard at most.
const CONTROL_QUEUE: usize = 1024;

/// Herald could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The configured broker cannot be used.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The `[auth]` key cannot be used.
    #[error(transparent)]
    Key(#[from] auth::KeyError),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Binding the listener or starting a shard thread failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A running Herald: shard threads, and an acceptor unless embedded.
/// Cloning gives another handle to the same engine.
#[derive(Clone, Debug)]
pub struct Herald {
    engine: Arc<Engine>,
}

impl Herald {
    /// Binds `config.listen` and serves on it.
    pub fn start(config: Config) -> Result<Herald, StartError> {
        // A bad setting is reported as itself, before the port is taken.
        config.validated()?;
        let tls = server_tls(&config)?;
        let listener = bind(config.listen, config.listen_backlog)
            .map_err(|source| StartError::Io { what: format!("cannot listen on {}", config.listen), source })?;
        Herald::serve_on(listener, config, tls)
    }

    /// Serves on a listener the caller bound (for example on port 0).
    pub fn start_on(listener: TcpListener, config: Config) -> Result<Herald, StartError> {
        let tls = server_tls(&config)?;
        Herald::serve_on(listener, config, tls)
    }

    fn serve_on(listener: TcpListener, config: Config, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<Herald, StartError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| StartError::Io { what, source }
        };
        listener.set_nonblocking(true).map_err(io("cannot configure the listener"))?;
        let addr = listener.local_addr().map_err(io("cannot read the listener's address"))?;
        Herald::launch(config, Some((listener, tls)), Some(addr))
    }

    /// Starts the shards without a listener: serve the endpoints from your
    /// own server through [`Herald::service`].
    pub fn start_embedded(config: Config) -> Result<Herald, StartError> {
        if config.tls_cert.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert applies to Herald's own listener; an embedding server terminates TLS itself".into(),
            )
            .into());
        }
        Herald::launch(config, None, None)
    }

    fn launch(
        config: Config,
        listener: Option<(TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
        local_addr: Option<SocketAddr>,
    ) -> Result<Herald, StartError> {
        let config = config.validated()?;
        let n = config.shards;
        let router = Arc::new(Router::new(n, config.shard_queue_capacity, config.max_channels));
        let presence = Arc::new(presence::Presence::default());
        let broker = Broker::from_config(&config, &router, &presence)?;
        let auth = config.auth.as_ref().map(auth::Auth::from_config).transpose()?;
        if config.api_key.is_none() && local_addr.is_some_and(|a| !a.ip().is_loopback()) {
            tracing::warn!(
                listen = %config.listen,
                "no api_key: POST /publish, GET /history, /presence and /api/* are open to anyone who reaches this address (see docs/security.md)"
            );
        }
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel(CONTROL_QUEUE)).unzip();
        let (done_tx, done_rx): (Vec<_>, Vec<_>) = (0..n).map(|_| oneshot::channel()).unzip();
        let engine = Arc::new(Engine::new(config, router, broker, presence, auth, senders.into_boxed_slice(), local_addr, done_rx));
        let weak = Arc::downgrade(&engine);
        engine.broker.on_command(Box::new(move |bytes| {
            let Some(cmd) = engine::NodeCommand::decode(bytes) else {
                tracing::debug!("unreadable server API command from another node");
                return;
            };
            if let Some(engine) = weak.upgrade() {
                tokio::spawn(async move {
                    engine.run_here(&cmd).await;
                });
            }
        }));
        engine.broker.start().map_err(|source| StartError::Io { what: "cannot start the broker thread".into(), source })?;
        for (id, (rx, done)) in receivers.into_iter().zip(done_tx).enumerate() {
            let up: Arc<dyn Upstream> = Arc::clone(&engine) as Arc<dyn Upstream>;
            shard::spawn(id, up, rx, done).map_err(|source| StartError::Io { what: "cannot start a shard thread".into(), source })?;
        }
        for (id, control) in engine.controls.iter().enumerate() {
            let e = Arc::clone(&engine);
            // The shard's control queue is new and empty: there is room.
            let _ = control.try_send(Control::Run(Box::new(move |shard| {
                if let Some(work) = e.broker.on_shard(id) {
                    let drained = shard.drain_signal();
                    tokio::task::spawn_local(async move {
                        tokio::select! {
                            _ = work => {}
                            _ = drained => {}
                        }
                    });
                }
            })));
        }
        let scheme = if listener.as_ref().is_some_and(|(_, tls)| tls.is_some()) { "https" } else { "http" };
        if let Some((listener, tls)) = listener {
            accept::start(&engine, listener, tls);
        }
        match local_addr {
            Some(addr) => tracing::info!(%addr, %scheme, shards = n, broker = %engine.broker.mode(), "herald started"),
            None => tracing::info!(shards = n, broker = %engine.broker.mode(), "herald started (embedded)"),
        }
        Ok(Herald { engine })
    }

    /// The address served, unless embedded.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.engine.local_addr
    }

    /// The configuration in force (with `shards` resolved).
    pub fn config(&self) -> &Config {
        &self.engine.config
    }

    /// Publishes `payload` to `channel`; every current subscriber gets it
    /// (on every node, with a Redis broker). Every error but
    /// [`PublishError::OutcomeUnknown`] means nothing was published.
    pub async fn publish(&self, channel: &str, payload: Payload) -> Result<Published, PublishError> {
        self.engine.publish(channel, payload, None, self.engine.metrics_here()).await
    }

    /// The Prometheus text exposition that `/metrics` serves.
    pub fn metrics_text(&self) -> String {
        self.engine.metrics_text()
    }

    /// A `tower` / `hyper` service answering Herald's endpoints, to mount
    /// in your own server.
    pub fn service(&self) -> HeraldService {
        HeraldService { engine: Arc::clone(&self.engine) }
    }

    /// Stops accepting, closes WebSockets with 1001 "going away" and ends
    /// SSE streams after flushing what is queued, waiting at most `grace`;
    /// then stops the shard threads. New requests get 503 meanwhile.
    pub async fn shutdown(&self, grace: Duration) {
        if !self.engine.begin_shutdown() {
            return;
        }
        let deadline = Instant::now() + grace;
        for i in 0..self.engine.config.shards {
            let _ = self.engine.send_control(i, Control::Shutdown(deadline)).await;
        }
        let done = std::mem::take(&mut *self.engine.done.lock().unwrap_or_else(|e| e.into_inner()));
        for d in done {
            let _ = d.await;
        }
        self.engine.broker.stop().await;
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

/// The listener's TLS, loaded (and its files checked) before anything is
/// bound.
fn server_tls(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, StartError> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(tls::acceptor(cert, key)?)),
        _ => Ok(None),
    }
}

/// Binds `addr` with a listen backlog of `backlog` (`std`'s `bind` fixes it
/// at 128, which a connection storm overflows), warning when the kernel
/// caps it lower.
fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    let wanted = i32::try_from(backlog).unwrap_or(i32::MAX);
    socket.listen(wanted)?;
    let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse::<u32>().ok());
    if let Some(cap) = cap.filter(|&c| c < backlog) {
        tracing::warn!(listen_backlog = backlog, somaxconn = cap, "the kernel caps the listen backlog at net.core.somaxconn");
    }
    Ok(socket.into())
}

/// Herald's endpoints as a service (`tower_service::Service` and
/// `hyper::service::Service`), for any request body type.
#[derive(Clone, Debug)]
pub struct HeraldService {
    engine: Arc<Engine>,
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
        let engine = Arc::clone(&self.engine);
        Box::pin(async move { Ok(http::handle(engine, req).await) })
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
        let engine = Arc::clone(&self.engine);
        Box::pin(async move { Ok(http::handle(engine, req).await) })
    }
}
