//! A real browser: Debian's Chromium, driven by playwright-core from
//! Node (engine/tests/browser; `.ci/run` installs both). Its own
//! EventSource reconnects with `Last-Event-ID` after the stream is cut and
//! gets what was published meanwhile, exactly once.

use std::net::SocketAddr;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdout, Command};

use crate::common::*;

struct Browser {
    child: Child,
    events: BufReader<ChildStdout>,
}

impl Browser {
    /// A page of `origin` (the server's), or of `page_origin`, another one.
    fn open(origin: &str, channel: &str, page_origin: Option<&str>) -> Browser {
        Browser::open_with_token(origin, channel, page_origin, None)
    }

    /// As [`Browser::open`], the EventSource carrying a connection token.
    fn open_with_token(origin: &str, channel: &str, page_origin: Option<&str>, token: Option<&str>) -> Browser {
        let args: Vec<&str> = [origin, channel].into_iter().chain(page_origin).chain(token).collect();
        Browser::script("eventsource", &args)
    }

    /// Runs engine/tests/browser/NAME.mjs with `args`: it reports events
    /// on stdout and runs until its stdin closes.
    fn script(name: &str, args: &[&str]) -> Browser {
        let mut child = Command::new("node")
            .arg(format!("{}/{name}.mjs", browser_dir()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node");
        let events = BufReader::new(child.stdout.take().unwrap());
        Browser { child, events }
    }

    /// The next event the page saw, within [`WAIT`].
    async fn next(&mut self) -> Value {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT * 3, self.events.read_line(&mut line)).await.expect("no event from the browser").unwrap();
        assert!(n > 0, "the browser script ended");
        serde_json::from_str(&line).unwrap()
    }

    /// The next event of `kind`, skipping the others.
    async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let e = self.next().await;
            if e["type"] == kind {
                return e;
            }
        }
    }
}

/// A server of plain pages on another port: another origin than Herald's.
async fn page_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let page = "<!doctype html><title>app</title>";
                let head =
                    format!("HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", page.len());
                let _ = s.write_all(format!("{head}{page}").as_bytes()).await;
            });
        }
    });
    addr
}

