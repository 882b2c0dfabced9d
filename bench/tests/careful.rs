//! The careful baseline over real sockets: what its subscribers receive is
//! byte for byte what Herald sends for the same publishes.

use std::net::SocketAddr;

use futures_util::StreamExt;
use herald::proto::frame::decode_server_head;
use herald::proto::json::{sse_json, ws_json};
use herald::Payload;
use herald_bench::careful::Careful;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

async fn start() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Careful::default().serve(listener));
    addr
}

/// One HTTP/1.1 request on its own connection; returns the status line and
/// the body (the server answers with a length, never chunked, here).
async fn request(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8(out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The three publishes, as Herald's `Payload`s and as HTTP requests.
fn publishes() -> Vec<(Payload, &'static str, &'static str)> {
    vec![
        (Payload::text("hello"), "text/plain", "hello"),
        (Payload::text("he said \"hi\"\n\\ \u{1}\t é"), "text/plain; charset=utf-8", "he said \"hi\"\n\\ \u{1}\t é"),
        (Payload::json(&b"{\n  \"a\": [1, 2]\r\n}"[..]).unwrap(), "application/json", "{\n  \"a\": [1, 2]\r\n}"),
    ]
}

/// The text Herald's frame for `offset` carries.
fn herald_text(channel: &str, offset: u64, payload: &Payload) -> Vec<u8> {
    let frame = ws_json(channel, offset, payload);
    let head = decode_server_head(&frame, usize::MAX).unwrap().unwrap();
    frame[head.header_len..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_subscribers_get_heralds_envelopes() {
    let addr = start().await;
    let url = format!("ws://{addr}/ws?channel=room");
    // Subscribed once the handshake is answered.
    let (mut a, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut b, _) = tokio_tungstenite::connect_async(&url).await.unwrap();

    let mut epoch = None;
    for (i, (_, content_type, body)) in publishes().into_iter().enumerate() {
        let (status, reply) = request(addr, "POST", "/publish/room", content_type, body.as_bytes()).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["channel"], "room");
        assert_eq!(reply["offset"], i as u64 + 1);
        let e = reply["epoch"].as_str().unwrap().to_string();
        assert_eq!(e.len(), 8);
        assert_eq!(epoch.get_or_insert(e.clone()), &e, "one epoch for the server's life");
    }

    for ws in [&mut a, &mut b] {
        for (i, (payload, _, _)) in publishes().iter().enumerate() {
            let msg = ws.next().await.unwrap().unwrap();
            let Message::Text(text) = msg else { panic!("not a text frame: {msg:?}") };
            assert_eq!(text.as_bytes(), &herald_text("room", i as u64 + 1, payload)[..], "{}", text.as_str());
        }
    }
}

/// The complete chunks of a chunked body (after the response head).
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let Some(start) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return Vec::new() };
    let mut at = start + 4;
    let mut out = Vec::new();
    while let Some(eol) = raw[at..].windows(2).position(|w| w == b"\r\n") {
        let len = usize::from_str_radix(std::str::from_utf8(&raw[at..at + eol]).unwrap(), 16).unwrap();
        let data = at + eol + 2;
        if raw.len() < data + len + 2 {
            break;
        }
        out.extend_from_slice(&raw[data..data + len]);
        at = data + len + 2;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_subscriber_gets_heralds_events() {
    let addr = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /sse?channel=feed HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    // The head arrives once the subscription is in place.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(s.read(&mut byte).await.unwrap(), 1);
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");

    let mut expected = Vec::new();
    for (i, (payload, content_type, body)) in publishes().into_iter().enumerate() {
        let (status, _) = request(addr, "POST", "/publish/feed", content_type, body.as_bytes()).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        expected.extend_from_slice(&sse_json("feed", i as u64 + 1, &payload));
    }
    // `dechunk` reads the chunks after a head: give it one.
    let mut raw = b"\r\n\r\n".to_vec();
    let mut buf = [0u8; 4096];
    while dechunk(&raw).len() < expected.len() {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "stream ended");
        raw.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8(dechunk(&raw)).unwrap(), String::from_utf8(expected).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_health() {
    let addr = start().await;
    let (status, body) = request(addr, "GET", "/healthz", "text/plain", b"").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok\n"));

    let (status, body) = request(addr, "POST", "/publish/room", "application/json", b"{bad").await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["code"], "bad_request");

    // Offsets count per channel.
    let (_, body) = request(addr, "POST", "/publish/other", "text/plain", b"x").await;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["offset"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_subscriber_is_closed_without_a_gap() {
    use herald_bench::careful::{Data, CAPACITY};
    let careful = Careful::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(careful.clone().serve(listener));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?channel=slow")).await.unwrap();

    // Not read meanwhile: loopback buffers hold some megabytes, the ring
    // CAPACITY messages; this is far more than both.
    let data = Data::text(&"x".repeat(16 * 1024));
    let total = 4 * CAPACITY as u64;
    for _ in 0..total {
        careful.publish("slow", &data).unwrap();
    }

    let mut next = 1;
    let close = loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => {
                let at = t.find("\"offset\":").unwrap() + 9;
                let offset: u64 = t[at..].split(',').next().unwrap().parse().unwrap();
                assert_eq!(offset, next, "offsets arrive in order, with no gap");
                next += 1;
            }
            Message::Close(c) => break c.unwrap(),
            m => panic!("unexpected {m:?}"),
        }
    };
    assert!(next <= total, "it lagged, so it did not get everything");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "slow consumer");
    assert_eq!(careful.lagged_closes(), 1);
}
