//! `loadgen` as a user runs it: the real binary, real sockets, its JSON
//! report. Against an embedded Herald nothing may be lost; against small
//! servers that delay and drop known messages, the report must show
//! exactly what was planted.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;

fn loadgen(args: &[&str]) -> (Value, String) {
    let dir = std::env::temp_dir().join(format!("loadgen-test-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");
    let html = dir.join("report.html");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .args(["--quiet", "--json", json.to_str().unwrap(), "--html", html.to_str().unwrap()])
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "loadgen failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg"), "the HTML report has its plots");
    // `loadgen report` renders the saved run again: the same page, the
    // same summary.
    let again = dir.join("again.html");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["report", json.to_str().unwrap(), "--html", again.to_str().unwrap()])
        .output()
        .expect("run loadgen report");
    assert!(out.status.success(), "loadgen report failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&again).unwrap(), page, "the saved run renders the same page");
    assert!(stdout.contains(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()), "the same summary");
    let _ = std::fs::remove_dir_all(&dir);
    (report, stdout)
}

fn rand_suffix() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn u(r: &Value, k: &str) -> u64 {
    r[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {r}"))
}

#[test]
fn embedded_herald_over_websocket_loses_nothing() {
    let (r, stdout) =
        loadgen(&["fanout", "--subscribers", "200", "--channels", "4", "--rate", "200", "--duration", "2", "--warmup", "0.5"]);
    assert_eq!(u(&r, "subscribers"), 200);
    assert_eq!(u(&r, "connected"), 200);
    assert_eq!(u(&r, "sent"), 400, "200 msg/s for 2 s measured");
    assert_eq!(u(&r, "expected"), 400 * 50, "each message reaches its channel's 50 subscribers");
    assert_eq!(u(&r, "deliveries"), u(&r, "expected"));
    assert_eq!((u(&r, "lost"), u(&r, "duplicates"), u(&r, "out_of_order"), u(&r, "misrouted")), (0, 0, 0, 0));
    assert_eq!(u(&r, "incomplete_messages"), 0);
    assert_eq!(r["completion_latency_us"]["count"].as_u64(), Some(400));
    for k in ["p50", "p90", "p99", "p999", "max"] {
        let (delivery, completion) = (r["delivery_latency_us"][k].as_f64().unwrap(), r["completion_latency_us"][k].as_f64().unwrap());
        assert!(delivery > 0.0, "{k}");
        // A message is complete at its last delivery: every quantile of
        // completion is at least the same quantile of delivery.
        assert!(completion >= delivery, "{k}: completion {completion} < delivery {delivery}");
    }
    assert!(r["server_cpu_s"].as_f64().is_some(), "an embedded server's CPU is measured");
    assert!(r["client_cpu_s"].as_f64().unwrap() > 0.0, "200 subscribers for 2.5 s cost the client some CPU");
    assert!(r["client_saturated"].is_boolean());
    assert!(!r["timeline"].as_array().unwrap().is_empty());
    assert!(stdout.contains("deliveries"), "a human summary: {stdout}");
}

#[test]
fn embedded_herald_over_sse_and_ws_publish_loses_nothing() {
    let (r, _) = loadgen(&[
        "fanout",
        "--transport",
        "sse",
        "--publish",
        "ws",
        "--subscribers",
        "50",
        "--rate",
        "100",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--payload",
        "300",
    ]);
    assert_eq!(u(&r, "sent"), 200);
    assert_eq!(u(&r, "expected"), 200 * 50);
    assert_eq!(u(&r, "deliveries"), 200 * 50);
    assert_eq!(u(&r, "lost"), 0);
    assert_eq!(r["transport"], "sse");
}

#[test]
fn raw_format_on_an_embedded_herald() {
    let (r, _) = loadgen(&["fanout", "--format", "raw", "--subscribers", "20", "--rate", "100", "--duration", "1", "--warmup", "0"]);
    assert_eq!(u(&r, "deliveries"), 100 * 20);
    assert_eq!(u(&r, "lost"), 0);
}

/// A run whose publisher has at most `inflight` publishes awaiting their
/// reply (`None`: pipelined); its JSON report and text summary.
fn publisher_run(publish: &str, inflight: Option<&str>) -> (Value, String) {
    let mut args = vec!["fanout", "--publish", publish, "--subscribers", "10", "--rate", "100", "--duration", "1", "--warmup", "0.2"];
    if let Some(n) = inflight {
        args.extend(["--publish-inflight", n]);
    }
    loadgen(&args)
}

/// Every measured message the target took had its reply timed, and the
/// percentiles are ordered.
fn assert_round_trips(r: &Value) {
    let rtt = &r["publish_rtt_us"];
    let (count, sent) = (rtt["count"].as_u64().unwrap(), u(r, "sent"));
    if r["publish_inflight"].is_null() {
        // Pipelined: a message is counted as measured when it is handed to
        // its connection, its round trip when it is written, so the one
        // message at the warm-up boundary may fall on either side.
        assert!(count + 1 >= sent && count <= sent + 1, "a round trip per accepted measured message: {rtt}");
    } else {
        assert_eq!(count, sent, "one round trip per accepted measured message: {rtt}");
    }
    let (p50, p90, p99, p999, max) = (
        rtt["p50"].as_f64().unwrap(),
        rtt["p90"].as_f64().unwrap(),
        rtt["p99"].as_f64().unwrap(),
        rtt["p999"].as_f64().unwrap(),
        rtt["max"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max, "{rtt}");
}

#[test]
fn closed_loop_http_publisher_loses_nothing_and_times_replies() {
    let (r, stdout) = publisher_run("http", Some("1"));
    assert_eq!(u(&r, "sent"), 100);
    assert_eq!(u(&r, "lost"), 0);
    assert_eq!(u(&r, "deliveries"), 100 * 10);
    assert_eq!(r["publish_inflight"].as_u64(), Some(1));
    assert_round_trips(&r);
    assert_eq!(r["publisher_lag_us"]["count"].as_u64(), Some(120), "lag is taken at every write, warm-up included");
    assert!(stdout.contains("publish round trip") && stdout.contains("closed loop"), "{stdout}");
}

#[test]
fn closed_loop_ws_publisher_loses_nothing_and_times_replies() {
    let (r, _) = publisher_run("ws", Some("1"));
    assert_eq!(u(&r, "sent"), 100);
    assert_eq!(u(&r, "lost"), 0);
    assert_eq!(r["publish_errors"], serde_json::json!({}));
    assert_eq!(r["publish_inflight"].as_u64(), Some(1));
    assert_round_trips(&r);
}

#[test]
fn pipelined_publishers_time_replies_too() {
    for publish in ["http", "ws"] {
        let (r, stdout) = publisher_run(publish, None);
        assert_eq!(u(&r, "sent"), 100, "{publish}");
        assert_eq!(u(&r, "lost"), 0, "{publish}");
        assert!(r["publish_inflight"].is_null(), "unlimited is null: {}", r["publish_inflight"]);
        assert_round_trips(&r);
        assert!(stdout.contains("(pipelined)"), "{stdout}");
    }
}

#[test]
fn an_inflight_limit_needs_replies() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["fanout", "--publish", "ws-raw", "--publish-url", "ws://127.0.0.1:9/x", "--publish-inflight", "1", "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--publish-inflight") && err.contains("ws-raw"), "{err}");
}

