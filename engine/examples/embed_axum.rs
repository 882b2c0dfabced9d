//! Herald's endpoints under an axum router, beside the embedder's own routes.
//!
//! ```text
//! cargo run -p herald --example embed_axum
//! curl -N 'localhost:3000/realtime/sse?channel=news'
//! curl -d hi localhost:3000/realtime/publish/news
//! curl localhost:3000/announce        # publishes from Rust
//! ```
//!
//! SIGINT (Ctrl-C) or SIGTERM stops it: Herald closes its WebSockets with
//! 1001 and ends its SSE streams first, so axum's graceful shutdown, which
//! waits for every open response, finishes at once.

use std::time::Duration;

use axum::{extract::State, routing::get, Router};
use herald::{Config, Herald, Payload};

async fn announce(State(herald): State<Herald>) -> String {
    match herald.publish("news", Payload::text("announcement from the embedder")).await {
        Ok(p) => format!("published at offset {} (epoch {})\n", p.offset, p.epoch),
        Err(e) => format!("publish failed: {e}\n"),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let herald = Herald::start_embedded(Config::default()).map_err(std::io::Error::other)?;
    let app = Router::new()
        .route("/", get(|| async { "my app; realtime endpoints under /realtime\n" }))
        .route("/announce", get(announce))
        .nest_service("/realtime", herald.service())
        .with_state(herald.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    // Herald's shutdown runs inside axum's signal future, not after
    // `serve` returns: axum waits for open SSE bodies, which only Herald ends.
    let stop = herald.shutdown_on(signal()?, Duration::from_secs(5));
    axum::serve(listener, app).with_graceful_shutdown(stop).await?;
    println!("stopped");
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed
/// here, before serving, so a signal that comes early is not missed.
fn signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        let which = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        println!("{which}: closing Herald's connections");
    })
}
