//! Herald's endpoints under an axum router, beside the embedder's own routes.
//!
//! ```text
//! cargo run -p herald --example embed_axum
//! curl -N 'localhost:3000/realtime/sse?channel=news'
//! curl -d hi localhost:3000/realtime/publish/news
//! curl localhost:3000/announce        # publishes from Rust
//! ```

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
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    herald.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
