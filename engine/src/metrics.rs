//! Counters kept per shard and summed at scrape, so the hot path never
//! contends on a shared cache line.
//!
//! Each shard writes only its own [`ShardMetrics`]; code that runs outside
//! a shard (the embedder's threads, the acceptor) writes the extra
//! "global" slot. `/metrics` renders the sum in Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

pub(crate) use crate::proto::form::Form;
use crate::proto::ErrorCode;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    #[inline]
    pub(crate) fn inc(&self) {
        self.add(1);
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disconnect {
    /// The client sent a close frame (WebSocket) or went away (either).
    Client = 0,
    /// The outbound queue overflowed under the `disconnect` policy.
    SlowConsumer = 1,
    /// Nothing received for the idle timeout.
    IdleTimeout = 2,
    /// RFC 6455 violation (close 1002).
    ProtocolError = 3,
    /// Text that is not UTF-8 (close 1007).
    InvalidUtf8 = 4,
    /// Frame or message over the limit (close 1009).
    TooLarge = 5,
    /// Server shutdown (close 1001).
    Shutdown = 6,
    /// A socket error.
    IoError = 7,
    /// The broker (Redis) could not start an SSE stream's subscriptions.
    Unavailable = 8,
    /// The connection's token expired without a refresh (close 4001).
    TokenExpired = 9,
    /// A refresh carried another user's token (close 4003).
    UserChanged = 10,
    /// `POST /api/disconnect` of the connection's user (close 4002), or
    /// `/api/unsubscribe` of an SSE stream's last channel.
    ServerApi = 11,
}

impl Disconnect {
    pub(crate) const ALL: [Disconnect; 12] = [
        Disconnect::Client,
        Disconnect::SlowConsumer,
        Disconnect::IdleTimeout,
        Disconnect::ProtocolError,
        Disconnect::InvalidUtf8,
        Disconnect::TooLarge,
        Disconnect::Shutdown,
        Disconnect::IoError,
        Disconnect::Unavailable,
        Disconnect::TokenExpired,
        Disconnect::UserChanged,
        Disconnect::ServerApi,
    ];
    pub(crate) fn label(self) -> &'static str {
        match self {
            Disconnect::Client => "client",
            Disconnect::SlowConsumer => "slow_consumer",
            Disconnect::IdleTimeout => "idle_timeout",
            Disconnect::ProtocolError => "protocol_error",
            Disconnect::InvalidUtf8 => "invalid_utf8",
            Disconnect::TooLarge => "too_large",
            Disconnect::Shutdown => "shutdown",
            Disconnect::IoError => "io_error",
            Disconnect::Unavailable => "broker_unavailable",
            Disconnect::TokenExpired => "token_expired",
            Disconnect::UserChanged => "user_changed",
            Disconnect::ServerApi => "server_api",
        }
    }
}

/// Upper bounds of the latency histogram buckets, in microseconds.
const BUCKETS_US: [u64; 16] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000];

/// A fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [Counter; BUCKETS_US.len() + 1],
    sum_ns: Counter,
}

impl Histogram {
    #[inline]
    pub(crate) fn record(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(BUCKETS_US.len());
        self.buckets[i].inc();
        self.sum_ns.add(d.as_nanos() as u64);
    }

    /// Its lines of a Prometheus histogram `name`; `labels` are put before
    /// `le` (each followed by a comma).
    pub(crate) fn render(&self, out: &mut String, name: &str, labels: &str) {
        render_histogram(out, name, labels, &[self]);
    }

    /// Per-bucket counts (not cumulative), the last above every bound.
    pub(crate) fn counts(all: &[&Histogram]) -> ([u64; BUCKETS_US.len() + 1], f64) {
        let mut counts = [0; BUCKETS_US.len() + 1];
        for h in all {
            for (c, b) in counts.iter_mut().zip(&h.buckets) {
                *c += b.get();
            }
        }
        (counts, all.iter().map(|h| h.sum_ns.get()).sum::<u64>() as f64 / 1e9)
    }

