//! History and recovery (protocol v2) on the local broker, over real
//! WebSockets and HTTP.

use serde_json::{json, Value};

use crate::common::*;

/// Publishes `n` JSON numbers `from..from+n` over HTTP; returns the last reply.
async fn publish_range(addr: std::net::SocketAddr, channel: &str, from: u64, n: u64) -> Value {
    let mut last = Value::Null;
    for i in from..from + n {
        let (status, reply) = publish(addr, channel, &i.to_string(), true).await;
        assert_eq!(status, 200, "{reply}");
        last = reply;
    }
    last
}

/// The `data` of the next `n` messages.
async fn data_of_next(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = next_json(ws).await;
        assert!(m.get("op").is_none(), "a message, not {m}");
        out.push(m["data"].clone());
    }
    out
}

#[tokio::test]
async fn a_client_that_was_away_recovers_what_it_missed_then_live() {
    let h = start(2, |_| {});
    let a = addr(&h);
    let mut ws1 = ws(a, "/ws").await;
    let sub = command(&mut ws1, json!({"op":"subscribe","channel":"doc","id":1})).await;
    assert_eq!((sub["op"].as_str(), sub["offset"].as_u64(), sub.get("recovered")), (Some("subscribed"), Some(0), None));
    let epoch = sub["epoch"].as_str().unwrap().to_string();
    publish_range(a, "doc", 1, 5).await;
    let got = data_of_next(&mut ws1, 5).await;
    assert_eq!(got, (1..=5).map(|i| json!(i)).collect::<Vec<_>>());
    drop(ws1);

    publish_range(a, "doc", 6, 5).await;
    let mut ws2 = ws(a, "/ws").await;
    let sub = command(&mut ws2, json!({"op":"subscribe","channel":"doc","since":format!("{epoch}:5"),"id":2})).await;
    assert_eq!(sub, json!({"op":"subscribed","channel":"doc","epoch":epoch,"offset":10,"recovered":true,"id":2}));
    let offsets: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(next_json(&mut ws2).await["offset"].as_u64().unwrap());
        }
        v
    };
    assert_eq!(offsets, vec![6, 7, 8, 9, 10]);
    publish_range(a, "doc", 11, 1).await;
    let live = next_json(&mut ws2).await;
    assert_eq!((live["offset"].as_u64(), live["data"].clone()), (Some(11), json!(11)));

    let m = reqwest_like_metrics(a).await;
    assert_eq!(metric(&m, "herald_recoveries_total{outcome=\"recovered\"}"), 1);
    assert_eq!(metric(&m, "herald_messages_replayed_total"), 5);
    assert_eq!(metric(&m, "herald_history_entries"), 11);
}

async fn reqwest_like_metrics(a: std::net::SocketAddr) -> String {
    http(a, "GET", "/metrics", &[], b"").await.2
}

#[tokio::test]
async fn what_cannot_be_recovered_whole_is_not_recovered_at_all() {
    let h = start(1, |c| {
        c.history_size(5).recovery_max(7);
    });
    let a = addr(&h);
    let epoch = publish_range(a, "c", 1, 10).await["epoch"].as_str().unwrap().to_string();
    let cases = [
        (format!("{epoch}:3"), "too_old"),           // 4..10: history holds only 6..10
        (format!("{epoch}:1"), "too_many"),          // 2..10: 9 > recovery_max 7
        ("00000000:9".to_string(), "epoch_changed"), // another epoch
        (format!("{epoch}:99"), "epoch_changed"),    // ahead of the top
    ];
    for (i, (since, outcome)) in cases.iter().enumerate() {
        let mut c = ws(a, "/ws").await;
        let sub = command(&mut c, json!({"op":"subscribe","channel":"c","since":since})).await;
        assert_eq!((sub["recovered"].as_bool(), sub["offset"].as_u64()), (Some(false), Some(10 + i as u64)), "{since}: {sub}");
        // Nothing is replayed: the next frame is the next live message.
        publish_range(a, "c", 11 + i as u64, 1).await;
        assert_eq!(next_json(&mut c).await["offset"].as_u64(), Some(11 + i as u64), "{since}");
        let m = reqwest_like_metrics(a).await;
        assert!(metric(&m, &format!("herald_recoveries_total{{outcome=\"{outcome}\"}}")) >= 1, "{since}");
    }
    let mut c = ws(a, "/ws").await;
    let bad = command(&mut c, json!({"op":"subscribe","channel":"c","since":"nonsense","id":5})).await;
    assert_eq!((bad["op"].as_str(), bad["code"].as_str(), bad["id"].as_u64()), (Some("error"), Some("bad_request"), Some(5)));
}

