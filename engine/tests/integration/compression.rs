//! permessage-deflate over real sockets: the negotiation as a client sees
//! it, one compressed frame per message shared by every compressing
//! subscriber, plain and compressed subscribers side by side (Python's
//! `websockets` compresses both ways, with context takeover), the
//! decompression bomb, and a client window smaller than a message.

use herald::proto::deflate;
use herald::proto::frame::{self, OpCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// A client over raw TCP that offers `extensions` and inflates what it
/// gets: the frames exactly as the server sent them.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    agreed: Option<deflate::Agreed>,
}

/// One message as received: whether it came compressed, and its text.
#[derive(Debug)]
struct Got {
    compressed: bool,
    op: OpCode,
    text: Vec<u8>,
}

/// The upgrade's response head (lowercase) for an offer.
async fn handshake(a: std::net::SocketAddr, path: &str, extensions: &[&str]) -> (TcpStream, String) {
    let extra: Vec<String> = extensions.iter().map(|e| format!("sec-websocket-extensions: {e}")).collect();
    let (s, head) = crate::common::handshake(TcpStream::connect(a).await.unwrap(), path, &extra).await;
    (s, head.to_ascii_lowercase())
}

fn extension_of(head: &str) -> Option<&str> {
    head.lines().find_map(|l| l.strip_prefix("sec-websocket-extensions:")).map(str::trim)
}

impl Raw {
    async fn open(a: std::net::SocketAddr, path: &str, extensions: &[&str]) -> Raw {
        let (s, head) = handshake(a, path, extensions).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        let agreed = deflate::accept_response(extension_of(&head)).unwrap();
        Raw { s, buf: Vec::new(), agreed }
    }

