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

/// Who a `/ws` or `/sse` request says it is, read before anything waits.
pub(crate) enum Claim {
    /// Known at once: an embedder's identity, a verified token, anonymous
    /// or open.
    Known(Access),
    /// The connect hook decides.
    Ask(crate::proxy::ConnectInfo),
}

/// The address a request came from (standalone server).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemoteAddr(pub std::net::SocketAddr);

/// Who a `/ws` or `/sse` request is: the identity an embedder put in its
/// extensions, else the connect hook's answer (`[proxy] connect_url`), else
/// a verified token (`Authorization: Bearer`, or the `token` query
/// parameter), else anonymous with `[auth]` set, else open. A bad token is
/// 401 before anything is opened.
#[allow(clippy::result_large_err)]
pub(crate) fn claim<B>(engine: &Engine, req: &Request<B>, transport: &'static str) -> Result<Claim, Response<Body>> {
    if let Some(id) = req.extensions().get::<crate::auth::Identity>() {
        return Ok(Claim::Known(Access::User(id.clone())));
    }
    let token = || bearer(req).map(str::to_owned).or_else(|| query_param(req, "token"));
    if engine.proxy.as_ref().is_some_and(|p| p.has(crate::proxy::Hook::Connect)) {
        return Ok(Claim::Ask(crate::proxy::ConnectInfo {
            transport,
            remote_addr: req.extensions().get::<RemoteAddr>().map(|a| a.0),
            headers: crate::proxy::ConnectInfo::headers_of(req.headers()),
            token: token(),
        }));
    }
    Ok(Claim::Known(match &engine.auth {
        None => Access::Open,
        Some(auth) => match token() {
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
    }))
}

/// Settles a claim (asking the connect hook if it must) and checks that
/// the connection may subscribe to every channel of its query (by its
/// grants, or by the subscribe hook on `subscribe_proxy` namespaces): 403
/// otherwise; 401 or 403 when the connect hook refuses; 503 when a hook
/// cannot answer.
pub(crate) async fn admit(engine: &Engine, claim: Claim, channels: &[String]) -> Result<Access, Response<Body>> {
    use crate::proxy::HookError;
    let hook_error = |e: &HookError, what: &str| match e {
        HookError::Refused { status, .. } if *status == StatusCode::FORBIDDEN => {
            refuse(engine, StatusCode::FORBIDDEN, ErrorCode::Forbidden, &format!("{what}: {e}"))
        }
        HookError::Refused { .. } => refuse(engine, StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, &format!("{what}: {e}")),
        _ => refuse(engine, StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, &format!("{what}: {e}")),
    };
    let access = match claim {
        Claim::Known(a) => a,
        Claim::Ask(info) => match engine.proxy.as_ref() {
            Some(p) => match p.connect(info).await {
                Ok(id) => Access::User(id),
                Err(e) => return Err(hook_error(&e, "connection refused")),
            },
            None => Access::Anonymous,
        },
    };
    for ch in channels {
        let hook = engine.rules.of(ch).subscribe_proxy && !ch.starts_with("user:");
        let refused = |engine: &Engine| {
            engine.metrics_here().forbidden[0].inc();
            let msg = format!("not allowed to subscribe to {:?}", truncate_str(ch, 64));
            refuse(engine, StatusCode::FORBIDDEN, ErrorCode::Forbidden, &msg)
        };
        match (hook, engine.proxy.as_ref()) {
            (true, Some(p)) => match p.subscribe(access.user(), ch).await {
                Ok(()) => {}
                Err(HookError::Refused { .. }) => return Err(refused(engine)),
                Err(e) => return Err(hook_error(&e, &format!("cannot subscribe to {:?}", truncate_str(ch, 64)))),
            },
            _ if !access.may_subscribe(&engine.rules, ch) => return Err(refused(engine)),
            _ => {}
        }
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