/// The browser receives 1–3, the stream is cut, 4–6 are published while it
/// is away, and its own reconnect with `Last-Event-ID` delivers 4–6 exactly
/// once, then live 7.
async fn recovers_after_a_cut(b: &mut Browser, a: SocketAddr, proxy: &Proxy) {
    let sub: Value = serde_json::from_str(b.next_of("subscribed").await["data"].as_str().unwrap()).unwrap();
    let epoch = sub["epoch"].as_str().unwrap().to_string();
    let top = sub["offset"].as_u64().unwrap();
    for i in 1..=3 {
        assert_eq!(publish(a, "room", &i.to_string(), true).await.0, 200);
    }
    for i in 1..=3 {
        let m = b.next_of("message").await;
        assert_eq!(m["id"], format!("{epoch}:{}", top + i), "{m}");
    }
    // The stream is cut; while the browser is away, 4–6 are published.
    proxy.cut();
    b.next_of("error").await;
    for i in 4..=6 {
        assert_eq!(publish(a, "room", &i.to_string(), true).await.0, 200);
    }
    // Its own reconnect sends Last-Event-ID: it recovers 4–6, then live.
    let sub: Value = serde_json::from_str(b.next_of("subscribed").await["data"].as_str().unwrap()).unwrap();
    assert_eq!(sub["recovered"], true, "{sub}");
    for i in 4..=6 {
        let m = b.next_of("message").await;
        let data: Value = serde_json::from_str(m["data"].as_str().unwrap()).unwrap();
        assert_eq!((m["id"].as_str(), data["offset"].as_u64()), (Some(format!("{epoch}:{}", top + i).as_str()), Some(top + i)), "{m}");
    }
    assert_eq!(publish(a, "room", "7", true).await.0, 200);
    let m = b.next_of("message").await;
    assert_eq!(m["id"], format!("{epoch}:{}", top + 7), "each exactly once, then live: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_eventsource_recovers_with_last_event_id() {
    let h = start(2, |_| {});
    let a = addr(&h);
    let proxy = Proxy::start(a).await;
    let mut b = Browser::open(&format!("http://{}", proxy.addr), "room", None);
    recovers_after_a_cut(&mut b, a, &proxy).await;
    drop(b.child.stdin.take());
    let _ = tokio::time::timeout(WAIT, b.child.wait()).await;
}

/// A page on another origin: allowed, it reads history with fetch and its
/// EventSource, carrying the user's token in its URL, recovers as a
/// same-origin one does; not allowed, the browser gets neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_on_another_origin_reads_history_and_recovers_when_allowed() {
    let pages = page_server().await;
    let page_origin = format!("http://{pages}");
    let allowed = page_origin.clone();
    // With [auth]: the page's EventSource carries the user's token.
    const SECRET: &str = "a-test-secret-of-32-bytes-or-so!";
    let h = start(2, move |c| {
        c.allowed_origins([allowed]).auth_hmac_secret(SECRET);
    });
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let claims = serde_json::json!({"sub": "42", "exp": exp, "subscribe": ["room"]});
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let token = jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
    let a = addr(&h);
    assert_eq!(publish(a, "room", "0", true).await.0, 200);
    let proxy = Proxy::start(a).await;
    let server = format!("http://{}", proxy.addr);
    let mut b = Browser::open_with_token(&server, "room", Some(&page_origin), Some(&token));
    let hist = b.next_of("history").await;
    assert_eq!(hist["status"], 200, "{hist}");
    let body: Value = serde_json::from_str(hist["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["publications"][0]["data"], 0, "{body}");
    recovers_after_a_cut(&mut b, a, &proxy).await;
    drop(b.child.stdin.take());
    let _ = tokio::time::timeout(WAIT, b.child.wait()).await;
    assert!(metric(&h.metrics_text(), "herald_auth_total{result=\"ok\"}") >= 2, "the first stream and its reconnect");

    // The same page, with Herald allowing another origin only.
    let h2 = start(2, |c| {
        c.allowed_origins(["https://app.example"]);
    });
    let mut b = Browser::open(&format!("http://{}", addr(&h2)), "room", Some(&page_origin));
    let hist = b.next_of("history").await;
    assert_eq!(hist["status"], 0, "the browser may not read it: {hist}");
    let e = b.next_of("error").await;
    assert_eq!(e["state"], 2, "403: the EventSource gives up (CLOSED): {e}");
    assert_eq!(metric(&h2.metrics_text(), "herald_errors_total{code=\"forbidden\"}"), 2);
    drop(b.child.stdin.take());
    let _ = tokio::time::timeout(WAIT, b.child.wait()).await;
}

/// The browser scripts' directory, once Chromium and playwright-core are
/// known to be there.
fn browser_dir() -> &'static str {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists() && std::path::Path::new(dir).join("node_modules/playwright-core").exists(),
        "the browser tests need Debian's chromium and `npm install` in {dir} (bash .ci/run installs both)"
    );
    dir
}