    /// The buckets' upper bounds in seconds.
    pub(crate) fn bounds_s() -> impl Iterator<Item = f64> {
        BUCKETS_US.iter().map(|&b| b as f64 / 1e6)
    }
}

/// The sum of `parts` as Prometheus histogram `name`.
fn render_histogram(out: &mut String, name: &str, labels: &str, parts: &[&Histogram]) {
    let (counts, sum_s) = Histogram::counts(parts);
    let mut cumulative = 0;
    for (i, le) in BUCKETS_US.iter().enumerate() {
        cumulative += counts[i];
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{}\"}} {cumulative}", *le as f64 / 1e6);
    }
    cumulative += counts[BUCKETS_US.len()];
    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
    let plain = labels.trim_end_matches(',');
    let braces = if plain.is_empty() { String::new() } else { format!("{{{plain}}}") };
    let _ = writeln!(out, "{name}_sum{braces} {sum_s}");
    let _ = writeln!(out, "{name}_count{braces} {cumulative}");
}

/// One shard's counters (or the global slot's).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct ShardMetrics {
    pub ws_opened: Counter,
    pub ws_closed: Counter,
    pub sse_opened: Counter,
    pub sse_closed: Counter,
    pub rejected_max_connections: Counter,
    pub tls_handshakes: Counter,
    pub tls_handshake_failures: Counter,
    pub subscriptions_added: Counter,
    pub subscriptions_removed: Counter,
    pub published: Counter,
    pub encoded: [Counter; 8],
    /// Compressed frames built: for messages (once per message and form),
    /// for replies.
    pub compressed: [Counter; 2],
    /// Payload bytes into and out of deflate.
    pub compression_in: Counter,
    pub compression_out: Counter,
    /// Frames left plain for a compressing connection: small, no gain.
    pub compression_skipped: [Counter; 2],
    pub compression_opened: Counter,
    pub compression_closed: Counter,
    /// Compressed client messages inflated, and their bytes.
    pub inflated: Counter,
    pub inflate_in: Counter,
    pub inflate_out: Counter,
    pub delivered_ws: Counter,
    pub delivered_sse: Counter,
    pub bytes_delivered: Counter,
    pub dropped_slow_consumer: Counter,
    pub lagged_notices: Counter,
    /// Recoveries by outcome: recovered, then each [`crate::broker::Miss`].
    pub recoveries: [Counter; 5],
    pub replayed: Counter,
    pub disconnects: [Counter; 12],
    /// Authentications by result ([`crate::auth::TokenError::RESULTS`]).
    pub auth: [Counter; 7],
    /// `auth` commands that refreshed a connection's token.
    pub auth_refreshes: Counter,
    /// Subscribes (and history reads), publishes refused by the grants.
    pub forbidden: [Counter; 2],
    pub errors: [Counter; ErrorCode::ALL.len()],
    pub publish_overloaded: Counter,
    pub publish_to_write: Histogram,
}

impl ShardMetrics {
    pub(crate) fn disconnect(&self, reason: Disconnect) {
        self.disconnects[reason as usize].inc();
    }
    pub(crate) fn error(&self, code: ErrorCode) {
        self.errors[code.index()].inc();
    }
}

/// All shards' counters plus the global slot (the last one).
#[derive(Debug)]
pub(crate) struct Metrics {
    slots: Box<[ShardMetrics]>,
}

impl Metrics {
    pub(crate) fn new(shards: usize) -> Metrics {
        Metrics { slots: (0..=shards).map(|_| ShardMetrics::default()).collect() }
    }

    pub(crate) fn shard(&self, i: usize) -> &ShardMetrics {
        &self.slots[i]
    }

    pub(crate) fn global(&self) -> &ShardMetrics {
        &self.slots[self.slots.len() - 1]
    }

    fn sum(&self, f: impl Fn(&ShardMetrics) -> &Counter) -> u64 {
        self.slots.iter().map(|s| f(s).get()).sum()
    }

