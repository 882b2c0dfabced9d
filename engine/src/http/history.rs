//! `GET /history/{channel}?since=<position>&limit=<n>`: a page of the
//! channel's history, the same object as the `history` command's reply
//! without `op` and `id`.

use std::sync::Arc;

use http::{Request, Response, StatusCode};

use super::body::Body;
use super::{refuse, text_response};
use crate::engine::Engine;
use crate::message::Position;
use crate::proto::{truncate_str, ErrorCode};
use crate::shard::Upstream;

pub(crate) async fn history<B>(engine: Arc<Engine>, req: Request<B>) -> Response<Body> {
    let channel = match super::path_channel(&engine, &req, "/history/") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let max = engine.config.recovery_max;
    let (mut since, mut limit) = (None, max);
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "since" => match Position::parse(&v) {
                Some(p) => since = Some(p),
                None => {
                    let msg = format!("since is not a position <epoch>:<offset>: {:?}", truncate_str(&v, 64));
                    return refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &msg);
                }
            },
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) && v.bytes().all(|b| b.is_ascii_digit()) => limit = n,
                _ => {
                    let msg = format!("limit must be a number from 1 to {max}: {:?}", truncate_str(&v, 64));
                    return refuse(&engine, StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &msg);
                }
            },
            _ => {}
        }
    }
    match Upstream::history(&*engine, &channel, since, limit).get().await {
        Ok(page) => text_response("application/json", page.to_json(false, &channel, None, engine.config.outbound_queue_bytes)),
        Err(e) => refuse(&engine, StatusCode::SERVICE_UNAVAILABLE, e.code(), &format!("no history for {channel:?}: {e}")),
    }
}
