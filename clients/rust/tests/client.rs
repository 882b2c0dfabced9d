//! herald-client against an in-process Herald on real sockets, through a
//! TCP proxy the test cuts as a network would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_client::{Client, Config, Event};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

fn herald(tweak: impl FnOnce(&mut herald::Config)) -> herald::Herald {
    let mut c = herald::Config::default();
    c.shards(2);
    tweak(&mut c);
    herald::Herald::start_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), c).unwrap()
}

struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(to: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let list = Arc::clone(&conns);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                list.lock().unwrap().push(tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(to).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }));
            }
        });
        Proxy { addr, conns }
    }

    fn cut(&self) {
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

async fn next(sub: &mut herald_client::Subscription) -> Event {
    tokio::time::timeout(WAIT, sub.next()).await.expect("timed out").expect("the subscription ended")
}

fn data(e: Event) -> serde_json::Value {
    match e {
        Event::Message { data, .. } => data,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_and_receives_and_reports_errors() {
    let h = herald(|_| {});
    let client = Client::connect(Config::new(format!("ws://{}/ws", h.local_addr().unwrap())));
    let mut sub = client.subscribe("news", None).await.unwrap();
    assert_eq!(sub.offset, 0);
    for i in 1..=3 {
        assert_eq!(client.publish("news", json!({ "n": i })).await.unwrap().offset, i);
    }
    for i in 1..=3 {
        assert_eq!(data(next(&mut sub).await), json!({ "n": i }));
    }
    let e = client.publish("bad name", json!(1)).await.unwrap_err();
    assert!(matches!(e, herald_client::Error::Herald { ref code, .. } if code == "bad_channel"), "{e}");
    let page = client.history("news", None, Some(2)).await.unwrap();
    assert_eq!(page["publications"].as_array().unwrap().len(), 2);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_recovers_what_it_missed_once_in_order() {
    let h = herald(|_| {});
    let proxy = Proxy::start(h.local_addr().unwrap()).await;
    let client = Client::connect(Config::new(format!("ws://{}/ws", proxy.addr)));
    let mut sub = client.subscribe("doc", None).await.unwrap();
    h.publish("doc", herald::Payload::text("1")).await.unwrap();
    assert_eq!(data(next(&mut sub).await), json!("1"));
    proxy.cut();
    tokio::time::timeout(WAIT, client.wait_for(herald_client::State::Connecting)).await.unwrap();
    for i in 2..=4 {
        h.publish("doc", herald::Payload::text(i.to_string())).await.unwrap();
    }
    tokio::time::timeout(WAIT, client.wait_for(herald_client::State::Connected)).await.unwrap();
    h.publish("doc", herald::Payload::text("5")).await.unwrap();
    for i in 2..=5 {
        assert_eq!(data(next(&mut sub).await), json!(i.to_string()), "each once, in order, no gap");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_recovered_is_a_gap() {
    let h = herald(|c| {
        c.history_size(2).recovery_max(2);
    });
    let proxy = Proxy::start(h.local_addr().unwrap()).await;
    let client = Client::connect(Config::new(format!("ws://{}/ws", proxy.addr)));
    let mut sub = client.subscribe("doc", None).await.unwrap();
    proxy.cut();
    tokio::time::timeout(WAIT, client.wait_for(herald_client::State::Connecting)).await.unwrap();
    for i in 1..=5 {
        h.publish("doc", herald::Payload::text(i.to_string())).await.unwrap();
    }
    assert_eq!(next(&mut sub).await, Event::Gap { channel: "doc".into(), reason: "not_recovered".into() });
    h.publish("doc", herald::Payload::text("6")).await.unwrap();
    assert_eq!(data(next(&mut sub).await), json!("6"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_falls_behind_is_told_of_what_it_lost() {
    let h = herald(|_| {});
    let mut config = Config::new(format!("ws://{}/ws", h.local_addr().unwrap()));
    config.queue = 4;
    let client = Client::connect(config);
    let mut sub = client.subscribe("fast", None).await.unwrap();
    let mut marker = client.subscribe("marker", None).await.unwrap();
    for i in 1..=10 {
        h.publish("fast", herald::Payload::text(i.to_string())).await.unwrap();
    }
    // On the same connection after the ten: once it is here, the client
    // has offered all ten to the unread subscription.
    h.publish("marker", herald::Payload::text("m")).await.unwrap();
    assert_eq!(data(next(&mut marker).await), json!("m"));
    let mut got = Vec::new();
    loop {
        match next(&mut sub).await {
            Event::Message { offset, .. } => got.push(offset),
            Event::Gap { reason, .. } => {
                assert_eq!(reason, "client_queue_full");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, [1, 2, 3], "three and the gap filled the queue of four; the rest were lost, and said so");
    // Room again: what comes next is delivered.
    h.publish("fast", herald::Payload::text("11")).await.unwrap();
    assert_eq!(data(next(&mut sub).await), json!("11"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_refreshed_on_its_connection_before_it_expires() {
    let secret = "a-test-secret-of-32-bytes-or-so!";
    let h = herald(|c| {
        c.auth_hmac_secret(secret);
    });
    let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = Arc::clone(&issued);
    let mut config = Config::new(format!("ws://{}/ws", h.local_addr().unwrap()));
    config.get_token = Some(Arc::new(move || {
        let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // The first expires in 31 s: refreshed 30 s ahead, after a second.
        let exp_in = if n == 0 { 31 } else { 3600 };
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + exp_in;
        let claims = json!({"sub": "42", "exp": exp, "subscribe": ["user:42"]});
        let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
        let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).map_err(|e| e.to_string());
        Box::pin(async move { token })
    }));
    let client = Client::connect(config);
    let mut sub = client.subscribe("user:42", None).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while issued.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no refresh");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Herald took the new token on the same connection; delivery goes on.
    let refreshed = || h.metrics_text().lines().any(|l| l == "herald_auth_refreshes_total 1");
    while !refreshed() {
        assert!(tokio::time::Instant::now() < deadline, "Herald did not take the new token");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.publish("user:42", herald::Payload::text("after")).await.unwrap();
    assert_eq!(data(next(&mut sub).await), json!("after"));
    let m = h.metrics_text();
    let value = |series: &str| m.lines().find_map(|l| l.strip_prefix(series)?.trim().parse::<u64>().ok()).unwrap();
    assert_eq!(value("herald_connections_total{transport=\"ws\"}"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscription_unsubscribes_and_a_newer_one_stays() {
    let h = herald(|_| {});
    let client = Client::connect(Config::new(format!("ws://{}/ws", h.local_addr().unwrap())));
    let subscriptions = || {
        let m = h.metrics_text();
        m.lines().find_map(|l| l.strip_prefix("herald_subscriptions ")?.trim().parse::<u64>().ok()).unwrap()
    };
    let old = client.subscribe("a", None).await.unwrap();
    let mut newer = client.subscribe("a", None).await.unwrap();
    drop(old);
    let gone = client.subscribe("b", None).await.unwrap();
    drop(gone);
    let deadline = tokio::time::Instant::now() + WAIT;
    while subscriptions() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "b was not unsubscribed on the server");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.publish("a", herald::Payload::text("still")).await.unwrap();
    assert_eq!(data(next(&mut newer).await), json!("still"), "dropping the older handle left the newer one");
}

/// With `compression`, large messages come compressed and are read right,
/// and through a cut the client reconnects compressed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_messages_are_inflated_and_survive_a_reconnect() {
    let h = herald(|c| {
        c.compression(true);
    });
    let proxy = Proxy::start(h.local_addr().unwrap()).await;
    let mut config = Config::new(format!("ws://{}/ws", proxy.addr));
    config.compression = true;
    let client = Client::connect(config);
    let mut sub = client.subscribe("zip", None).await.unwrap();
    let big = |i: usize| json!({ "i": i, "items": (0..50).map(|j| json!({"id": j, "title": format!("item {j}")})).collect::<Vec<_>>() });
    for i in 0..5 {
        client.publish("zip", big(i)).await.unwrap();
    }
    for i in 0..5 {
        assert_eq!(data(next(&mut sub).await), big(i));
    }
    let metrics = h.metrics_text();
    let series = |name: &str| -> u64 {
        metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("{name}"))
    };
    assert_eq!(series("herald_compression_connections "), 1);
    assert_eq!(series("herald_compressed_frames_total{source=\"message\"} "), 5);
    proxy.cut();
    for i in 5..8 {
        // Published while it is away or back: recovered either way.
        h.publish("zip", herald::Payload::json(big(i).to_string()).unwrap()).await.unwrap();
    }
    for i in 5..8 {
        assert_eq!(data(next(&mut sub).await), big(i));
    }
    client.close().await;
}
