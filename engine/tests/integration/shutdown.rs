//! Graceful shutdown: queued messages are flushed, WebSockets get 1001,
//! SSE streams end, new requests are refused.

use std::time::Duration;

use herald::Payload;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_then_closes_websockets_with_1001_and_ends_sse() {
    let h = start(2, |_| {});
    let a = addr(&h);
    let mut w = ws(a, "/ws?channel=bye").await;
    let mut s = Sse::open(a, "channel=bye").await;
    for i in 0..10 {
        h.publish("bye", Payload::text(format!("m{i}"))).await.unwrap();
    }
    // A deadline far beyond the test's own wait: the drain can only end
    // within that wait because every client has gone, not by the deadline.
    let stopping = {
        let h = h.clone();
        tokio::spawn(async move { h.shutdown(Duration::from_secs(600)).await })
    };
    for i in 0..10 {
        assert_eq!(next_json(&mut w).await["data"], format!("m{i}"));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&s.next_data().await.unwrap()).unwrap()["data"], format!("m{i}"));
    }
    assert_eq!(close_of(&mut w).await, (1001, "going away".to_string()));
    assert_eq!(s.next_data().await, None, "the SSE stream ended");
    // tokio-tungstenite answers the close when it reads it; then the drain ends.
    drop(w);
    tokio::time::timeout(WAIT, stopping).await.expect("the drain ends once the last client is gone").unwrap();
    assert!(h.publish("bye", Payload::text("late")).await.is_err());
    assert!(tokio::net::TcpStream::connect(a).await.is_err(), "the listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_once_shutdown_begins() {
    use http_body_util::BodyExt;
    use hyper::service::Service;
    let h = herald::Herald::start_embedded(herald::Config::default()).unwrap();
    let get = || http::Request::get("/healthz").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    let svc = h.service();
    assert_eq!(svc.call(get()).await.unwrap().status(), 200);
    h.shutdown(Duration::from_secs(1)).await;
    let resp = svc.call(get()).await.unwrap();
    assert_eq!(resp.status(), 503, "a load balancer stops sending clients");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["code"], "unavailable");
}

/// The `herald` binary as an operator runs it: SIGTERM drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_standalone_server_and_exits_0() {
    let Spawned { mut child, addr: a, log, .. } = spawn_herald(&["--shards", "2", "--shutdown-grace-secs", "5"]).await;
    let mut w = ws(a, "/ws?channel=term").await;
    let mut s = Sse::open(a, "channel=term").await;
    for i in 0..20 {
        let (status, _) = publish(a, "term", &format!("m{i}"), false).await;
        assert_eq!(status, 200);
    }
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    // Everything published before the signal arrives, then the close.
    for i in 0..20 {
        assert_eq!(next_json(&mut w).await["data"], format!("m{i}"));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&s.next_data().await.unwrap()).unwrap()["data"], format!("m{i}"));
    }
    assert_eq!(close_of(&mut w).await, (1001, "going away".to_string()));
    assert_eq!(s.next_data().await, None, "the SSE stream ended");
    drop(w);
    // A guard against a hang only: every client is gone, so it exits
    // without waiting for the grace period.
    let status = tokio::time::timeout(WAIT * 3, child.wait()).await.expect("herald exited").unwrap();
    assert!(status.success(), "exit status {status:?}");
    let log = log.await.unwrap();
    assert!(log.contains("draining connections") && log.contains("herald stopped"), "{log}");
}
