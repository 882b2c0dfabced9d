//! The standalone server's acceptor: one task on shard 0 accepts every
//! connection and hands it to a shard round-robin, where HTTP is served.
//! Over `max_connections`, a connection gets a 503 and is closed.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::engine::Engine;
use crate::http;
use crate::proto::{json, ErrorCode};
use crate::shard::Control;

/// Starts the acceptor on shard 0; it stops when that shard drains.
pub(crate) fn start(engine: &Arc<Engine>, listener: std::net::TcpListener) {
    let e = Arc::clone(engine);
    let run = Control::Run(Box::new(move |shard| {
        let drained = shard.drain_signal();
        tokio::task::spawn_local(async move {
            tokio::select! {
                _ = accept_loop(e, listener) => {}
                _ = drained => {}
            }
        });
    }));
    // The shard's control queue is new and empty: there is room.
    if engine.controls[0].try_send(run).is_err() {
        tracing::error!("cannot start the acceptor");
    }
}

async fn accept_loop(engine: Arc<Engine>, listener: std::net::TcpListener) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the listener");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = engine.acquire_permit() else {
            let m = engine.metrics_here();
            m.rejected_max_connections.inc();
            m.error(ErrorCode::Limit);
            tokio::task::spawn_local(reject(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let target = engine.next_shard();
        if let Some(here) = crate::shard::current(&*engine).filter(|s| s.id == target) {
            http::serve(&engine, &here, stream, permit);
            continue;
        }
        let std = match stream.into_std() {
            Ok(std) => std,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a socket to its shard");
                continue;
            }
        };
        let e = Arc::clone(&engine);
        let handoff = Control::Run(Box::new(move |shard| match TcpStream::from_std(std) {
            Ok(s) => http::serve(&e, shard, s, permit),
            Err(err) => tracing::debug!(error = %err, "cannot register an accepted socket"),
        }));
        if engine.send_control(target, handoff).await.is_err() {
            return;
        }
    }
}

/// Answers 503 to a connection over the limit, then closes it.
async fn reject(mut stream: TcpStream) {
    let body = json::http_error_body("limit", "connection limit reached");
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await?;
        // Read what the client sent (up to a bound) before closing: closing
        // with unread input would reset the connection, and the client might
        // never see the 503.
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}
