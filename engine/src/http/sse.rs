//! `GET /sse`: an SSE stream fed by the connection's shard.

use std::rc::Rc;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use tokio::sync::{mpsc, oneshot};

use super::body::Body;
use super::query::{admit, claim, parse_query, query_param, take_permit, Query};
use super::{error_response, refuse, shutting_down};
use crate::engine::Engine;
use crate::message::Position;
use crate::proto::ErrorCode;
use crate::shard::conn::Transport;
use crate::shard::sse;

pub(crate) async fn open<B>(engine: Arc<Engine>, req: Request<B>) -> Response<Body> {
    if let Some(r) = shutting_down(&engine) {
        return r;
    }
    let Query { channels, format } = match parse_query(&engine, req.uri().query()) {
        Ok(q) => q,
        Err(r) => return r,
    };
    if channels.is_empty() {
        return refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "at least one channel is required");
    }
    // The position to resume from: the `Last-Event-ID` a reconnecting
    // EventSource sends, else the `last_event_id` parameter of a first
    // connect. One that is not a position is no position (recovered: false).
    let last_id =
        req.headers().get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned).or_else(|| query_param(&req, "last_event_id"));
    let since: Option<Vec<Position>> =
        last_id.as_deref().map(|s| s.split(',').map(|p| Position::parse(p.trim()).unwrap_or_else(Position::nowhere)).collect());
    let claim = match claim(&engine, &req, "sse") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let access = match admit(&engine, claim, &channels).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let permit = match take_permit(&engine, &req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (frames_tx, frames_rx) = mpsc::channel(sse::SSE_CHANNEL_FRAMES);
    let (abort_tx, abort_rx) = oneshot::channel();
    let (tx, rx) = oneshot::channel();
    let remote = req.extensions().get::<super::query::RemoteAddr>().map(|a| a.0);
    let (target, _) = engine.pick_shard();
    let opened = engine
        .on_shard(target, move |shard| match shard.open_conn(Transport::Sse, format, &channels, since, access, permit, None, remote) {
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
        (_, Ok(Err(e))) => refuse(&engine, StatusCode::SERVICE_UNAVAILABLE, e.code(), &e.to_string()),
        _ => error_response(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable.as_str(), "server is shutting down"),
    }
}
