//! Namespaces: `[namespaces.NAME]` options for the channels `NAME:…`, and
//! `[namespaces.default]` for the others, from a configuration file as an
//! operator writes one.

use herald::{Config, Herald};
use serde_json::{json, Value};

use crate::common::*;

const SECRET: &str = "a-test-secret-of-32-bytes-or-so!";

fn from_toml(text: &str) -> Config {
    let dir = std::env::temp_dir().join(format!("herald-ns-{}-{}", std::process::id(), fastrand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("herald.toml");
    std::fs::write(&path, text).unwrap();
    let c = Config::from_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    c.unwrap()
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos().into()
}

fn serve(mut c: Config) -> Herald {
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.shards(2);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Herald::start_on(listener, c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_namespace_keeps_its_own_history_and_publish_switch() {
    let h = serve(from_toml(
        r#"
        history_size = 100

        [namespaces.default]
        history_size = 0

        [namespaces.chat]
        history_size = 2

        [namespaces.feed]
        client_publish = false
        "#,
    ));
    let a = addr(&h);
    for ch in ["chat:room", "news", "feed:x"] {
        for i in 1..=5 {
            assert_eq!(publish(a, ch, &i.to_string(), true).await.0, 200);
        }
    }
    let history = |ch: &'static str| async move {
        let (_, _, body) = http(a, "GET", &format!("/history/{ch}"), &[], b"").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        v["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(history("chat:room").await, vec![4, 5], "chat keeps 2");
    assert_eq!(history("news").await, Vec::<u64>::new(), "the default keeps none");
    assert_eq!(history("feed:x").await, vec![1, 2, 3, 4, 5], "feed takes the top-level 100");
    let mut c = ws(a, "/ws").await;
    let r = command(&mut c, json!({"op": "subscribe", "channel": "news", "since": "zzzzzzzz:1"})).await;
    assert_eq!(r["recovered"], false, "no history: nothing to recover: {r}");
    let r = command(&mut c, json!({"op": "publish", "channel": "feed:x", "data": 1})).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let r = command(&mut c, json!({"op": "publish", "channel": "chat:room", "data": 1})).await;
    assert_eq!(r["op"], "published", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_namespace_is_open_to_connections_without_a_token() {
    let h = serve(from_toml(&format!(
        r#"
        [auth]
        hmac_secret = "{SECRET}"

        [namespaces.public]
        anonymous = true

        [namespaces.user]
        anonymous = true
        "#
    )));
    let a = addr(&h);
    let mut sse = Sse::open(a, "channel=public:scores").await;
    assert_eq!(sse.next_event().await.unwrap().0, "subscribed");
    let mut c = ws(a, "/ws").await;
    let r = command(&mut c, json!({"op": "subscribe", "channel": "public:news"})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    for ch in ["news", "user:42"] {
        let r = command(&mut c, json!({"op": "subscribe", "channel": ch})).await;
        assert_eq!(r["code"], "forbidden", "{ch}: a user channel is never anonymous: {r}");
    }
    let r = command(&mut c, json!({"op": "publish", "channel": "public:news", "data": 1})).await;
    assert_eq!(r["code"], "forbidden", "anonymous connections never publish: {r}");
}

#[test]
fn namespace_mistakes_are_errors() {
    let dir = std::env::temp_dir().join(format!("herald-ns-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (text, want) in [
        ("[namespaces.chat]\nhistory_sise = 2\n", "unknown field `history_sise`"),
        ("[namespaces.chat]\njoin_leave = true\n", "namespaces.chat.join_leave needs presence = true"),
        ("[namespaces.chat]\npublish_proxy = true\n", "namespaces.chat.publish_proxy needs [proxy] publish_url"),
        ("[proxy]\npublish_url = \"https://app/hook\"\n", "must be an http://host[:port]/path URL"),
        ("[namespaces.\"a:b\"]\nanonymous = true\n", "namespace \"a:b\""),
        ("[namespaces.chat]\nhistory_ttl_s = 0\n", "namespaces.chat.history_ttl_s must be at least 1"),
        ("redis_counter_ttl_ms = 60000\n[namespaces.chat]\nhistory_ttl_s = 3600\n", "the longest history_ttl_s"),
    ] {
        let path = dir.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let e = Config::from_file(&path).and_then(|c| c.validated()).unwrap_err().to_string();
        assert!(e.contains(want), "{text:?}: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