/// Publishes race the replay: each offset reaches the client exactly
/// once, in order, across the seam between history and live messages.
#[tokio::test]
async fn publishes_racing_a_recovery_arrive_once_in_order() {
    let h = start(2, |c| {
        c.history_size(1000).recovery_max(1000);
    });
    let a = addr(&h);
    let epoch = publish_range(a, "race", 1, 50).await["epoch"].as_str().unwrap().to_string();
    // A publisher on its own task keeps going while clients recover.
    let publisher = tokio::spawn(async move {
        let mut p = ws(a, "/ws").await;
        for i in 51..=400u64 {
            send(&mut p, json!({"op":"publish","channel":"race","data":i})).await;
        }
        for _ in 51..=400 {
            let r = next_json(&mut p).await;
            assert_eq!(r["op"], "published", "{r}");
        }
    });
    let mut clients = Vec::new();
    for since in [0u64, 10, 25, 40] {
        let epoch = epoch.clone();
        clients.push(tokio::spawn(async move {
            let mut c = ws(a, "/ws").await;
            let sub = command(&mut c, json!({"op":"subscribe","channel":"race","since":format!("{epoch}:{since}")})).await;
            assert_eq!(sub["recovered"], true, "{sub}");
            let mut next = since + 1;
            while next <= 400 {
                let m = next_json(&mut c).await;
                assert_eq!(m["offset"].as_u64(), Some(next), "since {since}: expected offset {next}, got {m}");
                next += 1;
            }
        }));
        tokio::task::yield_now().await;
    }
    publisher.await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
}

#[tokio::test]
async fn history_over_websocket_and_http() {
    let h = start(1, |c| {
        c.history_size(10).recovery_max(50);
    });
    let a = addr(&h);
    let epoch = publish_range(a, "h", 1, 3).await["epoch"].as_str().unwrap().to_string();
    let (status, _, _) = http(a, "POST", "/publish/h", &[("content-type", "text/plain")], b"four").await;
    assert_eq!(status, 200);
    let mut c = ws(a, "/ws").await;
    let page = command(&mut c, json!({"op":"history","channel":"h","since":format!("{epoch}:1"),"limit":2,"id":3})).await;
    assert_eq!(
        page,
        json!({"op":"history","channel":"h","epoch":epoch,"offset":4,"publications":[{"offset":2,"data":2},{"offset":3,"data":3}],"complete":false,"id":3})
    );
    let (status, head, body) = http(a, "GET", &format!("/history/h?since={epoch}:2"), &[], b"").await;
    assert_eq!(status, 200);
    assert!(head.contains("application/json"), "{head}");
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(
        v,
        json!({"channel":"h","epoch":epoch,"offset":4,"publications":[{"offset":3,"data":3},{"offset":4,"data":"four"}],"complete":true})
    );
    let latest: Value = serde_json::from_str(http(a, "GET", "/history/h?limit=1", &[], b"").await.2.trim()).unwrap();
    assert_eq!(latest["publications"], json!([{"offset":4,"data":"four"}]));
    for (path, code) in [
        ("/history/h?since=xyz", "bad_request"),
        ("/history/h?limit=0", "bad_request"),
        ("/history/h?limit=51", "bad_request"),
        ("/history/bad%20name", "bad_channel"),
    ] {
        let (status, _, body) = http(a, "GET", path, &[], b"").await;
        assert_eq!(status, 400, "{path}");
        assert!(body.contains(code), "{path}: {body}");
    }
    assert_eq!(http(a, "POST", "/history/h", &[], b"").await.0, 405);
    let err = command(&mut c, json!({"op":"history","channel":"h","limit":51})).await;
    assert_eq!(err["code"], "bad_request");
}

/// The plain subscribe's `offset` is where the subscription starts: a
/// message at or before it is not delivered, every later one is.
#[tokio::test]
async fn subscribed_offset_is_where_delivery_starts() {
    let h = start(2, |_| {});
    let a = addr(&h);
    publish_range(a, "s", 1, 3).await;
    let mut c = ws(a, "/ws").await;
    let sub = command(&mut c, json!({"op":"subscribe","channel":"s"})).await;
    let top = sub["offset"].as_u64().unwrap();
    assert_eq!(top, 3);
    publish_range(a, "s", 4, 2).await;
    assert_eq!(next_json(&mut c).await["offset"].as_u64(), Some(4));
    assert_eq!(next_json(&mut c).await["offset"].as_u64(), Some(5));
}

