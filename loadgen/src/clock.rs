//! One process-wide monotonic epoch: every send and receive time is
//! nanoseconds since it, so times from different threads compare.

use std::sync::OnceLock;
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Fixes the epoch; call once at start-up, before any other thread runs.
pub fn init() {
    EPOCH.get_or_init(Instant::now);
}

/// Nanoseconds since the process epoch.
#[inline]
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
