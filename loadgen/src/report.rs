//! What a run measured: the JSON report (a contract that users' scripts
//! read: keys are added, never renamed) and the human summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// The full spectrum: `[percentile, value_us]` pairs, from 0 up to 100,
    /// denser towards the tail.
    pub spectrum: Vec<[f64; 2]>,
}

impl Percentiles {
    /// From a histogram recorded in nanoseconds.
    pub fn from_ns(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |v: u64| (v as f64 / 1000.0 * 10.0).round() / 10.0;
        let q = |p: f64| us(h.value_at_quantile(p));
        let mut spectrum = Vec::new();
        // 0, 10, …, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, … up to 100.
        let mut p: f64 = 0.0;
        while p < 90.0 {
            spectrum.push([p, q(p / 100.0)]);
            p += 10.0;
        }
        let mut gap: f64 = 10.0;
        while gap > 1e-4 && (h.len() as f64) * gap / 100.0 >= 1.0 {
            let p1 = 100.0 - gap;
            let p2 = 100.0 - gap / 2.0;
            spectrum.push([p1, q(p1 / 100.0)]);
            spectrum.push([p2, q(p2 / 100.0)]);
            gap /= 10.0;
        }
        spectrum.push([100.0, us(h.max())]);
        Percentiles {
            count: h.len(),
            min: us(h.min()),
            mean: (h.mean() / 100.0).round() / 10.0,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: us(h.max()),
            spectrum,
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Sample {
    /// Seconds since the first publish (negative while connecting).
    pub t: f64,
    /// Phase at the end of the second.
    pub phase: String,
    pub connections: u64,
    /// Messages sent during this second.
    pub sent: u64,
    /// Messages received during this second (every phase).
    pub deliveries: u64,
    /// Delivery latency p99 of the second, microseconds.
    pub p99_us: f64,
}

/// A latency given in microseconds, with its unit: `830 µs`, `4.21 ms`,
/// `1.23 s`.
pub fn us(v: f64) -> String {
    if v < 1000.0 {
        format!("{v:.0} µs")
    } else if v < 1e6 {
        format!("{:.2} ms", v / 1e3)
    } else {
        format!("{:.2} s", v / 1e6)
    }
}

/// The report of one `loadgen fanout` run (read back by `loadgen report`:
/// keys missing from an older report take their defaults).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FanoutReport {
    pub target: String,
    pub transport: String,
    pub format: String,
    pub publish: String,
    /// Publishes awaiting their reply per publisher connection at most;
    /// `null`: unlimited (pipelined). 1 is a closed loop.
    pub publish_inflight: Option<usize>,
    pub subscribers: u64,
    pub channels: u64,
    pub rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub payload_bytes: usize,
    /// JSON payloads (`--payload-json`).
    pub payload_json: bool,
    /// Subscribers offered permessage-deflate (`--compression`).
    pub compression: bool,
    /// Subscribers that agreed it.
    pub compressed_connections: u64,
    /// Compressed messages received in the measured window.
    pub compressed_messages: u64,
    /// Bytes WebSocket subscribers read from their sockets during the
    /// measured window (frames and their headers, pings included).
    pub wire_bytes: u64,
    /// `wire_bytes` per delivery in the window (WebSocket only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire_bytes_per_delivery: Option<f64>,
    /// Subscribers that connected (those the server closed later included:
    /// their missed messages count as lost).
    pub connected: u64,
    /// Messages sent during the measured window (refused ones excluded).
    pub sent: u64,
    /// Publishes the target refused or that failed, by kind.
    pub publish_errors: BTreeMap<String, u64>,
    /// Deliveries the sent messages should have made.
    pub expected: u64,
    /// Distinct deliveries received of measured messages.
    pub deliveries: u64,
    pub lost: u64,
    /// Deliveries of messages the target refused or never confirmed.
    pub unexpected: u64,
    /// Payloads of another loadgen run on the same channels (ignored).
    pub foreign: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Messages that reached a subscriber of another channel.
    pub misrouted: u64,
    /// Messages received per second between the window's bounds (whatever
    /// their phase: the rate the target sustained).
    pub deliveries_per_s: f64,
    /// Messages sent per second over the measured window.
    pub messages_per_s: f64,
    /// Receive time minus intended send time, per delivery.
    pub delivery_latency_us: Percentiles,
    /// Last subscriber's receive time minus intended send time, per message
    /// that reached every subscriber.
    pub completion_latency_us: Percentiles,
    /// Measured messages that did not reach every subscriber.
    pub incomplete_messages: u64,
    /// Actual send time minus intended send time, per message.
    pub publisher_lag_us: Percentiles,
    /// Write of a publish request to read of its reply, per measured
    /// message that had one (pipelined: queueing on the connection
    /// included; `ws-raw` has none).
    pub publish_rtt_us: Percentiles,
    /// How much a 1 ms sleep overran on this machine during the measured
    /// window: stalls the machine imposed on every thread.
    pub machine_hiccup_us: Percentiles,
    pub connect_latency_us: Percentiles,
    pub connect_errors: u64,
    pub connect_errors_by_kind: BTreeMap<String, u64>,
    /// Subscribers the server closed or that failed during the run, by kind.
    pub disconnects_by_kind: BTreeMap<String, u64>,
    /// CPU time of loadgen's own threads during the measured window.
    pub client_cpu_s: f64,
    pub client_cpu_us_per_delivery: f64,
    /// Busiest loadgen thread's CPU share of the window (1.0 = one core).
    pub client_busiest_thread: f64,
    pub client_threads: usize,
    pub client_saturated: bool,
    /// What made `client_saturated` true, each with its remedy.
    pub saturation: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Server RSS at the end of the measured window (KiB, summed over pids).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_kib: Option<u64>,
    /// Server RSS before the subscribers connected (KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_before_kib: Option<u64>,
    /// (RSS with subscribers − RSS before) / subscribers, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_per_connection_kib: Option<f64>,
    pub warnings: Vec<String>,
    pub timeline: Vec<Sample>,
    /// When the run ended, seconds since the Unix epoch.
    pub finished_unix_s: u64,
}

impl FanoutReport {
    /// `pipelined`, `closed loop, 1 in flight` or `N in flight`.
    pub fn inflight_label(&self) -> String {
        match self.publish_inflight {
            None => "pipelined".into(),
            Some(1) => "closed loop, 1 in flight".into(),
            Some(n) => format!("{n} in flight"),
        }
    }

    /// The human summary table.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "target       {}", self.target);
        let _ = writeln!(
            s,
            "scenario     {} subscribers ({} connected) over {} channel(s), {} {}, {} msg/s for {}s after {}s warm-up, {} B {}payload, publish {} ({})",
            self.subscribers,
            self.connected,
            self.channels,
            self.transport,
            self.format,
            self.rate,
            self.duration_s,
            self.warmup_s,
            self.payload_bytes,
            if self.payload_json { "JSON " } else { "" },
            self.publish,
            self.inflight_label()
        );
        let _ = writeln!(
            s,
            "messages     sent {}  ({:.0}/s){}",
            self.sent,
            self.messages_per_s,
            if self.publish_errors.is_empty() { String::new() } else { format!("  publish errors {:?}", self.publish_errors) }
        );
        let _ = writeln!(
            s,
            "deliveries   {} of {} expected  ({:.0}/s)  lost {}  duplicates {}  out of order {}",
            self.deliveries, self.expected, self.deliveries_per_s, self.lost, self.duplicates, self.out_of_order
        );
        let _ = writeln!(s, "{:<24}{:>10}{:>10}{:>10}{:>10}{:>10}", "latency", "p50", "p90", "p99", "p99.9", "max");
        for (name, p) in [
            ("delivery", &self.delivery_latency_us),
            ("fan-out completion", &self.completion_latency_us),
            ("publisher lag", &self.publisher_lag_us),
            ("publish round trip", &self.publish_rtt_us),
            ("machine hiccup", &self.machine_hiccup_us),
            ("connect", &self.connect_latency_us),
        ] {
            let _ = writeln!(s, "  {:<22}{:>10}{:>10}{:>10}{:>10}{:>10}", name, us(p.p50), us(p.p90), us(p.p99), us(p.p999), us(p.max));
        }
        if let Some(per) = self.wire_bytes_per_delivery {
            let _ = write!(s, "wire         {} B received in the window ({per:.0} B per delivery)", self.wire_bytes);
            if self.compression {
                let _ = write!(
                    s,
                    "; compression agreed by {} of {} subscribers, {} compressed messages",
                    self.compressed_connections, self.connected, self.compressed_messages
                );
            }
            s.push('\n');
        }
        if self.incomplete_messages > 0 {
            let _ = writeln!(s, "incomplete   {} messages did not reach every subscriber", self.incomplete_messages);
        }
        if self.connect_errors > 0 {
            let _ = writeln!(s, "connect errs {} {:?}", self.connect_errors, self.connect_errors_by_kind);
        }
        if !self.disconnects_by_kind.is_empty() {
            let _ = writeln!(s, "disconnects  {:?}", self.disconnects_by_kind);
        }
        let _ = writeln!(
            s,
            "client CPU   {:.2} s  ({:.2} µs per delivery, busiest thread {:.0}% of a core, {} threads){}",
            self.client_cpu_s,
            self.client_cpu_us_per_delivery,
            self.client_busiest_thread * 100.0,
            self.client_threads,
            if self.client_saturated { format!("  SATURATED: {}", self.saturation.join("; ")) } else { String::new() }
        );
        if let (Some(cpu), Some(per)) = (self.server_cpu_s, self.server_cpu_us_per_delivery) {
            let _ = write!(s, "server CPU   {cpu:.2} s  ({per:.2} µs per delivery)");
            if let Some(rss) = self.server_rss_kib {
                let _ = write!(s, "  RSS {rss} KiB");
            }
            if let Some(per) = self.server_rss_per_connection_kib {
                let _ = write!(s, "  ({per:.1} KiB per connection)");
            }
            s.push('\n');
        }
        for w in &self.warnings {
            let _ = writeln!(s, "WARNING      {w}");
        }
        s
    }
}

/// The report of one `loadgen connect` run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectReport {
    pub target: String,
    pub transport: String,
    pub connections: u64,
    pub rate: f64,
    pub hold_s: f64,
    pub opened: u64,
    pub connect_errors: u64,
    pub connect_errors_by_kind: BTreeMap<String, u64>,
    pub connect_latency_us: Percentiles,
    /// Connections the server closed while held.
    pub dropped_while_held: u64,
    /// Seconds from the first attempt to the last completed one.
    pub open_s: f64,
    pub opened_per_s: f64,
    pub client_cpu_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_per_connection_kib: Option<f64>,
    pub warnings: Vec<String>,
}

impl ConnectReport {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "target       {}", self.target);
        let _ = writeln!(
            s,
            "opened       {} of {} {} connections in {:.2} s ({:.0}/s), held {} s, {} dropped while held",
            self.opened, self.connections, self.transport, self.open_s, self.opened_per_s, self.hold_s, self.dropped_while_held
        );
        let p = &self.connect_latency_us;
        let _ =
            writeln!(s, "connect      p50 {}  p90 {}  p99 {}  p99.9 {}  max {}", us(p.p50), us(p.p90), us(p.p99), us(p.p999), us(p.max));
        if self.connect_errors > 0 {
            let _ = writeln!(s, "connect errs {} {:?}", self.connect_errors, self.connect_errors_by_kind);
        }
        if let Some(rss) = self.server_rss_kib {
            let _ = write!(s, "server RSS   {rss} KiB");
            if let Some(per) = self.server_rss_per_connection_kib {
                let _ = write!(s, " ({per:.2} KiB per connection)");
            }
            s.push('\n');
        }
        let _ = writeln!(s, "client CPU   {:.2} s", self.client_cpu_s);
        for w in &self.warnings {
            let _ = writeln!(s, "WARNING      {w}");
        }
        s
    }
}
