//! One fan-out run: connect the subscribers at a bounded rate, publish at
//! the planned rate through warm-up and the measured window, wait for
//! stragglers, then turn every observation into a report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::clock;
use crate::connect::{connect_all, Connected};
use crate::net::ConnectError;
use crate::progress::Progress;
use crate::publish;
use crate::report::{FanoutReport, Percentiles, Sample};
use crate::scenario::Scenario;
use crate::stats::WorkerStats;
use crate::sub::{Transport, Worker};
use crate::sys;

/// Thread-name prefix of an embedded Herald's shards.
const SERVER_THREADS: &str = "herald-shard";

/// Runs one fan-out scenario and reports it.
/// A run in which no subscriber connected: nothing was measured (exit
/// status 4).
#[derive(Debug)]
pub struct NoSubscriber(pub String);

impl std::fmt::Display for NoSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoSubscriber {}

pub async fn run(sc: &Scenario, progress: &Progress) -> anyhow::Result<FanoutReport> {
    let plan = sc.plan()?;
    let rss_before = sys::servers_rss_kib(&sc.conns.server_pids);
    let connected = connect_all(&sc.conns, plan, progress).await?;
    let Connected { workers, live, per_channel, .. } = connected;
    if per_channel.iter().sum::<u64>() == 0 {
        let stats: Vec<WorkerStats> = workers.into_iter().map(Worker::stop).collect();
        let mut errs = std::collections::BTreeMap::<String, u64>::new();
        for s in stats {
            for (k, v) in s.connect_errors {
                *errs.entry(k).or_default() += v;
            }
        }
        let hint = errs.keys().find_map(|k| ConnectError::hint(k)).map(|h| format!("; {h}")).unwrap_or_default();
        return Err(NoSubscriber(format!("no subscriber could connect to {} (errors: {errs:?}){hint}", sc.conns.target)).into());
    }
    // Let the target finish its subscriptions before publishing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_connected = sys::servers_rss_kib(&sc.conns.server_pids);

    let failed = live.connect_failed.load(Ordering::Relaxed);
    let abort = Arc::new(AtomicBool::new(false));
    let (publisher, start_ns) = publish::spawn(publish::Job {
        method: sc.load.method.clone(),
        plan,
        rate: sc.load.rate,
        payload_bytes: sc.load.payload,
        payload_json: sc.load.payload_json,
        inflight: sc.load.inflight,
        channel_names: sc.conns.channel_names(),
        lead: Duration::from_millis(200),
        live: Arc::clone(&live),
        abort: Arc::clone(&abort),
    })
    .context("cannot start the publisher")?;

    let window_start = start_ns + (plan.first_measured as f64 * 1e9 / sc.load.rate) as u64;
    let window_end = start_ns + (plan.total as f64 * 1e9 / sc.load.rate) as u64;
    live.window_start.store(window_start, Ordering::Relaxed);
    live.window_end.store(window_end, Ordering::Relaxed);
    let hiccups = spawn_hiccup_meter(window_start, window_end)?;
    let mut timeline = Vec::new();
    let mut cpu0 = None;
    let mut cpu1 = None;
    let (mut prev_sent, mut prev_recv) = (0u64, 0u64);
    let mut next_sample = start_ns;
    progress.timed(Duration::from_secs_f64(sc.load.warmup + sc.load.duration + sc.load.drain));
    progress.phase("warmup");
    loop {
        let now = clock::now_ns();
        if cpu0.is_none() && now >= window_start {
            cpu0 = Some((sys::thread_cpu(), sys::self_cpu(), sys::servers_cpu(&sc.conns.server_pids)));
            progress.phase("measure");
        }
        if cpu1.is_none() && now >= window_end {
            cpu1 = Some((
                sys::thread_cpu(),
                sys::self_cpu(),
                sys::servers_cpu(&sc.conns.server_pids),
                sys::servers_rss_kib(&sc.conns.server_pids),
            ));
        }
        if now >= next_sample {
            // One sample per second, even after a stall of several.
            while next_sample + 1_000_000_000 <= now {
                next_sample += 1_000_000_000;
            }
            let sent = live.sent.load(Ordering::Relaxed);
            let recv = live.received.load(Ordering::Relaxed);
            let p99 = live.take_interval_p99_us();
            let phase = if now < window_start {
                "warmup"
            } else if now < window_end {
                "measure"
            } else {
                "drain"
            };
            timeline.push(Sample {
                t: (now as f64 - start_ns as f64) / 1e9,
                phase: phase.to_string(),
                connections: live.connected.load(Ordering::Relaxed),
                sent: sent - prev_sent,
                deliveries: recv - prev_recv,
                p99_us: p99,
            });
            progress.tick(&live, sc.conns.subscribers, p99);
            (prev_sent, prev_recv) = (sent, recv);
            next_sample += 1_000_000_000;
        }
        if publisher.is_finished() && cpu1.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hiccup = hiccups.join().map(|h| Percentiles::from_ns(&h)).unwrap_or_default();
    let outcome = match publisher.join() {
        Ok(r) => r?,
        Err(_) => bail!("the publisher thread failed"),
    };

    // Expected deliveries: every measured message the target took, times
    // its channel's subscribers.
    let measured_range = plan.first_measured as usize..plan.total as usize;
    let connected_total: u64 = per_channel.iter().sum();
    let mut sent = 0u64;
    let mut expected = 0u64;
    let mut expected_per_message = vec![0u32; measured_range.len()];
    for (i, g) in measured_range.clone().enumerate() {
        if outcome.ok.get(g).copied().unwrap_or(false) {
            sent += 1;
            let e = per_channel[g % sc.conns.channels as usize];
            expected += e;
            expected_per_message[i] = e as u32;
        }
    }
    progress.phase("drain");
    let drain_until = Instant::now() + Duration::from_secs_f64(sc.load.drain);
    while live.measured.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        progress.tick(&live, sc.conns.subscribers, live.take_interval_p99_us());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Flushes happen every 200 ms: let the last one land.
    tokio::time::sleep(Duration::from_millis(250)).await;
    abort.store(true, Ordering::Relaxed);

    let mut stats: Option<WorkerStats> = None;
    for w in workers {
        let s = w.stop();
        match &mut stats {
            None => stats = Some(s),
            Some(all) => all.merge(s),
        }
    }
    let stats = stats.context("no worker")?;

    // Per message: a target that refused a message (or whose answer was
    // lost) may still have delivered it; such deliveries are `unexpected`,
    // never counted against another message's loss.
    let mut completion = crate::stats::histogram();
    let mut incomplete = 0u64;
    let (mut delivered, mut lost, mut unexpected) = (0u64, 0u64, 0u64);
    for (i, g) in measured_range.enumerate() {
        let got = stats.counts.get(i).copied().unwrap_or(0);
        let want = expected_per_message[i];
        if want == 0 {
            unexpected += u64::from(got);
            continue;
        }
        delivered += u64::from(got.min(want));
        lost += u64::from(want.saturating_sub(got));
        if got >= want {
            let intended = start_ns + (g as f64 * 1e9 / sc.load.rate) as u64;
            let _ = completion.record(stats.last_ns.get(i).copied().unwrap_or(0).saturating_sub(intended).max(1));
        } else {
            incomplete += 1;
        }
    }

    let (cpu_a, self_a, server_a) = cpu0.unwrap_or_default();
    let (cpu_b, self_b, server_b, rss_end) = cpu1.unwrap_or_default();
    let (_, busiest, embedded_server_cpu, client_threads) = sys::split_cpu(&cpu_a, &cpu_b, SERVER_THREADS);
    // The whole process (threads that ended included) less the embedded
    // server's shards.
    let client_cpu = (self_b - self_a - embedded_server_cpu).max(0.0);
    let window_s = sc.load.duration;
    // Receipts between the window's bounds: what the window's CPU paid for.
    let deliveries_in_window = stats.in_window.max(1) as f64;
    let server_cpu_s = match (server_a, server_b) {
        (Some(a), Some(b)) => Some(b - a),
        _ if sc.conns.embedded => Some(embedded_server_cpu),
        _ => None,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let lag = Percentiles::from_ns(&outcome.lag);

    let mut warnings = Vec::new();
    let by_message = sc.conns.subscribe_message.as_ref().is_some_and(|m| m.contains("{channel}"));
    if !by_message && sc.conns.urls.iter().any(|u| !u.path.contains("{channel}")) {
        warnings.push("a --url has no {channel}: its subscribers all connect to it as it is (one channel)".to_string());
    }
    let mut saturated = false;
    // Which signal said the client may be the bottleneck, with its remedy.
    let mut causes: Vec<String> = Vec::new();
    if busiest / window_s >= 0.9 {
        saturated = true;
        causes.push(format!("a loadgen thread used {:.0} % of a core: add --threads or run loadgen elsewhere", busiest / window_s * 100.0));
        warnings.push(format!(
            "a loadgen thread used {:.0}% of a core: loadgen itself may be the bottleneck (add --threads, or run it on another machine)",
            busiest / window_s * 100.0
        ));
    }
    if client_cpu / window_s >= 0.9 * cores {
        saturated = true;
        causes.push(format!(
            "loadgen used {:.0} % of all {cores} cores: run it on another machine, or lower the load",
            client_cpu / window_s * 100.0
        ));
        warnings.push(format!(
            "loadgen used {:.0}% of all {cores} cores: the figures measure the machine, not only the target",
            client_cpu / window_s * 100.0
        ));
    }
    let rtt = Percentiles::from_ns(&outcome.rtt);
    if lag.p99 > 10_000.0 {
        match sc.load.inflight {
            // Waiting for replies is the target's doing, not loadgen's.
            Some(n) => warnings.push(format!(
                "the publisher fell behind schedule waiting for replies (lag p99 {:.1} ms, publish round trip p99 {:.1} ms, {n} in flight): \
                 latency still counts from the intended send times",
                lag.p99 / 1000.0,
                rtt.p99 / 1000.0
            )),
            None => {
                saturated = true;
                causes.push(format!(
                    "the publisher fell behind schedule (lag p99 {}): the machine is busy (hiccup p99 {}); lower --rate or give loadgen a core",
                    crate::report::us(lag.p99),
                    crate::report::us(hiccup.p99)
                ));
                warnings.push(format!(
                    "the publisher fell behind schedule (lag p99 {:.1} ms): latency still counts from the intended send times",
                    lag.p99 / 1000.0
                ));
            }
        }
    }
    if hiccup.p99 > 5_000.0 {
        warnings.push(format!(
            "this machine stalled a sleeping thread by up to {:.1} ms (p99 {:.1} ms) during the run: latencies at that scale may be the machine's, not the target's",
            hiccup.max / 1000.0,
            hiccup.p99 / 1000.0
        ));
    }
    if let Some(n) = outcome.errors.get("backlog") {
        // With an in-flight limit, the queue fills while replies are awaited.
        if sc.load.inflight.is_none() {
            saturated = true;
            causes.push(format!(
                "{n} publishes refused for a full publisher backlog: the target (or the machine) took them slower than --rate"
            ));
        }
        warnings
            .push(format!("{n} messages were refused because the target did not take them as fast as planned (publisher backlog full)"));
    }
    if !stats.connect_errors.is_empty() {
        let mut w = format!("{} of {} subscribers could not connect: {:?}", failed, sc.conns.subscribers, stats.connect_errors);
        if let Some(h) = stats.connect_errors.keys().find_map(|k| ConnectError::hint(k)) {
            w.push_str("; ");
            w.push_str(h);
        }
        warnings.push(w);
    }
    if lost > 0 {
        warnings.push(format!("{lost} deliveries were lost (not received by the end of the drain period, {} s)", sc.load.drain));
    }
    if unexpected > 0 {
        warnings.push(format!("{unexpected} deliveries were of messages the target refused or did not confirm"));
    }
    if stats.foreign > 0 {
        warnings.push(format!("{} payloads of another loadgen run arrived on these channels (ignored)", stats.foreign));
    }
    if stats.misrouted > 0 {
        warnings.push(format!("{} messages reached subscribers of another channel", stats.misrouted));
    }
    if !outcome.errors.is_empty() {
        warnings.push(format!("publish errors: {:?}", outcome.errors));
    }

    let per_conn = match (rss_before, rss_connected) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 / connected_total.max(1) as f64),
        _ => None,
    };
    let _ = outcome.scheduled;
    Ok(FanoutReport {
        target: sc.conns.target.clone(),
        transport: match sc.conns.transport {
            Transport::Ws => "ws".into(),
            Transport::Sse => "sse".into(),
        },
        format: sc.load.format.clone(),
        publish: sc.load.method.name().into(),
        publish_inflight: sc.load.inflight,
        subscribers: sc.conns.subscribers,
        channels: sc.conns.channels,
        rate: sc.load.rate,
        duration_s: sc.load.duration,
        warmup_s: sc.load.warmup,
        payload_bytes: sc.load.payload,
        payload_json: sc.load.payload_json,
        compression: sc.conns.compression,
        compressed_connections: stats.compressed_conns,
        compressed_messages: stats.compressed_frames,
        wire_bytes: stats.wire_bytes,
        wire_bytes_per_delivery: (sc.conns.transport == Transport::Ws).then(|| stats.wire_bytes as f64 / deliveries_in_window),
        connected: connected_total,
        sent,
        publish_errors: outcome.errors,
        expected,
        deliveries: delivered,
        lost,
        unexpected,
        foreign: stats.foreign,
        duplicates: stats.duplicates,
        out_of_order: stats.out_of_order,
        misrouted: stats.misrouted,
        deliveries_per_s: stats.in_window as f64 / window_s,
        messages_per_s: sent as f64 / window_s,
        delivery_latency_us: Percentiles::from_ns(&stats.latency),
        completion_latency_us: Percentiles::from_ns(&completion),
        incomplete_messages: incomplete,
        publisher_lag_us: lag,
        publish_rtt_us: rtt,
        machine_hiccup_us: hiccup,
        connect_latency_us: Percentiles::from_ns(&stats.connect),
        connect_errors: stats.connect_errors.values().sum(),
        connect_errors_by_kind: stats.connect_errors,
        disconnects_by_kind: stats.disconnects,
        client_cpu_s: client_cpu,
        client_cpu_us_per_delivery: client_cpu * 1e6 / deliveries_in_window,
        client_busiest_thread: busiest / window_s,
        client_threads,
        client_saturated: saturated,
        saturation: causes,
        server_cpu_s,
        server_cpu_us_per_delivery: server_cpu_s.map(|s| s * 1e6 / deliveries_in_window),
        server_rss_kib: rss_end,
        server_rss_before_kib: rss_before,
        server_rss_per_connection_kib: per_conn,
        warnings,
        timeline,
        finished_unix_s: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    })
}

/// A thread that sleeps 1 ms at a time and records by how much each sleep
/// overran, between `from` and `until` (process-epoch ns): the stalls the
/// machine itself imposed on every thread, whatever the target did.
fn spawn_hiccup_meter(from: u64, until: u64) -> anyhow::Result<std::thread::JoinHandle<hdrhistogram::Histogram<u64>>> {
    Ok(std::thread::Builder::new().name("lg-hiccup".into()).spawn(move || {
        let mut h = crate::stats::histogram();
        let tick = Duration::from_millis(1);
        loop {
            let before = clock::now_ns();
            if before >= until {
                return h;
            }
            std::thread::sleep(tick);
            let after = clock::now_ns();
            if before >= from {
                let _ = h.record((after - before).saturating_sub(1_000_000).max(1));
            }
        }
    })?)
}
