//! `loadgen`: measures fan-out latency, throughput and loss of Herald or
//! any other WebSocket/SSE server.
//!
//! ```text
//! loadgen fanout                       # an embedded Herald, 1,000 subscribers
//! loadgen fanout --url 'ws://127.0.0.1:8080/ws?channel={channel}' --json out.json
//! loadgen connect --url 'ws://127.0.0.1:8080/ws?channel=c' --connections 10000
//! loadgen compare --target 'name=a url=ws://…' --target 'name=b url=ws://…'
//! ```

mod clock;
mod compare;
mod fanout;
mod html;
mod http1;
mod net;
mod payload;
mod progress;
mod publish;
mod report;
mod stats;
mod sub;
mod sys;
mod ws;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use fanout::Scenario;
use net::Url;
use progress::Progress;
use publish::Method;
use report::{ConnectReport, Percentiles};
use sub::Transport;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about = "Fan-out load generator for Herald and any WebSocket/SSE server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// N subscribers over C channels, an open-loop publisher at a fixed
    /// rate: delivery and fan-out completion latency, throughput, loss.
    /// With no --url it measures an embedded Herald.
    Fanout(FanoutArgs),
    /// A connection storm: open N at a rate, hold, close.
    Connect(ConnectArgs),
    /// The same fan-out scenario against several targets, interleaved.
    Compare(CompareArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TransportArg {
    Ws,
    Sse,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FormatArg {
    /// Herald's v1 envelope.
    Herald,
    /// The frame or SSE data is the payload alone.
    Raw,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum PublishArg {
    /// POST to --publish-url.
    Http,
    /// Herald's publish command on a WebSocket.
    Ws,
    /// The payload as a text frame, one connection per channel.
    WsRaw,
    /// PUBLISH straight to Redis.
    Redis,
}

/// What a scenario is made of (shared by `fanout` and `compare`).
#[derive(Args, Debug, Clone)]
struct ScenarioArgs {
    /// Subscriber URL template; `{channel}` is replaced by the channel name.
    /// Repeat to spread subscribers over several nodes. None: an embedded
    /// Herald.
    #[arg(long)]
    url: Vec<String>,
    #[arg(long, value_enum, default_value = "ws")]
    transport: TransportArg,
    #[arg(long, value_enum, default_value = "herald")]
    format: FormatArg,
    #[arg(long, default_value_t = 1000)]
    subscribers: u64,
    #[arg(long, default_value_t = 1)]
    channels: u64,
    /// Messages per second, all channels together.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of publishing before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds to wait after the last publish for deliveries still on
    /// their way; what has not arrived then is lost.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Payload size in bytes (at least the ~30-byte header).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// New connections per second while connecting.
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Seconds a connection and its handshake may take.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    #[arg(long, value_enum, default_value = "http")]
    publish: PublishArg,
    /// Publish URL template (`{channel}` replaced). Derived for Herald URLs
    /// (`/ws`, `/sse`) when not given.
    #[arg(long)]
    publish_url: Option<String>,
    /// Keep-alive connections of the `http` publisher.
    #[arg(long, default_value_t = 4)]
    publish_connections: usize,
    /// Redis channel name template of the `redis` publisher.
    #[arg(long, default_value = "{channel}")]
    redis_channel: String,
    /// Channel names are this prefix and a number.
    #[arg(long, default_value = "lg-")]
    channel_prefix: String,
    /// Subscriber threads (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Source addresses to spread connections over, past the ephemeral
    /// port limit: `127.0.0.1-127.0.0.8` or a comma list.
    #[arg(long)]
    source_ips: Option<String>,
    /// Sample this server process's CPU and RSS (repeatable).
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Shards of the embedded Herald (default: the number of cores).
    #[arg(long)]
    shards: Option<usize>,
}

#[derive(Args, Debug)]
struct FanoutArgs {
    #[command(flatten)]
    scenario: ScenarioArgs,
    /// Write the full report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report with plots.
    #[arg(long)]
    html: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct ConnectArgs {
    /// URL (`{channel}` replaced by `lg-0`…); none: an embedded Herald.
    #[arg(long)]
    url: Vec<String>,
    #[arg(long, value_enum, default_value = "ws")]
    transport: TransportArg,
    #[arg(long, default_value_t = 1000)]
    connections: u64,
    /// New connections per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds to hold them open.
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    #[arg(long, default_value_t = 1)]
    channels: u64,
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    source_ips: Option<String>,
    #[arg(long)]
    server_pid: Vec<u32>,
    #[arg(long)]
    shards: Option<usize>,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// A target: space-separated `key=value` pairs; keys `name`, `url`
    /// (repeatable), `publish`, `publish-url`, `format`, `pid`. A target
    /// with no `url` is an embedded Herald.
    #[arg(long, required = true)]
    target: Vec<String>,
    /// Rounds; each runs every target once, in turn (A B A B …).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[command(flatten)]
    scenario: ScenarioArgs,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

fn main() {
    clock::init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start: {e}");
            std::process::exit(2);
        }
    };
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Fanout(a) => cmd_fanout(a).await,
            Cmd::Connect(a) => cmd_connect(a).await,
            Cmd::Compare(a) => compare::run(a).await,
        }
    });
    if let Err(e) = r {
        eprintln!("loadgen: {e:#}");
        std::process::exit(1);
    }
}

fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
}

/// An embedded Herald on a free loopback port.
fn embedded(shards: Option<usize>) -> anyhow::Result<herald::Herald> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    let mut config = herald::Config::default();
    config.shards(shards.unwrap_or(0)).max_connections(1_000_000);
    herald::Herald::start_on(listener, config).context("cannot start the embedded Herald")
}

