//! History, recovery, gap filling and idempotent publish through the Redis
//! brokers, with real `redis-server`s (killed and restarted) and several
//! Herald nodes: what a client of one node misses, it gets back from any
//! node.

use std::time::Duration;

use herald::{Herald, Payload};
use serde_json::{json, Value};

use crate::broker::{node, ready, subscribed_ws, wait_for, Cluster, RedisServer};
use crate::common::*;

fn offsets(v: &Value) -> Vec<u64> {
    v["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect()
}

/// Subscribes with `since` and returns the reply.
async fn subscribe_since(c: &mut Ws, channel: &str, since: &str, id: u64) -> Value {
    command(c, json!({"op": "subscribe", "channel": channel, "since": since, "id": id})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_node_and_a_node_restart_changes_nothing() {
    let mut redis = RedisServer::start(&[]);
    let (a, b) = (node(&redis.url()), node(&redis.url()));
    let mut c = ws(addr(&a), "/ws").await;
    let r = command(&mut c, json!({"op": "subscribe", "channel": "doc", "id": 1})).await;
    assert_eq!((r["op"].as_str(), r["offset"].as_u64()), (Some("subscribed"), Some(0)), "{r}");
    let epoch = r["epoch"].as_str().unwrap().to_owned();
    for i in 1..=5u64 {
        let p = b.publish("doc", Payload::text(format!("m{i}"))).await.unwrap();
        assert_eq!((p.offset, p.epoch.as_str()), (i, epoch.as_str()), "the epoch the subscriber was told");
    }
    for i in 1..=5u64 {
        assert_eq!(next_json(&mut c).await["offset"].as_u64(), Some(i));
    }
    drop(c);
    // Node A is restarted meanwhile: history lives in Redis.
    a.shutdown(Duration::from_secs(1)).await;
    let a = node(&redis.url());
    for i in 6..=10u64 {
        assert_eq!(a.publish("doc", Payload::text(format!("m{i}"))).await.unwrap().offset, i);
    }
    // The client comes back through node B with its position.
    let mut c = ws(addr(&b), "/ws").await;
    let r = subscribe_since(&mut c, "doc", &format!("{epoch}:5"), 2).await;
    assert_eq!((r["recovered"].as_bool(), r["offset"].as_u64(), r["epoch"].as_str()), (Some(true), Some(10), Some(&*epoch)), "{r}");
    for i in 6..=10u64 {
        let m = next_json(&mut c).await;
        assert_eq!((m["offset"].as_u64(), m["data"].as_str()), (Some(i), Some(format!("m{i}").as_str())), "{m}");
    }
    let live = a.publish("doc", Payload::text("m11")).await.unwrap();
    assert_eq!(next_json(&mut c).await["offset"].as_u64(), Some(live.offset), "then live, with no gap or duplicate");
    assert_eq!(metric(&b.metrics_text(), "herald_recoveries_total{outcome=\"recovered\"}"), 1);
    assert_eq!(metric(&b.metrics_text(), "herald_messages_replayed_total"), 5);

    // History, on the wire and over HTTP, from Redis.
    let h = command(&mut c, json!({"op": "history", "channel": "doc", "since": format!("{epoch}:8"), "id": 3})).await;
    assert_eq!((offsets(&h), h["complete"].as_bool(), h["offset"].as_u64()), (vec![9, 10, 11], Some(true), Some(11)), "{h}");
    let (status, _, body) = http(addr(&a), "GET", "/history/doc?limit=2", &[], b"").await;
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, offsets(&h), h["complete"].as_bool()), (200, vec![10, 11], Some(false)), "{body}");
    assert_eq!(h["publications"][1]["data"], "m11");

    // What cannot be recovered says so, and replays nothing.
    let mut d = ws(addr(&a), "/ws").await;
    let other = subscribe_since(&mut d, "doc", "zzzzzzzz:3", 4).await;
    assert_eq!(other["recovered"].as_bool(), Some(false), "another epoch: {other}");
    send(&mut d, json!({"op": "unsubscribe", "channel": "doc"})).await;
    assert_eq!(next_json(&mut d).await["op"], "unsubscribed", "nothing was replayed before");
    // The stream lost its oldest entries (trimmed by hand, exactly).
    let trimmed: u64 = redis.query(&["XTRIM", "herald:{doc}:history", "MAXLEN", "3"]).unwrap();
    assert!(trimmed > 0);
    let old = subscribe_since(&mut d, "doc", &format!("{epoch}:5"), 5).await;
    assert_eq!(old["recovered"].as_bool(), Some(false), "too old: {old}");
    assert_eq!(metric(&a.metrics_text(), "herald_recoveries_total{outcome=\"too_old\"}"), 1);
    let h = command(&mut d, json!({"op": "history", "channel": "doc", "since": format!("{epoch}:5"), "id": 6})).await;
    assert_eq!((offsets(&h), h["complete"].as_bool()), (vec![9, 10, 11], Some(false)), "{h}");

    // Redis restarted without persistence: a new epoch.
    redis.kill();
    redis.spawn();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut e = ws(addr(&b), "/ws").await;
    let r = loop {
        let r = subscribe_since(&mut e, "doc", &format!("{epoch}:11"), 7).await;
        if r["op"] == "subscribed" {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "Redis never came back: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((r["recovered"].as_bool(), r["offset"].as_u64()), (Some(false), Some(0)), "{r}");
    assert_ne!(r["epoch"].as_str(), Some(&*epoch));
    assert_eq!(metric(&b.metrics_text(), "herald_recoveries_total{outcome=\"epoch_changed\"}"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_racing_a_recovery_through_redis_arrive_once_each_in_order() {
    let redis = RedisServer::start(&[]);
    let cfg = |c: &mut herald::Config| {
        c.redis(redis.url()).redis_timeout(Duration::from_millis(1000)).history_size(1000);
    };
    let (a, b) = (ready(start(2, cfg)), ready(start(2, cfg)));
    let mut epoch = String::new();
    for _ in 1..=40 {
        epoch = b.publish("race", Payload::text("before")).await.unwrap().epoch.to_string();
    }
    let publisher: Herald = b.clone();
    let racing = tokio::spawn(async move {
        for _ in 41..=400 {
            publisher.publish("race", Payload::text("during")).await.unwrap();
        }
    });
    let mut c = ws(addr(&a), "/ws").await;
    let r = subscribe_since(&mut c, "race", &format!("{epoch}:20"), 1).await;
    assert_eq!(r["recovered"].as_bool(), Some(true), "{r}");
    let top = r["offset"].as_u64().unwrap();
    assert!(top >= 40, "{r}");
    racing.await.unwrap();
    let mut seen = Vec::new();
    for _ in 21..=400 {
        seen.push(next_json(&mut c).await["offset"].as_u64().unwrap());
    }
    assert_eq!(seen, (21..=400).collect::<Vec<_>>(), "replayed up to {top}, then live: each offset once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_pubsub_connection_is_filled_from_the_stream() {
    let redis = RedisServer::start(&[]);
    // History long enough for everything published while A is cut off.
    let cfg = |c: &mut herald::Config| {
        c.redis(redis.url()).redis_timeout(Duration::from_millis(1000)).history_size(5000);
    };
    let (a, b) = (ready(start(2, cfg)), ready(start(2, cfg)));
    let mut sub = subscribed_ws(&a, "gap").await;
    let mut sse = Sse::open(addr(&a), "channel=gap").await;
    let publisher = b.clone();
    let publishing = tokio::spawn(async move {
        for i in 1..=600u64 {
            assert_eq!(publisher.publish("gap", Payload::text(format!("g{i}"))).await.unwrap().offset, i);
        }
    });
    // Cut every pub/sub connection while B keeps publishing.
    wait_for("a few publishes", || redis.query::<u64>(&["XLEN", "herald:{gap}:history"]).unwrap_or(0) >= 50).await;
    let killed: u64 = redis.query(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert_eq!(killed, 3, "node A's subscriber connection (B has no subscribers), and each node's control channel");
    publishing.await.unwrap();
    let mut seen = Vec::new();
    for _ in 1..=600 {
        let m = next_json(&mut sub).await;
        assert_eq!(m["op"].as_str(), None, "a message, no notice: {m}");
        seen.push(m["offset"].as_u64().unwrap());
    }
    assert_eq!(seen, (1..=600).collect::<Vec<_>>(), "every offset, in order, across the cut");
    let mut sse_seen = Vec::new();
    while sse_seen.len() < 600 {
        let (event, _, data) = sse.next_event().await.unwrap();
        if event == "message" {
            let v: Value = serde_json::from_str(&data).unwrap();
            sse_seen.push(v["offset"].as_u64().unwrap());
        }
    }
    assert_eq!(sse_seen, seen);
    let m = a.metrics_text();
    assert!(metric(&m, "herald_broker_reconnects_total") >= 1);
    assert_eq!(metric(&m, "herald_broker_missed_messages_total"), 0);
    assert_eq!(metric(&m, "herald_broker_epoch_changes_total"), 0);
}

/// Without history nothing can be filled: what a cut-off node missed is
/// announced with `lagged`, in place, and counted, never skipped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_stream_cannot_give_back_is_announced_in_place() {
    let redis = RedisServer::start(&[]);
    let cfg = |c: &mut herald::Config| {
        c.redis(redis.url()).redis_timeout(Duration::from_millis(1000)).history_size(0);
    };
    let (a, b) = (ready(start(2, cfg)), ready(start(2, cfg)));
    let mut sub = subscribed_ws(&a, "lossy").await;
    let publisher = b.clone();
    let publishing = tokio::spawn(async move {
        for _ in 1..=600u64 {
            publisher.publish("lossy", Payload::text("x")).await.unwrap();
        }
    });
    wait_for("a few deliveries", || metric(&a.metrics_text(), "herald_broker_messages_total") >= 50).await;
    let killed: u64 = redis.query(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert_eq!(killed, 3, "A's subscriber, and both control channels");
    publishing.await.unwrap();
    // Every offset arrives, or is inside a lagged range, in order.
    let (mut next, mut lost) = (1u64, 0u64);
    while next <= 600 {
        let m = next_json(&mut sub).await;
        if m["op"] == "lagged" {
            let (from, to) = (m["missed_from"].as_u64().unwrap(), m["missed_to"].as_u64().unwrap());
            assert_eq!(from, next, "{m}");
            lost += to - from + 1;
            next = to + 1;
        } else {
            assert_eq!(m["offset"].as_u64(), Some(next), "{m}");
            next += 1;
        }
    }
    assert_eq!(metric(&a.metrics_text(), "herald_broker_missed_messages_total"), lost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_publishes_once_across_nodes() {
    let redis = RedisServer::start(&[]);
    let (a, b) = (node(&redis.url()), node(&redis.url()));
    let mut sub = subscribed_ws(&a, "pay").await;
    let key = [("idempotency-key", "order-17")];
    let (s1, _, first) = http(addr(&a), "POST", "/publish/pay", &key, b"charged").await;
    let (s2, _, again) = http(addr(&b), "POST", "/publish/pay", &key, b"charged").await;
    assert_eq!((s1, s2), (200, 200));
    let (first, again): (Value, Value) = (serde_json::from_str(&first).unwrap(), serde_json::from_str(&again).unwrap());
    assert_eq!(first, again, "the same reply");
    let mut c = ws(addr(&b), "/ws").await;
    let r = command(&mut c, json!({"op": "publish", "channel": "pay", "data": "charged", "idempotency_key": "order-17", "id": 1})).await;
    assert_eq!(
        (r["op"].as_str(), r["offset"].clone(), r["epoch"].clone()),
        (Some("published"), first["offset"].clone(), first["epoch"].clone()),
        "{r}"
    );
    let (_, _, other) = http(addr(&b), "POST", "/publish/pay", &[("idempotency-key", "order-18")], b"next").await;
    let other: Value = serde_json::from_str(&other).unwrap();
    assert_eq!(other["offset"].as_u64(), Some(2), "another key publishes");
    let m1 = next_json(&mut sub).await;
    let m2 = next_json(&mut sub).await;
    assert_eq!((m1["data"].as_str(), m2["data"].as_str(), m2["offset"].as_u64()), (Some("charged"), Some("next"), Some(2)), "one copy");
    assert_eq!(metric(&b.metrics_text(), "herald_idempotent_repeats_total"), 2);
    let (status, _, body) = http(addr(&a), "POST", "/publish/pay", &[("idempotency-key", "")], b"x").await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_resumes_on_another_node_with_last_event_id() {
    let redis = RedisServer::start(&[]);
    let (a, b) = (node(&redis.url()), node(&redis.url()));
    let mut sse = Sse::open(addr(&a), "channel=feed").await;
    let (event, _, data) = sse.next_event().await.unwrap();
    assert_eq!(event, "subscribed", "{data}");
    let mut last = None;
    for i in 1..=3u64 {
        b.publish("feed", Payload::text(format!("f{i}"))).await.unwrap();
        let (_, id, _) = sse.next_event().await.unwrap();
        last = id;
    }
    drop(sse);
    let last = last.unwrap();
    for i in 4..=6u64 {
        a.publish("feed", Payload::text(format!("f{i}"))).await.unwrap();
    }
    let mut sse = Sse::open_with(addr(&b), "/sse?channel=feed", &[("Last-Event-ID", &last)]).await;
    let (event, _, data) = sse.next_event().await.unwrap();
    let v: Value = serde_json::from_str(&data).unwrap();
    assert_eq!((event.as_str(), v["recovered"].as_bool(), v["offset"].as_u64()), ("subscribed", Some(true), Some(6)), "{data}");
    let epoch = last.split(':').next().unwrap();
    for i in 4..=7u64 {
        if i == 7 {
            a.publish("feed", Payload::text("f7")).await.unwrap();
        }
        let (event, id, data) = sse.next_event().await.unwrap();
        let v: Value = serde_json::from_str(&data).unwrap();
        assert_eq!((event.as_str(), id, v["data"].as_str()), ("message", Some(format!("{epoch}:{i}")), Some(format!("f{i}").as_str())));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_keeps_each_channels_history_on_its_owner() {
    let cluster = Cluster::start();
    let cfg = |c: &mut herald::Config| {
        c.redis_cluster(cluster.urls()).redis_timeout(Duration::from_millis(1000));
    };
    let (a, b) = (ready(start(2, cfg)), ready(start(2, cfg)));
    let channels: Vec<String> = (0..4).map(|i| format!("desk-{i}")).collect();
    let mut epochs = Vec::new();
    for ch in &channels {
        for i in 1..=3u64 {
            let p = a.publish(ch, Payload::text(format!("{ch}/{i}"))).await.unwrap();
            assert_eq!(p.offset, i);
            if i == 1 {
                epochs.push(p.epoch.to_string());
            }
        }
        // One script wrote the counter and the stream: one slot, one owner.
        let owner = cluster.owner(ch);
        let len: u64 = cluster.nodes[owner].query(&["XLEN", &format!("herald:{{{ch}}}:history")]).unwrap();
        assert_eq!(len, 3, "{ch}");
    }
    let mut c = ws(addr(&b), "/ws").await;
    for (i, (ch, epoch)) in channels.iter().zip(&epochs).enumerate() {
        let r = subscribe_since(&mut c, ch, &format!("{epoch}:1"), i as u64).await;
        assert_eq!((r["recovered"].as_bool(), r["offset"].as_u64()), (Some(true), Some(3)), "{r}");
        for o in 2..=3u64 {
            let m = next_json(&mut c).await;
            assert_eq!((m["channel"].as_str(), m["offset"].as_u64()), (Some(ch.as_str()), Some(o)));
        }
    }
}

/// Many clients of one channel coming back at once, from different
/// positions (their starts share reads of the stream): each gets exactly
/// what it missed, then live messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_recovering_one_channel_at_once_each_gets_its_own_range() {
    let redis = RedisServer::start(&[]);
    let (a, b) = (node(&redis.url()), node(&redis.url()));
    let mut epoch = String::new();
    for _ in 1..=50 {
        epoch = b.publish("crowd", Payload::text("x")).await.unwrap().epoch.to_string();
    }
    let mut clients = Vec::new();
    for i in 0..40u64 {
        let (addr, epoch) = (addr(&a), epoch.clone());
        clients.push(tokio::spawn(async move {
            let mut c = ws(addr, "/ws").await;
            // Every fourth from another epoch; the rest from 0, 5, … 45.
            let since = if i % 4 == 3 { "zzzzzzzz:7".to_string() } else { format!("{epoch}:{}", (i % 10) * 5) };
            let r = subscribe_since(&mut c, "crowd", &since, i).await;
            (i, since, r, c)
        }));
    }
    let mut joined = Vec::new();
    for c in clients {
        joined.push(c.await.unwrap());
    }
    let live = b.publish("crowd", Payload::text("live")).await.unwrap();
    assert_eq!(live.offset, 51);
    for (i, since, r, mut c) in joined {
        let from = if i % 4 == 3 {
            assert_eq!(r["recovered"].as_bool(), Some(false), "{since}: {r}");
            51
        } else {
            assert_eq!((r["recovered"].as_bool(), r["offset"].as_u64()), (Some(true), Some(50)), "{since}: {r}");
            (i % 10) * 5 + 1
        };
        for o in from..=51 {
            assert_eq!(next_json(&mut c).await["offset"].as_u64(), Some(o), "client {i} from {since}");
        }
    }
}

/// subscribe, unsubscribe, subscribe sent at once, while the first start is
/// still being read from Redis: every command is answered, and the
/// subscription that stands delivers each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_resubscribes_answer_every_command_and_deliver_once() {
    let redis = RedisServer::start(&[]);
    let (a, b) = (node(&redis.url()), node(&redis.url()));
    let mut c = ws(addr(&a), "/ws").await;
    for round in 0..20u64 {
        let ch = format!("flip-{round}");
        send(&mut c, json!({"op": "subscribe", "channel": ch, "id": 1})).await;
        send(&mut c, json!({"op": "unsubscribe", "channel": ch, "id": 2})).await;
        send(&mut c, json!({"op": "subscribe", "channel": ch, "id": 3})).await;
        let mut ids = Vec::new();
        for _ in 0..3 {
            let r = next_json(&mut c).await;
            assert!(r["op"] == "subscribed" || r["op"] == "unsubscribed", "{r}");
            ids.push(r["id"].as_u64().unwrap());
        }
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 3], "round {round}");
        let p = b.publish(&ch, Payload::text("once")).await.unwrap();
        let m = next_json(&mut c).await;
        assert_eq!((m["channel"].as_str(), m["offset"].as_u64()), (Some(ch.as_str()), Some(p.offset)), "{m}");
        // Nothing else for this channel: the next frame is the next round's.
        send(&mut c, json!({"op": "unsubscribe", "channel": ch, "id": 4})).await;
        let r = next_json(&mut c).await;
        assert_eq!((r["op"].as_str(), r["id"].as_u64()), (Some("unsubscribed"), Some(4)), "a duplicate would come first: {r}");
    }
}

/// A namespace's history size applies to its channels' streams in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_redis_each_namespace_keeps_its_own_stream_size() {
    let redis = RedisServer::start(&[]);
    let cfg = |c: &mut herald::Config| {
        c.redis(redis.url()).redis_timeout(Duration::from_millis(1000));
        c.namespaces.insert("live".into(), herald::config::Namespace { history_size: Some(0), ..Default::default() });
    };
    let a = ready(start(2, cfg));
    for ch in ["live:score", "doc"] {
        a.publish(ch, Payload::text("x")).await.unwrap();
    }
    let exists = |ch: &str| redis.query::<u64>(&["EXISTS", &format!("herald:{{{ch}}}:history")]).unwrap();
    assert_eq!((exists("live:score"), exists("doc")), (0, 1), "no stream for a namespace without history");
    let mut c = ws(addr(&a), "/ws").await;
    let r = subscribe_since(&mut c, "live:score", "zzzzzzzz:0", 1).await;
    assert_eq!(r["recovered"].as_bool(), Some(false), "{r}");
    assert_eq!(metric(&a.metrics_text(), "herald_recoveries_total{outcome=\"off\"}"), 1, "history is off there");
}

/// "Send this to user 42" through Redis: the user's devices on two nodes
/// both get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_channel_reaches_the_users_devices_on_every_node() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    const SECRET: &str = "a-test-secret-of-32-bytes-or-so!";
    let redis = RedisServer::start(&[]);
    let cfg = |c: &mut herald::Config| {
        c.redis(redis.url()).redis_timeout(Duration::from_millis(1000)).auth_hmac_secret(SECRET);
    };
    let (a, b) = (ready(start(2, cfg)), ready(start(2, cfg)));
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let token =
        encode(&Header::new(Algorithm::HS256), &json!({"sub": "42", "exp": exp}), &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
    let mut phone = ws(addr(&a), &format!("/ws?token={token}")).await;
    let mut laptop = ws(addr(&b), &format!("/ws?token={token}")).await;
    for device in [&mut phone, &mut laptop] {
        let r = command(device, json!({"op": "subscribe", "channel": "user:42"})).await;
        assert_eq!(r["op"], "subscribed", "{r}");
    }
    let p = b.publish("user:42", Payload::text("sync")).await.unwrap();
    for device in [&mut phone, &mut laptop] {
        let m = next_json(device).await;
        assert_eq!((m["channel"].as_str(), m["offset"].as_u64()), (Some("user:42"), Some(p.offset)), "{m}");
    }
}
