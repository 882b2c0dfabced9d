//! Presence: who is subscribed, join and leave events, on one node and
//! across nodes sharing a Redis (one of them killed with SIGKILL).

use std::time::Duration;

use herald::{Herald, Namespace};
use serde_json::{json, Value};

use crate::broker::{ready, RedisServer};
use crate::common::*;

const KEY: &str = "an-api-key-for-the-tests";

fn token(user: &str) -> String {
    user_token(user, 3600)
}

/// A node with presence and join/leave on `chat:…`, presence alone on
/// `room:…`, none elsewhere.
fn node(redis: Option<&str>) -> Herald {
    let h = start(2, |c| {
        c.auth_hmac_secret(SECRET).api_key(KEY).presence_ttl_s(3);
        c.namespace("chat", Namespace { presence: true, join_leave: true, anonymous: true, ..Namespace::default() });
        c.namespace("room", Namespace { presence: true, ..Namespace::default() });
        if let Some(url) = redis {
            c.redis(url).redis_timeout(Duration::from_millis(500));
        }
    });
    match redis {
        Some(_) => ready(h),
        None => h,
    }
}

async fn joined(h: &Herald, user: Option<&str>, channel: &str) -> Ws {
    let path = match user {
        Some(u) => format!("/ws?token={}", token(u)),
        None => "/ws".to_string(),
    };
    let mut c = ws(addr(h), &path).await;
    let r = command(&mut c, json!({"op":"subscribe","channel":channel,"id":1})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    c
}

/// The next join or leave a client receives, as ("join", user).
async fn next_event(c: &mut Ws) -> (String, String) {
    let v = next_json(c).await;
    (v["op"].as_str().unwrap_or_default().to_string(), v["user"].as_str().unwrap_or_default().to_string())
}

/// Sends a command and returns its reply, past the join and leave events
/// queued before it.
async fn ask(c: &mut Ws, v: Value) -> Value {
    crate::common::send(c, v).await;
    loop {
        let r = next_json(c).await;
        if r["op"] != "join" && r["op"] != "leave" {
            return r;
        }
    }
}

fn ev(op: &str, user: &str) -> (String, String) {
    (op.to_string(), user.to_string())
}

async fn presence(c: &mut Ws, channel: &str) -> Value {
    let mut v = command(c, json!({"op":"presence","channel":channel,"id":9})).await;
    assert_eq!(v["op"], "presence", "{v}");
    v.as_object_mut().unwrap().remove("id");
    v
}

/// `presence`'s `key` once it is `want`: across nodes, a change reaches
/// Redis through each node's presence writer, after the reply that made it.
async fn settled(c: &mut Ws, channel: &str, key: &str, want: Value) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = presence(c, channel).await;
        if v[key] == want || tokio::time::Instant::now() > deadline {
            assert_eq!(v[key], want, "{v}");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_counts_users_once_and_announces_first_and_last_connections() {
    let h = node(None);
    let mut carol = joined(&h, Some("carol"), "chat:1").await;
    assert_eq!(next_event(&mut carol).await, ev("join", "carol"), "a subscriber sees its own join");
    let mut phone = joined(&h, Some("alice"), "chat:1").await;
    assert_eq!(next_event(&mut carol).await, ev("join", "alice"));
    let laptop = joined(&h, Some("alice"), "chat:1").await;
    let _anon = joined(&h, None, "chat:1").await;
    let _dave = joined(&h, Some("dave"), "chat:1").await;
    assert_eq!(next_event(&mut carol).await, ev("join", "dave"), "alice's second device and the anonymous one made no join");
    assert_eq!(
        presence(&mut carol, "chat:1").await,
        json!({"op":"presence","channel":"chat:1","clients":5,"users":["alice","carol","dave"]})
    );
    let mut sse = Sse::open(addr(&h), &format!("channel=chat:1&token={}", token("erin"))).await;
    assert!(sse.next_block().await.unwrap().starts_with("event: subscribed"));
    assert_eq!(sse.next_block().await.unwrap(), "event: join\ndata: {\"op\":\"join\",\"channel\":\"chat:1\",\"user\":\"erin\"}");
    assert_eq!(next_event(&mut carol).await, ev("join", "erin"));
    // One device of alice's goes: she is still there.
    drop(laptop);
    wait_metric(&h, "herald_subscriptions", |n| n == 5).await;
    assert_eq!(presence(&mut carol, "chat:1").await["users"], json!(["alice", "carol", "dave", "erin"]));
    // Her last one unsubscribes: she leaves.
    assert_eq!(ask(&mut phone, json!({"op":"unsubscribe","channel":"chat:1","id":2})).await["op"], "unsubscribed");
    assert_eq!(next_event(&mut carol).await, ev("leave", "alice"));
    assert_eq!(sse.next_block().await.unwrap(), "event: leave\ndata: {\"op\":\"leave\",\"channel\":\"chat:1\",\"user\":\"alice\"}");
    let (status, _, body) = http(addr(&h), "GET", "/presence/chat:1", &[("authorization", &format!("Bearer {KEY}"))], b"").await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"channel":"chat:1","clients":4,"users":["carol","dave","erin"]}));
    let m = h.metrics_text();
    assert_eq!(metric(&m, "herald_presence_events_total{event=\"join\"}"), 4);
    assert_eq!(metric(&m, "herald_presence_events_total{event=\"leave\"}"), 1);
    assert_eq!(metric(&m, "herald_presence_entries"), 4, "carol, dave, erin and the anonymous connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_without_join_leave_and_where_it_is_off() {
    let h = node(None);
    let mut a = joined(&h, Some("a"), "room:1").await;
    let _b = joined(&h, Some("b"), "room:1").await;
    assert_eq!(presence(&mut a, "room:1").await["users"], json!(["a", "b"]));
    let r = command(&mut a, json!({"op":"presence","channel":"news","id":3})).await;
    assert_eq!(r["code"], "bad_request", "{r}");
    assert!(r["message"].as_str().unwrap().contains("presence is off"), "{r}");
    let (status, _, _) = http(addr(&h), "GET", "/presence/room:1", &[], b"").await;
    assert_eq!(status, 401, "the API key");
    // No join event came to room:1's subscribers: the next frame is a message.
    let (status, _, _) = http(addr(&h), "POST", "/publish/room:1", &[("authorization", &format!("Bearer {KEY}"))], b"hi").await;
    assert_eq!(status, 200);
    assert_eq!(next_json(&mut a).await["data"], "hi");
    // A user with more than 1,000 names listed is cut, and said so.
    let mut users: Vec<Ws> = Vec::new();
    for i in 0..1001 {
        let mut c = ws(addr(&h), &format!("/ws?token={}", token(&format!("u{i:04}")))).await;
        crate::common::send(&mut c, json!({"op":"subscribe","channel":"room:big"})).await;
        users.push(c);
    }
    wait_metric(&h, "herald_subscriptions", |n| n == 1003).await;
    let v = presence(&mut a, "room:big").await;
    assert_eq!((v["clients"].as_u64(), v["users"].as_array().unwrap().len(), &v["truncated"]), (Some(1001), 1000, &json!(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_presence_and_join_leave_through_redis() {
    let redis = RedisServer::start(&[]);
    let (a, b) = (node(Some(&redis.url())), node(Some(&redis.url())));
    let mut carol = joined(&a, Some("carol"), "chat:x").await;
    assert_eq!(next_event(&mut carol).await, ev("join", "carol"));
    let mut on_b = joined(&b, Some("alice"), "chat:x").await;
    assert_eq!(next_event(&mut carol).await, ev("join", "alice"), "a join on node B reaches node A");
    assert_eq!(next_event(&mut on_b).await, ev("join", "alice"));
    // Alice's second device, on node A: no second join.
    let mut on_a = joined(&a, Some("alice"), "chat:x").await;
    let _dave = joined(&b, Some("dave"), "chat:x").await;
    assert_eq!(next_event(&mut carol).await, ev("join", "dave"));
    settled(&mut carol, "chat:x", "users", json!(["alice", "carol", "dave"])).await;
    settled(&mut carol, "chat:x", "clients", json!(4)).await;
    // Her device on B leaves: she is still on A.
    assert_eq!(ask(&mut on_b, json!({"op":"unsubscribe","channel":"chat:x","id":2})).await["op"], "unsubscribed");
    settled(&mut carol, "chat:x", "clients", json!(3)).await;
    assert_eq!(ask(&mut on_a, json!({"op":"unsubscribe","channel":"chat:x","id":2})).await["op"], "unsubscribed");
    assert_eq!(next_event(&mut carol).await, ev("leave", "alice"), "her last device, on the other node, left");
    settled(&mut carol, "chat:x", "users", json!(["carol", "dave"])).await;
    let fields: Vec<String> = redis.query(&["HKEYS", "herald:{chat:x}:presence"]).unwrap();
    assert_eq!(fields.len(), 2, "one field per user and node: {fields:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_the_presence_within_its_ttl() {
    let redis = RedisServer::start(&[]);
    let a = node(Some(&redis.url()));
    let dir = std::env::temp_dir().join(format!("herald-presence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("herald.toml");
    std::fs::write(&config, "presence_ttl_s = 3\n[namespaces.chat]\npresence = true\njoin_leave = true\n").unwrap();
    let url = redis.url();
    let mut b = spawn_herald(&["--config", config.to_str().unwrap(), "--redis", &url, "--auth-hmac-secret", SECRET]).await;
    let mut carol = joined(&a, Some("carol"), "chat:k").await;
    assert_eq!(next_event(&mut carol).await, ev("join", "carol"));
    let (mut bob, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?token={}", b.addr, token("bob"))).await.unwrap();
    let r = command(&mut bob, json!({"op":"subscribe","channel":"chat:k","id":1})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    assert_eq!(next_event(&mut carol).await, ev("join", "bob"));
    assert_eq!(presence(&mut carol, "chat:k").await["users"], json!(["bob", "carol"]));
    b.child.start_kill().unwrap();
    b.child.wait().await.unwrap();
    // Node B's entries expire after presence_ttl_s (3 s), and node A's
    // next refresh (every second) sweeps them and announces the leave.
    assert_eq!(next_event(&mut carol).await, ev("leave", "bob"));
    assert_eq!(presence(&mut carol, "chat:k").await, json!({"op":"presence","channel":"chat:k","clients":1,"users":["carol"]}));
    assert_eq!(metric(&a.metrics_text(), "herald_presence_nodes_swept_total"), 1);
    drop(bob);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_takes_its_users_out_of_presence_at_once() {
    let redis = RedisServer::start(&[]);
    let a = node(Some(&redis.url()));
    // A long TTL: only the stopping node's own cleanup can explain a quick leave.
    let b = ready(start(2, |c| {
        c.auth_hmac_secret(SECRET).presence_ttl_s(600).redis(redis.url()).redis_timeout(Duration::from_millis(500));
        c.namespace("chat", Namespace { presence: true, join_leave: true, ..Namespace::default() });
    }));
    let mut carol = joined(&a, Some("carol"), "chat:s").await;
    assert_eq!(next_event(&mut carol).await, ev("join", "carol"));
    let _bob = joined(&b, Some("bob"), "chat:s").await;
    assert_eq!(next_event(&mut carol).await, ev("join", "bob"));
    b.shutdown(Duration::from_secs(1)).await;
    assert_eq!(next_event(&mut carol).await, ev("leave", "bob"));
    assert_eq!(presence(&mut carol, "chat:s").await["users"], json!(["carol"]));
    let nodes: Vec<String> = redis.query(&["ZRANGE", "herald:{chat:s}:presence:nodes", "0", "-1"]).unwrap();
    assert_eq!(nodes.len(), 1, "the stopped node left the channel's set: {nodes:?}");
}