    async fn next(&mut self) -> Got {
        loop {
            if let Some(head) = frame::decode_server_head_ext(&self.buf, 1 << 24, self.agreed.is_some()).unwrap() {
                if self.buf.len() >= head.total_len() {
                    let payload = self.buf[head.header_len..head.total_len()].to_vec();
                    self.buf.drain(..head.total_len());
                    assert!(head.fin, "Herald does not fragment what it sends");
                    if head.opcode == OpCode::Ping {
                        continue;
                    }
                    let text = if head.compressed { deflate::inflate(&payload, None, 1 << 24).unwrap() } else { payload };
                    return Got { compressed: head.compressed, op: head.opcode, text };
                }
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(WAIT, self.s.read(&mut chunk)).await.expect("timed out waiting for a frame").unwrap();
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn json(&mut self) -> (bool, Value) {
        let g = self.next().await;
        assert_eq!(g.op, OpCode::Text);
        (g.compressed, serde_json::from_slice(&g.text).unwrap())
    }

    /// Sends a text message, deflated (RSV1) when `compressed`.
    async fn send(&mut self, text: &[u8], compressed: bool) {
        let mut out = Vec::new();
        if compressed {
            let mut z = Vec::new();
            assert!(deflate::deflate_into(text, 6, &mut z), "the test message must shrink");
            frame::encode_client_frame(&mut out, true, OpCode::Text, &z, [1, 2, 3, 4]);
            out[0] |= 0x40;
        } else {
            frame::encode_client_frame(&mut out, true, OpCode::Text, text, [1, 2, 3, 4]);
        }
        self.s.write_all(&out).await.unwrap();
    }

    /// The close frame's code (the frames before it skipped).
    async fn close_code(&mut self) -> u16 {
        loop {
            let g = self.next().await;
            if g.op == OpCode::Close {
                return u16::from_be_bytes([g.text[0], g.text[1]]);
            }
        }
    }
}

/// A JSON change set of about `n` bytes.
fn change(i: usize, n: usize) -> String {
    let mut items = Vec::new();
    let mut s = String::new();
    while s.len() < n {
        items.push(json!({"id": items.len(), "title": format!("task {i}-{}", items.len()), "done": items.len() % 3 == 0}));
        s = json!({"i": i, "items": items}).to_string();
    }
    s
}

#[tokio::test]
async fn negotiation_as_the_client_sees_it() {
    let h = start(1, |c| {
        c.compression(true);
    });
    let a = addr(&h);
    let answer = |offers: &'static [&'static str]| async move {
        let (_, head) = handshake(a, "/ws", offers).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        extension_of(&head).map(str::to_owned)
    };
    let base = "permessage-deflate; server_no_context_takeover";
    assert_eq!(answer(&["permessage-deflate; client_max_window_bits"]).await.as_deref(), Some(base));
    assert_eq!(answer(&[]).await, None);
    assert_eq!(answer(&["x-webkit-deflate-frame"]).await, None);
    assert_eq!(answer(&["permessage-deflate; server_max_window_bits=16"]).await, None, "declined: no extension");
    assert_eq!(answer(&["permessage-deflate; mystery=1"]).await, None);
    // The first offer it can serve, across headers.
    assert_eq!(
        answer(&["x-other, permessage-deflate; server_max_window_bits=7", "permessage-deflate; client_no_context_takeover"])
            .await
            .as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    assert_eq!(
        answer(&["permessage-deflate; server_max_window_bits=10; client_max_window_bits=12"]).await.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_max_window_bits=12")
    );
    // `/echo` negotiates too (Autobahn's sections 12 and 13 run there) —
    // only when served.
    let (_, head) = handshake(a, "/echo", &["permessage-deflate"]).await;
    assert!(!head.starts_with("http/1.1 101"), "no /echo unless echo = true");

    // Off (the default): the offer is ignored and frames are plain.
    let plain = start(1, |_| {});
    let mut c = Raw::open(addr(&plain), "/ws?channel=c", &["permessage-deflate"]).await;
    assert!(c.agreed.is_none());
    publish(addr(&plain), "c", &change(0, 1000), true).await;
    assert!(!c.json().await.0);
    assert_eq!(metric(&plain.metrics_text(), "herald_compression_connections"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_compressed_subscribers_get_the_same_messages_each_deflated_once() {
    let h = start(2, |c| {
        c.compression(true);
    });
    let a = addr(&h);
    let mut plain = ws(a, "/ws?channel=c").await;
    let mut raws = Vec::new();
    for _ in 0..6 {
        raws.push(Raw::open(a, "/ws?channel=c", &["permessage-deflate; client_max_window_bits"]).await);
    }
    assert!(raws.iter().all(|r| r.agreed.is_some()));
    wait_metric(&h, "herald_compression_connections", |n| n == 6).await;
    // Every other message is small (sent plain to everyone).
    let sent: Vec<String> = (0..40).map(|i| if i % 2 == 0 { change(i, 1024) } else { json!({"i": i}).to_string() }).collect();
    for m in &sent {
        assert_eq!(publish(a, "c", m, true).await.0, 200);
    }
    for (i, m) in sent.iter().enumerate() {
        let want: Value = serde_json::from_str(m).unwrap();
        let got = next_json(&mut plain).await;
        assert_eq!((got["offset"].as_u64(), &got["data"]), (Some(i as u64 + 1), &want));
        for r in &mut raws {
            let (compressed, got) = r.json().await;
            assert_eq!((got["offset"].as_u64(), &got["data"]), (Some(i as u64 + 1), &want));
            assert_eq!(compressed, i % 2 == 0, "message {i}: large ones compressed, small ones plain");
        }
    }
    let text = h.metrics_text();
    // Six compressing subscribers over two shards, 20 large messages: 20 deflates.
    assert_eq!(metric(&text, "herald_frames_encoded_total{form=\"ws_json_deflate\"}"), 20);
    assert_eq!(metric(&text, "herald_compressed_frames_total{source=\"message\"}"), 20);
    assert_eq!(metric(&text, "herald_compression_skipped_total{reason=\"small\"}"), 20);
    let (bytes_in, bytes_out) =
        (metric(&text, "herald_compression_bytes_total{stage=\"in\"}"), metric(&text, "herald_compression_bytes_total{stage=\"out\"}"));
    assert!(bytes_out * 2 < bytes_in, "JSON compresses: {bytes_in} → {bytes_out}");

    // Replies are compressed by the same rules: a history page is large.
    raws[0].send(json!({"op": "history", "channel": "c", "limit": 10, "id": 1}).to_string().as_bytes(), false).await;
    let (compressed, page) = raws[0].json().await;
    assert_eq!(page["op"], "history");
    assert!(compressed);
    raws[0].send(br#"{"op":"unsubscribe","channel":"nope","id":2}"#, false).await;
    let (compressed, reply) = raws[0].json().await;
    assert_eq!((compressed, reply["id"].as_u64()), (false, Some(2)), "a small reply stays plain");
    drop(raws);
    wait_metric(&h, "herald_compression_connections", |n| n == 0).await;
}

const PY_SCRIPT: &str = r#"
import asyncio, json, sys
import websockets

async def main(base, n):
    # websockets offers permessage-deflate by default and compresses what
    # it sends with context takeover.
    async with websockets.connect(f"ws://{base}/ws") as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions")
        assert ext and ext.startswith("permessage-deflate"), ext
        await ws.send(json.dumps({"op": "subscribe", "channel": "mix", "id": 1}))
        reply = json.loads(await ws.recv())
        assert reply["op"] == "subscribed", reply
        print("ready", flush=True)
        for _ in range(n):
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            print(json.dumps([m["offset"], m["data"]]), flush=True)
        # Publish through compressed commands, one after another (the
        # second reuses the first's context).
        for i in range(3):
            await ws.send(json.dumps({"op": "publish", "channel": "mix", "data": {"from": "python", "i": i, "pad": "abc" * 100}, "id": 10 + i}))
        seen = 0
        while seen < 6:
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            seen += 1
    print("done", flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_compresses_both_ways_beside_a_plain_client() {
    use tokio::io::AsyncBufReadExt;
    let h = start(2, |c| {
        c.compression(true);
    });
    let a = addr(&h);
    let mut plain = ws(a, "/ws?channel=mix").await;
    let n = 30;
    let mut child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(PY_SCRIPT)
        .arg(a.to_string())
        .arg(n.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (with the `websockets` package)");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    async fn line(lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>) -> String {
        tokio::time::timeout(WAIT, lines.next_line()).await.expect("python timed out").unwrap().unwrap_or_default()
    }
    assert_eq!(line(&mut lines).await, "ready");
    let sent: Vec<Value> = (0..n).map(|i| serde_json::from_str(&change(i, 200 + 50 * i)).unwrap()).collect();
    for m in &sent {
        publish(a, "mix", &m.to_string(), true).await;
    }
    for (i, m) in sent.iter().enumerate() {
        let got = next_json(&mut plain).await;
        assert_eq!(&got["data"], m);
        let py: Value = serde_json::from_str(&line(&mut lines).await).unwrap();
        assert_eq!(py, json!([i + 1, m]), "the compressing client got message {i} as it was sent");
    }
    // Its three compressed publishes reached the plain subscriber.
    for i in 0..3 {
        let got = next_json(&mut plain).await;
        assert_eq!((got["data"]["from"].as_str(), got["data"]["i"].as_u64()), (Some("python"), Some(i)));
    }
    assert_eq!(line(&mut lines).await, "done");
    let text = h.metrics_text();
    assert!(metric(&text, "herald_inflated_messages_total") >= 4, "its subscribe and publishes came compressed");
    assert!(metric(&text, "herald_compressed_frames_total{source=\"message\"}") >= n as u64);
}

#[tokio::test]
async fn a_decompression_bomb_closes_1009_and_touches_no_one_else() {
    let h = start(1, |c| {
        c.compression(true);
    });
    let a = addr(&h);
    let mut bystander = Raw::open(a, "/ws?channel=c", &["permessage-deflate"]).await;
    let mut bomber = Raw::open(a, "/ws", &["permessage-deflate"]).await;
    // 16 MiB of spaces deflate to about 16 KiB; the cap is 64 KiB + 1 KiB.
    let mut bomb = Vec::new();
    assert!(deflate::deflate_into(&vec![b' '; 16 << 20], 9, &mut bomb));
    assert!(bomb.len() < 64 * 1024);
    let mut out = Vec::new();
    frame::encode_client_frame(&mut out, true, OpCode::Text, &bomb, [9, 8, 7, 6]);
    out[0] |= 0x40;
    bomber.s.write_all(&out).await.unwrap();
    assert_eq!(bomber.close_code().await, 1009);
    assert_eq!(wait_metric(&h, "herald_disconnects_total{reason=\"too_large\"}", |n| n == 1).await, 1);
    // Broken deflate data: 1007.
    let mut broken = Raw::open(a, "/ws", &["permessage-deflate"]).await;
    let mut out = Vec::new();
    frame::encode_client_frame(&mut out, true, OpCode::Text, b"\xff\xff\xff\xff\xff", [1, 1, 1, 1]);
    out[0] |= 0x40;
    broken.s.write_all(&out).await.unwrap();
    assert_eq!(broken.close_code().await, 1007);
    // RSV1 on a continuation: 1002; RSV1 where compression was not agreed: 1002.
    let mut fragmented = Raw::open(a, "/ws", &["permessage-deflate"]).await;
    let mut out = Vec::new();
    frame::encode_client_frame(&mut out, false, OpCode::Text, b"{", [1, 1, 1, 1]);
    frame::encode_client_frame(&mut out, true, OpCode::Continuation, b"}", [1, 1, 1, 1]);
    let second = out.len() - 7;
    out[second] |= 0x40;
    fragmented.s.write_all(&out).await.unwrap();
    assert_eq!(fragmented.close_code().await, 1002);
    let mut unagreed = Raw::open(a, "/ws", &[]).await;
    unagreed.send(change(0, 500).as_bytes(), true).await;
    assert_eq!(unagreed.close_code().await, 1002);
    // The bystander still gets messages.
    publish(a, "c", &change(1, 1000), true).await;
    let (compressed, m) = bystander.json().await;
    assert!(compressed);
    assert_eq!(m["offset"], 1);
}

#[tokio::test]
async fn compressed_commands_are_inflated_within_the_cap() {
    let h = start(1, |c| {
        c.compression(true).max_message_bytes(4096);
    });
    let a = addr(&h);
    let mut c = Raw::open(a, "/ws", &["permessage-deflate; client_no_context_takeover"]).await;
    let data = change(0, 3000);
    let cmd = format!(r#"{{"op":"publish","channel":"c","data":{data},"id":1}}"#);
    c.send(cmd.as_bytes(), true).await;
    let (_, reply) = c.json().await;
    assert_eq!((reply["op"].as_str(), reply["offset"].as_u64()), (Some("published"), Some(1)), "{reply}");
    // Just over the cap once inflated (4096 + 1024): 1009.
    let data = change(1, 5200);
    let cmd = format!(r#"{{"op":"publish","channel":"c","data":{data},"id":2}}"#);
    assert!(cmd.len() > 5120);
    c.send(cmd.as_bytes(), true).await;
    assert_eq!(c.close_code().await, 1009);
}

#[tokio::test]
async fn a_small_client_window_gets_longer_messages_plain() {
    let h = start(1, |c| {
        c.compression(true);
    });
    let a = addr(&h);
    let mut narrow = Raw::open(a, "/ws?channel=c", &["permessage-deflate; server_max_window_bits=9"]).await;
    let mut wide = Raw::open(a, "/ws?channel=c", &["permessage-deflate"]).await;
    assert_eq!(narrow.agreed.unwrap().server_max_window_bits, Some(9));
    let short = change(0, 400);
    let long = change(1, 2000);
    publish(a, "c", &short, true).await;
    publish(a, "c", &long, true).await;
    for (i, want) in [&short, &long].into_iter().enumerate() {
        let want: Value = serde_json::from_str(want).unwrap();
        let (nz, n) = narrow.json().await;
        let (wz, w) = wide.json().await;
        assert_eq!((&n["data"], &w["data"]), (&want, &want));
        assert!(wz, "the wide window gets message {i} compressed");
        // A 512-byte window: the shared frame of the 2 KB message reaches
        // back further than that.
        assert_eq!(nz, i == 0, "the narrow window gets message {i} compressed only if it fits");
    }
}
