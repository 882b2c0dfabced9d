//! Fan-out: every subscriber gets every message once, in order, from one
//! encoding per wire form.

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_to_1000_websocket_subscribers_over_all_shards() {
    const SUBS: usize = 1000;
    const MSGS: u64 = 20;
    let h = start(4, |_| {});
    let a = addr(&h);
    let mut clients = Vec::with_capacity(SUBS);
    for _ in 0..SUBS {
        clients.push(ws(a, "/ws?channel=fan").await);
    }
    let text = h.metrics_text();
    for shard in 0..4 {
        let n = metric(&text, &format!("herald_shard_connections_open{{shard=\"{shard}\"}}"));
        assert_eq!(n, (SUBS / 4) as u64, "connections are spread round-robin over every shard");
    }
    for i in 1..=MSGS {
        let p = h.publish("fan", herald::Payload::json(format!("{{\"n\":{i}}}")).unwrap()).await.unwrap();
        assert_eq!(p.offset, i);
    }
    let readers = clients.into_iter().map(|mut c| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..MSGS {
                got.push(next_json(&mut c).await);
            }
            got
        })
    });
    for r in readers {
        let got = r.await.unwrap();
        for (i, m) in got.iter().enumerate() {
            let want = i as u64 + 1;
            assert_eq!(m, &json!({"channel": "fan", "offset": want, "data": {"n": want}}));
        }
    }
    let text = h.metrics_text();
    assert_eq!(metric(&text, "herald_frames_encoded_total{form=\"ws_json\"}"), MSGS, "each message encoded once");
    assert_eq!(metric(&text, "herald_frames_delivered_total{transport=\"ws\"}"), SUBS as u64 * MSGS);
    assert_eq!(metric(&text, "herald_messages_published_total"), MSGS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_sse_subscribers_see_identical_messages() {
    let h = start(2, |_| {});
    let a = addr(&h);
    let mut w1 = ws(a, "/ws?channel=news").await;
    let mut w2 = ws(a, "/ws?channel=news").await;
    let mut s1 = Sse::open(a, "channel=news").await;
    let mut s2 = Sse::open(a, "channel=news").await;
    let bodies = [("plain text", false), ("two\nlines\r\nhere", false), ("{\"a\": [1, 2],\n \"b\": null}", true), ("\"quoted\"", true)];
    for (body, is_json) in bodies {
        let (status, _) = publish(a, "news", body, is_json).await;
        assert_eq!(status, 200);
    }
    for _ in bodies {
        let a1 = next_text(&mut w1).await;
        let a2 = next_text(&mut w2).await;
        let b1 = s1.next_data().await.unwrap();
        let b2 = s2.next_data().await.unwrap();
        assert_eq!(a1, b1, "WebSocket and SSE carry the same envelope");
        assert_eq!(a1, a2);
        assert_eq!(b1, b2);
        assert!(!a1.contains('\n'), "the envelope is one line: {a1:?}");
    }
    let text = h.metrics_text();
    for form in ["ws_json", "sse_json_id"] {
        assert_eq!(metric(&text, &format!("herald_frames_encoded_total{{form=\"{form}\"}}")), 4, "{form}");
    }
    assert_eq!(metric(&text, "herald_frames_delivered_total{transport=\"ws\"}"), 8);
    assert_eq!(metric(&text, "herald_frames_delivered_total{transport=\"sse\"}"), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_format_sends_the_payload_alone() {
    let h = start(2, |_| {});
    let a = addr(&h);
    let mut w = ws(a, "/ws?channel=r&format=raw").await;
    let mut s = Sse::open(a, "channel=r&format=raw").await;
    publish(a, "r", "line one\nline two", false).await;
    publish(a, "r", "{\"k\":1}", true).await;
    assert_eq!(next_text(&mut w).await, "line one\nline two");
    assert_eq!(s.next_data().await.unwrap(), "line one\nline two");
    assert_eq!(next_text(&mut w).await, "{\"k\":1}");
    assert_eq!(s.next_data().await.unwrap(), "{\"k\":1}");
    // A raw connection takes its channels from the query only.
    let reply = command(&mut w, json!({"op": "subscribe", "channel": "other"})).await;
    assert_eq!(reply["code"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_publish_unsubscribe_over_websocket() {
    let h = start(2, |_| {});
    let a = addr(&h);
    let mut c = ws(a, "/ws").await;
    let sub = command(&mut c, json!({"op": "subscribe", "channel": "chat", "id": 1})).await;
    assert_eq!(sub["op"], "subscribed");
    assert_eq!(sub["channel"], "chat");
    assert_eq!(sub["id"], 1);
    let epoch = sub["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());

    let publ = command(&mut c, json!({"op": "publish", "channel": "chat", "data": {"hi": true}, "id": 2})).await;
    assert_eq!(publ, json!({"op": "published", "channel": "chat", "offset": 1, "epoch": epoch, "id": 2}));
    assert_eq!(next_json(&mut c).await, json!({"channel": "chat", "offset": 1, "data": {"hi": true}}));

    // Subscribing again is harmless and gives the same epoch; one copy per message.
    let again = command(&mut c, json!({"op": "subscribe", "channel": "chat"})).await;
    assert_eq!(again["epoch"], epoch.as_str());
    let (status, body) = publish(a, "chat", "two", false).await;
    assert_eq!((status, body["offset"].as_u64(), body["epoch"].as_str()), (200, Some(2), Some(epoch.as_str())));
    assert_eq!(next_json(&mut c).await["offset"], 2);

    let unsub = command(&mut c, json!({"op": "unsubscribe", "channel": "chat", "id": 3})).await;
    assert_eq!(unsub, json!({"op": "unsubscribed", "channel": "chat", "id": 3}));
    publish(a, "chat", "not for you", false).await;
    // A sentinel on another channel proves nothing from "chat" arrived.
    command(&mut c, json!({"op": "subscribe", "channel": "sentinel"})).await;
    publish(a, "sentinel", "s", false).await;
    assert_eq!(next_json(&mut c).await["channel"], "sentinel");
}