/// A replay that would not fit the connection's queue whole is not
/// started (recovered: false), rather than cut by the slow-consumer
/// policy half way; a history page is cut to fit and says so.
#[tokio::test]
async fn a_recovery_or_page_larger_than_the_queue_is_refused_or_cut() {
    let h = start(1, |c| {
        c.max_message_bytes(100).outbound_queue_bytes(4000).history_size(100).recovery_max(100);
    });
    let a = addr(&h);
    let body = "y".repeat(90);
    let mut epoch = String::new();
    for _ in 0..50 {
        let (status, reply) = publish(a, "big", &body, false).await;
        assert_eq!(status, 200);
        epoch = reply["epoch"].as_str().unwrap().to_string();
    }
    let mut c = ws(a, "/ws").await;
    let sub = command(&mut c, json!({"op":"subscribe","channel":"big","since":format!("{epoch}:0")})).await;
    assert_eq!((sub["recovered"].as_bool(), sub["offset"].as_u64()), (Some(false), Some(50)), "{sub}");
    let page = command(&mut c, json!({"op":"history","channel":"big","since":format!("{epoch}:0"),"limit":100})).await;
    let n = page["publications"].as_array().unwrap().len();
    assert!(n > 0 && n < 50, "{n} publications in a page of at most 2,000 bytes");
    assert_eq!(page["complete"], false);
    // The connection is fine: it still gets live messages.
    publish(a, "big", "live", false).await;
    assert_eq!(next_json(&mut c).await["offset"].as_u64(), Some(51));
}

/// A retried publish with the same idempotency key publishes once and
/// answers as the first time, over HTTP and WebSocket; a bad key is
/// refused.
#[tokio::test]
async fn a_retried_publish_with_its_key_publishes_once() {
    let h = start(2, |_| {});
    let a = addr(&h);
    let mut sub = ws(a, "/ws").await;
    command(&mut sub, json!({"op":"subscribe","channel":"once"})).await;
    let post = |key: &'static str, body: &'static str| async move {
        let (status, _, reply) =
            http(a, "POST", "/publish/once", &[("content-type", "text/plain"), ("idempotency-key", key)], body.as_bytes()).await;
        (status, serde_json::from_str::<Value>(reply.trim()).unwrap_or(Value::Null))
    };
    let (s1, r1) = post("order-17", "first").await;
    let (s2, r2) = post("order-17", "retry").await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(r1, r2, "the repeat gets the first reply");
    let (_, r3) = post("order-18", "second").await;
    assert_eq!(r3["offset"].as_u64(), Some(2));
    let mut c = ws(a, "/ws").await;
    let p1 = command(&mut c, json!({"op":"publish","channel":"once","data":"ws","idempotency_key":"k","id":1})).await;
    let p2 = command(&mut c, json!({"op":"publish","channel":"once","data":"ws","idempotency_key":"k","id":2})).await;
    assert_eq!((p1["offset"].as_u64(), p2["offset"].as_u64(), p2["id"].as_u64()), (Some(3), Some(3), Some(2)));
    // The subscriber saw each publish once: first, second, ws; then a marker.
    publish(a, "once", "marker", false).await;
    let got: Vec<Value> = data_of_next(&mut sub, 4).await;
    assert_eq!(got, vec![json!("first"), json!("second"), json!("ws"), json!("marker")]);
    let (status, _, body) = http(a, "POST", "/publish/once", &[("idempotency-key", &"x".repeat(129))], b"x").await;
    assert_eq!(status, 400, "{body}");
    let bad = command(&mut c, json!({"op":"publish","channel":"once","data":1,"idempotency_key":""})).await;
    assert_eq!(bad["code"], "bad_request");
    let m = reqwest_like_metrics(a).await;
    assert_eq!(metric(&m, "herald_idempotent_repeats_total"), 2);
}

