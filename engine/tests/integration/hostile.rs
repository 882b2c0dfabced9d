//! Hostile input, one case after another, on one server: each gets a
//! clear answer (an HTTP status or a WebSocket close code), a counter, and
//! nothing else. A well-behaved subscriber receives every message of a
//! steady stream throughout, and the server is healthy at the end.

use std::net::SocketAddr;
use std::time::Duration;

use herald::Payload;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Sends `bytes` on a fresh connection and returns what came back until
/// the server closed (or 5 s passed).
async fn exchange(a: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(a).await.unwrap();
    let _ = s.write_all(bytes).await;
    read_until_closed(&mut s, Duration::from_secs(5)).await
}

async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn status(resp: &[u8]) -> u16 {
    std::str::from_utf8(resp.get(9..12).unwrap_or_default()).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The close code of the first close frame in `bytes` (server frames are
/// unmasked; skips data frames before it).
fn close_code(bytes: &[u8]) -> Option<u16> {
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let len = usize::from(bytes[at + 1] & 0x7F);
        let (len, head) = match len {
            126 => (usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])), 4),
            127 => return None,
            l => (l, 2),
        };
        if bytes[at] & 0x0F == 0x8 {
            return Some(u16::from_be_bytes([*bytes.get(at + head)?, *bytes.get(at + head + 1)?]));
        }
        at += head + len;
    }
    None
}

/// A masked client frame (mask 0: the payload goes as is).
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

