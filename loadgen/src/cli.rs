//! The command line: clap's types, and turning them into a [`Scenario`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::net::{self, Url};
use crate::publish::{self, Method};
use crate::scenario::{embedded, threads, Connections, Load, Scenario};
use crate::sub::Transport;

#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about = "Fan-out load generator for Herald and any WebSocket/SSE server")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// N subscribers over C channels, an open-loop publisher at a fixed
    /// rate: delivery and fan-out completion latency, throughput, loss.
    /// With no --url it measures an embedded Herald.
    Fanout(FanoutArgs),
    /// A connection storm: open N at a rate, hold, close.
    Connect(ConnectArgs),
    /// The same fan-out scenario against several targets, interleaved.
    Compare(CompareArgs),
    /// Renders a saved report (`fanout --json` or `compare --json`) again:
    /// its summary on standard output, its page with --html.
    Report(ReportArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ReportArgs {
    /// The JSON report.
    pub(crate) json: PathBuf,
    /// Write the HTML page here.
    #[arg(long)]
    pub(crate) html: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TransportArg {
    Ws,
    Sse,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FormatArg {
    /// Herald's v1 envelope.
    Herald,
    /// The frame or SSE data is the payload alone.
    Raw,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PublishArg {
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
pub(crate) struct ScenarioArgs {
    /// Subscriber URL template; `{channel}` is replaced by the channel name.
    /// Repeat to spread subscribers over several nodes. None: an embedded
    /// Herald.
    #[arg(long)]
    pub(crate) url: Vec<String>,
    #[arg(long, value_enum, default_value = "ws")]
    pub(crate) transport: TransportArg,
    #[arg(long, value_enum, default_value = "herald")]
    pub(crate) format: FormatArg,
    #[arg(long, default_value_t = 1000)]
    pub(crate) subscribers: u64,
    #[arg(long, default_value_t = 1)]
    pub(crate) channels: u64,
    /// Messages per second, all channels together.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) rate: f64,
    /// Time measured: `10s`, `2m`, `500ms`, or seconds.
    #[arg(long, default_value = "10s", value_parser = seconds)]
    pub(crate) duration: f64,
    /// Publishing before measuring (`2s`, or seconds).
    #[arg(long, default_value = "2s", value_parser = seconds)]
    pub(crate) warmup: f64,
    /// Wait after the last publish for deliveries still on their way
    /// (`3s`, or seconds); what has not arrived then is lost.
    #[arg(long, default_value = "3s", value_parser = seconds)]
    pub(crate) drain: f64,
    /// Payload size in bytes (at least the ~30-byte header).
    #[arg(long, default_value_t = 64)]
    pub(crate) payload: usize,
    /// Payloads are JSON documents of about `--payload` bytes, a list of
    /// records that differ per message (compressible as real JSON is, 3–5×),
    /// published as `application/json` (not with `--publish-body`).
    #[arg(long)]
    pub(crate) payload_json: bool,
    /// WebSocket subscribers offer permessage-deflate (as browsers do) and
    /// inflate what comes compressed; the report counts the connections
    /// that agreed it and the bytes received on the wire. The embedded
    /// Herald then runs with `compression = true`.
    #[arg(long)]
    pub(crate) compression: bool,
    /// PEM bundle of the CAs that wss:// and https:// targets are checked
    /// against (default: the system's).
    #[arg(long)]
    pub(crate) tls_ca: Option<String>,
    /// New connections per second while connecting.
    #[arg(long, default_value_t = 2000.0)]
    pub(crate) connect_rate: f64,
    /// Time a connection and its handshake may take (`10s`, or seconds).
    #[arg(long, default_value = "10s", value_parser = seconds)]
    pub(crate) connect_timeout: f64,
    #[arg(long, value_enum, default_value = "http")]
    pub(crate) publish: PublishArg,
    /// Publish URL template (`{channel}` replaced). Derived for Herald URLs
    /// (`/ws`, `/sse`) when not given.
    #[arg(long)]
    pub(crate) publish_url: Option<String>,
    /// Keep-alive connections of the `http` publisher.
    #[arg(long, default_value_t = 4)]
    pub(crate) publish_connections: usize,
    /// Publishes awaiting their reply on each publisher connection at most
    /// (1 to 4096; 1: closed loop, each waits for the previous reply).
    /// Default: unlimited (pipelined). Not for `ws-raw` (no replies).
    #[arg(long)]
    pub(crate) publish_inflight: Option<usize>,
    /// Body of each `http` publish, `{channel}` and `{payload}` replaced
    /// (default: the payload alone), for servers that take an envelope,
    /// e.g. Pusher's `{"name":"lg","channel":"{channel}","data":"{payload}"}`.
    #[arg(long)]
    pub(crate) publish_body: Option<String>,
    /// Content-Type of each `http` publish.
    #[arg(long, default_value = "text/plain")]
    pub(crate) publish_content_type: String,
    /// Sign each `http` publish: `pusher:KEY:SECRET` adds the Pusher HTTP
    /// API's `auth_key`, `auth_timestamp`, `auth_version`, `body_md5` and
    /// `auth_signature` (HMAC-SHA256) to the query.
    #[arg(long)]
    pub(crate) publish_sign: Option<String>,
    /// A text frame every WebSocket subscriber sends after its handshake
    /// (`{channel}` replaced), for servers that subscribe by message, e.g.
    /// Pusher's `{"event":"pusher:subscribe","data":{"channel":"{channel}"}}`.
    #[arg(long)]
    pub(crate) subscribe_message: Option<String>,
    /// Redis channel name template of the `redis` publisher.
    #[arg(long, default_value = "{channel}")]
    pub(crate) redis_channel: String,
    /// Channel names are this prefix and a number.
    #[arg(long, default_value = "lg-")]
    pub(crate) channel_prefix: String,
    /// Subscriber threads (default: the number of cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Source addresses to spread connections over, past the ephemeral
    /// port limit: `127.0.0.1-127.0.0.8` or a comma list.
    #[arg(long)]
    pub(crate) source_ips: Option<String>,
    /// Sample this server process's CPU and RSS (repeatable).
    #[arg(long)]
    pub(crate) server_pid: Vec<u32>,
    /// Shards of the embedded Herald (default: the number of cores).
    #[arg(long)]
    pub(crate) shards: Option<usize>,
}

#[derive(Args, Debug)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    pub(crate) scenario: ScenarioArgs,
    /// Write the full report as JSON.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Write a self-contained HTML report with plots.
    #[arg(long)]
    pub(crate) html: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    pub(crate) quiet: bool,
    #[command(flatten)]
    pub(crate) thresholds: Thresholds,
}

/// Pass/fail criteria: a run that crosses one exits with status 3.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct Thresholds {
    /// Most deliveries that may be lost, as a fraction of those expected
    /// (`0`: none; `0.01`: 1 %).
    #[arg(long)]
    pub(crate) max_loss: Option<f64>,
    /// Highest delivery latency p99 allowed (`50ms`, `1s`, or seconds).
    #[arg(long, value_parser = seconds)]
    pub(crate) max_p99: Option<f64>,
    /// Highest fan-out completion p99 allowed (`100ms`, or seconds).
    #[arg(long, value_parser = seconds)]
    pub(crate) max_completion_p99: Option<f64>,
    /// Fewest deliveries per second the target must sustain.
    #[arg(long)]
    pub(crate) min_deliveries_per_s: Option<f64>,
}

impl Thresholds {
    /// The thresholds `r` crossed, in words.
    pub(crate) fn crossed(&self, r: &crate::report::FanoutReport) -> Vec<String> {
        let mut out = Vec::new();
        let loss = r.lost as f64 / r.expected.max(1) as f64;
        if let Some(max) = self.max_loss.filter(|m| loss > *m) {
            out.push(format!("loss {:.4} % > --max-loss {:.4} %", loss * 100.0, max * 100.0));
        }
        if let Some(max) = self.max_p99.filter(|m| r.delivery_latency_us.p99 / 1e6 > *m) {
            out.push(format!("delivery p99 {} > --max-p99 {}", crate::report::us(r.delivery_latency_us.p99), crate::report::us(max * 1e6)));
        }
        if let Some(max) = self.max_completion_p99.filter(|m| r.completion_latency_us.p99 / 1e6 > *m) {
            out.push(format!(
                "completion p99 {} > --max-completion-p99 {}",
                crate::report::us(r.completion_latency_us.p99),
                crate::report::us(max * 1e6)
            ));
        }
        if let Some(min) = self.min_deliveries_per_s.filter(|m| r.deliveries_per_s < *m) {
            out.push(format!("{:.0} deliveries/s < --min-deliveries-per-s {min:.0}", r.deliveries_per_s));
        }
        out
    }
}

/// A duration: `500ms`, `30s`, `2m`, `1h`, `250us`, or a number of seconds.
pub(crate) fn seconds(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (500ms, 30s, 2m, or seconds)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?} in {s:?} (use ms, s, m or h)")),
    };
    Ok(n * scale)
}

#[derive(Args, Debug)]
pub(crate) struct ConnectArgs {
    /// URL (`{channel}` replaced by `lg-0`…, `{conn}` by the connection's
    /// number: `token=u{conn}` gives each its own user); none: an embedded
    /// Herald.
    #[arg(long)]
    pub(crate) url: Vec<String>,
    #[arg(long, value_enum, default_value = "ws")]
    pub(crate) transport: TransportArg,
    /// PEM bundle of the CAs that wss:// and https:// targets are checked
    /// against (default: the system's).
    #[arg(long)]
    pub(crate) tls_ca: Option<String>,
    #[arg(long, default_value_t = 1000)]
    pub(crate) connections: u64,
    /// New connections per second.
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) rate: f64,
    /// How long to hold them open (`5s`, `1m`, or seconds).
    #[arg(long, default_value = "5s", value_parser = seconds)]
    pub(crate) hold: f64,
    #[arg(long, default_value_t = 1)]
    pub(crate) channels: u64,
    #[arg(long, default_value = "10s", value_parser = seconds)]
    pub(crate) connect_timeout: f64,
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    #[arg(long)]
    pub(crate) source_ips: Option<String>,
    /// A text frame each WebSocket connection sends after its handshake
    /// (`{channel}` replaced), as for `fanout`.
    #[arg(long)]
    pub(crate) subscribe_message: Option<String>,
    #[arg(long)]
    pub(crate) server_pid: Vec<u32>,
    #[arg(long)]
    pub(crate) shards: Option<usize>,
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    #[arg(long)]
    pub(crate) quiet: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CompareArgs {
    /// A target: space-separated `key=value` pairs; keys `name`, `url`
    /// (repeatable), `publish`, `publish-url`, `publish-body`,
    /// `publish-content-type`, `publish-sign`, `publish-inflight`,
    /// `publish-connections`, `subscribe-message`, `format`, `pid` (values
    /// without spaces). A target
    /// with no `url` is an embedded Herald.
    #[arg(long, required = true)]
    pub(crate) target: Vec<String>,
    /// Rounds; each runs every target once, in turn (A B A B …).
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    #[command(flatten)]
    pub(crate) scenario: ScenarioArgs,
    /// Write every run and the medians as JSON.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Write a page with the medians, the ratios and each target's curves.
    #[arg(long)]
    pub(crate) html: Option<PathBuf>,
    #[arg(long)]
    pub(crate) quiet: bool,
}

impl ScenarioArgs {
    /// The scenario, and the embedded Herald when there is no URL.
    pub(crate) fn build(&self, name: Option<&str>) -> anyhow::Result<(Scenario, Option<herald::Herald>)> {
        let (urls, method_default_url, herald) = if self.url.is_empty() {
            let h = embedded(self.shards, self.compression)?;
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
        net::set_tls_ca(self.tls_ca.clone())?;
        if first.tls && self.publish_url.is_none() && matches!(self.publish, PublishArg::Ws) {
            bail!("--publish ws speaks plain text only: give a ws:// --publish-url, or publish with --publish http (https://) or redis");
        }
        let authority = method_default_url.unwrap_or_else(|| first.authority());
        let method = match self.publish {
            PublishArg::Http => {
                let u = match &self.publish_url {
                    Some(u) => u.clone(),
                    None if herald_path => format!("{}://{authority}/publish/{{channel}}", if first.tls { "https" } else { "http" }),
                    None => bail!("--publish http needs --publish-url for a target that is not Herald"),
                };
                let sign = self.publish_sign.as_deref().map(publish::Sign::parse).transpose()?;
                Method::Http {
                    url: Url::parse(&u)?,
                    connections: self.publish_connections.max(1),
                    body: self.publish_body.clone(),
                    content_type: if self.payload_json && self.publish_content_type == "text/plain" {
                        "application/json".into()
                    } else {
                        self.publish_content_type.clone()
                    },
                    sign,
                }
            }
            PublishArg::Ws => {
                let u = match &self.publish_url {
                    Some(u) => u.clone(),
                    None if herald_path => format!("ws://{authority}/ws"),
                    None => bail!("--publish ws needs --publish-url for a target that is not Herald"),
                };
                Method::Ws { url: Url::parse(&u)?.plain("--publish ws")? }
            }
            PublishArg::WsRaw => {
                let u = self.publish_url.clone().context("--publish ws-raw needs --publish-url (a WebSocket URL template)")?;
                Method::WsRaw { url: Url::parse(&u)?.plain("--publish ws-raw")? }
            }
            PublishArg::Redis => Method::Redis {
                url: self.publish_url.clone().unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
                channel: self.redis_channel.clone(),
            },
        };
        if !matches!(method, Method::Http { .. }) && (self.publish_body.is_some() || self.publish_sign.is_some()) {
            bail!("--publish-body and --publish-sign are for --publish http");
        }
        if self.compression && self.transport != TransportArg::Ws {
            bail!("--compression is for WebSocket subscribers (--transport ws)");
        }
        if self.payload_json && self.publish_body.is_some() {
            bail!("--payload-json makes the whole body; it does not go with --publish-body");
        }
        if self.subscribe_message.is_some() && self.transport != TransportArg::Ws {
            bail!("--subscribe-message is for WebSocket subscribers (--transport ws)");
        }
        if let Some(n) = self.publish_inflight {
            if matches!(method, Method::WsRaw { .. }) {
                bail!("--publish-inflight needs replies to wait for; --publish ws-raw has none (use http, ws or redis)");
            }
            if !(1..=publish::MAX_INFLIGHT).contains(&n) {
                bail!("--publish-inflight must be from 1 to {} (omit it for unlimited)", publish::MAX_INFLIGHT);
            }
        }
        let by_message = self.subscribe_message.as_ref().is_some_and(|m| m.contains("{channel}"));
        if self.channels > 1 && !by_message && urls.iter().any(|u| !u.path.contains("{channel}")) {
            bail!(
                "--channels {} needs {{channel}} in every --url (each subscriber's channel goes there), e.g. 'ws://host/ws?channel={{channel}}'",
                self.channels
            );
        }
        if self.payload > 16 * 1024 * 1024 {
            bail!("--payload is limited to 16 MiB");
        }
        let source_ips = match &self.source_ips {
            Some(s) => net::parse_source_ips(s)?,
            None => Vec::new(),
        };
        let conns = Connections {
            target: name.map(str::to_string).unwrap_or_else(|| {
                if herald.is_some() {
                    format!("embedded herald ({})", first.authority())
                } else {
                    urls.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                }
            }),
            embedded: herald.is_some(),
            compression: self.compression,
            urls,
            transport: match self.transport {
                TransportArg::Ws => Transport::Ws,
                TransportArg::Sse => Transport::Sse,
            },
            subscribers: self.subscribers,
            subscribe_message: self.subscribe_message.clone(),
            channels: self.channels,
            channel_prefix: self.channel_prefix.clone(),
            connect_rate: self.connect_rate,
            connect_timeout: Duration::from_secs_f64(self.connect_timeout.max(0.1)),
            threads: threads(self.threads),
            source_ips,
            server_pids: self.server_pid.clone(),
        };
        let load = Load {
            format: match self.format {
                FormatArg::Herald => "herald".into(),
                FormatArg::Raw => "raw".into(),
            },
            method,
            inflight: self.publish_inflight,
            rate: self.rate,
            duration: self.duration,
            warmup: self.warmup.max(0.0),
            drain: self.drain.max(0.0),
            payload: self.payload,
            payload_json: self.payload_json,
        };
        let sc = Scenario { conns, load };
        Ok((sc, herald))
    }
}