/// A broadcast server that holds every message `delay` and drops every
/// message whose number (from 0) is `≡ 3 (mod 10)`: 10 % of them.
async fn lossy_server(delay: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, _) = broadcast::channel::<String>(100_000);
    let count = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let _ = stream.set_nodelay(true);
            let tx = tx.clone();
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut path = String::new();
                // The callback's signature is tungstenite's (a large Err type).
                #[allow(clippy::result_large_err)]
                let cb = |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                    path = req.uri().path().to_string();
                    Ok(resp)
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, cb).await else { return };
                let (mut sink, mut source) = ws.split();
                if path == "/pub" {
                    while let Some(Ok(m)) = source.next().await {
                        if let Message::Text(t) = m {
                            let n = count.fetch_add(1, Ordering::SeqCst);
                            if n % 10 == 3 {
                                continue;
                            }
                            let tx = tx.clone();
                            let t = t.to_string();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = tx.send(t);
                            });
                        }
                    }
                } else {
                    let mut rx = tx.subscribe();
                    while let Ok(t) = rx.recv().await {
                        if sink.send(Message::text(t)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Runs loadgen against [`lossy_server`] holding each message 50 ms.
fn planted_delay_run() -> Value {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let addr = rt.block_on(lossy_server(Duration::from_millis(50)));
    let url = format!("ws://{addr}/sub");
    let publish = format!("ws://{addr}/pub");
    let (r, _) = loadgen(&[
        "fanout",
        "--url",
        &url,
        "--format",
        "raw",
        "--publish",
        "ws-raw",
        "--publish-url",
        &publish,
        "--subscribers",
        "20",
        "--rate",
        "50",
        "--duration",
        "2",
        "--warmup",
        "0",
        "--drain",
        "1",
    ]);
    drop(rt);
    r
}

#[test]
fn planted_delay_and_loss_are_reported() {
    let r = planted_delay_run();
    assert_eq!(u(&r, "sent"), 100);
    assert_eq!(u(&r, "expected"), 100 * 20);
    assert_eq!(u(&r, "lost"), 10 * 20, "messages 3, 13, … 93 were dropped for all 20 subscribers");
    assert_eq!(u(&r, "deliveries"), 90 * 20);
    assert_eq!(u(&r, "incomplete_messages"), 10);
    // The server holds every message 50 ms before it sends it: however
    // slow the machine, no measured latency can be below that.
    let lat = &r["delivery_latency_us"];
    assert!(lat["min"].as_f64().unwrap() >= 50_000.0, "nothing beats the planted 50 ms: {lat}");
    assert!(r["completion_latency_us"]["min"].as_f64().unwrap() >= 50_000.0);
}

#[test]
#[ignore = "stress: run by bench/stress.sh"]
fn planted_delay_is_measured_close_to_its_floor() {
    let r = planted_delay_run();
    let lat = &r["delivery_latency_us"];
    // The fastest deliveries are close to the planted delay (on a quiet
    // machine; a loaded one stalls threads by hundreds of milliseconds).
    let min = lat["min"].as_f64().unwrap();
    assert!(
        (50_000.0..250_000.0).contains(&min),
        "the latency floor is the planted 50 ms: {lat}; publisher lag {}, machine hiccups {}",
        r["publisher_lag_us"],
        r["machine_hiccup_us"]
    );
}

#[test]
fn connect_storm_against_an_embedded_herald() {
    let dir = std::env::temp_dir().join(format!("loadgen-connect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("c.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["connect", "--connections", "500", "--rate", "2000", "--hold", "0.5", "--quiet", "--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(u(&r, "opened"), 500);
    assert_eq!(u(&r, "connect_errors"), 0);
    assert_eq!(u(&r, "dropped_while_held"), 0);
    assert_eq!(r["connect_latency_us"]["count"].as_u64(), Some(500));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreachable_target_is_a_clear_error() {
    // A socket bound but not listening holds the port for the whole test
    // (no other test can take it), and connecting to it is refused.
    let holder = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    holder.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let port = holder.local_addr().unwrap().as_socket().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}/ws?channel={{channel}}");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["fanout", "--url", &url, "--subscribers", "5", "--duration", "1", "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no subscriber could connect") && err.contains("refused"), "{err}");
    drop(holder);
}

#[test]
fn compare_interleaves_targets_and_prints_ratios() {
    let dir = std::env::temp_dir().join(format!("loadgen-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("cmp.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["compare", "--target", "name=http", "--target", "name=ws publish=ws publish-inflight=1", "--rounds", "2"])
        .args(["--subscribers", "20", "--rate", "100", "--duration", "1", "--warmup", "0", "--drain", "1", "--quiet"])
        .args(["--json", json.to_str().unwrap(), "--html", dir.join("cmp.html").to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ratio to http"), "{stdout}");
    assert!(stdout.contains(" ms") || stdout.contains(" µs"), "latencies with their unit: {stdout}");
    // The page: both targets, their ratio, a curve each; and `loadgen
    // report` renders the same page again from the JSON.
    let page = std::fs::read_to_string(dir.join("cmp.html")).unwrap();
    assert!(page.contains("<th>ws ÷ http</th>") && page.contains("(n = 2,000)"), "{page}");
    // A percentile curve per target, and a p99-over-time line for each
    // target whose run timed a second's deliveries.
    assert!((2..=4).contains(&page.matches("<polyline").count()), "{page}");
    assert!(page.contains("http (n = 2,000)") && page.contains("ws (n = 2,000)"), "{page}");
    let again = dir.join("again.html");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["report", json.to_str().unwrap(), "--html", again.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&again).unwrap(), page, "the saved report renders the same page");
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0]["name"].as_str(), rows[1]["name"].as_str()), (Some("http"), Some("ws")));
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "2 rounds × 2 targets");
    for run in runs {
        assert_eq!(u(run, "lost"), 0);
        assert_eq!(u(run, "deliveries"), 100 * 20);
    }
    let per_target: Vec<&str> = runs.iter().map(|x| x["publish"].as_str().unwrap()).collect();
    assert_eq!(per_target, ["http", "http", "ws", "ws"], "runs are listed per target");
    let inflight: Vec<Option<u64>> = runs.iter().map(|x| x["publish_inflight"].as_u64()).collect();
    assert_eq!(inflight, [None, None, Some(1), Some(1)], "a target's own keys apply to it alone");
    assert_eq!(r["sequence"], serde_json::json!(["http#1", "ws#1", "http#2", "ws#2"]), "interleaved: A B A B");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "stress: run by bench/stress.sh"]
fn a_high_rate_keeps_its_schedule_with_pipelined_http() {
    // 2,000 msg/s: the schedule never waits for the connection, and HTTP
    // requests are pipelined, so nothing is refused for backlog.
    let (r, _) = loadgen(&["fanout", "--subscribers", "10", "--rate", "2000", "--duration", "1", "--warmup", "0.2"]);
    assert_eq!(r["publish_errors"], serde_json::json!({}), "{}", r["warnings"]);
    assert_eq!(u(&r, "sent"), 2000);
    assert_eq!(u(&r, "lost"), 0, "{}", r["warnings"]);
    assert_eq!(u(&r, "deliveries"), 2000 * 10);
    assert_eq!(u(&r, "out_of_order"), 0, "one channel's messages stay in order on its connection");
}

/// Subscribers that subscribe by a message after the handshake, as
/// Pusher's clients do; Herald's own `subscribe` command stands in for
/// such a protocol. Without the message they would receive nothing.
#[test]
fn subscribers_can_subscribe_by_message() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let herald = herald::Herald::start_on(listener, herald::Config::default()).unwrap();
    let addr = herald.local_addr().unwrap();
    let url = format!("ws://{addr}/ws");
    let publish = format!("http://{addr}/publish/{{channel}}");
    let (r, _) = loadgen(&[
        "fanout",
        "--url",
        &url,
        "--publish-url",
        &publish,
        "--subscribe-message",
        r#"{"op":"subscribe","channel":"{channel}"}"#,
        "--subscribers",
        "20",
        "--channels",
        "2",
        "--rate",
        "100",
        "--duration",
        "1",
        "--warmup",
        "0.5",
    ]);
    assert_eq!(u(&r, "sent"), 100);
    assert_eq!(u(&r, "expected"), 100 * 10, "each message reaches its channel's 10 subscribers");
    assert_eq!(u(&r, "deliveries"), 100 * 10);
    assert_eq!((u(&r, "lost"), u(&r, "misrouted")), (0, 0));
}

/// `--publish-body` wraps the payload: Herald's publish endpoint takes the
/// JSON body as the message's data, and the subscribers find the payload
/// inside it.
#[test]
fn an_http_publish_body_template_wraps_the_payload() {
    let (r, _) = loadgen(&[
        "fanout",
        "--publish-body",
        r#"{"wrapped":"{payload}","on":"{channel}"}"#,
        "--publish-content-type",
        "application/json",
        "--subscribers",
        "10",
        "--rate",
        "100",
        "--duration",
        "1",
        "--warmup",
        "0.2",
    ]);
    assert_eq!(u(&r, "deliveries"), 100 * 10);
    assert_eq!(u(&r, "lost"), 0);
}

/// A server whose publish endpoint answers each `POST` with
/// `Connection: close` and closes (as some servers' HTTP APIs do), and
/// whose WebSocket subscribers receive each body as a text frame. Returns
/// (WebSocket address, HTTP address).
async fn closing_http_server() -> (std::net::SocketAddr, std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ws, http) = (TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap());
    let addrs = (ws.local_addr().unwrap(), http.local_addr().unwrap());
    let (tx, _) = broadcast::channel::<String>(100_000);
    let sub_tx = tx.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = ws.accept().await {
            let mut rx = sub_tx.subscribe();
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
                let (mut sink, _source) = ws.split();
                while let Ok(t) = rx.recv().await {
                    if sink.send(Message::text(t)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = http.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let head_text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
                    let len: usize =
                        head_text.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                    if buf.len() < head + 4 + len {
                        continue;
                    }
                    let _ = tx.send(String::from_utf8_lossy(&buf[head + 4..head + 4 + len]).into_owned());
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
                    return;
                }
            });
        }
    });
    addrs
}

