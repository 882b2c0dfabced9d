//! The sync backend's application: Herald's three hooks over an in-memory
//! store of shared lists ("boards"), and a read of a board's state.
//!
//! - `POST /herald/connect`: the token is the user's name (a demo: a real
//!   application checks a session or a password here). No token, or the
//!   name `banned`: 401. Every user may subscribe to `board:*` and
//!   `user:<own name>`, and publish to `board:*`.
//! - `POST /herald/subscribe`: boards named `board:private-…` are for the
//!   user `admin` only (403 otherwise).
//! - `POST /herald/publish`: the data is a change to the board,
//!   `{"op":"add","text":"milk"}` or `{"op":"remove","id":3}`. The backend
//!   applies it to its store and answers the canonical change, with the
//!   item's id, its author and the board's version, which is what every
//!   device gets: `{"data":{"op":"add","id":1,"text":"milk","by":"alice","version":1}}`.
//!   A change it cannot apply is refused (422) with a message the client
//!   sees. A change retried with the same `idempotency_key` is stored once
//!   (the first answer is given again). A publish to any other channel is
//!   allowed as it is.
//! - `GET /boards/{name}`: the board as stored (for a device that was away
//!   longer than Herald's history).
//!
//! Herald's tests serve this same module (and use the knobs the example
//! binary leaves alone).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

/// One shared list.
#[derive(Debug, Default)]
pub struct Board {
    pub version: u64,
    next_id: u64,
    pub items: BTreeMap<u64, (String, String)>,
    /// The canonical change stored for each idempotency key, so a change
    /// a client retries is stored once (a real store bounds and expires
    /// these as Herald does).
    applied: BTreeMap<String, Value>,
}

/// The backend's state.
#[derive(Debug, Default)]
pub struct App {
    boards: Mutex<BTreeMap<String, Board>>,
    /// Every hook waits this long before answering (to try Herald's
    /// timeout).
    pub delay_ms: AtomicU64,
    /// Hooks answer only while they can take this lock for reading: a
    /// test holds it for writing to keep calls waiting.
    pub gate: tokio::sync::RwLock<()>,
    /// Hook calls answered, by hook.
    pub connects: AtomicU64,
    pub subscribes: AtomicU64,
    pub publishes: AtomicU64,
}

impl App {
    /// The items of a board, oldest first: (id, text, author).
    pub fn items(&self, board: &str) -> Vec<(u64, String, String)> {
        let boards = self.boards.lock().unwrap();
        boards.get(board).map(|b| b.items.iter().map(|(id, (t, by))| (*id, t.clone(), by.clone())).collect()).unwrap_or_default()
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

fn refuse(status: StatusCode, message: &str) -> Response {
    answer(status, json!({ "message": message }))
}

async fn pause(app: &App) {
    drop(app.gate.read().await);
    let ms = app.delay_ms.load(Ordering::Relaxed);
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

async fn connect(State(app): State<Arc<App>>, body: Bytes) -> Response {
    pause(&app).await;
    app.connects.fetch_add(1, Ordering::Relaxed);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else { return refuse(StatusCode::BAD_REQUEST, "not JSON") };
    match req["token"].as_str() {
        None | Some("") => refuse(StatusCode::UNAUTHORIZED, "sign in first"),
        Some("banned") => refuse(StatusCode::UNAUTHORIZED, "this account is suspended"),
        Some(user) => {
            answer(StatusCode::OK, json!({ "user": user, "subscribe": ["board:*", format!("user:{user}")], "publish": ["board:*"] }))
        }
    }
}

async fn subscribe(State(app): State<Arc<App>>, body: Bytes) -> Response {
    pause(&app).await;
    app.subscribes.fetch_add(1, Ordering::Relaxed);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else { return refuse(StatusCode::BAD_REQUEST, "not JSON") };
    let channel = req["channel"].as_str().unwrap_or("");
    if channel.starts_with("board:private-") && req["user"] != "admin" {
        return refuse(StatusCode::FORBIDDEN, "this board is private");
    }
    answer(StatusCode::OK, json!({}))
}

async fn publish(State(app): State<Arc<App>>, body: Bytes) -> Response {
    pause(&app).await;
    app.publishes.fetch_add(1, Ordering::Relaxed);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else { return refuse(StatusCode::BAD_REQUEST, "not JSON") };
    let (Some(channel), user, change) = (req["channel"].as_str(), req["user"].as_str().unwrap_or("anonymous"), &req["data"]) else {
        return refuse(StatusCode::BAD_REQUEST, "no channel");
    };
    if !channel.starts_with("board:") {
        // Not a board: allowed as it is (the answer has no data).
        return answer(StatusCode::OK, json!({}));
    }
    let mut boards = app.boards.lock().unwrap();
    let board = boards.entry(channel.to_string()).or_default();
    let key = req["idempotency_key"].as_str().map(str::to_owned);
    if let Some(done) = key.as_ref().and_then(|k| board.applied.get(k)) {
        return answer(StatusCode::OK, json!({ "data": done }));
    }
    let canonical = match change["op"].as_str() {
        Some("add") => {
            let Some(text) = change["text"].as_str().filter(|t| !t.is_empty() && t.len() <= 200) else {
                return refuse(StatusCode::UNPROCESSABLE_ENTITY, "an item needs a text of 1 to 200 bytes");
            };
            board.next_id += 1;
            board.version += 1;
            board.items.insert(board.next_id, (text.to_string(), user.to_string()));
            json!({ "op": "add", "id": board.next_id, "text": text, "by": user, "version": board.version })
        }
        Some("remove") => {
            let id = change["id"].as_u64().unwrap_or(0);
            if board.items.remove(&id).is_none() {
                return refuse(StatusCode::UNPROCESSABLE_ENTITY, &format!("no item {id} on this board"));
            }
            board.version += 1;
            json!({ "op": "remove", "id": id, "by": user, "version": board.version })
        }
        _ => return refuse(StatusCode::UNPROCESSABLE_ENTITY, "a change is {\"op\":\"add\",\"text\":…} or {\"op\":\"remove\",\"id\":…}"),
    };
    if let Some(k) = key {
        board.applied.insert(k, canonical.clone());
    }
    answer(StatusCode::OK, json!({ "data": canonical }))
}

async fn board(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let boards = app.boards.lock().unwrap();
    let (version, items) = match boards.get(&name) {
        Some(b) => (b.version, b.items.iter().map(|(id, (t, by))| json!({ "id": id, "text": t, "by": by })).collect()),
        None => (0, Vec::new()),
    };
    answer(StatusCode::OK, json!({ "board": name, "version": version, "items": items }))
}

/// The backend's routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/herald/connect", post(connect))
        .route("/herald/subscribe", post(subscribe))
        .route("/herald/publish", post(publish))
        .route("/boards/{name}", get(board))
        .with_state(app)
}