/// One-channel SSE streams carry each message's position as its `id`, say
/// where they start (`event: subscribed`, json format), and a reconnect
/// with `Last-Event-ID` (or a first connect with `last_event_id`) gets
/// what it missed, exactly once, then live messages.
#[tokio::test]
async fn sse_streams_carry_positions_and_recover_from_last_event_id() {
    let h = start(2, |_| {});
    let a = addr(&h);
    let mut s = Sse::open(a, "channel=feed").await;
    let (name, _, data) = s.next_event().await.unwrap();
    let sub: Value = serde_json::from_str(&data).unwrap();
    assert_eq!((name.as_str(), sub["offset"].as_u64(), sub.get("recovered")), ("subscribed", Some(0), None), "{data}");
    let epoch = sub["epoch"].as_str().unwrap().to_string();
    publish_range(a, "feed", 1, 3).await;
    let mut last = String::new();
    for i in 1..=3u64 {
        let (name, id, data) = s.next_event().await.unwrap();
        assert_eq!((name.as_str(), id.clone()), ("message", Some(format!("{epoch}:{i}"))), "{data}");
        last = id.unwrap();
    }
    drop(s);
    publish_range(a, "feed", 4, 3).await;
    // The browser's reconnect: Last-Event-ID is the last id it saw.
    let mut s = Sse::open_with(a, "/sse?channel=feed", &[("Last-Event-ID", &last)]).await;
    let (name, _, data) = s.next_event().await.unwrap();
    let sub: Value = serde_json::from_str(&data).unwrap();
    assert_eq!((name.as_str(), sub["recovered"].as_bool(), sub["offset"].as_u64()), ("subscribed", Some(true), Some(6)), "{data}");
    for i in 4..=6u64 {
        let (_, id, data) = s.next_event().await.unwrap();
        let m: Value = serde_json::from_str(&data).unwrap();
        assert_eq!((id, m["offset"].as_u64()), (Some(format!("{epoch}:{i}")), Some(i)));
    }
    publish_range(a, "feed", 7, 1).await;
    assert_eq!(s.next_event().await.unwrap().1, Some(format!("{epoch}:7")), "then live");
    // A first connect with the query parameter; the header would win.
    let mut q = Sse::open(a, &format!("channel=feed&format=raw&last_event_id={epoch}:5")).await;
    let (name, id, data) = q.next_event().await.unwrap();
    assert_eq!(
        (name.as_str(), id, data.as_str()),
        ("message", Some(format!("{epoch}:6")), "6"),
        "raw: no subscribed event, the replay first"
    );
    // An id that is not a position recovers nothing.
    let mut bad = Sse::open_with(a, "/sse?channel=feed", &[("Last-Event-ID", "garbage")]).await;
    let (_, _, data) = bad.next_event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["recovered"], false);
}

/// A stream of several channels writes every channel's position, in the
/// stream's order, as each message's id, and recovers each channel from
/// that list.
#[tokio::test]
async fn sse_streams_of_several_channels_carry_every_position_and_recover_each() {
    let h = start(2, |_| {});
    let a = addr(&h);
    let ea = publish_range(a, "a", 1, 2).await["epoch"].as_str().unwrap().to_string();
    let mut s = Sse::open(a, "channel=a&channel=b&format=raw").await;
    let eb = publish_range(a, "b", 1, 1).await["epoch"].as_str().unwrap().to_string();
    let (_, id, data) = s.next_event().await.unwrap();
    assert_eq!((id.as_deref(), data.as_str()), (Some(format!("{ea}:2,{eb}:1").as_str()), "1"), "a starts at its top 2, b moves to 1");
    publish_range(a, "a", 3, 1).await;
    let (_, last, _) = s.next_event().await.unwrap();
    assert_eq!(last.as_deref(), Some(format!("{ea}:3,{eb}:1").as_str()));
    drop(s);
    publish_range(a, "b", 2, 2).await;
    publish_range(a, "a", 4, 1).await;
    let mut s = Sse::open_with(a, "/sse?channel=a&channel=b", &[("Last-Event-ID", last.as_deref().unwrap())]).await;
    let mut subscribed = Vec::new();
    let mut got = Vec::new();
    while got.len() < 3 {
        let (name, id, data) = s.next_event().await.unwrap();
        let v: Value = serde_json::from_str(&data).unwrap();
        if name == "subscribed" {
            subscribed.push((v["channel"].as_str().unwrap().to_string(), v["recovered"].as_bool()));
        } else {
            got.push((v["channel"].as_str().unwrap().to_string(), v["offset"].as_u64().unwrap(), id.unwrap()));
        }
    }
    assert_eq!(subscribed, vec![("a".to_string(), Some(true)), ("b".to_string(), Some(true))]);
    assert_eq!(
        got,
        vec![
            ("a".to_string(), 4, format!("{ea}:4,{eb}:1")),
            ("b".to_string(), 2, format!("{ea}:4,{eb}:2")),
            ("b".to_string(), 3, format!("{ea}:4,{eb}:3")),
        ],
        "each channel's missed messages once, and the list moves with them"
    );
    publish_range(a, "a", 5, 1).await;
    assert_eq!(s.next_event().await.unwrap().1, Some(format!("{ea}:5,{eb}:3")), "then live");
    // A list that does not match the channels recovers nothing.
    let mut bad = Sse::open_with(a, "/sse?channel=a&channel=b", &[("Last-Event-ID", &format!("{ea}:1"))]).await;
    let (_, _, data) = bad.next_event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["recovered"], false);
}
