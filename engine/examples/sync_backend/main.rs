//! A tiny application behind Herald: the multi-device sync flow of
//! docs/hooks.md ("a client sends a change; the server checks it and
//! stores it; everyone gets it"), with Herald's connect, subscribe and
//! publish hooks over an in-memory store.
//!
//! ```text
//! cargo run -p herald --example sync_backend            # 127.0.0.1:9000
//! herald --config engine/examples/sync_backend/herald.toml
//! ```

mod app;

use std::sync::Arc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("sync backend on http://{addr} (hooks under /herald/, boards under /boards/)");
    axum::serve(listener, app::router(Arc::new(app::App::default()))).await
}