/// Raises the fd limit and says what it allows.
fn fd_budget(connections: u64, progress: &Progress) {
    let limit = sys::raise_fd_limit();
    if connections + 64 > limit {
        progress.note(&format!(
            "the file descriptor limit is {limit}: {connections} connections will not all open (raise the hard limit with ulimit -Hn)"
        ));
    }
}

impl ScenarioArgs {
    /// The scenario, and the embedded Herald when there is no URL.
    fn build(&self, name: Option<&str>) -> anyhow::Result<(Scenario, Option<herald::Herald>)> {
        let (urls, method_default_url, herald) = if self.url.is_empty() {
            let h = embedded(self.shards)?;
            let addr = h.local_addr().context("the embedded Herald has no address")?;
            let raw = if self.format == FormatArg::Raw { "&format=raw" } else { "" };
            let url = match self.transport {
                TransportArg::Ws => format!("ws://{addr}/ws?channel={{channel}}{raw}"),
                TransportArg::Sse => format!("http://{addr}/sse?channel={{channel}}{raw}"),
            };
            (vec![Url::parse(&url)?], Some(addr.to_string()), Some(h))
        } else {
            let urls = self.url.iter().map(|u| Url::parse(u)).collect::<anyhow::Result<Vec<_>>>()?;
            (urls, None, None)
        };
        let first = &urls[0];
        let herald_path = first.path.starts_with("/ws") || first.path.starts_with("/sse");
        let authority = method_default_url.unwrap_or_else(|| first.authority());
        let method = match self.publish {
            PublishArg::Http => {
                let u = match &self.publish_url {
                    Some(u) => u.clone(),
                    None if herald_path => format!("http://{authority}/publish/{{channel}}"),
                    None => bail!("--publish http needs --publish-url for a target that is not Herald"),
                };
                Method::Http { url: Url::parse(&u)?, connections: self.publish_connections.max(1) }
            }
            PublishArg::Ws => {
                let u = match &self.publish_url {
                    Some(u) => u.clone(),
                    None if herald_path => format!("ws://{authority}/ws"),
                    None => bail!("--publish ws needs --publish-url for a target that is not Herald"),
                };
                Method::Ws { url: Url::parse(&u)? }
            }
            PublishArg::WsRaw => {
                let u = self.publish_url.clone().context("--publish ws-raw needs --publish-url (a WebSocket URL template)")?;
                Method::WsRaw { url: Url::parse(&u)? }
            }
            PublishArg::Redis => Method::Redis {
                url: self.publish_url.clone().unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
                channel: self.redis_channel.clone(),
            },
        };
        if self.payload > 16 * 1024 * 1024 {
            bail!("--payload is limited to 16 MiB");
        }
        let source_ips = match &self.source_ips {
            Some(s) => net::parse_source_ips(s)?,
            None => Vec::new(),
        };
        let sc = Scenario {
            target: name.map(str::to_string).unwrap_or_else(|| {
                if herald.is_some() {
                    format!("embedded herald ({})", first.authority())
                } else {
                    urls.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                }
            }),
            embedded: herald.is_some(),
            urls,
            transport: match self.transport {
                TransportArg::Ws => Transport::Ws,
                TransportArg::Sse => Transport::Sse,
            },
            format: match self.format {
                FormatArg::Herald => "herald".into(),
                FormatArg::Raw => "raw".into(),
            },
            method,
            subscribers: self.subscribers,
            channels: self.channels,
            channel_prefix: self.channel_prefix.clone(),
            rate: self.rate,
            duration: self.duration,
            warmup: self.warmup.max(0.0),
            drain: self.drain.max(0.0),
            payload: self.payload,
            connect_rate: self.connect_rate,
            connect_timeout: Duration::from_secs_f64(self.connect_timeout.max(0.1)),
            threads: threads(self.threads),
            source_ips,
            server_pids: self.server_pid.clone(),
        };
        Ok((sc, herald))
    }
}

async fn cmd_fanout(a: FanoutArgs) -> anyhow::Result<()> {
    let progress = Progress::new(a.quiet);
    fd_budget(a.scenario.subscribers, &progress);
    let (sc, herald) = a.scenario.build(None)?;
    let r = fanout::run(&sc, &progress).await;
    progress.finish();
    if let Some(h) = herald {
        h.shutdown(Duration::from_secs(2)).await;
    }
    let report = r?;
    print!("{}", report.summary());
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &a.html {
        std::fs::write(path, html::render(&report)).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

async fn cmd_connect(a: ConnectArgs) -> anyhow::Result<()> {
    let progress = Progress::new(a.quiet);
    fd_budget(a.connections, &progress);
    let herald = if a.url.is_empty() { Some(embedded(a.shards)?) } else { None };
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
    let sc = Scenario {
        target: match &herald {
            Some(_) => format!("embedded herald ({})", urls[0].authority()),
            None => urls.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        },
        embedded: herald.is_some(),
        urls,
        transport: if a.transport == TransportArg::Ws { Transport::Ws } else { Transport::Sse },
        format: "herald".into(),
        method: Method::Redis { url: String::new(), channel: String::new() },
        subscribers: a.connections,
        channels: a.channels.max(1),
        channel_prefix: "lg-".into(),
        rate: 1.0,
        duration: 1.0,
        warmup: 0.0,
        drain: 0.0,
        payload: 0,
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
    let c = fanout::connect_all(&sc, plan, &progress).await?;
    let opened = c.per_channel.iter().sum::<u64>();
    let open_s = c.open_s;
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
