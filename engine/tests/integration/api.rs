//! The server API (`/api/*`): broadcast, disconnect and unsubscribe a user
//! (on every node, through Redis), this node's channels and numbers.

use std::time::Duration;

use herald::Herald;
use serde_json::{json, Value};

use crate::broker::{ready, RedisServer};
use crate::common::*;

const KEY: &str = "an-api-key-for-the-tests";
const BEARER: (&str, &str) = ("authorization", "Bearer an-api-key-for-the-tests");

fn token(user: &str) -> String {
    user_token(user, 3600)
}

fn node(redis: Option<&str>) -> Herald {
    let h = start(2, |c| {
        c.auth_hmac_secret(SECRET).api_key(KEY);
        if let Some(url) = redis {
            c.redis(url).redis_timeout(Duration::from_millis(500));
        }
    });
    match redis {
        Some(_) => ready(h),
        None => h,
    }
}

async fn api(h: &Herald, method: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, _, text) = http(addr(h), method, path, &[BEARER, ("content-type", "application/json")], body.to_string().as_bytes()).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text:?}")))
}

/// `POST /publish/{channel}` of a text, with the API key.
async fn post(h: &Herald, channel: &str, text: &str) -> u16 {
    http(addr(h), "POST", &format!("/publish/{channel}"), &[BEARER], text.as_bytes()).await.0
}

