//! The query of `/ws` and `/sse`, and the connection permit a request
//! carries.

use http::{Request, Response, StatusCode};

use super::body::Body;
use super::refuse;
use super::serve::PermitSlot;
use crate::engine::Engine;
use crate::proto::{channel, truncate_str, ErrorCode};
use crate::shard::conn::Format;
use crate::shard::Access;
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

/// Who a `/ws` or `/sse` request is: the identity an embedder put in its
/// extensions, else a verified token (`Authorization: Bearer`, or the
/// `token` query parameter), else anonymous with `[auth]` set, else open.
/// A bad token is 401 before anything is opened; a channel of the query
/// the identity may not subscribe to is 403.
#[allow(clippy::result_large_err)]
pub(crate) fn identify<B>(engine: &Engine, req: &Request<B>, channels: &[String]) -> Result<Access, Response<Body>> {
    let access = match req.extensions().get::<crate::auth::Identity>() {
        Some(id) => Access::User(id.clone()),
        None => match &engine.auth {
            None => Access::Open,
            Some(auth) => match bearer(req).map(str::to_owned).or_else(|| query_param(req, "token")) {
                None => {
                    engine.metrics_here().auth[crate::auth::TokenError::MISSING].inc();
                    Access::Anonymous
                }
                Some(token) => match auth.verify(&token) {
                    Ok(id) => {
                        engine.metrics_here().auth[crate::auth::TokenError::OK].inc();
                        Access::User(id)
                    }
                    Err(e) => {
                        engine.metrics_here().auth[e.result()].inc();
                        return Err(refuse(engine, StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, &format!("token refused: {e}")));
                    }
                },
            },
        },
    };
    if let Some(ch) = channels.iter().find(|c| !access.may_subscribe(&engine.rules, c)) {
        engine.metrics_here().forbidden[0].inc();
        let msg = format!("not allowed to subscribe to {:?}", truncate_str(ch, 64));
        return Err(refuse(engine, StatusCode::FORBIDDEN, ErrorCode::Forbidden, &msg));
    }
    Ok(access)
}

/// The value of an `Authorization: Bearer …` header.
pub(crate) fn bearer<B>(req: &Request<B>) -> Option<&str> {
    let v = req.headers().get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, value) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| value.trim())
}

/// The first value of query parameter `name`.
pub(crate) fn query_param<B>(req: &Request<B>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
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
