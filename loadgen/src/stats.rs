//! What the subscribers observe, kept per worker thread without locks and
//! merged when the run ends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

use crate::payload::Found;

/// Latency histograms record nanoseconds from 1 ns to 10 minutes with 3
/// significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Which messages are measured, and how they map to channels.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Messages the publisher sends in all (warm-up and measured).
    pub total: u64,
    /// The first measured message; earlier ones are the warm-up.
    pub first_measured: u64,
    pub channels: u64,
    /// This run's number, carried in every payload.
    pub nonce: u64,
}

impl Plan {
    pub fn measured(&self) -> u64 {
        self.total - self.first_measured
    }
}

/// Counters every thread updates and the progress display reads.
#[derive(Debug)]
pub struct Live {
    /// Subscribers connected now.
    pub connected: AtomicU64,
    /// Subscribers that connected, per channel (never decreases).
    pub connected_per_channel: Box<[AtomicU64]>,
    pub connect_failed: AtomicU64,
    pub disconnected: AtomicU64,
    pub sent: AtomicU64,
    /// Messages received, every phase.
    pub received: AtomicU64,
    /// Distinct deliveries of measured messages.
    pub measured: AtomicU64,
    /// Receipts inside the measured window.
    pub in_window: AtomicU64,
    /// The measured window (process-epoch ns), once known: receipts inside
    /// it are what CPU per delivery and deliveries per second divide by.
    pub window_start: AtomicU64,
    pub window_end: AtomicU64,
    /// Latency of deliveries since the display last read it.
    pub interval: Mutex<Histogram<u64>>,
}

impl Live {
    pub fn new(channels: usize) -> Arc<Live> {
        Arc::new(Live {
            connected: AtomicU64::new(0),
            connected_per_channel: (0..channels).map(|_| AtomicU64::new(0)).collect(),
            connect_failed: AtomicU64::new(0),
            disconnected: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            measured: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            window_start: AtomicU64::new(u64::MAX),
            window_end: AtomicU64::new(u64::MAX),
            interval: Mutex::new(histogram()),
        })
    }

    /// Whether `now_ns` is inside the measured window.
    #[inline]
    pub fn in_window(&self, now_ns: u64) -> bool {
        now_ns >= self.window_start.load(Ordering::Relaxed) && now_ns < self.window_end.load(Ordering::Relaxed)
    }

    /// Takes the p99 of the deliveries since the last call (µs).
    pub fn take_interval_p99_us(&self) -> f64 {
        let mut h = self.interval.lock().unwrap_or_else(|e| e.into_inner());
        let v = if h.is_empty() { 0.0 } else { h.value_at_quantile(0.99) as f64 / 1000.0 };
        h.reset();
        v
    }
}

/// Duplicate and order tracking of one subscriber, over a sliding window
/// of the last [`WINDOW`] message indices it should receive.
#[derive(Debug)]
pub struct Seq {
    highest: Option<u64>,
    bits: Box<[u64; WINDOW / 64]>,
}

/// Indices a subscriber remembers for duplicate detection.
pub const WINDOW: usize = 4096;

/// What one receipt was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    /// New, but after a later one.
    Late,
    Duplicate,
}

impl Default for Seq {
    fn default() -> Seq {
        Seq { highest: None, bits: Box::new([0; WINDOW / 64]) }
    }
}

impl Seq {
    fn bit(k: u64) -> (usize, u64) {
        let i = (k % WINDOW as u64) as usize;
        (i / 64, 1 << (i % 64))
    }

    pub fn observe(&mut self, k: u64) -> Seen {
        let (w, m) = Seq::bit(k);
        match self.highest {
            None => {
                self.highest = Some(k);
                self.bits[w] |= m;
                Seen::New
            }
            Some(h) if k > h => {
                if k - h >= WINDOW as u64 {
                    self.bits.fill(0);
                } else {
                    for j in h + 1..k {
                        let (w, m) = Seq::bit(j);
                        self.bits[w] &= !m;
                    }
                }
                self.bits[w] |= m;
                self.highest = Some(k);
                Seen::New
            }
            // Older than the window: cannot tell a duplicate; count it late.
            Some(h) if h - k >= WINDOW as u64 => Seen::Late,
            Some(_) if self.bits[w] & m != 0 => Seen::Duplicate,
            Some(_) => {
                self.bits[w] |= m;
                Seen::Late
            }
        }
    }
}

/// One worker thread's observations.
#[derive(Debug)]
pub struct WorkerStats {
    pub plan: Plan,
    pub latency: Histogram<u64>,
    pub interval: Histogram<u64>,
    pub connect: Histogram<u64>,
    pub connect_errors: BTreeMap<String, u64>,
    pub disconnects: BTreeMap<String, u64>,
    /// Per measured message: receipts on this worker.
    pub counts: Vec<u32>,
    /// Per measured message: latest receipt on this worker (ns).
    pub last_ns: Vec<u64>,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub misrouted: u64,
    /// Payloads of another run (another loadgen on the same channels).
    pub foreign: u64,
    /// Receipts between the window bounds, whatever their message.
    pub in_window: u64,
    /// Not yet added to [`Live`].
    pub unflushed_received: u64,
    pub unflushed_measured: u64,
    pub unflushed_in_window: u64,
    /// Bytes read from WebSocket subscribers' sockets in the window.
    pub wire_bytes: u64,
    /// Subscribers that agreed permessage-deflate.
    pub compressed_conns: u64,
    /// Compressed messages received in the window.
    pub compressed_frames: u64,
}

