//! HTTP/1.1 on one accepted socket, on its shard (standalone server).

use std::convert::Infallible;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::engine::Engine;
use crate::shard::{Permit, Shard};

/// The permit of the TCP connection a request arrived on, taken over by a
/// WebSocket or SSE connection.
#[derive(Clone, Debug)]
pub(crate) struct PermitSlot(Arc<Mutex<Option<Permit>>>);

impl PermitSlot {
    pub(crate) fn take(&self) -> Option<Permit> {
        self.0.lock().ok().and_then(|mut p| p.take())
    }
}

/// Serves HTTP/1.1 on a socket on this shard, until the client leaves or
/// the shard drains (then hyper finishes the request in flight).
/// `stream` is a TCP socket or a TLS stream over one.
pub(crate) fn serve<S>(engine: &Arc<Engine>, shard: &Rc<Shard>, stream: S, remote: Option<std::net::SocketAddr>, permit: Permit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &engine.config;
    let slot = PermitSlot(Arc::new(Mutex::new(Some(permit))));
    let remote = remote.map(super::query::RemoteAddr);
    let service = {
        let engine = Arc::clone(engine);
        hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(slot.clone());
            if let Some(r) = remote {
                req.extensions_mut().insert(r);
            }
            let engine = Arc::clone(&engine);
            async move { Ok::<_, Infallible>(super::handle(engine, req).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.request_head_timeout_ms))
        .max_buf_size(cfg.max_request_head_bytes);
    let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    let drained = shard.drain_signal();
    let guard = shard.task_guard();
    tokio::task::spawn_local(async move {
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = drained => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
        drop(guard);
    });
}