async fn ws_close_code(a: SocketAddr, frames: &[u8]) -> Option<u16> {
    let mut s = raw_ws(a, "/ws").await;
    let _ = s.write_all(frames).await;
    close_code(&read_until_closed(&mut s, Duration::from_secs(5)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_clear_answers_and_the_others_lose_nothing() {
    let h = start(2, |c| {
        c.max_message_bytes(4096).request_head_timeout(Duration::from_millis(500)).max_subscriptions(16);
    });
    let a = addr(&h);

    // The bystander and a steady stream.
    let mut bystander = ws(a, "/ws?channel=steady").await;
    let stream = {
        let h = h.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                n += 1;
                h.publish("steady", Payload::text(format!("m{n}"))).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // Malformed HTTP.
    assert_eq!(status(&exchange(a, b"NONSENSE\r\n\r\n").await), 400);
    assert!([400, 505].contains(&status(&exchange(a, b"GET /ws HTTP/9.9\r\n\r\n").await)), "unknown HTTP version");
    assert_eq!(status(&exchange(a, b"GET / HTTP/1.1\r\nbad header line\r\n\r\n").await), 400);
    // Handshakes without a key, with a bad version, or not an upgrade.
    let no_key = b"GET /ws HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\r\n";
    assert_eq!(status(&exchange(a, no_key).await), 400, "missing Sec-WebSocket-Key");
    let bad_version =
        b"GET /ws HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 8\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let r = exchange(a, bad_version).await;
    assert_eq!(status(&r), 426, "bad Sec-WebSocket-Version");
    assert!(String::from_utf8_lossy(&r).to_lowercase().contains("sec-websocket-version: 13"), "it says which version");
    assert_eq!(status(&exchange(a, b"GET /ws HTTP/1.1\r\nhost: t\r\n\r\n").await), 426);
    // Bad channels, too many channels, SSE without a channel.
    assert_eq!(status(&exchange(a, b"GET /ws?channel=a%20b HTTP/1.1\r\nhost: t\r\n\r\n").await), 400);
    let many: String = (0..17).map(|i| format!("channel=c{i}&")).collect();
    assert_eq!(status(&exchange(a, format!("GET /sse?{many} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes()).await), 400);
    assert_eq!(status(&exchange(a, b"GET /sse HTTP/1.1\r\nhost: t\r\n\r\n").await), 400);
    // Slowloris: a head trickled byte by byte is cut at its deadline.
    let mut slow = TcpStream::connect(a).await.unwrap();
    for b in b"GET /ws HTTP/1.1\r\nhost: t\r\nx-slow: ".iter() {
        if slow.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let cut = read_until_closed(&mut slow, Duration::from_secs(3)).await;
    assert!(cut.is_empty() || status(&cut) == 408, "{}", String::from_utf8_lossy(&cut));

    // WebSocket frames.
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", vec![0x81, 0x02, b'h', b'i'], 1002),
        ("reserved bits", client_frame(0xC1, b"x"), 1002),
        ("reserved opcode", client_frame(0x83, b"x"), 1002),
        ("fragmented control frame", client_frame(0x09, b"x"), 1002),
        ("oversized control frame", client_frame(0x89, &[b'p'; 126]), 1002),
        ("invalid UTF-8", client_frame(0x81, &[0xC3, 0x28]), 1007),
        ("invalid close code", client_frame(0x88, &999u16.to_be_bytes()), 1002),
        ("one-byte close payload", client_frame(0x88, &[3]), 1002),
        ("2^63-byte length", vec![0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0], 1009),
        ("oversized message", client_frame(0x81, &[b'a'; 6000]), 1009),
    ];
    for (what, frame, want) in cases {
        assert_eq!(ws_close_code(a, &frame).await, Some(want), "{what}");
    }
    // An endless fragmented message: its reassembled size is capped.
    let mut endless = client_frame(0x01, &[b'a'; 1000]);
    for _ in 0..10 {
        endless.extend_from_slice(&client_frame(0x00, &[b'a'; 1000]));
    }
    assert_eq!(ws_close_code(a, &endless).await, Some(1009), "endless fragments");
    // Slowloris mid-frame: a frame trickled slower than nothing at all is
    // still answered (pings, then the idle timeout), never a stuck shard;
    // meanwhile the stream goes on (checked below).
    let mut trickle = raw_ws(a, "/ws").await;
    for b in client_frame(0x81, br#"{"op":"subscribe","channel":"x"}"#).iter().take(10) {
        trickle.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(trickle);

    // Deeply nested JSON and a flood of subscribes: error replies, the
    // connection stays.
    let mut c = ws(a, "/ws").await;
    let deep = format!(r#"{{"op":"publish","channel":"d","data":{}{}}}"#, "[".repeat(200), "]".repeat(200));
    let r = command(&mut c, serde_json::from_str(&deep).unwrap_or(json!({"op":"publish","channel":"d"}))).await;
    assert_eq!(r["op"], "error", "{r}");
    for i in 0..40 {
        send(&mut c, json!({"op": "subscribe", "channel": format!("flood-{i}"), "id": i})).await;
    }
    let mut limits = 0;
    for _ in 0..40 {
        let r = next_json(&mut c).await;
        if r["code"] == "limit" {
            limits += 1;
        }
    }
    assert_eq!(limits, 40 - 16, "subscriptions over max_subscriptions are refused");
    let r = command(&mut c, json!({"op": "subscribe", "channel": "bad channel!"})).await;
    assert_eq!(r["code"], "bad_channel");

    // The bystander got every message of the stream, in order.
    stream.abort();
    let last = h.publish("steady", Payload::text("last")).await.unwrap().offset;
    for want in 1..=last {
        let m = next_json(&mut bystander).await;
        assert_eq!(m["offset"].as_u64(), Some(want), "the bystander lost nothing");
    }
    let (code, _, _) = http(a, "GET", "/healthz", &[], b"").await;
    assert_eq!(code, 200);
    let m = h.metrics_text();
    assert!(metric(&m, "herald_disconnects_total{reason=\"protocol_error\"}") >= 7);
    assert!(metric(&m, "herald_disconnects_total{reason=\"too_large\"}") >= 3);
    assert!(metric(&m, "herald_disconnects_total{reason=\"invalid_utf8\"}") >= 1);
    assert!(metric(&m, "herald_errors_total{code=\"bad_channel\"}") >= 2);
    assert!(metric(&m, "herald_errors_total{code=\"limit\"}") >= 25);
}
