//! `POST /publish/{channel}`: the body is the payload (JSON with
//! `Content-Type: application/json`, else UTF-8 text).

use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::body::Body;
use super::{refuse, text_response};
use crate::engine::Engine;
use crate::message::PublishError;
use crate::proto::json::{self, Payload};
use crate::proto::ErrorCode;

pub(crate) async fn publish<B>(engine: Arc<Engine>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let channel = match super::path_channel(&engine, &req, "/publish/") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let max = engine.config.max_message_bytes;
    let too_large = || format!("payload over the limit of {max} bytes");
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return refuse(&engine, StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, &too_large());
    }
    // A header that is not visible ASCII cannot be a key.
    let req_key = req.headers().get("idempotency-key").map(|v| v.to_str().map(str::to_owned).map_err(|_| ()));
    let is_json = super::is_json(&req);
    let body = match http_body_util::Limited::new(req.into_body(), max).collect().await {
        // Copied out: hyper's body bytes share its read buffer, and a
        // message kept in history would keep that whole buffer alive.
        Ok(c) => bytes::Bytes::copy_from_slice(&c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return refuse(&engine, StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, &too_large());
        }
        Err(e) => return refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &format!("cannot read the body: {e}")),
    };
    let payload = if is_json {
        match Payload::json(body) {
            Ok(p) => p,
            Err(e) => return refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &e.to_string()),
        }
    } else {
        match Payload::text_from_utf8(body) {
            Ok(p) => p,
            Err(_) => {
                return refuse(
                    &engine,
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "body is not UTF-8 (send JSON with Content-Type: application/json)",
                )
            }
        }
    };
    let key = match req_key {
        Some(Ok(k)) => Some(k),
        Some(Err(())) => {
            return refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &PublishError::BadIdempotencyKey.to_string());
        }
        None => None,
    };
    match engine.publish(&channel, payload, key.as_deref(), engine.metrics_here()).await {
        Ok(p) => text_response("application/json", json::http_published_body(&p.channel, p.offset, p.epoch.as_str())),
        Err(e) => {
            let status = match e.code() {
                ErrorCode::BadChannel | ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
                ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let mut r = refuse(&engine, status, e.code(), &e.to_string());
            if status == StatusCode::SERVICE_UNAVAILABLE {
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            r
        }
    }
}
