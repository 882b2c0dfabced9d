//! The query of `/ws` and `/sse`, and the connection permit a request
//! carries.

use http::{Request, Response, StatusCode};

use super::body::Body;
use super::refuse;
use super::serve::PermitSlot;
use crate::engine::Engine;
use crate::proto::{channel, truncate_str, ErrorCode};
use crate::shard::conn::Format;
use crate::shard::Permit;

/// `channel` (repeatable) and `format` from a query string.
pub(crate) struct Query {
    pub channels: Vec<String>,
    pub format: Format,
}

// Refusals are rare and answered at once: no need to box the response.
#[allow(clippy::result_large_err)]
pub(crate) fn parse_query(engine: &Engine, query: Option<&str>) -> Result<Query, Response<Body>> {
    let mut channels = Vec::new();
    let mut format = Format::Json;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "channel" => {
                if let Err(e) = channel::validate(&v) {
                    return Err(refuse(
                        engine,
                        StatusCode::BAD_REQUEST,
                        ErrorCode::BadChannel,
                        &format!("{e}: {:?}", truncate_str(&v, 64)),
                    ));
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
                        let msg = format!("unknown format {:?} (expected json or raw)", truncate_str(other, 64));
                        return Err(refuse(engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &msg));
                    }
                }
            }
            _ => {}
        }
    }
    if channels.len() > engine.config.max_subscriptions {
        let msg = format!("at most {} channels per connection", engine.config.max_subscriptions);
        return Err(refuse(engine, StatusCode::BAD_REQUEST, ErrorCode::Limit, &msg));
    }
    Ok(Query { channels, format })
}

/// The TCP connection's permit (standalone), or a new one (embedded).
#[allow(clippy::result_large_err)]
pub(crate) fn take_permit<B>(engine: &Engine, req: &Request<B>) -> Result<Permit, Response<Body>> {
    let carried = req.extensions().get::<PermitSlot>().and_then(PermitSlot::take);
    match carried.or_else(|| engine.acquire_permit()) {
        Some(p) => Ok(p),
        None => {
            engine.metrics_here().rejected_max_connections.inc();
            Err(refuse(engine, StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Limit, "connection limit reached"))
        }
    }
}