    /// The node's numbers for `GET /api/stats` (totals since start).
    pub(crate) fn stats(&self) -> serde_json::Value {
        use serde_json::json;
        let open = |o: fn(&ShardMetrics) -> &Counter, c: fn(&ShardMetrics) -> &Counter| self.sum(o).saturating_sub(self.sum(c));
        let disconnects: serde_json::Map<String, serde_json::Value> =
            Disconnect::ALL.iter().map(|d| (d.label().to_string(), self.sum(|s| &s.disconnects[*d as usize]).into())).collect();
        let errors: serde_json::Map<String, serde_json::Value> =
            ErrorCode::ALL.iter().map(|c| (c.as_str().to_string(), self.sum(|s| &s.errors[c.index()]).into())).collect();
        let parts: Vec<&Histogram> = self.slots.iter().map(|s| &s.publish_to_write).collect();
        let (counts, sum_s) = Histogram::counts(&parts);
        let count: u64 = counts.iter().sum();
        json!({
            "connections": {"ws": open(|s| &s.ws_opened, |s| &s.ws_closed), "sse": open(|s| &s.sse_opened, |s| &s.sse_closed)},
            "connections_total": {"ws": self.sum(|s| &s.ws_opened), "sse": self.sum(|s| &s.sse_opened)},
            "subscriptions": open(|s| &s.subscriptions_added, |s| &s.subscriptions_removed),
            "published": self.sum(|s| &s.published),
            "delivered": {"ws": self.sum(|s| &s.delivered_ws), "sse": self.sum(|s| &s.delivered_sse)},
            "bytes_delivered": self.sum(|s| &s.bytes_delivered),
            "dropped": {"slow_consumer": self.sum(|s| &s.dropped_slow_consumer)},
            "lagged_notices": self.sum(|s| &s.lagged_notices),
            "publish_overloaded": self.sum(|s| &s.publish_overloaded),
            "disconnects": disconnects,
            "errors": errors,
            "publish_to_write": {
                "le_s": Histogram::bounds_s().collect::<Vec<_>>(),
                "counts": &counts[..BUCKETS_US.len()],
                "over": counts[BUCKETS_US.len()],
                "sum_s": sum_s,
                "count": count,
            },
        })
    }

