//! The HTTP side: the acceptor, per-connection hyper service, and the
//! endpoints of protocol v1 (`/ws`, `/sse`, `/publish/{channel}`,
//! `/healthz`, `/metrics`, and `/echo` when enabled).
//!
//! A WebSocket or SSE connection is registered (and subscribed to the
//! channels of its query) on a shard *before* the handshake response goes
//! out, so a client that sees `101` or the first SSE bytes is already
//! subscribed. The upgraded socket is then moved onto that shard.

pub(crate) mod body;

use std::convert::Infallible;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Disconnect;
use crate::proto::json::{self, Payload};
use crate::proto::{channel, ErrorCode};
use crate::shard::conn::{Format, Transport};
use crate::shard::{self, sse, ws, Permit, Shard};
use crate::Inner;
pub use body::{Body, BodyError};

/// The permit of the TCP connection a request arrived on (standalone
/// server), taken over by a WebSocket or SSE connection.
#[derive(Clone, Debug)]
struct PermitSlot(Arc<Mutex<Option<Permit>>>);

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let mut r = Response::new(Body::full(json::http_error_body(code, message)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An error answer to a bad request, counted by code.
fn refuse(inner: &Inner, status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    inner.metrics_here().error(code);
    error_response(status, code.as_str(), message)
}

fn text_response(content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Routes one request.
pub(crate) async fn handle<B>(inner: Arc<Inner>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/ws") => upgrade(inner, req, false).await,
        (&Method::GET, "/echo") if inner.config.echo => upgrade(inner, req, true).await,
        (&Method::GET, "/sse") => sse(inner, req).await,
        (&Method::POST, p) if p.starts_with("/publish/") => publish(inner, req).await,
        (&Method::GET, "/healthz") if inner.is_shutting_down() => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "server is shutting down")
        }
        (&Method::GET, "/healthz") => text_response("text/plain", "ok\n"),
        (&Method::GET, "/metrics") => text_response("text/plain; version=0.0.4", inner.metrics_text()),
        (_, "/ws" | "/sse" | "/healthz" | "/metrics") => error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
        (_, p) if p.starts_with("/publish/") => error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use POST"),
        _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

/// `channel` (repeatable) and `format` from a query string.
struct Query {
    channels: Vec<String>,
    format: Format,
}

// Refusals are rare and answered at once: no need to box the response.
#[allow(clippy::result_large_err)]
fn parse_query(inner: &Inner, query: Option<&str>) -> Result<Query, Response<Body>> {
    let mut channels = Vec::new();
    let mut format = Format::Json;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "channel" => {
                if let Err(e) = channel::validate(&v) {
                    return Err(refuse(inner, StatusCode::BAD_REQUEST, ErrorCode::BadChannel, &format!("{e}: {:?}", truncate(&v))));
                }
                if !channels.iter().any(|c| *c == *v) {
                    channels.push(v.into_owned());
                }
            }
            "format" => {
                format = match &*v {
                    "json" => Format::Json,
                    "raw" => Format::Raw,
                    other => {
                        let msg = format!("unknown format {:?} (expected json or raw)", truncate(other));
                        return Err(refuse(inner, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &msg));
                    }
                }
            }
            _ => {}
        }
    }
    if channels.len() > inner.config.max_subscriptions {
        let msg = format!("at most {} channels per connection", inner.config.max_subscriptions);
        return Err(refuse(inner, StatusCode::BAD_REQUEST, ErrorCode::Limit, &msg));
    }
    Ok(Query { channels, format })
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The TCP connection's permit (standalone), or a new one (embedded).
#[allow(clippy::result_large_err)]
fn take_permit<B>(inner: &Inner, req: &Request<B>) -> Result<Permit, Response<Body>> {
    let carried = req.extensions().get::<PermitSlot>().and_then(|s| s.0.lock().ok().and_then(|mut p| p.take()));
    match carried.or_else(|| inner.acquire_permit()) {
        Some(p) => Ok(p),
        None => {
            inner.metrics_here().rejected_max_connections.inc();
            Err(refuse(inner, StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Limit, "connection limit reached"))
        }
    }
}

fn shutting_down(inner: &Inner) -> Option<Response<Body>> {
    inner
        .is_shutting_down()
        .then(|| error_response(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable.as_str(), "server is shutting down"))
}

async fn upgrade<B>(inner: Arc<Inner>, mut req: Request<B>, echo: bool) -> Response<Body> {
    if let Some(r) = shutting_down(&inner) {
        return r;
    }
    let Query { channels, format } = match parse_query(&inner, req.uri().query()) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let format = if echo { Format::Echo } else { format };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return refuse(&inner, StatusCode::UPGRADE_REQUIRED, ErrorCode::BadRequest, "expected a WebSocket upgrade request");
    }
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(fastwebsockets::WebSocketError::InvalidSecWebsocketVersion) => {
            let mut r = refuse(&inner, StatusCode::UPGRADE_REQUIRED, ErrorCode::BadRequest, "Sec-WebSocket-Version must be 13");
            r.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
            return r;
        }
        Err(e) => return refuse(&inner, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &e.to_string()),
    };
    let permit = match take_permit(&inner, &req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (target, local) = inner.pick_shard();
    let (tx, rx) = oneshot::channel();
    let opened = inner
        .on_shard(target, move |shard| match shard.open_conn(Transport::Ws, format, &channels, permit) {
            Ok(conn) => {
                let _ = tx.send(Ok(()));
                let shard = Rc::clone(shard);
                tokio::task::spawn_local(async move {
                    match upgrade.await {
                        Ok(ws) => attach(shard, conn, ws.into_inner().into_inner(), local).await,
                        Err(_) => shard.remove_conn(&conn, Disconnect::Client),
                    }
                });
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })
        .await;
    match (opened, rx.await) {
        (Ok(()), Ok(Ok(()))) => response.map(|_| Body::empty()),
        (_, Ok(Err((code, msg)))) => refuse(&inner, StatusCode::SERVICE_UNAVAILABLE, code, &msg),
        _ => error_response(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable.as_str(), "server is shutting down"),
    }
}

/// Runs an upgraded WebSocket on this shard: as a plain TCP socket when the
/// upgrade came over one (moved onto this shard's reactor if it was
/// accepted elsewhere), else over hyper's upgraded stream as it is.
async fn attach(shard: Rc<Shard>, conn: Rc<crate::shard::conn::Conn>, upgraded: hyper::upgrade::Upgraded, local: bool) {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let mut tcp = parts.io.into_inner();
            if !local {
                match tcp.into_std().and_then(TcpStream::from_std) {
                    Ok(t) => tcp = t,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot move the socket onto its shard");
                        shard.remove_conn(&conn, Disconnect::IoError);
                        return;
                    }
                }
            }
            ws::run(shard, conn, tcp, parts.read_buf).await;
        }
        Err(upgraded) => ws::run(shard, conn, TokioIo::new(upgraded), Bytes::new()).await,
    }
}

