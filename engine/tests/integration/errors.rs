//! Bad input: a clear error to that client, a counter, the connection (or
//! the server) otherwise unaffected.

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_is_answered_and_counted() {
    let h = start(2, |c| {
        c.max_message_bytes(100).max_subscriptions(2);
    });
    let a = addr(&h);
    let mut c = ws(a, "/ws").await;
    let cases = [
        (json!("not an object"), "bad_request"),
        (json!({"op": "dance", "channel": "x", "id": 9}), "unknown_op"),
        (json!({"op": "subscribe", "channel": "no spaces"}), "bad_channel"),
        (json!({"op": "subscribe"}), "bad_request"),
        (json!({"op": "publish", "channel": "x", "data": "y".repeat(200)}), "too_large"),
    ];
    for (cmd, code) in cases {
        let reply = command(&mut c, cmd.clone()).await;
        assert_eq!(reply["op"], "error", "{cmd}");
        assert_eq!(reply["code"], code, "{cmd}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let reply = command(&mut c, json!({"op": "dance", "channel": "x", "id": 9})).await;
    assert_eq!(reply["id"], 9, "the id is echoed on errors too");
    c.send(Message::Text("{not json".into())).await.unwrap();
    assert_eq!(next_json(&mut c).await["code"], "bad_request");
    c.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(next_json(&mut c).await["code"], "bad_request");
    // limit: two subscriptions per connection.
    assert_eq!(command(&mut c, json!({"op": "subscribe", "channel": "a"})).await["op"], "subscribed");
    assert_eq!(command(&mut c, json!({"op": "subscribe", "channel": "b"})).await["op"], "subscribed");
    assert_eq!(command(&mut c, json!({"op": "subscribe", "channel": "c"})).await["code"], "limit");
    // The connection still works after all of that.
    publish(a, "a", "still here", false).await;
    assert_eq!(next_json(&mut c).await["data"], "still here");

    let text = h.metrics_text();
    assert_eq!(metric(&text, "herald_errors_total{code=\"bad_request\"}"), 4);
    assert_eq!(metric(&text, "herald_errors_total{code=\"unknown_op\"}"), 2);
    assert_eq!(metric(&text, "herald_errors_total{code=\"bad_channel\"}"), 1);
    assert_eq!(metric(&text, "herald_errors_total{code=\"too_large\"}"), 1);
    assert_eq!(metric(&text, "herald_errors_total{code=\"limit\"}"), 1);

    // forbidden: a server that refuses client publishes.
    let h2 = start(1, |c| {
        c.client_publish(false);
    });
    let mut c2 = ws(addr(&h2), "/ws").await;
    let reply = command(&mut c2, json!({"op": "publish", "channel": "x", "data": 1, "id": 4})).await;
    assert_eq!((reply["code"].as_str(), reply["id"].as_u64()), (Some("forbidden"), Some(4)));
    assert_eq!(metric(&h2.metrics_text(), "herald_errors_total{code=\"forbidden\"}"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_errors() {
    let h = start(1, |c| {
        c.max_message_bytes(64);
    });
    let a = addr(&h);
    assert_eq!(publish(a, "bad%20name", "x", false).await.1["code"], "bad_channel");
    let (status, body) = publish(a, "ok", "{broken", true).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    let (status, body) = publish(a, "ok", &"z".repeat(65), false).await;
    assert_eq!((status, body["code"].as_str()), (413, Some("too_large")));
    let (status, _, body) = http(a, "POST", "/publish/ok", &[], b"\xff\xfe").await;
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = http(a, "GET", "/publish/ok", &[], b"").await;
    assert_eq!(status, 405);
    let (status, _, _) = http(a, "GET", "/nope", &[], b"").await;
    assert_eq!(status, 404);
    let (status, _, body) = http(a, "GET", "/sse", &[], b"").await;
    assert_eq!(status, 400, "SSE needs a channel: {body}");
    let (status, _, _) = http(a, "GET", "/ws?channel=a&format=xml", &[], b"").await;
    assert_eq!(status, 400);
    let (status, _, _) = http(a, "GET", "/ws?channel=a", &[], b"").await;
    assert_eq!(status, 426, "a plain GET on /ws asks for an upgrade");
    let (status, _, body) = http(a, "GET", "/healthz", &[], b"").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_closes_that_connection_with_1009_only() {
    let h = start(2, |c| {
        c.max_message_bytes(1000);
    });
    let a = addr(&h);
    let mut bystander = ws(a, "/ws?channel=keep").await;
    let mut offender = ws(a, "/ws?channel=keep").await;
    publish(a, "keep", "before", false).await;
    assert_eq!(next_json(&mut bystander).await["data"], "before");
    offender.send(Message::Text("x".repeat(5000).into())).await.unwrap();
    let (code, _) = close_of(&mut offender).await;
    assert_eq!(code, 1009);
    for i in 0..50 {
        publish(a, "keep", &format!("after {i}"), false).await;
    }
    for i in 0..50 {
        let m = next_json(&mut bystander).await;
        assert_eq!(m["data"], format!("after {i}"));
        assert_eq!(m["offset"], i + 2);
    }
    wait_metric(&h, "herald_disconnects_total{reason=\"too_large\"}", |v| v == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1002_and_bad_utf8_with_1007() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start(1, |_| {});
    let a = addr(&h);
    for (frame, want) in [
        (vec![0x81u8, 0x02, b'h', b'i'], 1002u16),        // unmasked
        (vec![0xC1, 0x80, 0, 0, 0, 0], 1002),             // RSV1 set
        (vec![0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28], 1007), // invalid UTF-8
        (vec![0x80, 0x80, 0, 0, 0, 0], 1002),             // continuation with nothing to continue
    ] {
        let mut s = raw_ws(a, "/ws").await;
        s.write_all(&frame).await.unwrap();
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n >= 4 && buf[0] == 0x88, "expected a close frame for {frame:?}, got {:?}", &buf[..n]);
        assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), want, "{frame:?}");
    }
    wait_metric(&h, "herald_disconnects_total{reason=\"protocol_error\"}", |v| v == 3).await;
    wait_metric(&h, "herald_disconnects_total{reason=\"invalid_utf8\"}", |v| v == 1).await;
}
