//! Slow consumers: a subscriber that stops reading is disconnected; the
//! others lose nothing.

use herald::Payload;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_is_disconnected_and_the_others_lose_nothing() {
    let h = start(2, |c| {
        c.outbound_queue_bytes(256 * 1024).max_message_bytes(32 * 1024).close_timeout(std::time::Duration::from_millis(300));
    });
    let a = addr(&h);
    // The stalled client: a small receive window, and it never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(a).await.unwrap();
    let (stalled, _) = tokio_tungstenite::client_async(format!("ws://{a}/ws?channel=flood"), stream).await.unwrap();
    let mut readers = Vec::new();
    for _ in 0..5 {
        let mut c = ws(a, "/ws?channel=flood").await;
        readers.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            loop {
                let m = next_json(&mut c).await;
                if m["data"] == "end" {
                    return offsets;
                }
                offsets.push(m["offset"].as_u64().unwrap());
            }
        }));
    }
    let payload = "p".repeat(2000);
    wait_metric(&h, "herald_subscriptions", |v| v == 6).await;
    // Publish until the stalled client's queue overflows and it leaves the
    // channel (kernel buffers absorb a few MiB first), then a little more.
    let mut sent = flood_until(&h, "flood", &payload, |m| metric(m, "herald_subscriptions") <= 5).await;
    for _ in 0..200 {
        h.publish("flood", Payload::text(payload.clone())).await.unwrap();
        sent += 1;
    }
    // It never reads, so its close frame cannot be written: the connection
    // ends at the close timeout.
    wait_metric(&h, "herald_disconnects_total{reason=\"slow_consumer\"}", |v| v == 1).await;
    h.publish("flood", Payload::text("end")).await.unwrap();
    for r in readers {
        let offsets = r.await.unwrap();
        assert_eq!(offsets, (1..=sent).collect::<Vec<_>>(), "a reading subscriber lost or reordered messages");
    }
    assert_eq!(metric(&h.metrics_text(), "herald_disconnects_total{reason=\"slow_consumer\"}"), 1);
    drop(stalled);
}

