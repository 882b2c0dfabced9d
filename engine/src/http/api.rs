//! The server API (`/api/*`, behind the API key): broadcast to many
//! channels in one call, disconnect a user, unsubscribe a user from a
//! channel (on every node), and read this node's channels and numbers.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::body::Body;
use super::query::query_param;
use super::{refuse, text_response};
use crate::engine::{ApiCall, Engine};
use crate::proto::json::Payload;
use crate::proto::{channel, truncate_str, ErrorCode};

/// Channels one broadcast may name.
pub(crate) const MAX_BROADCAST_CHANNELS: usize = 1000;
/// Channels `GET /api/channels` lists at most.
const MAX_LISTED: usize = 1000;

/// The call a path of `/api/` names, if any (to count refusals by call).
pub(crate) fn call_of(path: &str) -> Option<ApiCall> {
    Some(match path {
        "/api/broadcast" => ApiCall::Broadcast,
        "/api/disconnect" => ApiCall::Disconnect,
        "/api/unsubscribe" => ApiCall::Unsubscribe,
        "/api/channels" => ApiCall::Channels,
        "/api/stats" => ApiCall::Stats,
        _ => return None,
    })
}

fn json_response(v: &Value) -> Response<Body> {
    text_response("application/json", v.to_string())
}

/// The request's JSON body, at most `max` bytes. `Content-Type` must be
/// `application/json`: a page of another site cannot send that without a
/// CORS preflight, which Herald does not answer for `/api`, so it cannot
/// make a browser call the API behind its user's back.
async fn read_body<B>(engine: &Engine, req: Request<B>, max: usize) -> Result<Bytes, Response<Body>>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if !super::is_json(&req) {
        let msg = "the body must be JSON, sent with Content-Type: application/json";
        return Err(refuse(engine, StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::BadRequest, msg));
    }
    match http_body_util::Limited::new(req.into_body(), max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(refuse(engine, StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, &format!("body over the limit of {max} bytes")))
        }
        Err(e) => Err(refuse(engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &format!("cannot read the body: {e}"))),
    }
}

/// Parses the body as `T`, or answers 400 saying what it should be.
#[allow(clippy::result_large_err)]
fn parse<'a, T: Deserialize<'a>>(engine: &Engine, body: &'a [u8], shape: &str) -> Result<T, Response<Body>> {
    serde_json::from_slice(body)
        .map_err(|e| refuse(engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &format!("the body is {shape}: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Broadcast<'a> {
    channels: Vec<String>,
    #[serde(borrow)]
    data: &'a RawValue,
    idempotency_key: Option<String>,
}

/// `POST /api/broadcast`: one publish per channel, in order, one result
/// each.
pub(crate) async fn broadcast<B>(engine: Arc<Engine>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = engine.config.max_message_bytes + MAX_BROADCAST_CHANNELS * 260 + 1024;
    let body = match read_body(&engine, req, max).await {
        Ok(b) => b,
        Err(r) => return engine.api_done(ApiCall::Broadcast, r),
    };
    let shape = "{\"channels\":[…],\"data\":<any JSON>} (optional \"idempotency_key\")";
    let b: Broadcast<'_> = match parse(&engine, &body, shape) {
        Ok(b) => b,
        Err(r) => return engine.api_done(ApiCall::Broadcast, r),
    };
    if b.channels.is_empty() || b.channels.len() > MAX_BROADCAST_CHANNELS {
        let msg = format!("\"channels\" must name 1 to {MAX_BROADCAST_CHANNELS} channels");
        return engine.api_done(ApiCall::Broadcast, refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &msg));
    }
    let payload = match Payload::json(Bytes::copy_from_slice(b.data.get().as_bytes())) {
        Ok(p) => p,
        Err(e) => {
            return engine.api_done(ApiCall::Broadcast, refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &e.to_string()))
        }
    };
    let metrics = engine.metrics_here();
    let mut results = Vec::with_capacity(b.channels.len());
    for ch in &b.channels {
        let r = match channel::validate(ch) {
            Err(e) => Err((ErrorCode::BadChannel, format!("{e}: {:?}", truncate_str(ch, 64)))),
            Ok(()) => {
                engine.publish(ch, payload.clone(), b.idempotency_key.as_deref(), metrics).await.map_err(|e| (e.code(), e.to_string()))
            }
        };
        results.push(match r {
            Ok(p) => json!({"channel": ch, "offset": p.offset, "epoch": p.epoch.as_str()}),
            Err((code, message)) => {
                metrics.error(code);
                json!({"channel": ch, "error": {"code": code.as_str(), "message": message}})
            }
        });
    }
    engine.api_done(ApiCall::Broadcast, json_response(&json!({ "results": results })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserCommand {
    user: String,
    channel: Option<String>,
}

/// `POST /api/disconnect` and `POST /api/unsubscribe`: done on this node,
/// and sent to the others through the broker.
pub(crate) async fn user_command<B>(engine: Arc<Engine>, req: Request<B>, unsubscribe: bool) -> Response<Body>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let call = if unsubscribe { ApiCall::Unsubscribe } else { ApiCall::Disconnect };
    let body = match read_body(&engine, req, 4096).await {
        Ok(b) => b,
        Err(r) => return engine.api_done(call, r),
    };
    let shape = if unsubscribe { "{\"user\":…,\"channel\":…}" } else { "{\"user\":…}" };
    let c: UserCommand = match parse(&engine, &body, shape) {
        Ok(c) => c,
        Err(r) => return engine.api_done(call, r),
    };
    let bad = |msg: &str| refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, msg);
    if c.user.is_empty() || c.user.len() > 256 {
        return engine.api_done(call, bad("\"user\" must be 1 to 256 bytes"));
    }
    let channel = match (unsubscribe, &c.channel) {
        (false, None) => None,
        (false, Some(_)) => return engine.api_done(call, bad("disconnect takes no \"channel\"")),
        (true, None) => return engine.api_done(call, bad("missing \"channel\"")),
        (true, Some(ch)) => match channel::validate(ch) {
            Ok(()) => Some(ch.as_str()),
            Err(e) => {
                let r = refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadChannel, &format!("{e}: {:?}", truncate_str(ch, 64)));
                return engine.api_done(call, r);
            }
        },
    };
    let cmd = match channel {
        None => crate::engine::NodeCommand::Disconnect { user: c.user.clone() },
        Some(ch) => crate::engine::NodeCommand::Unsubscribe { user: c.user.clone(), channel: ch.to_owned() },
    };
    let connections = engine.run_here(&cmd).await;
    let mut answer = json!({ "connections": connections });
    match engine.broker.send_command(&cmd.encode()).await {
        Ok(Some(nodes)) => answer["nodes"] = nodes.into(),
        Ok(None) => {}
        Err(e) => {
            let msg = format!("done on this node ({connections} connections), but not sent to the other nodes: {e}");
            return engine.api_done(call, refuse(&engine, StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, &msg));
        }
    }
    engine.api_done(call, json_response(&answer))
}

