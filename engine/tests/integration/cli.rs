//! The `herald` binary as an operator meets it: errors said once and
//! before the port is taken, `--listen` with a host name, defaults in
//! `--help`, the configuration logged at start.

use crate::common::*;
use tokio::io::AsyncWriteExt;

async fn run(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("HERALD_LOG", "info")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn a_bad_setting_is_reported_before_the_port_is_bound() {
    // A port that is taken: the bad value must still be what is reported.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let (code, text) = run(&["--listen", &port, "--max-message-bytes", "0"]).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("max_message_bytes must be at least 1"), "{text}");
    assert!(!text.contains("in use"), "{text}");
    // The port itself, once, with its cause once.
    let (code, text) = run(&["--listen", &port]).await;
    assert_eq!(code, 1);
    assert_eq!(text.matches("Address already in use").count(), 1, "{text}");
    // The queue bound says the number it needs and the flag.
    let (_, text) = run(&["--max-message-bytes", "1048576", "--print-config"]).await;
    assert!(text.contains("= 6292480") && text.contains("--outbound-queue-bytes 6292480"), "{text}");
}

#[tokio::test]
async fn a_config_file_error_is_printed_once() {
    let dir = std::env::temp_dir().join(format!("herald-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "max_message_bytes = \"x\"\n").unwrap();
    let (code, text) = run(&["--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert_eq!(text.matches("TOML parse error").count(), 1, "{text}");
    assert!(text.contains("expected usize"), "{text}");
    let (code, text) = run(&["--listen", "nowhere.invalid:1"]).await;
    assert_eq!(code, 1);
    assert!(text.contains("--listen \"nowhere.invalid:1\""), "{text}");
}

#[tokio::test]
async fn listen_takes_a_host_name_and_help_shows_the_defaults() {
    let h = spawn_herald_on("localhost:0", &[]).await;
    let addr = h.addr;
    assert!(addr.ip().is_loopback(), "{addr}");
    let (status, _, body) = http(addr, "GET", "/healthz", &[], b"").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (code, help) = run(&["--help"]).await;
    assert_eq!(code, 0);
    for default in ["[default: 127.0.0.1:8080]", "[default: 65536]", "[default: 1048576]", "[default: 100000]"] {
        assert!(help.contains(default), "no {default} in --help");
    }
}

#[tokio::test]
async fn the_configuration_is_logged_once_at_start() {
    let h = spawn_herald(&["--max-connections", "500", "--api-key", "a-very-secret-key-123"]).await;
    let seen = &h.startup;
    let config: Vec<&String> = seen.iter().filter(|l| l.contains("configuration")).collect();
    assert_eq!(config.len(), 1, "{seen:#?}");
    assert!(config[0].contains("max_connections=500") && config[0].contains("file=none"), "{}", config[0]);
    assert!(!config[0].contains("a-very-secret-key-123"), "the API key is never logged");
    assert_eq!(seen.iter().filter(|l| l.contains("herald started")).count(), 1);
}

#[tokio::test]
async fn head_allow_build_info_and_process_metrics() {
    let h = start(1, |c| {
        c.api_key = Some(herald::auth::Secret::new("an-api-key-of-16-bytes+".to_string()));
    });
    let a = addr(&h);
    let (status, head, body) = http(a, "HEAD", "/healthz", &[], b"").await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert!(head.contains("content-length: 3"), "{head}");
    let (status, head, body) = http(a, "HEAD", "/metrics", &[], b"").await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert!(head.contains("content-type: text/plain"), "{head}");
    // Behind the API key, HEAD is refused as GET is.
    let (status, _, _) = http(a, "HEAD", "/history/news", &[], b"").await;
    assert_eq!(status, 401);
    for (method, path, allow) in [
        ("POST", "/healthz", "get, head"),
        ("DELETE", "/metrics", "get, head"),
        ("GET", "/publish/news", "post"),
        ("PUT", "/ws", "get"),
        ("POST", "/sse", "get"),
        ("POST", "/history/news", "get, head"),
        ("GET", "/api/broadcast", "post"),
        ("POST", "/api/stats", "get, head"),
    ] {
        let auth = [("authorization", "Bearer an-api-key-of-16-bytes+")];
        let (status, head, _) = http(a, method, path, &auth, b"").await;
        assert_eq!(status, 405, "{method} {path}");
        assert!(head.contains(&format!("\r\nallow: {allow}")), "{method} {path}: {head}");
    }
    let text = h.metrics_text();
    assert_eq!(metric(&text, &format!("herald_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))), 1);
    assert!(metric(&text, "process_open_fds") > 0);
    assert!(metric(&text, "process_resident_memory_bytes") > 1 << 20);
    assert!(metric(&text, "process_max_fds") >= metric(&text, "process_open_fds"));
    let start = metric(&text, "process_start_time_seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(start <= now && start + 24 * 3600 > now, "{start} vs {now}");
    let _ = metric(&text, "process_cpu_seconds_total");
}

#[tokio::test]
async fn broker_nodes_count_the_configured_node_before_it_connects() {
    // Nothing listens there: the broker never connects.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let h = start(1, |c| {
        c.redis = Some(format!("redis://{closed}"));
    });
    let text = h.metrics_text();
    assert_eq!(metric(&text, "herald_broker_nodes"), 1);
    assert_eq!(metric(&text, "herald_broker_up"), 0);
}

#[tokio::test]
async fn tls_files_are_checked_before_the_port_is_bound_and_redis_passwords_never_logged() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let (code, text) = run(&["--listen", &port, "--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"]).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("tls_cert \"/nonexistent/cert.pem\""), "{text}");
    assert!(!text.contains("in use"), "{text}");
    let (code, text) = run(&["--tls-cert", "/x.pem"]).await;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--tls-key"), "{text}");
    // A Redis URL with a password: redacted in the start log and in errors.
    let (code, text) = run(&["--redis", "rediss://app:hunter2-secret@127.0.0.1:1", "--redis-tls-ca", "/nonexistent/ca.pem"]).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("redis_tls_ca \"/nonexistent/ca.pem\""), "{text}");
    assert!(text.contains("app:<redacted>@"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let (code, text) = run(&["--redis", "unix://:hunter2-secret@/tmp/x.sock", "--print-config"]).await;
    assert_eq!(code, 1, "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn connections_log_their_fields_and_close_reason_and_a_slow_consumer_is_said_at_info() {
    // At debug for herald::conn: one span per connection, its open and close.
    let mut h = spawn_herald_logging("127.0.0.1:0", "info,herald::conn=debug", &[]).await;
    let mut c = ws(h.addr, "/ws?channel=news").await;
    c.close(None).await.unwrap();
    let _ = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut c)).await;
    drop(c);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, _, text) = http(h.addr, "GET", "/metrics", &[], b"").await;
        if metric(&text, "herald_connections_open{transport=\"ws\"}") == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the connection never closed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A graceful stop: the shard that counted the close has logged it
    // before it drains and the process exits.
    terminate(&mut h).await;
    let log = h.log.await.unwrap();
    let opened = log.lines().find(|l| l.contains("opened")).unwrap_or_else(|| panic!("no open line: {log}"));
    for field in ["transport=ws", "shard=", "remote=127.0.0.1:", "user=-", "channels=1"] {
        assert!(opened.contains(field), "{field} in {opened}");
    }
    assert!(log.lines().any(|l| l.contains("closed") && l.contains("reason=client") && l.contains("transport=ws")), "{log}");
    assert!(!log.contains("Some("), "fields are displayed, not debug-printed: {log}");
    // At info: only a slow consumer's cut, with who it was.
    let h = spawn_herald(&["--max-message-bytes", "65536", "--outbound-queue-bytes", "400000", "--close-timeout-ms", "200"]).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let (mut stalled, head) = handshake(sock.connect(h.addr).await.unwrap(), "/ws?channel=flood", &[]).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let body = "x".repeat(60_000);
    let mut cut = false;
    for _ in 0..2_000 {
        let (status, _, text) = http(h.addr, "GET", "/metrics", &[], b"").await;
        assert_eq!(status, 200);
        if metric(&text, "herald_disconnects_total{reason=\"slow_consumer\"}") == 1 {
            cut = true;
            break;
        }
        if metric(&text, "herald_subscriptions") == 1 {
            publish(h.addr, "flood", &body, false).await;
        } else {
            // Cut: its close frame waits for the close timeout.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert!(cut, "the stalled subscriber was never cut");
    let mut h = h;
    terminate(&mut h).await;
    let log = h.log.await.unwrap();
    let cut = log.lines().find(|l| l.contains("slow consumer cut")).unwrap_or_else(|| panic!("no slow consumer line: {log}"));
    assert!(cut.contains("INFO") && cut.contains("remote=127.0.0.1:") && cut.contains("transport=ws"), "{cut}");
    assert!(!log.contains("opened"), "no per-connection lines at info: {log}");
    drop(stalled.shutdown().await);
}

/// SIGTERM, and waits for the process to drain and exit.
async fn terminate(h: &mut Spawned) {
    let pid = h.child.id().expect("running").to_string();
    let status = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(status.success());
    let _ = tokio::time::timeout(WAIT, h.child.wait()).await.expect("herald did not stop on SIGTERM");
}
