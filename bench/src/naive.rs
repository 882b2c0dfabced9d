//! The naive baseline (per-subscriber JSON), kept for reference: what a
//! hurried Rust user writes by hand for fan-out. It flatters whatever is
//! compared with it; [`crate::careful`] is the baseline to compare with.
//!
//! axum + its WebSocket support (tungstenite) + one
//! `tokio::sync::broadcast` channel per channel name. Every subscriber
//! task receives the message and serializes the envelope itself
//! (`serde_json`), then sends it: the encoding cost grows with the number
//! of subscribers, and a subscriber that lags more than the broadcast
//! capacity silently loses messages, as with most hand-written servers.
//!
//! Endpoints (same shapes as Herald's, so `loadgen` drives both):
//! `GET /ws?channel=X`, `GET /sse?channel=X`, `POST /publish/{channel}`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Messages a lagging subscriber may fall behind before it loses some.
const CAPACITY: usize = 1024;

/// One published message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub channel: Arc<str>,
    pub offset: u64,
    pub data: Arc<str>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    channel: &'a str,
    offset: u64,
    data: &'a str,
}

/// The server's state: channel name → broadcast sender.
#[derive(Debug, Default, Clone)]
pub struct Naive {
    channels: Arc<Mutex<HashMap<String, broadcast::Sender<Msg>>>>,
    offsets: Arc<AtomicU64>,
}

#[derive(Deserialize)]
struct Sub {
    channel: String,
}

impl Naive {
    fn sender(&self, channel: &str) -> broadcast::Sender<Msg> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(channel.to_string()).or_insert_with(|| broadcast::channel(CAPACITY).0).clone()
    }

    /// Publishes `data` to `channel`; returns how many subscribers it reached.
    pub fn publish(&self, channel: &str, data: &str) -> usize {
        let offset = self.offsets.fetch_add(1, Ordering::Relaxed) + 1;
        let msg = Msg { channel: channel.into(), offset, data: data.into() };
        self.sender(channel).send(msg).unwrap_or(0)
    }

    /// The axum router.
    pub fn router(&self) -> Router {
        Router::new().route("/ws", get(ws)).route("/sse", get(sse)).route("/publish/{channel}", post(publish)).with_state(self.clone())
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }
}

async fn ws(State(s): State<Naive>, Query(q): Query<Sub>, up: WebSocketUpgrade) -> impl IntoResponse {
    let rx = s.sender(&q.channel).subscribe();
    up.on_upgrade(move |socket| subscriber(socket, rx))
}

async fn subscriber(mut socket: WebSocket, mut rx: broadcast::Receiver<Msg>) {
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Ok(m) => {
                    // Encoded here, once per subscriber.
                    let text = serde_json::to_string(&Envelope { channel: &m.channel, offset: m.offset, data: &m.data })
                        .unwrap_or_default();
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            r = socket.recv() => match r {
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
}

async fn sse(State(s): State<Naive>, Query(q): Query<Sub>) -> impl IntoResponse {
    let rx = s.sender(&q.channel).subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(m) => {
                    let text =
                        serde_json::to_string(&Envelope { channel: &m.channel, offset: m.offset, data: &m.data }).unwrap_or_default();
                    return Some((Ok::<_, Infallible>(Event::default().data(text)), rx));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream)
}

async fn publish(State(s): State<Naive>, Path(channel): Path<String>, body: String) -> impl IntoResponse {
    let offset = s.offsets.load(Ordering::Relaxed) + 1;
    s.publish(&channel, &body);
    axum::Json(serde_json::json!({"channel": channel, "offset": offset}))
}
