//! Connection churn against the `herald` binary: connect–subscribe–
//! disconnect cycles leave no file descriptor, subscription or permit
//! behind. The long runs that also bound memory (RSS) are stress tests,
//! run by `bench/stress.sh`: they need an idle machine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use herald::proto::frame::{decode_server_head, OpCode};
use tokio::io::AsyncReadExt;

use crate::common::*;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// Opens a WebSocket subscribed to `channel` from source address `src`,
/// waits for the 101, and drops it.
async fn cycle(server: SocketAddr, src: IpAddr, channel: &str) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    upgrade(sock.connect(server).await.unwrap(), &format!("/ws?channel={channel}")).await;
}

async fn metrics(server: SocketAddr) -> String {
    http(server, "GET", "/metrics", &[], b"").await.2
}

/// What a churn run left behind.
struct Churned {
    metrics: String,
    fds: (usize, usize),
    rss_kib: (u64, u64),
}

/// Runs `warmup` then `n` connect–subscribe–disconnect cycles against a
/// fresh `herald` binary; returns its metrics once every connection
/// closed, and its fds and RSS after the warm-up and at the end.
async fn churn(warmup: usize, n: usize) -> Churned {
    let Spawned { mut child, addr: server, .. } = spawn_herald(&["--shards", "2"]).await;
    let pid = child.id().unwrap();
    // Source addresses 127.0.0.1-32: past one address's ephemeral ports
    // (each cycle leaves a client socket in TIME_WAIT).
    let sources: Vec<IpAddr> = (1..=32).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect();
    let run = |n: usize| {
        let sources = sources.clone();
        async move {
            let workers = 32;
            let tasks: Vec<_> = (0..workers)
                .map(|w| {
                    let sources = sources.clone();
                    tokio::spawn(async move {
                        for i in (w..n).step_by(workers) {
                            cycle(server, sources[i % sources.len()], &format!("churn-{}", i % 100)).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    let settled = || async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = metrics(server).await;
            if metric(&m, "herald_connections_open{transport=\"ws\"}") == 0 && metric(&m, "herald_subscriptions") == 0 {
                return m;
            }
            assert!(tokio::time::Instant::now() < deadline, "connections did not close: {m}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Warm up (allocator pools, shard buffers), then take the baseline.
    run(warmup).await;
    settled().await;
    let (fds0, rss0) = (fds(pid), rss_kib(pid));
    run(n).await;
    let m = settled().await;
    let (fds1, rss1) = (fds(pid), rss_kib(pid));
    child.kill().await.unwrap();
    eprintln!("churn: fds {fds0} -> {fds1}, RSS {rss0} KiB -> {rss1} KiB");
    Churned { metrics: m, fds: (fds0, fds1), rss_kib: (rss0, rss1) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_subscribe_disconnect_cycles_give_back_fds_and_permits() {
    let Churned { metrics: m, fds: (fds0, fds1), .. } = churn(50, 300).await;
    assert_eq!(metric(&m, "herald_connections_total{transport=\"ws\"}"), 350);
    // One permit is the /metrics request's own connection.
    assert_eq!(metric(&m, "herald_open_permits"), 1, "every connection permit came back");
    assert!(fds1 <= fds0 + 2, "file descriptors leaked: {fds0} -> {fds1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stress: run by bench/stress.sh"]
async fn fifty_thousand_connect_subscribe_disconnect_cycles_leave_nothing_behind() {
    let Churned { metrics: m, fds: (fds0, fds1), rss_kib: (rss0, rss1) } = churn(2_000, 50_000).await;
    assert!(metric(&m, "herald_connections_total{transport=\"ws\"}") >= 52_000);
    assert_eq!(metric(&m, "herald_open_permits"), 1, "every connection permit came back");
    assert!(fds1 <= fds0 + 2, "file descriptors leaked: {fds0} -> {fds1}");
    assert!(rss1 <= rss0 + rss0 / 4 + 2048, "RSS did not return near its baseline: {rss0} KiB -> {rss1} KiB");
}

/// Counts text frames on a raw WebSocket until `want` arrived.
async fn count_frames(mut s: tokio::net::TcpStream, want: u64) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut have, mut got, mut skip) = (0usize, 0u64, 0usize);
    while got < want {
        let n = match tokio::time::timeout(WAIT, s.read(&mut buf[have..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return got,
            Ok(Ok(n)) => n,
        };
        have += n;
        let mut at = 0;
        loop {
            let k = skip.min(have - at);
            skip -= k;
            at += k;
            if skip > 0 {
                break;
            }
            let Some(head) = decode_server_head(&buf[at..have], 1 << 20).unwrap() else { break };
            if head.opcode == OpCode::Text {
                got += 1;
            }
            at += head.header_len;
            skip = head.payload_len;
        }
        buf.copy_within(at..have, 0);
        have -= at;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stress: run by bench/stress.sh"]
async fn one_stalled_subscriber_among_a_thousand_costs_bounded_memory_and_nothing_else() {
    // A 256 KiB outbound bound, so the stalled client reaches it quickly.
    let args = ["--shards", "2", "--outbound-queue-bytes", "262144", "--max-message-bytes", "16384"];
    let Spawned { mut child, addr: server, .. } = spawn_herald(&args).await;
    let pid = child.id().unwrap();
    let rss_idle = rss_kib(pid);
    let n_msgs = 3_000u64;
    let mut readers = Vec::new();
    for _ in 0..1000 {
        let s = raw_ws(server, "/ws?channel=steady").await;
        readers.push(tokio::spawn(count_frames(s, n_msgs)));
    }
    // The stalled one: a 4 KiB receive window, never read.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stalled = upgrade(sock.connect(server).await.unwrap(), "/ws?channel=steady").await;
    let rss_connected = rss_kib(pid);
    // A steady rate: 3,000 messages of 3 KB (9 MB: more than the stalled
    // socket's kernel buffers and its 256 KiB queue hold), ~1,000 a second.
    let payload = "s".repeat(3000);
    let mut peak = rss_connected;
    for i in 0..n_msgs {
        let (status, _) = publish(server, "steady", &payload, false).await;
        assert_eq!(status, 200);
        if i % 100 == 0 {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), n_msgs, "a reading subscriber lost messages");
    }
    peak = peak.max(rss_kib(pid));
    // It left the channel at once; the connection ends at the close timeout
    // (its close frame cannot be written).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = metrics(server).await;
        if metric(&m, "herald_disconnects_total{reason=\"slow_consumer\"}") == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stalled subscriber was never cut: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("slow consumer: RSS idle {rss_idle} KiB, 1,001 connected {rss_connected} KiB, peak {peak} KiB");
    // Bounded: the stalled queue holds at most 256 KiB; allow the readers'
    // in-flight frames and allocator slack on top.
    assert!(peak <= rss_connected + 16 * 1024, "RSS grew from {rss_connected} to {peak} KiB");
    drop(stalled);
    child.kill().await.unwrap();
}
