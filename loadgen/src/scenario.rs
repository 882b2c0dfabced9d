//! What a run is made of, in two halves: the [`Connections`] (the target,
//! how many subscribers on which channels, opened how fast) and, for a
//! fan-out, the [`Load`] published to them. `loadgen connect` needs only
//! the first.

use std::net::{IpAddr, TcpListener};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::clock;
use crate::net::Url;
use crate::publish::Method;
use crate::stats::Plan;
use crate::sub::Transport;

/// Largest number of messages one run may plan (memory: ~12 bytes per
/// message per worker thread).
const MAX_MESSAGES: u64 = 50_000_000;

/// The target and the subscriber connections opened to it.
#[derive(Debug, Clone)]
pub struct Connections {
    /// Subscriber URL templates; subscriber j uses `urls[j % len]`.
    pub urls: Vec<Url>,
    pub target: String,
    pub transport: Transport,
    pub subscribers: u64,
    /// A text frame each WebSocket subscriber sends after its handshake,
    /// `{channel}` replaced.
    pub subscribe_message: Option<String>,
    pub channels: u64,
    pub channel_prefix: String,
    pub connect_rate: f64,
    pub connect_timeout: Duration,
    pub threads: usize,
    pub source_ips: Vec<IpAddr>,
    pub server_pids: Vec<u32>,
    /// The target is an embedded Herald in this process.
    pub embedded: bool,
    /// WebSocket subscribers offer permessage-deflate.
    pub compression: bool,
}

impl Connections {
    pub fn channel_names(&self) -> Vec<String> {
        (0..self.channels).map(|c| format!("{}{c}", self.channel_prefix)).collect()
    }
}

/// What a fan-out publishes, and for how long.
#[derive(Debug, Clone)]
pub struct Load {
    pub format: String,
    pub method: Method,
    /// Publishes awaiting their reply per connection at most; `None`:
    /// unlimited (pipelined).
    pub inflight: Option<usize>,
    pub rate: f64,
    pub duration: f64,
    pub warmup: f64,
    pub drain: f64,
    pub payload: usize,
    /// Payloads are JSON documents (published as `application/json`).
    pub payload_json: bool,
}

/// Everything that defines a fan-out scenario and its target.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub conns: Connections,
    pub load: Load,
}

impl Scenario {
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let (load, conns) = (&self.load, &self.conns);
        if load.rate.is_nan() || load.rate <= 0.0 || !load.rate.is_finite() {
            bail!("--rate must be above 0");
        }
        if load.duration.is_nan() || load.duration <= 0.0 {
            bail!("--duration must be above 0");
        }
        if conns.channels == 0 || conns.subscribers == 0 {
            bail!("--channels and --subscribers must be at least 1");
        }
        let first_measured = (load.rate * load.warmup).round() as u64;
        let total = (load.rate * (load.warmup + load.duration)).round() as u64;
        if total > MAX_MESSAGES {
            bail!("{total} messages planned: over the limit of {MAX_MESSAGES}; lower --rate or --duration");
        }
        if total <= first_measured {
            bail!("no message falls in the measured window: raise --rate or --duration");
        }
        // A number of this run, carried in every payload.
        let nonce = (clock::now_ns() ^ (u64::from(std::process::id()) << 32)) % 1_000_000_007;
        Ok(Plan { total, first_measured, channels: conns.channels, nonce })
    }
}

/// Subscriber threads: `t`, or the number of cores.
pub fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
}

/// An embedded Herald on a free loopback port.
pub fn embedded(shards: Option<usize>, compression: bool) -> anyhow::Result<herald::Herald> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    let mut config = herald::Config::default();
    config.shards(shards.unwrap_or(0)).max_connections(1_000_000).compression(compression);
    herald::Herald::start_on(listener, config).context("cannot start the embedded Herald")
}
