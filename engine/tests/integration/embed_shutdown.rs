//! Embedded shutdown: `Herald::shutdown_on` as axum's graceful-shutdown
//! signal ends Herald's streams, so `axum::serve` returns while SSE and
//! WebSocket clients are still connected.

use std::time::Duration;

use herald::Payload;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Only a guard against a hang: the test fails if a step takes longer,
/// and never checks how long a step took.
const HANG: Duration = Duration::from_secs(30);

/// Reads from `s` until `buf` contains `needle`.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) {
    while !buf.windows(needle.len()).any(|w| w == needle) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(HANG, s.read(&mut chunk)).await.expect("no bytes from the SSE stream").unwrap();
        assert!(n > 0, "the SSE stream closed early: {}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_ends_sse_and_websockets_so_axum_serve_returns() {
    let (herald, app, listener, a) = embedded_in_axum().await;
    let (signal_tx, signal_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = herald.shutdown_on(
        async move {
            let _ = signal_rx.await;
        },
        Duration::from_secs(10),
    );
    let serving = tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stop).await });

    // An SSE client over a plain TCP socket, so the test sees the bytes
    // as they come: the head, then `:ok`.
    let mut sse = TcpStream::connect(a).await.unwrap();
    sse.write_all(b"GET /rt/sse?channel=bye HTTP/1.1\r\nhost: test\r\naccept: text/event-stream\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut sse, &mut seen, b":ok\n\n").await;
    assert!(seen.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
    let mut w = ws(a, "/rt/ws?channel=bye").await;
    herald.publish("bye", Payload::text("last")).await.unwrap();
    read_until(&mut sse, &mut seen, b"\"data\":\"last\"}\n\n").await;
    assert_eq!(next_json(&mut w).await["data"], "last");

    signal_tx.send(()).unwrap();

    assert_eq!(close_of(&mut w).await, (1001, "going away".to_string()));
    drop(w);
    // The stream ends normally (the final chunk), then the connection closes.
    let mut rest = Vec::new();
    tokio::time::timeout(HANG, sse.read_to_end(&mut rest)).await.expect("the SSE stream did not end").unwrap();
    seen.extend_from_slice(&rest);
    assert!(seen.ends_with(b"\r\n0\r\n\r\n"), "the SSE response ends with its final chunk: {:?}", String::from_utf8_lossy(&seen));
    let served = tokio::time::timeout(HANG, serving).await.expect("axum::serve did not return: its graceful shutdown hung");
    served.unwrap().unwrap();
    assert!(herald.publish("bye", Payload::text("late")).await.is_err(), "Herald is stopped");
}
