//! Limits: each has a default, a config key and a clear refusal.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_with_503() {
    let h = start(2, |c| {
        c.max_connections(3);
    });
    let a = addr(&h);
    let _c1 = ws(a, "/ws?channel=x").await;
    let _c2 = ws(a, "/ws?channel=x").await;
    let _c3 = ws(a, "/ws?channel=x").await;
    let (status, _, body) = http(a, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"limit\""), "{body}");
    assert!(tokio_tungstenite::connect_async(format!("ws://{a}/ws")).await.is_err());
    assert!(metric(&h.metrics_text(), "herald_connections_rejected_total{reason=\"max_connections\"}") >= 2);
    drop(_c3);
    // A freed slot is usable again.
    wait_metric(&h, "herald_open_permits", |v| v == 2).await;
    let _c4 = ws(a, "/ws?channel=x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_subscriptions_applies_to_the_query() {
    let h = start(1, |c| {
        c.max_subscriptions(2);
    });
    let a = addr(&h);
    let (status, _, body) = http(a, "GET", "/ws?channel=a&channel=b&channel=c", &[], b"").await;
    assert_eq!(status, 400);
    assert!(body.contains("\"limit\""), "{body}");
    let _ok = ws(a, "/ws?channel=a&channel=b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_gets_431() {
    let h = start(1, |_| {});
    let big = "v".repeat(20 * 1024);
    let (status, _, _) = http(addr(&h), "GET", "/healthz", &[("x-big", &big)], b"").await;
    assert_eq!(status, 431);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_request_head_is_cut_at_the_deadline() {
    let h = start(1, |c| {
        c.request_head_timeout(Duration::from_millis(500));
    });
    let mut s = tokio::net::TcpStream::connect(addr(&h)).await.unwrap();
    let started = Instant::now();
    s.write_all(b"GET /ws HTTP/1.1\r\n").await.unwrap();
    // One header byte every 100 ms: the connection must still be closed.
    let closed = async {
        loop {
            if s.write_all(b"x").await.is_err() {
                return;
            }
            let mut b = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), closed).await.expect("a trickling client is not cut off");
    assert!(started.elapsed() >= Duration::from_millis(400), "closed before the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_pinged_then_closed_while_a_responsive_one_stays() {
    let h = start(1, |c| {
        // Margins wide enough for a loaded machine: pings every 150 ms, and
        // a client is idle only after 1.5 s of silence.
        c.ping_interval(Duration::from_millis(150)).idle_timeout(Duration::from_millis(1500));
    });
    let a = addr(&h);
    // tokio-tungstenite answers pings while it reads.
    let mut alive = ws(a, "/ws?channel=k").await;
    let reader = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_millis(3500);
        while Instant::now() < deadline {
            use futures_util::StreamExt;
            if let Ok(Some(Err(e))) = tokio::time::timeout(Duration::from_millis(50), alive.next()).await {
                panic!("responsive client dropped: {e}");
            }
        }
        alive
    });
    // A raw client that never answers.
    let mut silent = raw_ws(a, "/ws").await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = tokio::time::timeout(WAIT, silent.read(&mut buf)).await.expect("silent client never closed").unwrap();
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&seen[..2], &[0x89, 0x00], "the server pings first");
    let close = seen.windows(2).position(|w| w[0] == 0x88).expect("a close frame");
    assert_eq!(u16::from_be_bytes([seen[close + 2], seen[close + 3]]), 1001);
    assert_eq!(&seen[close + 4..close + 2 + seen[close + 1] as usize], b"idle timeout");
    let mut alive = reader.await.unwrap();
    crate::common::send(&mut alive, serde_json::json!({"op":"subscribe","channel":"z"})).await;
    assert_eq!(next_json(&mut alive).await["op"], "subscribed", "the responsive client is still connected");
    wait_metric(&h, "herald_disconnects_total{reason=\"idle_timeout\"}", |v| v == 1).await;
}

/// The backlog the kernel reports for a listening socket (`ss`'s Send-Q).
fn listen_backlog(port: u16) -> u32 {
    let out = std::process::Command::new("ss").args(["-Hltn", &format!("sport = :{port}")]).output().expect("ss (iproute2) is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or_else(|| panic!("port {port} is not listening: {text:?}"));
    line.split_whitespace().nth(2).and_then(|q| q.parse().ok()).unwrap_or_else(|| panic!("no backlog in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_backlog_is_the_configured_one_up_to_somaxconn() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    for want in [100, 1000] {
        let mut c = herald::Config::default();
        c.shards(1).listen("127.0.0.1:0".parse().unwrap()).listen_backlog(want);
        let h = herald::Herald::start(c).unwrap();
        assert_eq!(listen_backlog(addr(&h).port()), want.min(somaxconn), "listen_backlog {want}");
        h.shutdown(Duration::from_secs(1)).await;
    }
}