/// Runs one of the browser scripts (engine/tests/browser/NAME.mjs) to its
/// end and returns its JSON lines.
async fn run_script(name: &str, args: &[&str]) -> Vec<Value> {
    let dir = browser_dir();
    let out = tokio::time::timeout(
        WAIT * 6,
        Command::new("node").arg(format!("{dir}/{name}.mjs")).args(args).stdout(Stdio::piped()).kill_on_drop(true).output(),
    )
    .await
    .expect("the browser script did not finish")
    .unwrap();
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_demo_devices_share_edits_and_one_back_from_offline_catches_up() {
    let h = start(2, |c| {
        c.demo(true);
    });
    let origin = format!("http://{}", addr(&h));
    let shot = std::env::var("HERALD_DEMO_SCREENSHOT").ok();
    let mut args = vec![origin.as_str(), "test"];
    args.extend(shot.as_deref());
    let steps = run_script("demo", &args).await;
    let step = |name: &str| steps.iter().find(|s| s["step"] == name).unwrap_or_else(|| panic!("no step {name:?} in {steps:#?}")).clone();
    assert!(!steps.iter().any(|s| s["step"] == "failed" || s["step"] == "pageerror"), "{steps:#?}");
    assert_eq!(step("edit seen on the other device")["items"], serde_json::json!(["milk"]));
    assert_eq!(step("edits while offline")["on_the_offline_device"], serde_json::json!(["milk"]), "offline: nothing new");
    let back = step("back");
    assert_eq!(back["items"], serde_json::json!(["milk", "eggs", "bread"]), "every edit exactly once: {back}");
    assert!(back["log"].as_str().unwrap().contains("catching up"), "{back}");
    // Each page subscribes from the top of the history it loaded (two),
    // and the device that was offline came back by recovery (one).
    assert_eq!(metric(&h.metrics_text(), "herald_recoveries_total{outcome=\"recovered\"}"), 3);
    assert_eq!(metric(&h.metrics_text(), "herald_messages_replayed_total"), 2, "eggs and bread, replayed to it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_admin_page_shows_the_numbers_of_metrics() {
    let key = "an-api-key-for-the-admin-test";
    let h = start(2, |c| {
        c.api_key(key);
    });
    let a = addr(&h);
    let mut subs = Vec::new();
    for ch in ["busy", "busy", "quiet"] {
        subs.push(ws(a, &format!("/ws?channel={ch}")).await);
    }
    let auth = format!("Bearer {key}");
    for _ in 0..5 {
        let (status, _, _) = http(a, "POST", "/publish/busy", &[("authorization", &auth)], b"x").await;
        assert_eq!(status, 200);
    }
    wait_metric(&h, "herald_frames_delivered_total{transport=\"ws\"}", |n| n == 10).await;
    let origin = format!("http://{a}");
    let shot = std::env::var("HERALD_ADMIN_SCREENSHOT").ok();
    let mut args = vec![origin.as_str(), key];
    args.extend(shot.as_deref());
    let shown = run_script("admin", &args).await.pop().expect("the page's numbers");
    let m = h.metrics_text();
    assert_eq!(shown["errors"], serde_json::json!([]), "{shown}");
    assert!(shown["asked"].as_str().unwrap().contains("API key"), "it asked for the key: {shown}");
    let num = |field: &str| shown[field].as_str().unwrap().replace(',', "").parse::<u64>().unwrap();
    assert_eq!(num("ws"), metric(&m, "herald_connections_open{transport=\"ws\"}"));
    assert_eq!(num("subscriptions"), metric(&m, "herald_subscriptions"));
    assert_eq!(num("channels"), metric(&m, "herald_channels"));
    assert_eq!(num("published"), metric(&m, "herald_messages_published_total"));
    assert_eq!(shown["top"], serde_json::json!([["busy", "2"], ["quiet", "1"]]));
    assert_eq!(shown["disconnects"]["slow_consumer"], metric(&m, "herald_disconnects_total{reason=\"slow_consumer\"}").to_string());
    assert_eq!(shown["bars"], 17, "one bar per latency bucket, and one past the last");
    assert!(shown["percentiles"].as_str().unwrap().ends_with("10 writes"), "{shown}");
    drop(subs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_herald_js_refreshes_an_expiring_token_without_losing_messages() {
    let secret = "a-test-secret-of-32-bytes-or-so!";
    let h = start(2, |c| {
        c.auth_hmac_secret(secret);
    });
    let origin = format!("http://{}", addr(&h));
    let mut b = Browser::script("token", &[&origin, secret]);
    assert_eq!(b.next_of("subscribed").await["offset"], 0);
    // Messages before, during and after the refresh.
    let mut sent = 0;
    while metric(&h.metrics_text(), "herald_auth_refreshes_total") == 0 || sent < 10 {
        sent += 1;
        let (status, _, _) = http(addr(&h), "POST", "/publish/user:42", &[], sent.to_string().as_bytes()).await;
        assert_eq!(status, 200);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(sent < 300, "the token was not refreshed");
    }
    let mut got = Vec::new();
    while got.len() < sent {
        let e = b.next().await;
        assert!(!["disconnected", "gap", "error", "pageerror"].contains(&e["type"].as_str().unwrap_or("")), "{e}");
        if e["type"] == "message" {
            got.push(e["data"].as_str().unwrap().parse::<u64>().unwrap());
        }
    }
    assert_eq!(got, (1..=sent as u64).collect::<Vec<_>>(), "every message, once, in order");
    assert_eq!(metric(&h.metrics_text(), "herald_auth_refreshes_total"), 1);
    assert_eq!(metric(&h.metrics_text(), "herald_connections_total{transport=\"ws\"}"), 1, "refreshed on the same connection");
    drop(b.child.stdin.take());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_herald_js_over_sse_resumes_after_a_cut_from_its_position() {
    let h = start(2, |_| {});
    let proxy = Proxy::start(addr(&h)).await;
    let origin = format!("http://{}", proxy.addr);
    let mut b = Browser::script("herald-sse", &[&origin, "feed"]);
    assert_eq!(b.next_of("subscribed").await["offset"], 0);
    let a = addr(&h);
    let post = |text: &'static str| async move { assert_eq!(publish(a, "feed", text, false).await.0, 200) };
    // Cut before any message: the stream still comes back from where it
    // started (a browser's own retry would carry no Last-Event-ID yet).
    proxy.cut();
    post("1").await;
    assert_eq!(b.next_of("message").await["data"], "1");
    proxy.cut();
    post("2").await;
    post("3").await;
    // herald.js opens the stream again from its last position.
    let mut got = Vec::new();
    while got.len() < 2 {
        let e = b.next().await;
        assert!(!["gap", "pageerror"].contains(&e["type"].as_str().unwrap_or("")), "{e}");
        if e["type"] == "message" {
            got.push(e["data"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(got, ["2", "3"], "what was published during the cut, once, in order");
    assert_eq!(metric(&h.metrics_text(), "herald_recoveries_total{outcome=\"recovered\"}"), 2);
    drop(b.child.stdin.take());
}

/// Chromium offers permessage-deflate on every WebSocket: with compression
/// on it gets compressed broadcasts and reads them right, beside a plain
/// client on the same channel, and its own (compressed) command is inflated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_reads_compressed_broadcasts_and_sends_compressed_commands() {
    let h = start(2, |c| {
        c.compression(true);
    });
    let a = addr(&h);
    let mut plain = ws(a, "/ws?channel=zip").await;
    let mut b = Browser::script("websocket", &[&format!("http://{a}"), "zip"]);
    let open = b.next_of("open").await;
    assert!(open["extensions"].as_str().unwrap_or("").starts_with("permessage-deflate"), "{open}");
    // Its publish reply, then its change as every subscriber sees it.
    let reply: Value = serde_json::from_str(b.next_of("message").await["data"].as_str().unwrap()).unwrap();
    assert_eq!((reply["op"].as_str(), reply["offset"].as_u64()), (Some("published"), Some(1)), "{reply}");
    let mine: Value = serde_json::from_str(b.next_of("message").await["data"].as_str().unwrap()).unwrap();
    assert_eq!(mine["data"]["items"].as_array().map(Vec::len), Some(40));
    assert_eq!(next_json(&mut plain).await["data"], mine["data"]);
    let sent: Vec<String> = (0..20)
        .map(|i| {
            let items: Vec<Value> = (0..i * 3).map(|j| serde_json::json!({"id": j, "title": format!("item {j} of {i}")})).collect();
            serde_json::json!({"i": i, "items": items}).to_string()
        })
        .collect();
    for m in &sent {
        publish(a, "zip", m, true).await;
    }
    for (i, m) in sent.iter().enumerate() {
        let want: Value = serde_json::from_str(m).unwrap();
        let got: Value = serde_json::from_str(b.next_of("message").await["data"].as_str().unwrap()).unwrap();
        assert_eq!((got["offset"].as_u64(), &got["data"]), (Some(i as u64 + 2), &want), "message {i} in Chromium");
        assert_eq!(next_json(&mut plain).await["data"], want);
    }
    let text = h.metrics_text();
    assert_eq!(metric(&text, "herald_compression_connections"), 1);
    assert!(metric(&text, "herald_compressed_frames_total{source=\"message\"}") >= 15, "the larger messages went compressed");
    assert!(metric(&text, "herald_inflated_messages_total") >= 1, "Chromium compressed its command");
    drop(b.child.stdin.take());
    let _ = tokio::time::timeout(WAIT, b.child.wait()).await;
}
