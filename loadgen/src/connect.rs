//! Opening subscribers: at a bounded rate, spread over worker threads,
//! waiting until each has connected or failed. `loadgen connect` is just
//! that (a connection storm: open, hold, close); a fan-out publishes to
//! them afterwards.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cli::{ConnectArgs, TransportArg};
use crate::net::{self, Url};
use crate::progress::Progress;
use crate::report::{ConnectReport, Percentiles};
use crate::scenario::{embedded, threads, Connections};
use crate::stats::{self, Live, Plan};
use crate::sub::{SubSpec, Transport, Worker};
use crate::sys;

/// The connected subscribers of a run.
pub struct Connected {
    pub workers: Vec<Worker>,
    pub live: Arc<Live>,
    /// Connected subscribers per channel.
    pub per_channel: Vec<u64>,
    pub open_s: f64,
}

/// Opens `scenario.subscribers` subscribers at the connect rate and waits
/// until each has connected or failed.
pub async fn connect_all(sc: &Connections, plan: Plan, progress: &Progress) -> anyhow::Result<Connected> {
    let live = Live::new(sc.channels as usize);
    let threads = sc.threads.max(1);
    let workers: Vec<Worker> = (0..threads).map(|i| Worker::spawn(i, plan, Arc::clone(&live))).collect::<anyhow::Result<_>>()?;
    let mut addrs = Vec::new();
    for u in &sc.urls {
        addrs.push((Arc::new(u.clone()), u.resolve().await?));
    }
    let names = sc.channel_names();
    let n = sc.subscribers;
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / sc.connect_rate.max(1.0));
    progress.phase("connect");
    for j in 0..n {
        let due = started + gap.mul_f64(j as f64);
        if due > Instant::now() + Duration::from_millis(1) {
            tokio::time::sleep_until(due.into()).await;
        }
        let (url, addr) = &addrs[(j as usize) % addrs.len()];
        let channel = j % sc.channels;
        let spec = SubSpec {
            transport: sc.transport,
            url: Arc::clone(url),
            addr: *addr,
            path: url.path_for(&names[channel as usize]).replace("{conn}", itoa::Buffer::new().format(j)),
            channel,
            source: (!sc.source_ips.is_empty()).then(|| sc.source_ips[(j as usize) % sc.source_ips.len()]),
            connect_timeout: sc.connect_timeout,
            subscribe: sc.subscribe_message.as_ref().map(|m| m.replace("{channel}", &names[channel as usize])),
            compression: sc.compression,
        };
        workers[(j as usize) % workers.len()].subscribe(spec);
        if j % 64 == 0 {
            progress.tick(&live, n, 0.0);
        }
    }
    let deadline = Instant::now() + sc.connect_timeout + Duration::from_secs(2);
    loop {
        let done = live.connected.load(Ordering::Relaxed)
            + live.connect_failed.load(Ordering::Relaxed)
            + live.disconnected.load(Ordering::Relaxed);
        if done >= n || Instant::now() > deadline {
            break;
        }
        progress.tick(&live, n, 0.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_s = started.elapsed().as_secs_f64();
    let per_channel = live.connected_per_channel.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    Ok(Connected { workers, live, per_channel, open_s })
}

/// `loadgen connect`: open the connections at a rate, hold them, close.
pub async fn run(a: ConnectArgs) -> anyhow::Result<()> {
    let progress = Progress::new(a.quiet);
    net::set_tls_ca(a.tls_ca.clone())?;
    sys::fd_budget(a.connections, &progress);
    let herald = if a.url.is_empty() { Some(embedded(a.shards, false)?) } else { None };
    let urls = match &herald {
        Some(h) => {
            let addr = h.local_addr().context("no address")?;
            vec![Url::parse(&match a.transport {
                TransportArg::Ws => format!("ws://{addr}/ws?channel={{channel}}"),
                TransportArg::Sse => format!("http://{addr}/sse?channel={{channel}}"),
            })?]
        }
        None => a.url.iter().map(|u| Url::parse(u)).collect::<anyhow::Result<_>>()?,
    };
    let sc = Connections {
        target: match &herald {
            Some(_) => format!("embedded herald ({})", urls[0].authority()),
            None => urls.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        },
        embedded: herald.is_some(),
        compression: false,
        urls,
        transport: if a.transport == TransportArg::Ws { Transport::Ws } else { Transport::Sse },
        subscribers: a.connections,
        subscribe_message: a.subscribe_message.clone(),
        channels: a.channels.max(1),
        channel_prefix: "lg-".into(),
        connect_rate: a.rate,
        connect_timeout: Duration::from_secs_f64(a.connect_timeout.max(0.1)),
        threads: threads(a.threads),
        source_ips: match &a.source_ips {
            Some(s) => net::parse_source_ips(s)?,
            None => Vec::new(),
        },
        server_pids: a.server_pid.clone(),
    };
    let rss_before = sys::servers_rss_kib(&sc.server_pids);
    let cpu0 = (sys::thread_cpu(), sys::self_cpu());
    let plan = stats::Plan { total: 0, first_measured: 0, channels: sc.channels, nonce: 0 };
    let c = connect_all(&sc, plan, &progress).await?;
    let opened = c.per_channel.iter().sum::<u64>();
    let open_s = c.open_s;
    progress.timed(Duration::from_secs_f64(a.hold.max(0.0)));
    progress.phase("hold");
    let until = Instant::now() + Duration::from_secs_f64(a.hold.max(0.0));
    while Instant::now() < until {
        progress.tick(&c.live, a.connections, 0.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_held = sys::servers_rss_kib(&sc.server_pids);
    let dropped = c.live.disconnected.load(Ordering::Relaxed);
    let cpu1 = (sys::thread_cpu(), sys::self_cpu());
    progress.phase("close");
    let mut all: Option<stats::WorkerStats> = None;
    for w in c.workers {
        let s = w.stop();
        match &mut all {
            None => all = Some(s),
            Some(x) => x.merge(s),
        }
    }
    progress.finish();
    let all = all.context("no worker")?;
    let (_, _, server_cpu, _) = sys::split_cpu(&cpu0.0, &cpu1.0, "herald-shard");
    let client_cpu = (cpu1.1 - cpu0.1 - server_cpu).max(0.0);
    if let Some(h) = herald {
        h.shutdown(Duration::from_secs(2)).await;
    }
    let mut warnings = Vec::new();
    if let Some(h) = all.connect_errors.keys().find_map(|k| net::ConnectError::hint(k)) {
        warnings.push(h.to_string());
    }
    let report = ConnectReport {
        target: sc.target.clone(),
        transport: if a.transport == TransportArg::Ws { "ws".into() } else { "sse".into() },
        connections: a.connections,
        rate: a.rate,
        hold_s: a.hold,
        opened,
        connect_errors: all.connect_errors.values().sum(),
        connect_errors_by_kind: all.connect_errors,
        connect_latency_us: Percentiles::from_ns(&all.connect),
        dropped_while_held: dropped,
        open_s,
        opened_per_s: opened as f64 / open_s.max(1e-9),
        client_cpu_s: client_cpu,
        server_rss_before_kib: rss_before,
        server_rss_kib: rss_held,
        server_rss_per_connection_kib: match (rss_before, rss_held) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / opened.max(1) as f64),
            _ => None,
        },
        warnings,
    };
    print!("{}", report.summary());
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if report.opened == 0 {
        bail!("no connection could be opened");
    }
    Ok(())
}