async fn user_ws(h: &Herald, user: &str, channel: &str) -> Ws {
    let mut c = ws(addr(h), &format!("/ws?token={}", token(user))).await;
    let r = command(&mut c, json!({"op":"subscribe","channel":channel,"id":1})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_answers_one_result_per_channel() {
    let h = node(None);
    let mut subs = Vec::new();
    for i in [0, 42, 99] {
        subs.push(user_ws(&h, "7", &format!("room:{i}")).await);
    }
    let mut channels: Vec<String> = (0..100).map(|i| format!("room:{i}")).collect();
    channels[50] = "room 50".into();
    let (status, v) = api(&h, "POST", "/api/broadcast", json!({"channels": channels, "data": {"notice": "maintenance"}})).await;
    assert_eq!(status, 200, "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 100);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["channel"], channels[i].as_str());
        if i == 50 {
            assert_eq!(r["error"]["code"], "bad_channel", "{r}");
        } else {
            assert_eq!((r["offset"].as_u64(), r["epoch"].as_str().map(str::len)), (Some(1), Some(8)), "{r}");
        }
    }
    for s in &mut subs {
        assert_eq!(next_json(s).await["data"], json!({"notice": "maintenance"}));
    }
    // Wrong shapes are refused whole.
    for bad in [json!({"channels": [], "data": 1}), json!({"channels": ["a"]}), json!({"channel": "a", "data": 1})] {
        let (status, v) = api(&h, "POST", "/api/broadcast", bad.clone()).await;
        assert_eq!((status, v["code"].as_str()), (400, Some("bad_request")), "{bad}: {v}");
    }
    let m = h.metrics_text();
    assert_eq!(metric(&m, "herald_api_calls_total{method=\"broadcast\",result=\"ok\"}"), 1);
    assert_eq!(metric(&m, "herald_api_calls_total{method=\"broadcast\",result=\"error\"}"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_its_key() {
    let h = node(None);
    for (method, path) in [("POST", "/api/broadcast"), ("POST", "/api/disconnect"), ("GET", "/api/channels"), ("GET", "/api/stats")] {
        let (status, head, _) = http(addr(&h), method, path, &[], b"{}").await;
        assert_eq!(status, 401, "{method} {path}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
    }
    let (status, _, _) = http(addr(&h), "GET", "/api/broadcast", &[BEARER], b"").await;
    assert_eq!(status, 405);
    // A body that is not declared JSON (what a page of another site can
    // send without a preflight) is refused.
    let body = br#"{"channels":["a"],"data":1}"#;
    let (status, _, text) = http(addr(&h), "POST", "/api/broadcast", &[BEARER, ("content-type", "text/plain")], body).await;
    assert_eq!(status, 415, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_removes_one_users_subscriptions_and_tells_them() {
    let h = node(None);
    let mut alice = user_ws(&h, "alice", "doc:1").await;
    assert_eq!(command(&mut alice, json!({"op":"subscribe","channel":"doc:2","id":2})).await["op"], "subscribed");
    let mut bob = user_ws(&h, "bob", "doc:1").await;
    let mut alice_sse = Sse::open(addr(&h), &format!("channel=doc:1&token={}", token("alice"))).await;
    assert!(alice_sse.next_block().await.unwrap().starts_with("event: subscribed"));
    let (status, v) = api(&h, "POST", "/api/unsubscribe", json!({"user": "alice", "channel": "doc:1"})).await;
    assert_eq!((status, &v), (200, &json!({"connections": 2})));
    assert_eq!(next_json(&mut alice).await, json!({"op":"unsubscribed","channel":"doc:1"}));
    assert_eq!(alice_sse.next_block().await, None, "the stream had no other channel: it ended");
    assert_eq!(post(&h, "doc:1", "after").await, 200);
    assert_eq!(post(&h, "doc:2", "still").await, 200);
    assert_eq!(next_json(&mut alice).await["channel"], "doc:2", "doc:1's message did not come");
    assert_eq!(next_json(&mut bob).await["data"], "after");
    let (status, v) = api(&h, "POST", "/api/unsubscribe", json!({"user": "alice"})).await;
    assert_eq!((status, v["code"].as_str()), (400, Some("bad_request")), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_and_stats_describe_this_node() {
    let h = node(None);
    let _a = user_ws(&h, "1", "busy").await;
    let _b = user_ws(&h, "2", "busy").await;
    let _c = user_ws(&h, "3", "quiet").await;
    let (status, v) = api(&h, "GET", "/api/channels", json!(null)).await;
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"channels": [{"channel": "busy", "subscribers": 2}, {"channel": "quiet", "subscribers": 1}], "total": 2, "truncated": false})
    );
    let (_, v) = api(&h, "GET", "/api/channels?limit=1", json!(null)).await;
    assert_eq!((v["channels"].as_array().unwrap().len(), &v["truncated"]), (1, &json!(true)));
    assert_eq!(post(&h, "busy", "x").await, 200);
    wait_metric(&h, "herald_frames_delivered_total{transport=\"ws\"}", |n| n == 2).await;
    let (status, s) = api(&h, "GET", "/api/stats", json!(null)).await;
    assert_eq!(status, 200, "{s}");
    let m = h.metrics_text();
    assert_eq!(s["connections"]["ws"], metric(&m, "herald_connections_open{transport=\"ws\"}"));
    assert_eq!(s["subscriptions"], 3);
    assert_eq!(s["channels"], 2);
    assert_eq!(s["published"], 1);
    assert_eq!(s["delivered"]["ws"], 2);
    assert_eq!(s["broker"], "local");
    assert_eq!(s["publish_to_write"]["count"], 2);
    let counts: u64 = s["publish_to_write"]["counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum();
    assert_eq!(counts + s["publish_to_write"]["over"].as_u64().unwrap(), 2);
    assert_eq!(s["publish_to_write"]["le_s"].as_array().unwrap().len(), s["publish_to_write"]["counts"].as_array().unwrap().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_a_users_connections_on_every_node() {
    let redis = RedisServer::start(&[]);
    let (a, b) = (node(Some(&redis.url())), node(Some(&redis.url())));
    for h in [&a, &b] {
        wait_metric(h, "herald_broker_control_up", |n| n == 1).await;
    }
    let mut on_a = user_ws(&a, "42", "news").await;
    let mut on_b = user_ws(&b, "42", "user:42").await;
    let mut sse_on_b = Sse::open(addr(&b), &format!("channel=news&token={}", token("42"))).await;
    assert!(sse_on_b.next_block().await.unwrap().starts_with("event: subscribed"));
    let mut other = user_ws(&b, "43", "news").await;
    let (status, v) = api(&a, "POST", "/api/disconnect", json!({"user": "42"})).await;
    assert_eq!((status, &v), (200, &json!({"connections": 1, "nodes": 1})));
    assert_eq!(close_of(&mut on_a).await, (4002, "disconnected".to_string()));
    assert_eq!(close_of(&mut on_b).await, (4002, "disconnected".to_string()));
    assert_eq!(sse_on_b.next_block().await, None);
    // Gone: the server need not wait for their close replies.
    drop((on_a, on_b));
    wait_metric(&b, "herald_disconnects_total{reason=\"server_api\"}", |n| n == 2).await;
    assert_eq!(metric(&b.metrics_text(), "herald_broker_commands_total"), 1);
    // Another user on that node is untouched.
    assert_eq!(post(&a, "news", "still here").await, 200);
    assert_eq!(next_json(&mut other).await["data"], "still here");
}
