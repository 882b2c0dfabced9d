//! The standalone server's acceptor: one task on shard 0 accepts every
//! connection and hands it to a shard round-robin, where HTTP is served.
//! Over `max_connections`, a connection gets a 503 and is closed. With TLS,
//! the handshake runs on the connection's shard, within the request head
//! deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::engine::Engine;
use crate::http;
use crate::proto::{json, ErrorCode};
use crate::shard::Control;

/// Starts the acceptor on shard 0; it stops when that shard drains.
pub(crate) fn start(engine: &Arc<Engine>, listener: std::net::TcpListener, tls: Option<TlsAcceptor>) {
    let e = Arc::clone(engine);
    let run = Control::Run(Box::new(move |shard| {
        let drained = shard.drain_signal();
        tokio::task::spawn_local(async move {
            tokio::select! {
                _ = accept_loop(e, listener, tls) => {}
                _ = drained => {}
            }
        });
    }));
    // The shard's control queue is new and empty: there is room.
    if engine.controls[0].try_send(run).is_err() {
        tracing::error!("cannot start the acceptor");
    }
}

async fn accept_loop(engine: Arc<Engine>, listener: std::net::TcpListener, tls: Option<TlsAcceptor>) {
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
            // Over TLS the 503 would cost a handshake when the server is
            // already full: the connection is closed instead.
            if tls.is_none() {
                tokio::task::spawn_local(reject(stream));
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let target = engine.next_shard();
        if let Some(here) = crate::shard::current(&*engine).filter(|s| s.id == target) {
            open(&engine, &here, stream, permit, tls.clone());
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
        let tls = tls.clone();
        let handoff = Control::Run(Box::new(move |shard| match TcpStream::from_std(std) {
            Ok(s) => open(&e, shard, s, permit, tls),
            Err(err) => tracing::debug!(error = %err, "cannot register an accepted socket"),
        }));
        if engine.send_control(target, handoff).await.is_err() {
            return;
        }
    }
}

/// Serves a connection on its shard: HTTP at once, or after the TLS
/// handshake.
fn open(
    engine: &Arc<Engine>,
    shard: &std::rc::Rc<crate::shard::Shard>,
    tcp: TcpStream,
    permit: crate::shard::Permit,
    tls: Option<TlsAcceptor>,
) {
    let remote = tcp.peer_addr().ok();
    let Some(tls) = tls else {
        return http::serve(engine, shard, tcp, remote, permit);
    };
    let (engine, shard) = (Arc::clone(engine), std::rc::Rc::clone(shard));
    let deadline = Duration::from_millis(engine.config.request_head_timeout_ms);
    let drained = shard.drain_signal();
    tokio::task::spawn_local(async move {
        let handshake = tokio::time::timeout(deadline, tls.accept(tcp));
        let r = tokio::select! {
            r = handshake => r,
            _ = drained => return,
        };
        let m = engine.metrics_here();
        match r {
            Ok(Ok(stream)) => {
                m.tls_handshakes.inc();
                http::serve(&engine, &shard, stream, remote, permit);
            }
            Ok(Err(e)) => {
                m.tls_handshake_failures.inc();
                tracing::debug!(remote = %DisplayAddr(remote), error = %e, "TLS handshake failed");
            }
            Err(_) => {
                m.tls_handshake_failures.inc();
                tracing::debug!(remote = %DisplayAddr(remote), "TLS handshake timed out");
            }
        }
    });
}

/// An optional address for logs: the address, or `-`.
pub(crate) struct DisplayAddr(pub Option<std::net::SocketAddr>);

impl std::fmt::Display for DisplayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
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
