//! The HTTP side: hyper's per-connection service ([`serve`]) and the
//! endpoints of protocol v1, one file each: `/ws` and `/echo` ([`ws`]),
//! `/sse` ([`sse`]), `/publish/{channel}` ([`publish`]),
//! `/history/{channel}` ([`history`]), `/healthz` and `/metrics` (here).
//!
//! A WebSocket or SSE connection is registered (and subscribed to the
//! channels of its query) on a shard *before* the handshake response goes
//! out, so a client that sees `101` or the first SSE bytes is already
//! subscribed. The upgraded socket is then moved onto that shard.

mod api;
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

/// The JavaScript client (clients/js/herald.js), served as it is.
const HERALD_JS: &str = include_str!("../../../clients/js/herald.js");
/// The admin page: a live view of `/api/stats` (the page asks for the API
/// key; the data is behind it).
const ADMIN_HTML: &str = include_str!("../../../clients/pages/admin.html");
/// The multi-device sync page (`demo = true`).
const DEMO_HTML: &str = include_str!("../../../clients/pages/demo.html");

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

/// The channel named by the rest of the path after `prefix`
/// (percent-decoded), or the 400 refusing a name that breaks the rules.
#[allow(clippy::result_large_err)]
fn path_channel<B>(engine: &Engine, req: &Request<B>, prefix: &str) -> Result<String, Response<Body>> {
    let raw = &req.uri().path()[prefix.len()..];
    let channel = percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned();
    match crate::proto::channel::validate(&channel) {
        Ok(()) => Ok(channel),
        Err(e) => {
            let msg = format!("{e}: {:?}", crate::proto::truncate_str(&channel, 64));
            Err(refuse(engine, StatusCode::BAD_REQUEST, ErrorCode::BadChannel, &msg))
        }
    }
}

/// Whether the request's body is declared `application/json`.
fn is_json<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
}

