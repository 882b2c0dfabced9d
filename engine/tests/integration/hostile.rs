//! Hostile input, one case after another, on one server: each gets a
//! clear answer (an HTTP status or a WebSocket close code), a counter, and
//! nothing else. A well-behaved subscriber receives every message of a
//! steady stream throughout, and the server is healthy at the end.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use herald::proto::frame::{decode_server_head, encode_client_frame, OpCode};
use herald::Payload;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

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

/// The close code of the first close frame in `bytes` (skips data frames
/// before it).
fn close_code(bytes: &[u8]) -> Option<u16> {
    let mut at = 0;
    while let Ok(Some(head)) = decode_server_head(&bytes[at..], 1 << 20) {
        if head.opcode == OpCode::Close {
            let p = bytes.get(at + head.header_len..at + head.header_len + 2)?;
            return Some(u16::from_be_bytes([p[0], p[1]]));
        }
        at += head.total_len();
    }
    None
}

/// A masked client frame whose first byte (FIN, RSV, opcode) is `first`,
/// set by hand so that reserved bits and opcodes can be sent.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    encode_client_frame(&mut f, true, OpCode::Text, payload, [0x37, 0xFA, 0x21, 0x3D]);
    f[0] = first;
    f
}

/// The next text frame on a raw WebSocket (control frames skipped).
async fn next_raw_text(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        while let Some(head) = decode_server_head(&buf, 1 << 20).unwrap() {
            if buf.len() < head.total_len() {
                break;
            }
            let frame: Vec<u8> = buf.drain(..head.total_len()).collect();
            if head.opcode == OpCode::Text {
                return String::from_utf8(frame[head.header_len..].to_vec()).unwrap();
            }
            assert!(head.opcode.is_control(), "unexpected {:?} frame", head.opcode);
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut tmp)).await.expect("timed out waiting for a frame").unwrap();
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&tmp[..n]);
    }
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
    // Slowloris mid-frame: a command trickled a byte at a time is parsed
    // once complete and answered like any other, and the subscription it
    // made works; meanwhile the stream goes on (checked below).
    let mut trickle = raw_ws(a, "/ws").await;
    for b in client_frame(0x81, br#"{"op":"subscribe","channel":"x"}"#) {
        trickle.write_all(&[b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reply: serde_json::Value = serde_json::from_str(&next_raw_text(&mut trickle).await).unwrap();
    assert_eq!((reply["op"].as_str(), reply["channel"].as_str()), (Some("subscribed"), Some("x")), "{reply}");
    h.publish("x", Payload::text("after the trickle")).await.unwrap();
    let m: serde_json::Value = serde_json::from_str(&next_raw_text(&mut trickle).await).unwrap();
    assert_eq!(m["data"], "after the trickle", "{m}");
    drop(trickle);

    // JSON nested deeper than the parser's limit (serde_json's is 128) as
    // the data of a publish: a bad_request reply, and the connection stays
    // usable.
    let mut c = ws(a, "/ws").await;
    let deep = format!(r#"{{"op":"publish","channel":"d","data":{}{}}}"#, "[".repeat(200), "]".repeat(200));
    assert!(serde_json::from_str::<serde_json::Value>(&deep).is_err(), "the payload is past the depth limit");
    c.send(Message::Text(deep.into())).await.unwrap();
    let r = next_json(&mut c).await;
    assert_eq!((r["op"].as_str(), r["code"].as_str()), (Some("error"), Some("bad_request")), "{r}");
    let r = command(&mut c, json!({"op": "subscribe", "channel": "d"})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    send(&mut c, json!({"op": "publish", "channel": "d", "data": [[[1]]]})).await;
    let (x, y) = (next_json(&mut c).await, next_json(&mut c).await);
    let message = if x["op"] == "message" { &x } else { &y };
    assert_eq!(message["data"], json!([[[1]]]), "the publish after the refused one went through: {x} {y}");

    // A flood of subscribes: error replies, the connection stays.
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
    // It holds one subscription (to "d") already.
    assert_eq!(limits, 40 - 15, "subscriptions over max_subscriptions are refused");
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
    assert!(metric(&m, "herald_errors_total{code=\"bad_request\"}") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stuck_mid_frame_is_pinged_then_closed_as_idle() {
    let h = start(1, |c| {
        c.ping_interval(Duration::from_millis(100)).idle_timeout(Duration::from_millis(600));
    });
    let mut s = raw_ws(addr(&h), "/ws").await;
    // Half a frame, then silence: the shard is not stuck waiting for the
    // rest, it keeps the connection's timers.
    let frame = client_frame(0x81, br#"{"op":"subscribe","channel":"x"}"#);
    s.write_all(&frame[..10]).await.unwrap();
    let got = read_until_closed(&mut s, WAIT).await;
    let mut at = 0;
    let mut pings = 0;
    while let Some(head) = decode_server_head(&got[at..], 1 << 20).unwrap() {
        match head.opcode {
            OpCode::Ping => pings += 1,
            OpCode::Close => break,
            op => panic!("unexpected {op:?} frame"),
        }
        at += head.total_len();
    }
    assert!(pings >= 1, "the server pinged first");
    assert_eq!(close_code(&got), Some(1001), "then closed it");
    wait_metric(&h, "herald_disconnects_total{reason=\"idle_timeout\"}", |v| v == 1).await;
}