/// `GET /api/channels`: this node's channels with subscribers, most
/// subscribers first.
pub(crate) async fn channels<B>(engine: Arc<Engine>, req: Request<B>) -> Response<Body> {
    let limit = match query_param(&req, "limit").map(|l| l.parse::<usize>()) {
        None => MAX_LISTED,
        Some(Ok(l)) if (1..=MAX_LISTED).contains(&l) => l,
        Some(_) => {
            let msg = format!("\"limit\" must be a number from 1 to {MAX_LISTED}");
            return engine.api_done(ApiCall::Channels, refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &msg));
        }
    };
    let mut counts: std::collections::HashMap<Arc<str>, usize> = std::collections::HashMap::new();
    for shard in engine.on_every_shard(|s| s.channel_counts()).await {
        for (ch, n) in shard {
            *counts.entry(ch).or_default() += n;
        }
    }
    let total = counts.len();
    let mut list: Vec<(Arc<str>, usize)> = counts.into_iter().collect();
    list.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let listed: Vec<Value> = list.iter().take(limit).map(|(c, n)| json!({"channel": &**c, "subscribers": n})).collect();
    let answer = json!({ "channels": listed, "total": total, "truncated": total > limit });
    engine.api_done(ApiCall::Channels, json_response(&answer))
}

/// `GET /api/stats`: this node's numbers, totals since start.
pub(crate) async fn stats(engine: Arc<Engine>) -> Response<Body> {
    let mut v = engine.metrics.stats();
    v["version"] = env!("CARGO_PKG_VERSION").into();
    v["broker"] = engine.broker.mode().into();
    v["shards"] = engine.config.shards.into();
    v["uptime_s"] = engine.started.elapsed().as_secs().into();
    v["channels"] = engine.router.len().into();
    engine.api_done(ApiCall::Stats, json_response(&v))
}

/// `GET /presence/{channel}`.
pub(crate) async fn presence<B>(engine: Arc<Engine>, req: Request<B>) -> Response<Body> {
    let ch = match super::path_channel(&engine, &req, "/presence/") {
        Ok(c) => c,
        Err(r) => return engine.api_done(ApiCall::Presence, r),
    };
    if !engine.rules.of(&ch).presence {
        let msg = format!("presence is off for {ch:?} (namespace option presence)");
        return engine.api_done(ApiCall::Presence, refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &msg));
    }
    let r = match engine.presence_of(&ch).get().await {
        Ok(snap) => json_response(&snap.body(&ch)),
        Err(e) => refuse(&engine, StatusCode::SERVICE_UNAVAILABLE, e.code(), &format!("no presence for {ch:?}: {e}")),
    };
    engine.api_done(ApiCall::Presence, r)
}