impl WorkerStats {
    pub fn new(plan: Plan) -> WorkerStats {
        let n = plan.measured() as usize;
        WorkerStats {
            plan,
            latency: histogram(),
            interval: histogram(),
            connect: histogram(),
            connect_errors: BTreeMap::new(),
            disconnects: BTreeMap::new(),
            counts: vec![0; n],
            last_ns: vec![0; n],
            duplicates: 0,
            out_of_order: 0,
            misrouted: 0,
            foreign: 0,
            in_window: 0,
            unflushed_received: 0,
            unflushed_measured: 0,
            unflushed_in_window: 0,
            wire_bytes: 0,
            compressed_conns: 0,
            compressed_frames: 0,
        }
    }

    /// One payload received at `now_ns` by a subscriber of `channel`.
    #[inline]
    /// `in_window`: `now_ns` is inside the measured window.
    pub fn record(&mut self, seq: &mut Seq, channel: u64, found: Found, now_ns: u64, in_window: bool) {
        let plan = self.plan;
        if found.run != plan.nonce {
            self.foreign += 1;
            return;
        }
        let (g, sent_ns) = (found.seq, found.intended_ns);
        self.unflushed_received += 1;
        if in_window {
            self.in_window += 1;
            self.unflushed_in_window += 1;
        }
        if g < plan.first_measured || g >= plan.total {
            return;
        }
        if g % plan.channels != channel {
            self.misrouted += 1;
            return;
        }
        match seq.observe(g / plan.channels) {
            Seen::Duplicate => {
                self.duplicates += 1;
                return;
            }
            Seen::Late => self.out_of_order += 1,
            Seen::New => {}
        }
        self.unflushed_measured += 1;
        let lat = now_ns.saturating_sub(sent_ns).max(1);
        let _ = self.latency.record(lat);
        let _ = self.interval.record(lat);
        let i = (g - plan.first_measured) as usize;
        self.counts[i] += 1;
        self.last_ns[i] = self.last_ns[i].max(now_ns);
    }

    /// Moves counts and the interval histogram to the shared view.
    pub fn flush(&mut self, live: &Live) {
        live.received.fetch_add(std::mem::take(&mut self.unflushed_received), Ordering::Relaxed);
        live.measured.fetch_add(std::mem::take(&mut self.unflushed_measured), Ordering::Relaxed);
        live.in_window.fetch_add(std::mem::take(&mut self.unflushed_in_window), Ordering::Relaxed);
        if !self.interval.is_empty() {
            let mut h = live.interval.lock().unwrap_or_else(|e| e.into_inner());
            let _ = h.add(&self.interval);
            self.interval.reset();
        }
    }

    /// Adds another worker's observations to this one.
    pub fn merge(&mut self, o: WorkerStats) {
        let _ = self.latency.add(&o.latency);
        let _ = self.connect.add(&o.connect);
        for (k, v) in o.connect_errors {
            *self.connect_errors.entry(k).or_default() += v;
        }
        for (k, v) in o.disconnects {
            *self.disconnects.entry(k).or_default() += v;
        }
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a += b;
        }
        for (a, b) in self.last_ns.iter_mut().zip(o.last_ns) {
            *a = (*a).max(b);
        }
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.misrouted += o.misrouted;
        self.foreign += o.foreign;
        self.in_window += o.in_window;
        self.wire_bytes += o.wire_bytes;
        self.compressed_conns += o.compressed_conns;
        self.compressed_frames += o.compressed_frames;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_tells_new_late_and_duplicate() {
        let mut s = Seq::default();
        assert_eq!(s.observe(0), Seen::New);
        assert_eq!(s.observe(2), Seen::New);
        assert_eq!(s.observe(1), Seen::Late);
        assert_eq!(s.observe(1), Seen::Duplicate);
        assert_eq!(s.observe(2), Seen::Duplicate);
        assert_eq!(s.observe(10_000), Seen::New);
        assert_eq!(s.observe(9_999), Seen::Late);
        assert_eq!(s.observe(3), Seen::Late, "beyond the window: counted late");
        // Bits reused by the window are cleared as it slides.
        assert_eq!(s.observe(10_000 + WINDOW as u64 - 1), Seen::New);
        assert_eq!(s.observe(10_000 + WINDOW as u64 + 2), Seen::New);
    }

    #[test]
    fn records_only_measured_messages_of_the_right_channel() {
        let plan = Plan { total: 10, first_measured: 4, channels: 2, nonce: 9 };
        let mut w = WorkerStats::new(plan);
        let mut seq = Seq::default();
        let f = |seq, intended_ns| Found { run: 9, seq, intended_ns };
        w.record(&mut seq, 0, f(2, 0), 5, false); // warm-up
        w.record(&mut seq, 0, f(4, 100), 300, true);
        w.record(&mut seq, 0, f(5, 100), 300, true); // channel 1's
        w.record(&mut seq, 0, f(4, 100), 400, false); // again
        w.record(&mut seq, 0, Found { run: 8, seq: 6, intended_ns: 1 }, 300, true); // another run's
        assert_eq!((w.counts[0], w.misrouted, w.duplicates, w.unflushed_received), (1, 1, 1, 4));
        assert_eq!((w.foreign, w.in_window), (1, 2));
        assert_eq!((w.counts[0], w.last_ns[0]), (1, 300));
        assert_eq!(w.latency.max(), 200);
    }
}