/// Publishes `payload` on `channel` until `done` holds (checked every 100
/// messages), at most 50,000 times; returns how many were published.
async fn flood_until(h: &herald::Herald, channel: &str, payload: &str, done: impl Fn(&str) -> bool) -> u64 {
    let mut sent = 0u64;
    loop {
        h.publish(channel, Payload::text(payload.to_string())).await.unwrap();
        sent += 1;
        if sent % 100 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            if done(&h.metrics_text()) {
                return sent;
            }
        }
        assert!(sent < 50_000, "the flood never had the expected effect");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_subscriber_is_cut_with_nothing_but_sse_on_its_stream() {
    let h = start(1, |c| {
        c.outbound_queue_bytes(256 * 1024).max_message_bytes(32 * 1024).close_timeout(std::time::Duration::from_millis(300));
    });
    let a = addr(&h);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stalled = sock.connect(a).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stalled.write_all(b"GET /sse?channel=sflood HTTP/1.1\r\nhost: t\r\n\r\n").await.unwrap();
    wait_metric(&h, "herald_subscriptions", |v| v == 1).await;
    let payload = "q".repeat(2000);
    flood_until(&h, "sflood", &payload, |m| metric(m, "herald_subscriptions") == 0).await;
    wait_metric(&h, "herald_disconnects_total{reason=\"slow_consumer\"}", |v| v == 1).await;
    // Everything the stalled client can still read is HTTP and SSE text:
    // no WebSocket close frame leaked into the event stream.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, stalled.read_to_end(&mut got)).await.expect("the stream was ended");
    assert!(!got.is_empty());
    assert!(std::str::from_utf8(&got).is_ok(), "the stream holds text only");
    assert!(!got.windows(13).any(|w| w == b"slow consumer"), "no close frame in an SSE stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_drop_policy_a_stalled_subscriber_stays_and_drops_are_counted() {
    let h = start(1, |c| {
        c.outbound_queue_bytes(256 * 1024)
            .max_message_bytes(32 * 1024)
            .slow_consumer(herald::SlowConsumerPolicy::Drop)
            // Pings go on throughout (what they do at the bound is shown
            // by `a_ping_that_meets_the_full_queue_is_dropped_and_counted`).
            .ping_interval(std::time::Duration::from_millis(50));
    });
    let a = addr(&h);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(a).await.unwrap();
    let (stalled, _) = tokio_tungstenite::client_async(format!("ws://{a}/ws?channel=dflood"), stream).await.unwrap();
    let mut reader = ws(a, "/ws?channel=dflood").await;
    let reading = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let m = next_json(&mut reader).await;
            if m["data"] == "end" {
                return (n, reader);
            }
            n += 1;
            assert_eq!(m["offset"].as_u64().unwrap(), n, "the reading subscriber loses nothing");
        }
    });
    let payload = "d".repeat(2000);
    let sent = flood_until(&h, "dflood", &payload, |m| metric(m, "herald_frames_dropped_total{reason=\"slow_consumer\"}") >= 200).await;
    h.publish("dflood", Payload::text("end")).await.unwrap();
    let (received, _reader) = reading.await.unwrap();
    assert_eq!(received, sent);
    let m = h.metrics_text();
    assert_eq!(metric(&m, "herald_disconnects_total{reason=\"slow_consumer\"}"), 0, "nobody was disconnected");
    assert_eq!(metric(&m, "herald_subscriptions"), 2, "the stalled subscriber is still subscribed");

    // The stalled client starts reading: it gets what was queued, `lagged`
    // notices for what it missed, then new messages; together they cover
    // every offset exactly once.
    let mut stalled = stalled;
    let tail = {
        let h = h.clone();
        tokio::spawn(async move {
            loop {
                h.publish("dflood", Payload::text("tail")).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    };
    let mut ranges = Vec::new();
    let mut notices = 0;
    loop {
        let m = next_json(&mut stalled).await;
        if m["op"] == "lagged" {
            assert_eq!(m["channel"], "dflood");
            ranges.push((m["missed_from"].as_u64().unwrap(), m["missed_to"].as_u64().unwrap()));
            notices += 1;
            continue;
        }
        let o = m["offset"].as_u64().unwrap();
        ranges.push((o, o));
        if m["data"] == "tail" {
            break;
        }
    }
    tail.abort();
    assert!(notices >= 1, "the subscriber was told it lagged");
    ranges.sort_unstable();
    assert_eq!(ranges[0].0, 1);
    for w in ranges.windows(2) {
        assert_eq!(w[1].0, w[0].1 + 1, "no offset missing or repeated between {:?} and {:?}", w[0], w[1]);
    }
    assert!(metric(&h.metrics_text(), "herald_lagged_notices_total") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_that_meets_the_full_queue_is_dropped_and_counted() {
    let h = start(1, |c| {
        c.outbound_queue_bytes(64 * 1024)
            .max_message_bytes(8 * 1024)
            .slow_consumer(herald::SlowConsumerPolicy::Drop)
            .ping_interval(std::time::Duration::from_millis(50))
            .idle_timeout(std::time::Duration::from_secs(600));
    });
    let a = addr(&h);
    let dropped = |h: &herald::Herald| metric(&h.metrics_text(), "herald_frames_dropped_total{reason=\"slow_consumer\"}");
    // The stalled client takes raw frames: an empty message is a 2-byte
    // frame, the size of a server ping.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let _stalled = upgrade(sock.connect(a).await.unwrap(), "/ws?channel=pfull&format=raw").await;
    // A reader on the same (single) shard: once it has a message, the
    // shard has offered that message to the stalled client too.
    let mut reader = ws(a, "/ws?channel=pfull").await;
    let (seen_tx, mut seen) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        loop {
            let m = next_json(&mut reader).await;
            assert_ne!(m["op"], "lagged", "the reader keeps up");
            if let Some(offset) = m["offset"].as_u64() {
                let _ = seen_tx.send(offset);
            }
        }
    });
    wait_metric(&h, "herald_subscriptions", |v| v == 2).await;
    // Fill the stalled queue with big frames, then top it up with 2-byte
    // ones until one is dropped: less than 2 bytes are left under the
    // bound. Each message is published once the reader has the previous
    // one, so the reader never queues and every drop is the stalled
    // client's.
    let big = "f".repeat(2000);
    for text in [big.as_str(), ""] {
        loop {
            let before = dropped(&h);
            let offset = h.publish("pfull", Payload::text(text.to_string())).await.unwrap().offset;
            seen.wait_for(|&o| o >= offset).await.unwrap();
            if dropped(&h) > before {
                break;
            }
        }
    }
    // Nothing is published any more and the client sends nothing, so
    // the only frames still offered to it are the server's pings: each
    // meets the full queue and is dropped and counted.
    let full = dropped(&h);
    wait_metric(&h, "herald_frames_dropped_total{reason=\"slow_consumer\"}", |v| v >= full + 2).await;
    let m = h.metrics_text();
    assert_eq!(
        metric(&m, "herald_disconnects_total{reason=\"slow_consumer\"}"),
        0,
        "under drop, a ping at the bound is no reason to close"
    );
    assert_eq!(metric(&m, "herald_subscriptions"), 2, "the stalled subscriber is still subscribed");
}