async fn sse<B>(inner: Arc<Inner>, req: Request<B>) -> Response<Body> {
    if let Some(r) = shutting_down(&inner) {
        return r;
    }
    let Query { channels, format } = match parse_query(&inner, req.uri().query()) {
        Ok(q) => q,
        Err(r) => return r,
    };
    if channels.is_empty() {
        return refuse(&inner, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "at least one channel is required");
    }
    let permit = match take_permit(&inner, &req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (frames_tx, frames_rx) = mpsc::channel(sse::SSE_CHANNEL_FRAMES);
    let (abort_tx, abort_rx) = oneshot::channel();
    let (tx, rx) = oneshot::channel();
    let (target, _) = inner.pick_shard();
    let opened = inner
        .on_shard(target, move |shard| match shard.open_conn(Transport::Sse, format, &channels, permit) {
            Ok(conn) => {
                let _ = tx.send(Ok(()));
                tokio::task::spawn_local(sse::pump(Rc::clone(shard), conn, frames_tx, abort_tx));
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })
        .await;
    match (opened, rx.await) {
        (Ok(()), Ok(Ok(()))) => {
            let mut r = Response::new(Body::sse(frames_rx, abort_rx));
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            r
        }
        (_, Ok(Err((code, msg)))) => refuse(&inner, StatusCode::SERVICE_UNAVAILABLE, code, &msg),
        _ => error_response(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable.as_str(), "server is shutting down"),
    }
}

async fn publish<B>(inner: Arc<Inner>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let raw = &req.uri().path()["/publish/".len()..];
    let channel = percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned();
    if let Err(e) = channel::validate(&channel) {
        return refuse(&inner, StatusCode::BAD_REQUEST, ErrorCode::BadChannel, &format!("{e}: {:?}", truncate(&channel)));
    }
    let max = inner.config.max_message_bytes;
    let too_large = || format!("payload over the limit of {max} bytes");
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return refuse(&inner, StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, &too_large());
    }
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"));
    let body = match http_body_util::Limited::new(req.into_body(), max).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return refuse(&inner, StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, &too_large());
        }
        Err(e) => return refuse(&inner, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &format!("cannot read the body: {e}")),
    };
    let payload = if is_json {
        match Payload::json(body) {
            Ok(p) => p,
            Err(e) => return refuse(&inner, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &e.to_string()),
        }
    } else {
        match Payload::text_from_utf8(body) {
            Ok(p) => p,
            Err(_) => {
                return refuse(
                    &inner,
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "body is not UTF-8 (send JSON with Content-Type: application/json)",
                )
            }
        }
    };
    match inner.publish(&channel, payload, inner.metrics_here()).await {
        Ok(p) => text_response("application/json", json::http_published_body(&p.channel, p.offset, p.epoch.as_str())),
        Err(e) => {
            let status = match e.code() {
                ErrorCode::BadChannel => StatusCode::BAD_REQUEST,
                ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let mut r = refuse(&inner, status, e.code(), &e.to_string());
            if status == StatusCode::SERVICE_UNAVAILABLE {
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            r
        }
    }
}

/// Accepts connections and hands them to the shards round-robin.
pub(crate) async fn accept_loop(shard: Rc<Shard>, listener: std::net::TcpListener) {
    let inner = Arc::clone(&shard.inner);
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the listener");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = inner.acquire_permit() else {
            shard.metrics().rejected_max_connections.inc();
            shard.metrics().error(ErrorCode::Limit);
            tokio::task::spawn_local(reject(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (target, _) = inner.next_shard();
        if target == shard.id {
            serve_http(&shard, stream, permit);
            continue;
        }
        match stream.into_std() {
            Ok(std) => {
                if inner.send_control(target, shard::Control::Accept(std, permit)).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot hand a socket to its shard"),
        }
    }
}

/// Answers 503 to a connection over the limit, then closes it.
async fn reject(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = json::http_error_body("limit", "connection limit reached");
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await?;
        // Read what the client sent (up to a bound) before closing: closing
        // with unread input would reset the connection, and the client might
        // never see the 503.
        use tokio::io::AsyncReadExt;
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Serves a socket accepted by another shard's acceptor on this shard.
pub(crate) fn serve_accepted(shard: &Rc<Shard>, stream: std::net::TcpStream, permit: Permit) {
    match TcpStream::from_std(stream) {
        Ok(s) => serve_http(shard, s, permit),
        Err(e) => tracing::debug!(error = %e, "cannot register an accepted socket"),
    }
}

/// Serves HTTP/1.1 on a socket, on this shard.
fn serve_http(shard: &Rc<Shard>, stream: TcpStream, permit: Permit) {
    let inner = Arc::clone(&shard.inner);
    let cfg = &inner.config;
    let slot = PermitSlot(Arc::new(Mutex::new(Some(permit))));
    let service = {
        let inner = Arc::clone(&inner);
        hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(slot.clone());
            let inner = Arc::clone(&inner);
            async move { Ok::<_, Infallible>(handle(inner, req).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.request_head_timeout_ms))
        .max_buf_size(cfg.max_request_head_bytes);
    let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    let mut stop = shard.http_shutdown();
    let shard = Rc::clone(shard);
    shard.http_opened();
    tokio::task::spawn_local(async move {
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = stop.wait_for(|s| *s) => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
        shard.http_closed();
    });
}