/// A closed-loop publisher against a server that closes after each answer
/// takes a new connection per publish and loses nothing.
#[test]
fn a_server_that_closes_after_each_answer_loses_nothing_in_a_closed_loop() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (ws, http) = rt.block_on(closing_http_server());
    let url = format!("ws://{ws}/sub");
    let publish = format!("http://{http}/pub");
    let (r, _) = loadgen(&[
        "fanout",
        "--url",
        &url,
        "--format",
        "raw",
        "--publish-url",
        &publish,
        "--publish-inflight",
        "1",
        "--subscribers",
        "10",
        "--rate",
        "100",
        "--duration",
        "1",
        "--warmup",
        "0.2",
    ]);
    drop(rt);
    assert_eq!(u(&r, "sent"), 100);
    assert_eq!(r["publish_errors"], serde_json::json!({}), "no publish failed: {}", r["publish_errors"]);
    assert_eq!(u(&r, "deliveries"), 100 * 10);
    assert_eq!(u(&r, "lost"), 0);
}

/// A server that refuses every `publish` command with an error reply sent
/// `delay` after the command, and forgets the replies still due when the
/// client half-closes; its `/sub` subscribers receive nothing.
async fn refusing_server(delay: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
                let (sink, mut source) = ws.split();
                let sink = Arc::new(tokio::sync::Mutex::new(sink));
                let mut replies = Vec::new();
                while let Some(Ok(m)) = source.next().await {
                    let Message::Text(t) = m else { continue };
                    let v: Value = serde_json::from_str(&t).unwrap();
                    let reply = serde_json::json!({"op": "error", "code": "overloaded", "message": "no", "id": v["id"]}).to_string();
                    let sink = Arc::clone(&sink);
                    replies.push(tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = sink.lock().await.send(Message::text(reply)).await;
                    }));
                }
                // The client half-closed (or left): what is due is dropped.
                for r in replies {
                    r.abort();
                }
            });
        }
    });
    addr
}

