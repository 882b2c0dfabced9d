//! `GET /ws` (and `/echo`): the WebSocket upgrade.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::body::Body;
use super::query::{admit, claim, parse_query, take_permit, Query};
use super::{error_response, refuse, shutting_down};
use crate::engine::Engine;
use crate::metrics::Disconnect;
use crate::proto::ErrorCode;
use crate::shard::conn::{Conn, Format, Transport};
use crate::shard::{ws, Shard};

pub(crate) async fn upgrade<B>(engine: Arc<Engine>, mut req: Request<B>, echo: bool) -> Response<Body> {
    if let Some(r) = shutting_down(&engine) {
        return r;
    }
    let Query { channels, format } = match parse_query(&engine, req.uri().query()) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let format = if echo { Format::Echo } else { format };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return refuse(&engine, StatusCode::UPGRADE_REQUIRED, ErrorCode::BadRequest, "expected a WebSocket upgrade request");
    }
    // permessage-deflate: the first offer Herald can serve, when enabled.
    let deflate = if engine.config.compression {
        let offers = req.headers().get_all(http::header::SEC_WEBSOCKET_EXTENSIONS).iter().filter_map(|v| v.to_str().ok());
        crate::proto::deflate::negotiate(offers)
    } else {
        None
    };
    let (mut response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(fastwebsockets::WebSocketError::InvalidSecWebsocketVersion) => {
            let mut r = refuse(&engine, StatusCode::UPGRADE_REQUIRED, ErrorCode::BadRequest, "Sec-WebSocket-Version must be 13");
            r.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
            return r;
        }
        Err(e) => return refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &e.to_string()),
    };
    let claim = match claim(&engine, &req, "ws") {
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
    let remote = req.extensions().get::<super::query::RemoteAddr>().map(|a| a.0);
    let (target, local) = engine.pick_shard();
    let (tx, rx) = oneshot::channel();
    let opened = engine
        .on_shard(target, move |shard| match shard.open_conn(Transport::Ws, format, &channels, None, access, permit, deflate, remote) {
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
        (Ok(()), Ok(Ok(()))) => {
            if let Some(agreed) = deflate {
                if let Ok(v) = HeaderValue::from_str(&agreed.response()) {
                    response.headers_mut().insert(http::header::SEC_WEBSOCKET_EXTENSIONS, v);
                }
            }
            response.map(|_| Body::empty())
        }
        (_, Ok(Err(e))) => refuse(&engine, StatusCode::SERVICE_UNAVAILABLE, e.code(), &e.to_string()),
        _ => error_response(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable.as_str(), "server is shutting down"),
    }
}

/// Runs an upgraded WebSocket on this shard: as a plain TCP socket when the
/// upgrade came over one (moved onto this shard's reactor if it was
/// accepted elsewhere), else over hyper's upgraded stream as it is.
async fn attach(shard: Rc<Shard>, conn: Rc<Conn>, upgraded: hyper::upgrade::Upgraded, local: bool) {
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
            ws::run_tcp(shard, conn, tcp, parts.read_buf).await;
        }
        Err(upgraded) => match upgraded.downcast::<TokioIo<tokio_rustls::server::TlsStream<TcpStream>>>() {
            // TLS: served over the stream itself (the handshake ran on this
            // shard), without the fan-out's direct writes.
            Ok(parts) => ws::run(shard, conn, parts.io.into_inner(), parts.read_buf).await,
            Err(upgraded) => ws::run(shard, conn, TokioIo::new(upgraded), Bytes::new()).await,
        },
    }
}
