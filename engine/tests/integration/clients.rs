//! herald.js (clients/js) in Node, driven by clients/js/test/driver.mjs,
//! against Herald on real sockets: commands matched to replies,
//! reconnection through a proxy the test cuts, recovery from the last
//! position, gaps, token refresh, and GET /herald.js.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::common::*;

/// herald.js in a Node process.
struct Client {
    _child: Child,
    stdin: ChildStdin,
    events: Lines<BufReader<ChildStdout>>,
    n: u64,
    /// Events read while looking for another.
    seen: Vec<Value>,
}

impl Client {
    fn start(url: &str, token: Option<&str>, refresh: bool) -> Client {
        let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/js/test/driver.mjs");
        let mut child = Command::new("node")
            .args(["--experimental-websocket", "--no-warnings", driver, url, token.unwrap_or("-")])
            .args(refresh.then_some("refresh"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node is on PATH");
        let stdin = child.stdin.take().unwrap();
        let events = BufReader::new(child.stdout.take().unwrap()).lines();
        Client { _child: child, stdin, events, n: 0, seen: Vec::new() }
    }

    async fn send(&mut self, mut cmd: Value) -> u64 {
        self.n += 1;
        cmd["n"] = self.n.into();
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await.unwrap();
        self.n
    }

    /// The next event matching `want` (earlier ones are kept in `seen`).
    async fn until(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.seen.iter().position(&want) {
            return self.seen.remove(i);
        }
        loop {
            let line = tokio::time::timeout(WAIT, self.events.next_line()).await.expect("timed out waiting for the client").unwrap();
            let v: Value = serde_json::from_str(&line.expect("the client exited")).unwrap();
            if want(&v) {
                return v;
            }
            self.seen.push(v);
        }
    }

    async fn event(&mut self, ev: &str) -> Value {
        let ev = ev.to_string();
        self.until(move |v| v["ev"] == ev.as_str()).await
    }

    /// Runs a command and returns its result (`value`, or `error`).
    async fn call(&mut self, cmd: Value) -> Value {
        let n = self.send(cmd).await;
        self.until(move |v| v["ev"] == "result" && v["n"] == n).await
    }

    /// The data of the next `count` messages, in order.
    async fn messages(&mut self, count: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < count {
            let m = self.event("message").await;
            out.push(m["data"].clone());
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_get_their_replies_and_messages_arrive_in_order() {
    let h = start(2, |c| {
        c.namespace("room", herald::Namespace { presence: true, ..Default::default() });
    });
    let mut c = Client::start(&format!("ws://{}/ws", addr(&h)), None, false);
    c.event("connected").await;
    let r = c.call(json!({"do":"subscribe","channel":"news"})).await;
    assert_eq!(r["value"]["offset"], 0, "{r}");
    for i in 1..=3 {
        let r = c.call(json!({"do":"publish","channel":"news","data":{"n":i}})).await;
        assert_eq!(r["value"]["offset"], i, "{r}");
    }
    assert_eq!(c.messages(3).await, [json!({"n":1}), json!({"n":2}), json!({"n":3})]);
    let r = c.call(json!({"do":"history","channel":"news","limit":2})).await;
    assert_eq!(r["value"]["publications"].as_array().unwrap().len(), 2, "{r}");
    let r = c.call(json!({"do":"publish","channel":"bad name","data":1})).await;
    assert_eq!(r["error"], "bad_channel", "{r}");
    let r = c.call(json!({"do":"subscribe","channel":"room:1"})).await;
    assert!(r["value"]["epoch"].is_string(), "{r}");
    let r = c.call(json!({"do":"presence","channel":"room:1"})).await;
    assert_eq!(r["value"]["clients"], 1, "{r}");
    // Publishes from elsewhere arrive too.
    assert_eq!(publish(addr(&h), "news", "from http", false).await.0, 200);
    assert_eq!(c.messages(1).await, [json!("from http")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_comes_back_and_recovers_what_it_missed_once() {
    let h = start(2, |_| {});
    let proxy = Proxy::start(addr(&h)).await;
    let mut c = Client::start(&format!("ws://{}/ws", proxy.addr), None, false);
    c.event("connected").await;
    c.call(json!({"do":"subscribe","channel":"doc"})).await;
    for i in 1..=2 {
        publish(addr(&h), "doc", &i.to_string(), true).await;
    }
    assert_eq!(c.messages(2).await, [json!(1), json!(2)]);
    proxy.cut();
    let d = c.event("disconnected").await;
    assert_eq!(d["reconnect"], true, "{d}");
    // Published while the client is away.
    for i in 3..=5 {
        publish(addr(&h), "doc", &i.to_string(), true).await;
    }
    c.event("connected").await;
    publish(addr(&h), "doc", "6", true).await;
    assert_eq!(c.messages(4).await, [json!(3), json!(4), json!(5), json!(6)], "each once, in order");
    assert!(!c.seen.iter().any(|e| e["ev"] == "gap"), "{:?}", c.seen);
    let pos = c.call(json!({"do":"position","channel":"doc"})).await;
    assert!(pos["value"].as_str().unwrap().ends_with(":6"), "{pos}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_recovered_is_a_gap() {
    let h = start(2, |c| {
        c.history_size(3).recovery_max(3);
    });
    let proxy = Proxy::start(addr(&h)).await;
    let mut c = Client::start(&format!("ws://{}/ws", proxy.addr), None, false);
    c.event("connected").await;
    c.call(json!({"do":"subscribe","channel":"doc"})).await;
    proxy.cut();
    c.event("disconnected").await;
    for i in 1..=10 {
        publish(addr(&h), "doc", &i.to_string(), true).await;
    }
    c.event("connected").await;
    let g = c.event("gap").await;
    assert_eq!((g["channel"].as_str(), g["reason"].as_str()), (Some("doc"), Some("not_recovered")), "{g}");
    publish(addr(&h), "doc", "11", true).await;
    assert_eq!(c.messages(1).await, [json!(11)], "live again from the top");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_refreshed_before_it_expires() {
    let h = start(2, |c| {
        c.auth_hmac_secret(SECRET);
    });
    let mut c = Client::start(&format!("ws://{}/ws", addr(&h)), None, true);
    c.event("token?").await;
    // Expires in 31 s: refreshed 30 s before, so after a second.
    let first = user_token("42", 31);
    c.send(json!({"do":"token","token":first})).await;
    c.event("connected").await;
    c.call(json!({"do":"subscribe","channel":"user:42"})).await;
    c.event("token?").await;
    c.send(json!({"do":"token","token":user_token("42", 3600)})).await;
    wait_metric(&h, "herald_auth_refreshes_total", |n| n == 1).await;
    assert_eq!(publish(addr(&h), "user:42", "still here", false).await.0, 200);
    assert_eq!(c.messages(1).await, [json!("still here")]);
    assert!(!c.seen.iter().any(|e| e["ev"] == "disconnected"), "{:?}", c.seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_disconnect_is_final() {
    let h = start(2, |c| {
        c.auth_hmac_secret(SECRET);
    });
    let mut c = Client::start(&format!("ws://{}/ws", addr(&h)), Some(&user_token("42", 3600)), false);
    c.event("connected").await;
    let (status, _, _) = http(addr(&h), "POST", "/api/disconnect", &[("content-type", "application/json")], br#"{"user":"42"}"#).await;
    assert_eq!(status, 200);
    let d = c.event("disconnected").await;
    assert_eq!((d["code"].as_u64(), d["reconnect"].as_bool()), (Some(4002), Some(false)), "{d}");
    let r = c.call(json!({"do":"publish","channel":"news","data":1})).await;
    assert_eq!(r["error"], "closed", "a command after a final close fails at once: {r}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metric(&h.metrics_text(), "herald_connections_total{transport=\"ws\"}"), 1, "it did not come back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_js_is_served() {
    let h = start(1, |_| {});
    let (status, head, body) = http(addr(&h), "GET", "/herald.js", &[("origin", "https://app.example")], b"").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(head.contains("access-control-allow-origin: https://app.example"), "{head}");
    assert_eq!(body, std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/js/herald.js")).unwrap());
}

/// The Python snippet of docs/clients.md, as written there.
fn python_snippet() -> String {
    let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/clients.md"));
    let start = doc.find("```python\n").expect("docs/clients.md has a python block") + "```python\n".len();
    doc[start..start + doc[start..].find("```").unwrap()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_snippet_of_the_docs_subscribes_publishes_and_recovers() {
    let h = start(2, |_| {});
    let dir = std::env::temp_dir().join(format!("herald-py-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("snippet.py");
    std::fs::write(&script, python_snippet()).unwrap();
    let state = dir.join("position.txt");
    let run = || {
        let out = std::process::Command::new("python3")
            .arg(&script)
            .env("HERALD_URL", format!("ws://{}/ws", addr(&h)))
            .env("HERALD_STATE", &state)
            .output()
            .unwrap();
        assert!(out.status.success(), "the snippet failed (is websocket-client installed?): {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run(), "message 1 {\"from\": \"python\"}\n");
    // Published while it was away: recovered first, then its own.
    for text in ["a", "b"] {
        assert_eq!(publish(addr(&h), "news", text, false).await.0, 200);
    }
    assert_eq!(run(), "message 2 \"a\"\nmessage 3 \"b\"\nmessage 4 {\"from\": \"python\"}\n");
    let _ = std::fs::remove_dir_all(&dir);
}