/// The `ws` publisher keeps its connection open until the last replies are
/// in: every refusal is counted, none is taken for a publish.
#[test]
fn the_ws_publisher_waits_for_its_last_replies() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let addr = rt.block_on(refusing_server(Duration::from_millis(300)));
    let (url, publish) = (format!("ws://{addr}/sub"), format!("ws://{addr}/pub"));
    let (r, _) = loadgen(&[
        "fanout",
        "--url",
        &url,
        "--format",
        "raw",
        "--publish",
        "ws",
        "--publish-url",
        &publish,
        "--subscribers",
        "2",
        "--rate",
        "100",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--drain",
        "0.5",
    ]);
    drop(rt);
    assert_eq!(r["publish_errors"]["error_overloaded"].as_u64(), Some(100), "{}", r["publish_errors"]);
    assert_eq!((u(&r, "sent"), u(&r, "expected"), u(&r, "lost")), (0, 0, 0));
}

/// The exit status and stderr of a run.
fn status(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args).arg("--quiet").output().expect("run loadgen");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
}

#[test]
fn exit_status_says_whether_the_run_passed() {
    let short = ["fanout", "--subscribers", "20", "--rate", "100", "--duration", "1s", "--warmup", "200ms", "--drain", "500ms"];
    // Clean, with thresholds it meets: 0.
    let (code, text) = status(&[&short[..], &["--max-loss", "0", "--max-p99", "10s"]].concat());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(" ms") || text.contains(" µs"), "latencies carry their unit: {text}");
    // A threshold no run meets: 3, and which one.
    let (code, text) = status(&[&short[..], &["--max-p99", "1us"]].concat());
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("THRESHOLD CROSSED: delivery p99"), "{text}");
    // Nothing listens there: no subscriber connected, 4.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("ws://{closed}/ws?channel={{channel}}");
    let (code, text) = status(&[&short[..], &["--url", &url, "--connect-timeout", "1s"]].concat());
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("no subscriber could connect"), "{text}");
    // Several channels and a URL without {channel}: refused before it runs.
    let (code, text) = status(&["fanout", "--url", &format!("ws://{closed}/ws"), "--channels", "2"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("needs {channel}"), "{text}");
    let (code, text) = status(&["fanout", "--duration", "ten"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("not a duration"), "{text}");
}

/// A Herald serving TLS only, with a self-signed certificate for
/// `localhost`; the certificate's file.
fn tls_herald() -> (herald::Herald, std::path::PathBuf, u16) {
    let dir = std::env::temp_dir().join(format!("loadgen-tls-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&key_file, key.signing_key.serialize_pem()).unwrap();
    let mut c = herald::Config::default();
    c.shards(2);
    c.tls_cert = Some(cert.to_str().unwrap().into());
    c.tls_key = Some(key_file.to_str().unwrap().into());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (herald::Herald::start_on(listener, c).unwrap(), cert, port)
}

#[test]
fn tls_targets_are_measured_over_wss_and_https() {
    let (_herald, cert, port) = tls_herald();
    let ca = cert.to_str().unwrap();
    for (transport, url) in [
        ("ws", format!("wss://localhost:{port}/ws?channel={{channel}}")),
        ("sse", format!("https://localhost:{port}/sse?channel={{channel}}")),
    ] {
        // Published over https too (derived from the target's URL).
        let (r, _) = loadgen(&[
            "fanout",
            "--url",
            &url,
            "--transport",
            transport,
            "--tls-ca",
            ca,
            "--subscribers",
            "20",
            "--channels",
            "2",
            "--rate",
            "100",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
        ]);
        assert_eq!(u(&r, "connected"), 20, "{transport}");
        assert_eq!(u(&r, "sent"), 100, "{transport}");
        assert_eq!(u(&r, "deliveries"), 100 * 10, "{transport}");
        assert_eq!((u(&r, "lost"), u(&r, "out_of_order")), (0, 0), "{transport}");
    }
    let url = format!("wss://localhost:{port}/ws?channel={{channel}}");
    let (code, text) = status(&["connect", "--url", &url, "--tls-ca", ca, "--connections", "50", "--rate", "500", "--hold", "200ms"]);
    assert_eq!(code, 0, "{text}");
    // Without the CA, the system's roots do not trust the certificate: a
    // clear error that names the remedy.
    let (code, text) = status(&["fanout", "--url", &url, "--subscribers", "2", "--duration", "1s", "--connect-timeout", "2s"]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("tls") && text.contains("--tls-ca"), "{text}");
    let _ = std::fs::remove_dir_all(cert.parent().unwrap());
}

#[test]
fn a_lossy_server_passes_by_default_and_fails_a_loss_threshold() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let addr = rt.block_on(lossy_server(Duration::from_millis(1)));
    let (url, publish) = (format!("ws://{addr}/sub"), format!("ws://{addr}/pub"));
    let run = |extra: &[&str]| {
        let base = [
            "fanout",
            "--url",
            &url,
            "--format",
            "raw",
            "--publish",
            "ws-raw",
            "--publish-url",
            &publish,
            "--subscribers",
            "5",
            "--rate",
            "50",
            "--duration",
            "1s",
            "--warmup",
            "0",
            "--drain",
            "1s",
        ];
        status(&[&base[..], extra].concat())
    };
    // 10 % lost: reported, but no threshold was set, so it passes (0).
    let (code, text) = run(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("lost 25 "), "5 messages for 5 subscribers: {text}");
    // With --max-loss 1 %: 3, and which threshold.
    let (code, text) = run(&["--max-loss", "0.01"]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("THRESHOLD CROSSED: loss 10.0000 % > --max-loss 1.0000 %"), "{text}");
    drop(rt);
}