    /// Renders the Prometheus text exposition.
    pub(crate) fn render(&self, extra_gauges: &[(&str, &str, u64)], broker_reconnects: u64) -> String {
        let mut out = String::with_capacity(4096);
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(&mut out, "herald_connections_open", "gauge", "Open WebSocket and SSE connections.");
        let ws_open = self.sum(|s| &s.ws_opened).saturating_sub(self.sum(|s| &s.ws_closed));
        let sse_open = self.sum(|s| &s.sse_opened).saturating_sub(self.sum(|s| &s.sse_closed));
        let _ = writeln!(out, "herald_connections_open{{transport=\"ws\"}} {ws_open}");
        let _ = writeln!(out, "herald_connections_open{{transport=\"sse\"}} {sse_open}");

        head(&mut out, "herald_shard_connections_open", "gauge", "Open WebSocket and SSE connections per shard.");
        for (i, m) in self.slots[..self.slots.len() - 1].iter().enumerate() {
            let open = (m.ws_opened.get() + m.sse_opened.get()).saturating_sub(m.ws_closed.get() + m.sse_closed.get());
            let _ = writeln!(out, "herald_shard_connections_open{{shard=\"{i}\"}} {open}");
        }

        head(&mut out, "herald_connections_total", "counter", "WebSocket and SSE connections opened.");
        let _ = writeln!(out, "herald_connections_total{{transport=\"ws\"}} {}", self.sum(|s| &s.ws_opened));
        let _ = writeln!(out, "herald_connections_total{{transport=\"sse\"}} {}", self.sum(|s| &s.sse_opened));

        head(&mut out, "herald_connections_rejected_total", "counter", "Connections refused, by reason.");
        let _ =
            writeln!(out, "herald_connections_rejected_total{{reason=\"max_connections\"}} {}", self.sum(|s| &s.rejected_max_connections));

        head(&mut out, "herald_tls_handshakes_total", "counter", "TLS handshakes on the listener, by result.");
        let _ = writeln!(out, "herald_tls_handshakes_total{{result=\"ok\"}} {}", self.sum(|s| &s.tls_handshakes));
        let _ = writeln!(out, "herald_tls_handshakes_total{{result=\"failed\"}} {}", self.sum(|s| &s.tls_handshake_failures));

        head(&mut out, "herald_subscriptions", "gauge", "Active subscriptions (connection, channel).");
        let subs = self.sum(|s| &s.subscriptions_added).saturating_sub(self.sum(|s| &s.subscriptions_removed));
        let _ = writeln!(out, "herald_subscriptions {subs}");

        head(&mut out, "herald_messages_published_total", "counter", "Messages accepted for publishing.");
        let _ = writeln!(out, "herald_messages_published_total {}", self.sum(|s| &s.published));

        head(&mut out, "herald_frames_encoded_total", "counter", "Messages encoded into a wire form (once per message and form).");
        for f in Form::ALL {
            let _ = writeln!(out, "herald_frames_encoded_total{{form=\"{}\"}} {}", f.label(), self.sum(|s| &s.encoded[f as usize]));
        }

        head(&mut out, "herald_compression_connections", "gauge", "Open WebSockets that agreed permessage-deflate.");
        let open = self.sum(|s| &s.compression_opened).saturating_sub(self.sum(|s| &s.compression_closed));
        let _ = writeln!(out, "herald_compression_connections {open}");
        head(
            &mut out,
            "herald_compressed_frames_total",
            "counter",
            "Compressed frames built: once per message and form (message), once per reply (reply).",
        );
        for (i, source) in ["message", "reply"].iter().enumerate() {
            let _ = writeln!(out, "herald_compressed_frames_total{{source=\"{source}\"}} {}", self.sum(|s| &s.compressed[i]));
        }
        head(&mut out, "herald_compression_bytes_total", "counter", "Payload bytes before (in) and after (out) deflate.");
        let _ = writeln!(out, "herald_compression_bytes_total{{stage=\"in\"}} {}", self.sum(|s| &s.compression_in));
        let _ = writeln!(out, "herald_compression_bytes_total{{stage=\"out\"}} {}", self.sum(|s| &s.compression_out));
        head(
            &mut out,
            "herald_compression_skipped_total",
            "counter",
            "Messages (once each) and replies left plain for compressing connections: under compression_min_bytes, or no smaller deflated.",
        );
        for (i, reason) in ["small", "no_gain"].iter().enumerate() {
            let _ = writeln!(out, "herald_compression_skipped_total{{reason=\"{reason}\"}} {}", self.sum(|s| &s.compression_skipped[i]));
        }
        head(&mut out, "herald_inflated_messages_total", "counter", "Compressed client messages inflated.");
        let _ = writeln!(out, "herald_inflated_messages_total {}", self.sum(|s| &s.inflated));
        head(&mut out, "herald_inflate_bytes_total", "counter", "Bytes of compressed client messages (in) and inflated (out).");
        let _ = writeln!(out, "herald_inflate_bytes_total{{stage=\"in\"}} {}", self.sum(|s| &s.inflate_in));
        let _ = writeln!(out, "herald_inflate_bytes_total{{stage=\"out\"}} {}", self.sum(|s| &s.inflate_out));

        head(&mut out, "herald_frames_delivered_total", "counter", "Message frames written to subscribers' sockets.");
        let _ = writeln!(out, "herald_frames_delivered_total{{transport=\"ws\"}} {}", self.sum(|s| &s.delivered_ws));
        let _ = writeln!(out, "herald_frames_delivered_total{{transport=\"sse\"}} {}", self.sum(|s| &s.delivered_sse));

        head(&mut out, "herald_bytes_delivered_total", "counter", "Bytes of message frames written to subscribers.");
        let _ = writeln!(out, "herald_bytes_delivered_total {}", self.sum(|s| &s.bytes_delivered));

        head(&mut out, "herald_frames_dropped_total", "counter", "Message frames dropped, by reason.");
        let _ = writeln!(out, "herald_frames_dropped_total{{reason=\"slow_consumer\"}} {}", self.sum(|s| &s.dropped_slow_consumer));

        head(&mut out, "herald_lagged_notices_total", "counter", "`lagged` notices sent to subscribers that dropped frames.");
        let _ = writeln!(out, "herald_lagged_notices_total {}", self.sum(|s| &s.lagged_notices));

        head(&mut out, "herald_disconnects_total", "counter", "Connections ended, by reason.");
        for d in Disconnect::ALL {
            let _ = writeln!(out, "herald_disconnects_total{{reason=\"{}\"}} {}", d.label(), self.sum(|s| &s.disconnects[d as usize]));
        }

        head(&mut out, "herald_errors_total", "counter", "Requests and commands refused, by error code.");
        for c in ErrorCode::ALL {
            let _ = writeln!(out, "herald_errors_total{{code=\"{}\"}} {}", c.as_str(), self.sum(|s| &s.errors[c.index()]));
        }

        head(&mut out, "herald_auth_total", "counter", "Authentications (connects with [auth], auth commands), by result.");
        for (i, result) in crate::auth::TokenError::RESULTS.iter().enumerate() {
            let _ = writeln!(out, "herald_auth_total{{result=\"{result}\"}} {}", self.sum(|s| &s.auth[i]));
        }
        head(&mut out, "herald_auth_refreshes_total", "counter", "auth commands that refreshed a connection's token.");
        let _ = writeln!(out, "herald_auth_refreshes_total {}", self.sum(|s| &s.auth_refreshes));
        head(
            &mut out,
            "herald_forbidden_total",
            "counter",
            "Subscribes (and history reads) and publishes refused by a connection's grants.",
        );
        for (i, action) in ["subscribe", "publish"].iter().enumerate() {
            let _ = writeln!(out, "herald_forbidden_total{{action=\"{action}\"}} {}", self.sum(|s| &s.forbidden[i]));
        }

        head(&mut out, "herald_recoveries_total", "counter", "Subscribes with a position, by outcome.");
        let outcomes = std::iter::once("recovered").chain(crate::broker::Miss::LABELS);
        for (i, outcome) in outcomes.enumerate() {
            let _ = writeln!(out, "herald_recoveries_total{{outcome=\"{outcome}\"}} {}", self.sum(|s| &s.recoveries[i]));
        }
        head(&mut out, "herald_messages_replayed_total", "counter", "Messages queued to subscribers by recovery.");
        let _ = writeln!(out, "herald_messages_replayed_total {}", self.sum(|s| &s.replayed));
        head(&mut out, "herald_publish_overloaded_total", "counter", "Publishes refused because a shard queue was full.");
        let _ = writeln!(out, "herald_publish_overloaded_total {}", self.sum(|s| &s.publish_overloaded));

        head(&mut out, "herald_broker_reconnects_total", "counter", "Reconnections to the broker.");
        let _ = writeln!(out, "herald_broker_reconnects_total {broker_reconnects}");

        for (name, help, value) in extra_gauges {
            head(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }

        head(
            &mut out,
            "herald_publish_to_write_seconds",
            "histogram",
            "Time from a message's publish to its frame's write to a subscriber socket.",
        );
        let parts: Vec<&Histogram> = self.slots.iter().map(|s| &s.publish_to_write).collect();
        render_histogram(&mut out, "herald_publish_to_write_seconds", "", &parts);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_slots_and_renders() {
        let m = Metrics::new(2);
        m.shard(0).delivered_ws.add(3);
        m.shard(1).delivered_ws.add(4);
        m.global().error(ErrorCode::BadChannel);
        m.shard(0).publish_to_write.record(Duration::from_micros(70));
        m.shard(1).publish_to_write.record(Duration::from_secs(10));
        let text = m.render(&[], 0);
        assert!(text.contains("herald_frames_delivered_total{transport=\"ws\"} 7\n"));
        assert!(text.contains("herald_errors_total{code=\"bad_channel\"} 1\n"));
        assert!(text.contains("herald_publish_to_write_seconds_bucket{le=\"0.00005\"} 0\n"));
        assert!(text.contains("herald_publish_to_write_seconds_bucket{le=\"0.0001\"} 1\n"));
        assert!(text.contains("herald_publish_to_write_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("herald_publish_to_write_seconds_count 2\n"));
    }
}