/// 405 with the `Allow` header listing the methods the path takes.
fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", &format!("use {allow}"));
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// Paths whose `GET` answers a document, which `HEAD` answers too (its
/// headers, no body); not the WebSocket and SSE endpoints.
fn takes_head(path: &str) -> bool {
    matches!(path, "/healthz" | "/metrics" | "/herald.js" | "/admin" | "/demo" | "/api/channels" | "/api/stats")
        || path.starts_with("/history/")
        || path.starts_with("/presence/")
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

/// Endpoints a browser page may call: they check `Origin` and answer
/// allowed origins with CORS headers.
fn for_pages(path: &str) -> bool {
    matches!(path, "/ws" | "/echo" | "/sse" | "/herald.js") || path.starts_with("/publish/") || path.starts_with("/history/")
}

/// Routes one request. A request from a page of an origin that is not in
/// `allowed_origins` is refused (403) before anything else.
pub(crate) async fn handle<B>(engine: Arc<Engine>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let origin = req.headers().get(header::ORIGIN).cloned();
    if let Some(o) = origin.as_ref().filter(|_| for_pages(req.uri().path())) {
        let allowed = o.to_str().is_ok_and(|o| engine.config.origin_allowed(o));
        if !allowed {
            let shown = String::from_utf8_lossy(o.as_bytes());
            let msg = format!("origin {:?} is not allowed (allowed_origins)", crate::proto::truncate_str(&shown, 128));
            return refuse(&engine, StatusCode::FORBIDDEN, ErrorCode::Forbidden, &msg);
        }
        if req.method() == Method::OPTIONS {
            return preflight(o.clone());
        }
    }
    let cors = origin.filter(|_| for_pages(req.uri().path()));
    let mut req = req;
    let head = req.method() == Method::HEAD && takes_head(req.uri().path());
    if head {
        *req.method_mut() = Method::GET;
    }
    let mut r = route(engine, req).await;
    if head {
        // The GET's headers, its length included, and no body.
        let len = http_body::Body::size_hint(r.body()).exact();
        *r.body_mut() = Body::empty();
        if let Some(n) = len {
            r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    if let Some(o) = cors {
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("retry-after"));
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    r
}

/// The answer to a CORS preflight from an allowed origin: what a page may
/// send (the API key or a token, a JSON body, an idempotency key, an SSE
/// position), cached by the browser for 10 minutes.
fn preflight(origin: HeaderValue) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type, idempotency-key, last-event-id"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    r
}

/// With `api_key` set, the refusal of a request without it (compared in
/// constant time); `None` to go on.
fn api_key<B>(engine: &Engine, req: &Request<B>) -> Option<Response<Body>> {
    let key = engine.config.api_key.as_ref()?;
    let given = query::bearer(req).unwrap_or("");
    if crate::auth::secrets_equal(given.as_bytes(), key.expose().as_bytes()) {
        return None;
    }
    let msg = "this endpoint needs the API key (Authorization: Bearer …)";
    let mut r = refuse(engine, StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, msg);
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

async fn route<B>(engine: Arc<Engine>, req: Request<B>) -> Response<Body>
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
        (&Method::POST, p) if p.starts_with("/publish/") => match api_key(&engine, &req) {
            Some(r) => r,
            None => publish::publish(engine, req).await,
        },
        (&Method::GET, p) if p.starts_with("/history/") => match api_key(&engine, &req) {
            Some(r) => r,
            None => history::history(engine, req).await,
        },
        (_, p) if p.starts_with("/api/") => match api_key(&engine, &req) {
            Some(r) => match api::call_of(p) {
                Some(call) => engine.api_done(call, r),
                None => r,
            },
            None => match (req.method(), p) {
                (&Method::POST, "/api/broadcast") => api::broadcast(engine, req).await,
                (&Method::POST, "/api/disconnect") => api::user_command(engine, req, false).await,
                (&Method::POST, "/api/unsubscribe") => api::user_command(engine, req, true).await,
                (&Method::GET, "/api/channels") => api::channels(engine, req).await,
                (&Method::GET, "/api/stats") => api::stats(engine).await,
                (_, "/api/broadcast" | "/api/disconnect" | "/api/unsubscribe") => {
                    let r = method_not_allowed("POST");
                    match api::call_of(p) {
                        Some(call) => engine.api_done(call, r),
                        None => r,
                    }
                }
                (_, "/api/channels" | "/api/stats") => {
                    let r = method_not_allowed("GET, HEAD");
                    match api::call_of(p) {
                        Some(call) => engine.api_done(call, r),
                        None => r,
                    }
                }
                _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
            },
        },
        (&Method::GET, p) if p.starts_with("/presence/") => match api_key(&engine, &req) {
            Some(r) => engine.api_done(crate::engine::ApiCall::Presence, r),
            None => api::presence(engine, req).await,
        },
        (&Method::GET, "/herald.js") => {
            let mut r = text_response("text/javascript; charset=utf-8", HERALD_JS);
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
            r
        }
        (&Method::GET, "/admin") => text_response("text/html; charset=utf-8", ADMIN_HTML),
        (&Method::GET, "/demo") if engine.config.demo => text_response("text/html; charset=utf-8", DEMO_HTML),
        (&Method::GET, "/healthz") => shutting_down(&engine).unwrap_or_else(|| text_response("text/plain", "ok\n")),
        (&Method::GET, "/metrics") => text_response("text/plain; version=0.0.4", engine.metrics_text()),
        (_, "/ws" | "/sse") => method_not_allowed("GET"),
        (_, "/echo") if engine.config.echo => method_not_allowed("GET"),
        (_, "/healthz" | "/metrics" | "/herald.js" | "/admin") => method_not_allowed("GET, HEAD"),
        (_, "/demo") if engine.config.demo => method_not_allowed("GET, HEAD"),
        (_, p) if p.starts_with("/publish/") => method_not_allowed("POST"),
        (_, p) if p.starts_with("/history/") || p.starts_with("/presence/") => method_not_allowed("GET, HEAD"),
        _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}
