//! The HTTP side: hyper's per-connection service ([`serve`]) and the
//! endpoints of protocol v1, one file each: `/ws` and `/echo` ([`ws`]),
//! `/sse` ([`sse`]), `/publish/{channel}` ([`publish`]),
//! `/history/{channel}` ([`history`]), `/healthz` and `/metrics` (here).
//!
//! A WebSocket or SSE connection is registered (and subscribed to the
//! channels of its query) on a shard *before* the handshake response goes
//! out, so a client that sees `101` or the first SSE bytes is already
//! subscribed. The upgraded socket is then moved onto that shard.

pub(crate) mod body;
mod history;
mod publish;
mod query;
mod serve;
mod sse;
mod ws;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::engine::Engine;
use crate::proto::json;
use crate::proto::ErrorCode;
pub use body::{Body, BodyError};
pub(crate) use serve::serve;

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let mut r = Response::new(Body::full(json::http_error_body(code, message)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An error answer to a bad request, counted by code.
fn refuse(engine: &Engine, status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    engine.metrics_here().error(code);
    error_response(status, code.as_str(), message)
}

fn text_response(content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn shutting_down(engine: &Engine) -> Option<Response<Body>> {
    engine
        .is_shutting_down()
        .then(|| error_response(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable.as_str(), "server is shutting down"))
}

/// Routes one request.
pub(crate) async fn handle<B>(engine: Arc<Engine>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/ws") => ws::upgrade(engine, req, false).await,
        (&Method::GET, "/echo") if engine.config.echo => ws::upgrade(engine, req, true).await,
        (&Method::GET, "/sse") => sse::open(engine, req).await,
        (&Method::POST, p) if p.starts_with("/publish/") => publish::publish(engine, req).await,
        (&Method::GET, p) if p.starts_with("/history/") => history::history(engine, req).await,
        (&Method::GET, "/healthz") => shutting_down(&engine).unwrap_or_else(|| text_response("text/plain", "ok\n")),
        (&Method::GET, "/metrics") => text_response("text/plain; version=0.0.4", engine.metrics_text()),
        (_, "/ws" | "/sse" | "/healthz" | "/metrics") => error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
        (_, p) if p.starts_with("/publish/") => error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use POST"),
        (_, p) if p.starts_with("/history/") => error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
        _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}
