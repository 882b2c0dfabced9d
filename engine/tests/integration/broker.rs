//! The Redis brokers, with real `redis-server` processes that each test
//! starts on free ports (and kills and restarts): several Herald nodes
//! serve one set of channels.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use herald::{BrokerDown, Herald, Payload, PublishError};
use serde_json::{json, Value};

use crate::common::*;

/// A `redis-server` of the test's own, without persistence.
pub(crate) struct RedisServer {
    port: u16,
    dir: std::path::PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    /// A redis-server on a free port. redis-server cannot be handed a bound
    /// socket, so the port is picked, released and passed: if another
    /// process took it meanwhile, redis-server exits and another is tried.
    pub(crate) fn start(extra: &[&str]) -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("herald-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut r = RedisServer { port, dir, extra: extra.iter().map(|s| s.to_string()).collect(), child: None };
            if r.try_spawn() {
                return r;
            }
        }
        panic!("no free port for redis-server after 5 tries");
    }

    /// Starts it again on its port (after [`RedisServer::kill`]).
    pub(crate) fn spawn(&mut self) {
        assert!(self.try_spawn(), "redis-server could not bind port {} again", self.port);
    }

    /// Starts redis-server and waits until it answers; false if it exited
    /// (its port was taken).
    fn try_spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is on PATH");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            // Ours exited: whatever answers on the port is not ours.
            if self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                self.child = None;
                return false;
            }
            if self.query::<String>(&["PING"]).is_ok() {
                return true;
            }
            assert!(std::time::Instant::now() < deadline, "redis-server on port {} did not start", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it the hard way (no goodbye to clients).
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let mut c = client.get_connection_with_timeout(Duration::from_secs(1))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    /// `PUBSUB NUMSUB` (or `SHARDNUMSUB`) of a Herald channel.
    fn subscribers(&self, channel: &str, sharded: bool) -> u64 {
        let name = format!("herald:{{{channel}}}");
        let sub = if sharded { "SHARDNUMSUB" } else { "NUMSUB" };
        let v: (String, u64) = self.query(&["PUBSUB", sub, &name]).unwrap();
        v.1
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn node(redis: &str) -> Herald {
    ready(start(2, |c| {
        c.redis(redis).redis_timeout(Duration::from_millis(500));
    }))
}

/// Returns `h` once its publisher connection to Redis is up, so that a
/// publish right away is not refused for a connection still being made,
/// and its control channel's subscription too.
pub(crate) fn ready(h: Herald) -> Herald {
    let deadline = std::time::Instant::now() + WAIT;
    let up = |m: &str| metric(m, "herald_broker_publisher_up") == 1 && metric(m, "herald_broker_control_up") == 1;
    while !up(&h.metrics_text()) {
        assert!(std::time::Instant::now() < deadline, "the node did not connect to Redis");
        std::thread::sleep(Duration::from_millis(10));
    }
    h
}

pub(crate) async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Subscribes over WebSocket and waits for `subscribed`: from then on,
/// nothing published anywhere is missed.
pub(crate) async fn subscribed_ws(h: &Herald, channel: &str) -> Ws {
    let mut c = ws(addr(h), "/ws").await;
    let r = command(&mut c, json!({"op": "subscribe", "channel": channel})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    assert_eq!(r["epoch"].as_str().map(str::len), Some(8), "{r}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_channels_in_one_order_over_ws_and_sse() {
    let redis = RedisServer::start(&[]);
    let (a, b) = (node(&redis.url()), node(&redis.url()));
    let mut on_a = subscribed_ws(&a, "news").await;
    let mut on_b = subscribed_ws(&b, "news").await;
    let mut sse_a = Sse::open(addr(&a), "channel=news").await;
    wait_metric(&a, "herald_broker_subscriptions", |v| v == 1).await;
    // Publishes from both nodes, and from both HTTP and the Rust API.
    let n = 100u64;
    for i in 0..n {
        if i % 2 == 0 {
            let (status, body) = publish(addr(&b), "news", &format!("{{\"i\":{i}}}"), true).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["offset"].as_u64(), Some(i + 1), "offsets come from Redis, global per channel");
        } else {
            let p = a.publish("news", Payload::json(format!("{{\"i\":{i}}}")).unwrap()).await.unwrap();
            assert_eq!(p.offset, i + 1);
        }
    }
    for c in [&mut on_a, &mut on_b] {
        for i in 0..n {
            let m = next_json(c).await;
            assert_eq!((m["offset"].as_u64(), &m["data"]), (Some(i + 1), &json!({"i": i})), "in order, contiguous, on both nodes");
        }
    }
    for i in 0..n {
        let m: Value = serde_json::from_str(&sse_a.next_data().await.unwrap()).unwrap();
        assert_eq!((m["offset"].as_u64(), &m["data"]), (Some(i + 1), &json!({"i": i})), "SSE sees the same stream");
    }
    // A WebSocket publish on node A reaches node B too.
    // (On a subscribed connection the message itself may come back before
    // the reply: both are read.)
    send(&mut on_a, json!({"op": "publish", "channel": "news", "data": "ws", "id": 7})).await;
    let (x, y) = (next_json(&mut on_a).await, next_json(&mut on_a).await);
    let r = if x["op"] == "published" { x } else { y };
    assert_eq!((r["op"].as_str(), r["offset"].as_u64(), r["id"].as_u64()), (Some("published"), Some(n + 1), Some(7)), "{r}");
    let m = next_json(&mut on_b).await;
    assert_eq!((m["offset"].as_u64(), m["data"].as_str()), (Some(n + 1), Some("ws")));
    assert_eq!(metric(&a.metrics_text(), "herald_broker_gaps_total"), 0);
    a.shutdown(Duration::from_secs(1)).await;
    b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_subscribed_in_redis_only_while_it_has_subscribers() {
    let redis = RedisServer::start(&[]);
    let (a, b) = (node(&redis.url()), node(&redis.url()));
    assert_eq!(redis.subscribers("quiet", false), 0);
    let first = subscribed_ws(&a, "quiet").await;
    assert_eq!(redis.subscribers("quiet", false), 1, "node A subscribed on its first subscriber");
    let second = subscribed_ws(&a, "quiet").await;
    assert_eq!(redis.subscribers("quiet", false), 1, "once per node, not per client");
    let on_b = subscribed_ws(&b, "quiet").await;
    assert_eq!(redis.subscribers("quiet", false), 2);
    let mut channels: Vec<String> = redis.query(&["PUBSUB", "CHANNELS"]).unwrap();
    channels.sort();
    assert_eq!(channels, ["herald:control", "herald:{quiet}"], "no node subscribes to a channel nobody wants");
    drop(first);
    // Once A has seen the client go, it had its chance to unsubscribe.
    wait_metric(&a, "herald_subscriptions", |v| v == 1).await;
    assert_eq!(redis.subscribers("quiet", false), 2, "A still has a subscriber");
    drop(second);
    wait_for("A to unsubscribe", || redis.subscribers("quiet", false) == 1).await;
    drop(on_b);
    wait_for("B to unsubscribe", || redis.subscribers("quiet", false) == 0).await;
    assert_eq!(metric(&a.metrics_text(), "herald_broker_subscriptions"), 0);
    // Publishing needs no subscription: the counter still moves.
    assert_eq!(a.publish("quiet", Payload::text("x")).await.unwrap().offset, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_recover_by_themselves_when_redis_restarts() {
    let mut redis = RedisServer::start(&[]);
    let (a, b) = (node(&redis.url()), node(&redis.url()));
    let mut sub = subscribed_ws(&a, "live").await;
    let mut sse = Sse::open(addr(&a), "channel=live").await;
    let mut publisher = ws(addr(&b), "/ws").await;
    for i in 1..=3u64 {
        assert_eq!(b.publish("live", Payload::text(format!("before {i}"))).await.unwrap().offset, i);
    }
    for i in 1..=3u64 {
        assert_eq!(next_json(&mut sub).await["offset"].as_u64(), Some(i));
    }

    redis.kill();
    // While Redis is away: every publish is refused, never a false success.
    match b.publish("live", Payload::text("lost")).await {
        // The publisher connection may notice the loss with the command
        // sent (outcome unknown) or before (not published): both are
        // `unavailable` on the wire.
        Err(e @ (PublishError::NotPublished(_) | PublishError::OutcomeUnknown(_))) => assert_eq!(e.code().as_str(), "unavailable"),
        other => panic!("a publish during the outage must fail: {other:?}"),
    }
    let (status, body) = publish(addr(&b), "live", "lost", false).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")), "{body}");
    let r = command(&mut publisher, json!({"op": "publish", "channel": "live", "data": "lost", "id": 1})).await;
    assert_eq!((r["op"].as_str(), r["code"].as_str(), r["id"].as_u64()), (Some("error"), Some("unavailable"), Some(1)), "{r}");
    // The nodes keep serving their connections meanwhile.
    let (status, _, _) = http(addr(&a), "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    wait_metric(&a, "herald_broker_up", |v| v == 0).await;

    redis.spawn();
    // Node B publishes from the first moment Redis takes publishes again,
    // most likely before node A has subscribed again.
    let deadline = tokio::time::Instant::now() + WAIT;
    let first = loop {
        match b.publish("live", Payload::text("after")).await {
            Ok(p) => break p,
            Err(_) => {
                assert!(tokio::time::Instant::now() < deadline, "publishing never recovered");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    assert_eq!(first.offset, 1, "Redis restarted empty: a new epoch, offsets from 1");
    let mut accepted = vec![first.offset];
    for _ in 0..9 {
        accepted.push(b.publish("live", Payload::text("after")).await.unwrap().offset);
    }
    // Every accepted publish reaches A's subscribers, in order, after the
    // notice of the new epoch: nothing is lost to the race.
    let notice = next_json(&mut sub).await;
    assert_eq!((notice["op"].as_str(), notice["channel"].as_str()), (Some("epoch"), Some("live")), "{notice}");
    assert_eq!(notice["epoch"].as_str(), Some(first.epoch.as_str()));
    let mut seen = Vec::new();
    for _ in &accepted {
        let m = next_json(&mut sub).await;
        assert_eq!(m["data"].as_str(), Some("after"), "{m}");
        seen.push(m["offset"].as_u64().unwrap());
    }
    assert_eq!(seen, accepted);
    let live = b.publish("live", Payload::text("live")).await.unwrap();
    assert_eq!(next_json(&mut sub).await["offset"].as_u64(), Some(live.offset), "then live");
    // SSE on the same node: its start, 1..3, the new epoch announced, then
    // 1..10 of it.
    let mut events = Vec::new();
    for _ in 0..15 {
        let (event, id, data) = sse.next_event().await.unwrap();
        let v: Value = serde_json::from_str(&data).unwrap();
        events.push((event, id, v["offset"].as_u64()));
    }
    let old = events[1].1.clone().unwrap();
    let old_epoch = old.split(':').next().unwrap().to_owned();
    let mut want: Vec<(String, Option<String>, Option<u64>)> = vec![("subscribed".into(), None, Some(0))];
    want.extend((1..=3).map(|o| ("message".into(), Some(format!("{old_epoch}:{o}")), Some(o))));
    want.push(("epoch".into(), None, None));
    want.extend((1..=10).map(|o| ("message".into(), Some(format!("{}:{o}", first.epoch)), Some(o))));
    assert_eq!(events, want);
    let m = a.metrics_text();
    assert!(metric(&m, "herald_broker_gaps_total") >= 1, "the gap is counted");
    assert_eq!(metric(&m, "herald_broker_epoch_changes_total"), 1);
    assert_eq!(metric(&m, "herald_broker_missed_messages_total"), 0, "the stream held everything");
    assert!(metric(&m, "herald_broker_reconnects_total") >= 1, "the reconnect is counted");
    assert!(metric(&b.metrics_text(), "herald_broker_publish_errors_total") >= 3);
    // A new subscriber after recovery is confirmed as usual.
    let _late = subscribed_ws(&a, "live").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_redis_cannot_confirm_is_refused_with_unavailable() {
    let mut redis = RedisServer::start(&[]);
    let a = node(&redis.url());
    let mut warm = subscribed_ws(&a, "warm").await;
    redis.kill();
    wait_metric(&a, "herald_broker_up", |v| v == 0).await;
    let mut c = ws(addr(&a), "/ws").await;
    let r = command(&mut c, json!({"op": "subscribe", "channel": "cold", "id": 3})).await;
    assert_eq!((r["op"].as_str(), r["code"].as_str(), r["id"].as_u64()), (Some("error"), Some("unavailable"), Some(3)), "{r}");
    assert_eq!(metric(&a.metrics_text(), "herald_subscriptions"), 1, "the refused subscription was undone");
    // Repeating a subscription the connection already holds gets the same
    // answer but keeps that subscription: it is served again after Redis.
    let r = command(&mut warm, json!({"op": "subscribe", "channel": "warm", "id": 4})).await;
    assert_eq!((r["code"].as_str(), r["id"].as_u64()), (Some("unavailable"), Some(4)), "{r}");
    assert_eq!(metric(&a.metrics_text(), "herald_subscriptions"), 1);
    redis.spawn();
    wait_metric(&a, "herald_broker_subscriptions", |v| v == 1).await;
    let p = a.publish("warm", Payload::text("back")).await.unwrap();
    let notice = next_json(&mut warm).await;
    assert_eq!((notice["op"].as_str(), notice["epoch"].as_str()), (Some("epoch"), Some(p.epoch.as_str())), "Redis came back empty");
    let m = next_json(&mut warm).await;
    assert_eq!((m["offset"].as_u64(), m["data"].as_str()), (Some(p.offset), Some("back")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_churn_leaves_no_redis_subscription_behind() {
    let redis = RedisServer::start(&[]);
    let a = node(&redis.url());
    // Subscribers come and go on one channel, overlapping, so the node's
    // interest flips while its Redis (un)subscribe commands are in flight.
    for round in 0..30 {
        let mut conns = Vec::new();
        for _ in 0..(round % 3 + 1) {
            conns.push(ws(addr(&a), "/ws?channel=churn").await);
        }
        if round % 2 == 0 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(conns);
    }
    wait_for("every subscriber to leave", || metric(&a.metrics_text(), "herald_subscriptions") == 0).await;
    wait_for("the node to unsubscribe in Redis", || redis.subscribers("churn", false) == 0).await;
    wait_metric(&a, "herald_broker_subscriptions", |v| v == 0).await;
    // And it still works afterwards.
    let mut sub = subscribed_ws(&a, "churn").await;
    assert_eq!(redis.subscribers("churn", false), 1);
    let p = a.publish("churn", Payload::text("after")).await.unwrap();
    assert_eq!(next_json(&mut sub).await["offset"].as_u64(), Some(p.offset));
}

/// A Redis Cluster of three masters on free ports.
pub(crate) struct Cluster {
    pub(crate) nodes: Vec<RedisServer>,
}

impl Cluster {
    pub(crate) fn start() -> Cluster {
        let nodes: Vec<RedisServer> =
            (0..3).map(|_| RedisServer::start(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli").args(["--cluster", "create"]).args(&addrs).args(["--cluster-yes"]).output().unwrap();
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            loop {
                let info: String = n.query(&["CLUSTER", "INFO"]).unwrap();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "the cluster never became ok: {info}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Cluster { nodes }
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The node that owns `channel`'s slot: the others answer MOVED.
    pub(crate) fn owner(&self, channel: &str) -> usize {
        let key = format!("herald:{{{channel}}}:meta");
        let own: Vec<usize> = (0..3).filter(|&i| self.nodes[i].query::<Option<String>>(&["TYPE", &key]).is_ok()).collect();
        assert_eq!(own.len(), 1, "exactly one master owns {key}");
        own[0]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_sharded_pubsub_reaches_only_the_owning_shard() {
    let cluster = Cluster::start();
    let cfg = |c: &mut herald::Config| {
        c.redis_cluster(cluster.urls()).redis_timeout(Duration::from_millis(1000));
    };
    let (a, b) = (ready(start(2, cfg)), ready(start(2, cfg)));
    // Channels spread over the three masters.
    let channels: Vec<String> = (0..6).map(|i| format!("room-{i}")).collect();
    let mut subs = Vec::new();
    for ch in &channels {
        subs.push(subscribed_ws(&a, ch).await);
    }
    let owners: Vec<usize> = channels.iter().map(|c| cluster.owner(c)).collect();
    assert!(owners.iter().collect::<std::collections::HashSet<_>>().len() >= 2, "the channels spread over several masters: {owners:?}");
    for (ch, &owner) in channels.iter().zip(&owners) {
        for (i, n) in cluster.nodes.iter().enumerate() {
            let want = u64::from(i == owner);
            assert_eq!(n.subscribers(ch, true), want, "{ch} is subscribed on its owner (node {owner}) only; node {i}");
        }
    }
    for round in 1..=3u64 {
        for ch in &channels {
            let p = b.publish(ch, Payload::text(format!("{ch} #{round}"))).await.unwrap();
            assert_eq!(p.offset, round);
        }
    }
    for (ch, s) in channels.iter().zip(&mut subs) {
        for round in 1..=3u64 {
            let m = next_json(s).await;
            assert_eq!((m["channel"].as_str(), m["offset"].as_u64()), (Some(ch.as_str()), Some(round)));
            assert_eq!(m["data"].as_str(), Some(format!("{ch} #{round}").as_str()));
        }
    }
    // Each message went to its owner's shard only: the other masters have
    // no shard channel of Herald's at all for it.
    for (ch, &owner) in channels.iter().zip(&owners) {
        for (i, n) in cluster.nodes.iter().enumerate() {
            let listed: Vec<String> = n.query(&["PUBSUB", "SHARDCHANNELS", &format!("herald:{{{ch}}}")]).unwrap();
            assert_eq!(!listed.is_empty(), i == owner, "{ch} on node {i}");
        }
    }
    assert_eq!(metric(&a.metrics_text(), "herald_broker_nodes"), 3);
    assert_eq!(metric(&a.metrics_text(), "herald_broker_gaps_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_redis_wait_for_full_shard_queues_instead_of_being_dropped() {
    let redis = RedisServer::start(&[]);
    // One slot per shard queue: a burst from Redis must wait for the shard.
    let a = start(1, |c| {
        c.redis(redis.url()).shard_queue_capacity(1);
    });
    let b = node(&redis.url());
    let a = ready(a);
    let mut sub = subscribed_ws(&a, "burst").await;
    let n = 2000u64;
    let publishes: Vec<_> = (0..n)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move { b.publish("burst", Payload::text(i.to_string())).await.unwrap() })
        })
        .collect();
    for p in publishes {
        p.await.unwrap();
    }
    for want in 1..=n {
        assert_eq!(next_json(&mut sub).await["offset"].as_u64(), Some(want), "nothing lost, nothing reordered");
    }
    let m = a.metrics_text();
    assert_eq!(metric(&m, "herald_broker_messages_total"), n);
    assert!(metric(&m, "herald_broker_backpressure_total") > 0, "the burst did fill the shard queue");
    for reason in ["no_interest", "malformed"] {
        assert_eq!(metric(&m, &format!("herald_broker_dropped_total{{reason=\"{reason}\"}}")), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_redis_serves_once_redis_is_up() {
    let mut redis = RedisServer::start(&[]);
    redis.kill();
    // Long enough for the SSE stream's start to wait for Redis to come up
    // however slowly the machine starts it.
    let a = start(2, |c| {
        c.redis(redis.url()).redis_timeout(Duration::from_secs(5));
    });
    // Redis is not there: the node serves, refuses publishes, and waits.
    assert_eq!(metric(&a.metrics_text(), "herald_broker_publisher_up"), 0);
    let (status, _, _) = http(addr(&a), "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    assert_eq!(
        a.publish("early", Payload::text("x")).await,
        Err(PublishError::NotPublished(BrokerDown::NotConnected)),
        "never connected: surely not published"
    );
    let (status, body) = publish(addr(&a), "early", "x", false).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")), "{body}");
    let mut sse = Sse::open(addr(&a), "channel=early").await;
    redis.spawn();
    wait_metric(&a, "herald_broker_subscriptions", |v| v == 1).await;
    assert_eq!(metric(&a.metrics_text(), "herald_broker_publisher_up"), 1);
    // The stream starts at the channel's top as read once Redis confirmed
    // it: a publish before that read would be before the start.
    let started = sse.next_block().await.unwrap();
    assert!(started.starts_with("event: subscribed"), "{started}");
    let p = a.publish("early", Payload::text("first")).await.unwrap();
    assert_eq!(p.offset, 1);
    let m: Value = serde_json::from_str(&sse.next_data().await.unwrap()).unwrap();
    assert_eq!((m["offset"].as_u64(), m["data"].as_str()), (Some(1), Some("first")));
}
