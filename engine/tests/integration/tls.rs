//! TLS: `wss://` and `https://` on the standalone server, `rediss://` to
//! Redis, with a self-signed certificate made by the test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use herald::{Herald, Payload};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

use crate::broker::{free_port, ready, RedisServer};
use crate::common::*;

/// A self-signed certificate for `localhost` and 127.0.0.1, in files.
struct Cert {
    dir: PathBuf,
    pem: String,
}

impl Cert {
    fn new() -> Cert {
        let dir = std::env::temp_dir().join(format!("herald-tls-test-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), key.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
        Cert { pem: key.cert.pem(), dir }
    }

    fn cert(&self) -> String {
        self.dir.join("cert.pem").to_str().unwrap().to_string()
    }

    fn key(&self) -> String {
        self.dir.join("key.pem").to_str().unwrap().to_string()
    }

    /// A client that trusts this certificate alone.
    fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::pem::PemObject::pem_slice_iter(self.pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    async fn connect(&self, addr: SocketAddr) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        self.connector().connect(name, tcp).await.unwrap()
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_herald(cert: &Cert, shards: usize) -> Herald {
    start(shards, |c| {
        c.tls_cert = Some(cert.cert());
        c.tls_key = Some(cert.key());
    })
}

/// One HTTP/1.1 request over TLS; the status and the body.
async fn https(cert: &Cert, addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = cert.connect(addr).await;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("no response");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_https_serve_every_endpoint_and_keep_connections_on_their_shards() {
    let cert = Cert::new();
    let h = tls_herald(&cert, 2);
    let a = addr(&h);
    let mut subs = Vec::new();
    for _ in 0..4 {
        let tls = cert.connect(a).await;
        let (ws, resp) = tokio_tungstenite::client_async("wss://localhost/ws?channel=news", tls).await.unwrap();
        assert_eq!(resp.status(), 101);
        subs.push(ws);
    }
    // Round-robin placement: both shards hold WebSockets.
    let m = h.metrics_text();
    for shard in 0..2 {
        assert_eq!(metric(&m, &format!("herald_shard_connections_open{{shard=\"{shard}\"}}")), 2, "{m}");
    }
    // SSE over https.
    let mut sse = cert.connect(a).await;
    sse.write_all(b"GET /sse?channel=news HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n").await.unwrap();
    wait_metric(&h, "herald_subscriptions", |v| v == 5).await;
    // A publish over https reaches every subscriber.
    let (status, body) = https(&cert, a, "POST", "/publish/news", r#"{"n":1}"#).await;
    assert_eq!(status, 200, "{body}");
    for ws in &mut subs {
        let m = next_json(ws).await;
        assert_eq!((m["channel"].as_str(), m["data"].clone()), (Some("news"), json!({"n": 1})), "{m}");
    }
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains(r#"{"n":1}"#) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, sse.read(&mut buf)).await.expect("no SSE event").unwrap();
        assert!(n > 0, "the SSE stream ended");
        got.extend_from_slice(&buf[..n]);
    }
    // Commands over wss get their replies.
    let r = command_on(&mut subs[0], json!({"op": "subscribe", "channel": "other", "id": 7})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    let (status, body) = https(&cert, a, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(metric(&body, "herald_tls_handshakes_total{result=\"ok\"}") >= 7, "{body}");
}

/// A command on a TLS WebSocket and its reply.
async fn command_on(ws: &mut tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>, v: serde_json::Value) -> serde_json::Value {
    use futures_util::SinkExt;
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
    next_json(ws).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_and_untrusted_clients_are_refused_and_counted_without_harm() {
    let cert = Cert::new();
    let h = tls_herald(&cert, 1);
    let a = addr(&h);
    let tls = cert.connect(a).await;
    let (mut ok, _) = tokio_tungstenite::client_async("wss://localhost/ws?channel=c", tls).await.unwrap();
    // Plain HTTP to the TLS port: no response, the connection is closed.
    let mut plain = TcpStream::connect(a).await.unwrap();
    plain.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf)).await.expect("the plain connection stayed open");
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"), "plain text was answered");
    // A client that trusts other roots refuses Herald's certificate.
    let other = Cert::new();
    let tcp = TcpStream::connect(a).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    assert!(other.connector().connect(name, tcp).await.is_err());
    wait_metric(&h, "herald_tls_handshakes_total{result=\"failed\"}", |v| v == 2).await;
    // The good connection did not notice.
    h.publish("c", Payload::text("still here")).await.unwrap();
    assert_eq!(next_json(&mut ok).await["data"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_channels_through_rediss() {
    let cert = Cert::new();
    let tls_port = free_port();
    let redis = RedisServer::start(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert.cert(),
        "--tls-key-file",
        &cert.key(),
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let node = |ca: Option<String>, timeout_ms: u64| {
        start(2, |c| {
            c.redis(url.clone()).redis_timeout(Duration::from_millis(timeout_ms));
            c.redis_tls_ca = ca;
        })
    };
    let a = ready(node(Some(cert.cert()), 1000));
    let b = ready(node(Some(cert.cert()), 1000));
    let mut on_b = ws(addr(&b), "/ws").await;
    let r = command(&mut on_b, json!({"op": "subscribe", "channel": "news"})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    wait_metric(&b, "herald_broker_subscriptions", |v| v == 1).await;
    let p = a.publish("news", Payload::text("over TLS")).await.unwrap();
    let m = next_json(&mut on_b).await;
    assert_eq!((m["data"].as_str(), m["offset"].as_u64()), (Some("over TLS"), Some(p.offset)), "{m}");
    // Herald's subscriber connections (both nodes' control channel, b's
    // channel) came in on the TLS port; the plain port serves only the
    // test's own queries.
    let clients: String = redis.query(&["CLIENT", "LIST"]).unwrap();
    let subscribers: Vec<&str> = clients.lines().filter(|l| !l.contains(" sub=0 ")).collect();
    assert!(subscribers.len() >= 3, "{clients}");
    let tls_addr = format!("laddr=127.0.0.1:{tls_port} ");
    assert!(subscribers.iter().all(|l| l.contains(&tls_addr)), "{clients}");
    // Without the CA, the system's roots do not trust the certificate: the
    // node never connects, and says so in its metrics.
    let untrusting = node(None, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = untrusting.metrics_text();
    assert_eq!(metric(&m, "herald_broker_publisher_up"), 0, "{m}");
    assert!(untrusting.publish("news", Payload::text("x")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_over_tls_carries_every_channel() {
    let cert = Cert::new();
    let tls_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let nodes: Vec<RedisServer> = tls_ports
        .iter()
        .map(|p| {
            let p = p.to_string();
            RedisServer::start(&[
                "--tls-port",
                &p,
                "--tls-cert-file",
                &cert.cert(),
                "--tls-key-file",
                &cert.key(),
                "--tls-ca-cert-file",
                &cert.cert(),
                "--tls-auth-clients",
                "no",
                "--tls-cluster",
                "yes",
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
            ])
        })
        .collect();
    let addrs: Vec<String> = tls_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = std::process::Command::new("redis-cli")
        .args(["--tls", "--cacert", &cert.cert(), "--cluster", "create"])
        .args(&addrs)
        .arg("--cluster-yes")
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for n in &nodes {
        while !n.query::<String>(&["CLUSTER", "INFO"]).unwrap().contains("cluster_state:ok") {
            assert!(std::time::Instant::now() < deadline, "the cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let urls: Vec<String> = tls_ports.iter().map(|p| format!("rediss://127.0.0.1:{p}")).collect();
    let node = |seeds: &[String]| {
        ready(start(2, |c| {
            c.redis_cluster(seeds.to_vec()).redis_timeout(Duration::from_millis(1000));
            c.redis_tls_ca = Some(cert.cert());
        }))
    };
    let (a, b) = (node(&urls[..2]), node(&urls[2..]));
    // Channels on every master (16 names cover the three slot ranges).
    let channels: Vec<String> = (0..16).map(|i| format!("c{i}")).collect();
    let mut on_b = ws(addr(&b), "/ws").await;
    for ch in &channels {
        let r = command(&mut on_b, json!({"op": "subscribe", "channel": ch})).await;
        assert_eq!(r["op"], "subscribed", "{r}");
    }
    wait_metric(&b, "herald_broker_subscriptions", |v| v == 16).await;
    assert_eq!(metric(&b.metrics_text(), "herald_broker_up"), 3, "one TLS subscriber connection per master");
    for ch in &channels {
        a.publish(ch, Payload::text(format!("to {ch}"))).await.unwrap();
    }
    let mut got: Vec<String> = Vec::new();
    for _ in &channels {
        got.push(next_json(&mut on_b).await["data"].as_str().unwrap().to_string());
    }
    got.sort();
    let mut want: Vec<String> = channels.iter().map(|c| format!("to {c}")).collect();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_subscriber_that_stalls_then_reads_gets_everything_without_waiting_for_a_ping() {
    let cert = Cert::new();
    // No ping for an hour: only the flush after the queue drains can push
    // out what TLS holds once the socket was full.
    let h = start(1, |c| {
        c.tls_cert = Some(cert.cert());
        c.tls_key = Some(cert.key());
        c.ping_interval(Duration::from_secs(3600)).idle_timeout(Duration::from_secs(7200)).outbound_queue_bytes(64 << 20);
    });
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(addr(&h)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = cert.connector().connect(name, tcp).await.unwrap();
    let (mut sub, _) = tokio_tungstenite::client_async("wss://localhost/ws?channel=bulk", tls).await.unwrap();
    wait_metric(&h, "herald_subscriptions", |v| v == 1).await;
    // 8 MiB while it does not read: far past the kernel's socket buffers.
    let payload = "p".repeat(2048);
    for _ in 0..4096 {
        h.publish("bulk", Payload::text(payload.clone())).await.unwrap();
    }
    h.publish("bulk", Payload::text("end")).await.unwrap();
    // Read slowly, so that the socket stays full to the end and the last
    // frames are taken by TLS while the socket cannot take them.
    let mut n = 0;
    loop {
        let m = next_json(&mut sub).await;
        if m["data"] == "end" {
            break;
        }
        n += 1;
        if n % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(n, 4096, "every message before the last");
}
