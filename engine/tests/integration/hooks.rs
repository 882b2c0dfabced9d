//! The application's hooks (`[proxy]`), against the example sync backend
//! (engine/examples/sync_backend) served for real on a loopback port.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use herald::{Config, Herald, Namespace, ProxyConfig};
use serde_json::{json, Value};

use crate::common::*;

#[path = "../../examples/sync_backend/app.rs"]
mod app;

/// The sync backend on a free port.
async fn backend() -> (Arc<app::App>, std::net::SocketAddr) {
    let state = Arc::new(app::App::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    let router = app::router(Arc::clone(&state));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (state, a)
}

fn hooks_at(backend: std::net::SocketAddr, timeout_ms: u64, max_in_flight: usize) -> ProxyConfig {
    ProxyConfig {
        connect_url: Some(format!("http://{backend}/herald/connect")),
        subscribe_url: Some(format!("http://{backend}/herald/subscribe")),
        publish_url: Some(format!("http://{backend}/herald/publish")),
        timeout_ms,
        max_in_flight,
    }
}

/// Herald with the backend's hooks on `board:…`; `news` is a plain channel.
fn herald_with(proxy: ProxyConfig, tweak: impl FnOnce(&mut Config)) -> Herald {
    start(2, |c| {
        c.proxy(proxy).namespace(
            "board",
            Namespace { client_publish: Some(true), subscribe_proxy: true, publish_proxy: true, ..Namespace::default() },
        );
        tweak(c);
    })
}

async fn metrics(h: &Herald) -> String {
    http(addr(h), "GET", "/metrics", &[], b"").await.2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_checked_stored_and_sent_to_every_device_in_its_canonical_form() {
    let (state, b) = backend().await;
    let h = herald_with(hooks_at(b, 2000, 100), |_| {});
    let a = addr(&h);
    let mut phone = ws(a, "/ws?token=alice").await;
    let mut laptop = ws(a, "/ws?token=alice").await;
    let mut bob = ws(a, "/ws?token=bob").await;
    for c in [&mut phone, &mut laptop, &mut bob] {
        let r = command(c, json!({"op":"subscribe","channel":"board:groceries","id":1})).await;
        assert_eq!(r["op"], "subscribed", "{r}");
    }
    let r = command(&mut phone, json!({"op":"publish","channel":"board:groceries","data":{"op":"add","text":"milk"},"id":2})).await;
    assert_eq!((r["op"].as_str(), r["offset"].as_u64()), (Some("published"), Some(1)), "{r}");
    // Every device, the sender's other one included, gets what the backend stored.
    let want = json!({"op":"add","id":1,"text":"milk","by":"alice","version":1});
    for c in [&mut laptop, &mut bob] {
        let m = next_json(c).await;
        assert_eq!((m["offset"].as_u64(), &m["data"]), (Some(1), &want), "{m}");
    }
    assert_eq!(next_json(&mut phone).await["data"], want);
    assert_eq!(state.items("board:groceries"), vec![(1, "milk".to_string(), "alice".to_string())]);
    // A change the backend cannot apply is refused with its message, and
    // nothing is published.
    let r = command(&mut bob, json!({"op":"publish","channel":"board:groceries","data":{"op":"remove","id":99},"id":3})).await;
    assert_eq!((r["op"].as_str(), r["code"].as_str()), (Some("error"), Some("forbidden")), "{r}");
    assert!(r["message"].as_str().unwrap().contains("no item 99 on this board"), "{r}");
    let (_, _, body) = http(a, "GET", "/history/board:groceries", &[], b"").await;
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["offset"], 1, "the refused change spent no offset: {page}");
    let m = metrics(&h).await;
    assert_eq!(metric(&m, "herald_proxy_calls_total{hook=\"publish\",result=\"ok\"}"), 1);
    assert_eq!(metric(&m, "herald_proxy_calls_total{hook=\"publish\",result=\"refused\"}"), 1);
    assert_eq!(metric(&m, "herald_forbidden_total{action=\"publish\"}"), 1);
    assert_eq!(metric(&m, "herald_proxy_duration_seconds_count{hook=\"publish\"}"), 2);
    // A plain channel is not asked about (and alice has no grant for it).
    let calls = state.publishes.load(Ordering::Relaxed);
    let r = command(&mut phone, json!({"op":"publish","channel":"news","data":1,"id":4})).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    assert_eq!(state.publishes.load(Ordering::Relaxed), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_hook_gives_the_user_and_grants_or_refuses() {
    let (state, b) = backend().await;
    let h = herald_with(hooks_at(b, 2000, 100), |_| {});
    let a = addr(&h);
    let (status, _, body) = http(a, "GET", "/ws", &WS_UPGRADE, b"").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("sign in first"), "{body}");
    let (status, _, body) = http(a, "GET", "/sse?channel=board:x&token=banned", &[], b"").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("this account is suspended"), "{body}");
    // The grants the hook gave: alice's own user channel, not bob's.
    let mut alice = ws(a, "/ws?token=alice").await;
    assert_eq!(command(&mut alice, json!({"op":"subscribe","channel":"user:alice","id":1})).await["op"], "subscribed");
    assert_eq!(command(&mut alice, json!({"op":"subscribe","channel":"user:bob","id":2})).await["code"], "forbidden");
    assert_eq!(command(&mut alice, json!({"op":"subscribe","channel":"news","id":3})).await["code"], "forbidden");
    assert_eq!(state.connects.load(Ordering::Relaxed), 3);
    let m = metrics(&h).await;
    assert_eq!(metric(&m, "herald_proxy_calls_total{hook=\"connect\",result=\"ok\"}"), 1);
    assert_eq!(metric(&m, "herald_proxy_calls_total{hook=\"connect\",result=\"refused\"}"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscribe_hook_allows_and_refuses() {
    let (state, b) = backend().await;
    let h = herald_with(hooks_at(b, 2000, 100), |_| {});
    let a = addr(&h);
    let mut alice = ws(a, "/ws?token=alice").await;
    let r = command(&mut alice, json!({"op":"subscribe","channel":"board:private-plans","id":1})).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    assert!(r["message"].as_str().unwrap().contains("this board is private"), "{r}");
    assert_eq!(command(&mut alice, json!({"op":"subscribe","channel":"board:public","id":2})).await["op"], "subscribed");
    let mut admin = ws(a, "/ws?token=admin").await;
    assert_eq!(command(&mut admin, json!({"op":"subscribe","channel":"board:private-plans","id":1})).await["op"], "subscribed");
    // The channels of the query are asked about before the upgrade.
    let (status, _, _) = http(a, "GET", "/ws?token=alice&channel=board:private-plans", &WS_UPGRADE, b"").await;
    assert_eq!(status, 403);
    let _admin_sse = Sse::open(a, "channel=board:private-plans&token=admin").await;
    assert_eq!(state.subscribes.load(Ordering::Relaxed), 5);
    let m = metrics(&h).await;
    assert_eq!(metric(&m, "herald_proxy_calls_total{hook=\"subscribe\",result=\"refused\"}"), 2);
    assert_eq!(metric(&m, "herald_forbidden_total{action=\"subscribe\"}"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_missing_backend_is_unavailable_and_publishes_nothing() {
    let (state, b) = backend().await;
    let h = herald_with(hooks_at(b, 300, 100), |_| {});
    let a = addr(&h);
    let mut alice = ws(a, "/ws?token=alice").await;
    assert_eq!(command(&mut alice, json!({"op":"subscribe","channel":"board:x","id":1})).await["op"], "subscribed");
    let held = state.gate.write().await;
    let r = command(&mut alice, json!({"op":"publish","channel":"board:x","data":{"op":"add","text":"late"},"id":2})).await;
    drop(held);
    assert_eq!(r["code"], "unavailable", "{r}");
    assert!(r["message"].as_str().unwrap().contains("within 300 ms"), "{r}");
    assert_eq!(metric(&metrics(&h).await, "herald_proxy_calls_total{hook=\"publish\",result=\"timeout\"}"), 1);
    let (_, _, body) = http(a, "GET", "/history/board:x", &[], b"").await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["offset"], 0, "nothing published: {body}");

    // No backend at all: a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let h = herald_with(hooks_at(closed, 300, 100), |_| {});
    let (status, _, body) = http(addr(&h), "GET", "/ws?token=alice", &WS_UPGRADE, b"").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"unavailable\""), "{body}");
    assert_eq!(metric(&metrics(&h).await, "herald_proxy_calls_total{hook=\"connect\",result=\"error\"}"), 1);
    // The publish hook alone, its backend gone: the publish is refused,
    // nothing published, the connection stays.
    let h = start(2, |c| {
        c.proxy(ProxyConfig { publish_url: Some(format!("http://{closed}/herald/publish")), ..ProxyConfig::default() })
            .namespace("board", Namespace { client_publish: Some(true), publish_proxy: true, ..Namespace::default() });
    });
    let mut c = ws(addr(&h), "/ws").await;
    let r = command(&mut c, json!({"op":"publish","channel":"board:x","data":1,"id":1})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    let (_, _, body) = http(addr(&h), "GET", "/history/board:x", &[], b"").await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["offset"], 0, "{body}");
    assert_eq!(command(&mut c, json!({"op":"publish","channel":"news","data":2,"id":2})).await["op"], "published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_a_call_is_not_made_and_others_go_on() {
    let (state, b) = backend().await;
    // Only the publish hook, so connecting asks nothing.
    let proxy = ProxyConfig { connect_url: None, subscribe_url: None, ..hooks_at(b, 10_000, 1) };
    let h = start(2, |c| {
        c.proxy(proxy).namespace("board", Namespace { client_publish: Some(true), publish_proxy: true, ..Namespace::default() });
    });
    let a = addr(&h);
    let (mut first, mut second, mut other) = (ws(a, "/ws").await, ws(a, "/ws").await, ws(a, "/ws").await);
    let held = state.gate.write().await;
    send(&mut first, json!({"op":"publish","channel":"board:x","data":{"op":"add","text":"one"},"id":1})).await;
    wait_metric(&h, "herald_proxy_in_flight", |n| n == 1).await;
    let r = command(&mut second, json!({"op":"publish","channel":"board:x","data":{"op":"add","text":"two"},"id":2})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    assert!(r["message"].as_str().unwrap().contains("max_in_flight 1"), "{r}");
    // A publish that needs no hook is not held up.
    let r = command(&mut other, json!({"op":"publish","channel":"news","data":3,"id":3})).await;
    assert_eq!(r["op"], "published", "{r}");
    // The call in flight completes.
    drop(held);
    let r = next_json(&mut first).await;
    assert_eq!(r["op"], "published", "{r}");
    assert_eq!(state.items("board:x").len(), 1);
    assert_eq!(metric(&metrics(&h).await, "herald_proxy_calls_total{hook=\"publish\",result=\"overloaded\"}"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_the_hook_answers_late_is_not_acted_on_once_undone() {
    let (state, b) = backend().await;
    let h = herald_with(hooks_at(b, 10_000, 100), |_| {});
    let a = addr(&h);
    // Unsubscribed while the application is asked: the answer changes nothing.
    let mut alice = ws(a, "/ws?token=alice").await;
    let held = state.gate.write().await;
    send(&mut alice, json!({"op":"subscribe","channel":"board:x","id":1})).await;
    wait_metric(&h, "herald_proxy_in_flight", |n| n == 1).await;
    let r = command(&mut alice, json!({"op":"unsubscribe","channel":"board:x","id":2})).await;
    assert_eq!(r, json!({"op":"unsubscribed","channel":"board:x","id":2}));
    drop(held);
    assert_eq!(next_json(&mut alice).await, json!({"op":"unsubscribed","channel":"board:x","id":1}), "the subscribe's own answer");
    // The client goes while the application is asked: nothing is left of it.
    let mut bob = ws(a, "/ws?token=bob").await;
    let held = state.gate.write().await;
    send(&mut bob, json!({"op":"subscribe","channel":"board:y","id":1})).await;
    wait_metric(&h, "herald_proxy_in_flight", |n| n == 1).await;
    drop(bob);
    wait_metric(&h, "herald_connections_open{transport=\"ws\"}", |n| n == 1).await;
    drop(held);
    wait_metric(&h, "herald_proxy_calls_total{hook=\"subscribe\",result=\"ok\"}", |n| n == 2).await;
    let m = metrics(&h).await;
    assert_eq!(
        (metric(&m, "herald_subscriptions"), metric(&m, "herald_channels")),
        (0, 0),
        "no subscription was made for a closed connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_change_is_stored_once_and_published_once() {
    let (state, b) = backend().await;
    let h = herald_with(hooks_at(b, 2000, 100), |_| {});
    let mut alice = ws(addr(&h), "/ws?token=alice").await;
    let change = json!({"op":"publish","channel":"board:k","data":{"op":"add","text":"eggs"},"idempotency_key":"change-17","id":1});
    let first = command(&mut alice, change.clone()).await;
    let again = command(&mut alice, change).await;
    assert_eq!((first["op"].as_str(), first["offset"].as_u64()), (Some("published"), Some(1)), "{first}");
    assert_eq!(first["offset"], again["offset"], "{again}");
    assert_eq!(state.items("board:k").len(), 1, "the backend got the key and stored the change once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_answering_another_status_is_unavailable_not_a_refusal() {
    let (_state, b) = backend().await;
    // A wrong path: the backend answers 404.
    let proxy = ProxyConfig { connect_url: Some(format!("http://{b}/no/such/hook")), ..hooks_at(b, 2000, 100) };
    let h = herald_with(proxy, |_| {});
    let (status, _, body) = http(addr(&h), "GET", "/ws?token=alice", &WS_UPGRADE, b"").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("answered 404"), "{body}");
}
