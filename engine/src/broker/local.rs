//! The local broker: offsets and epochs live in this process.
//!
//! For each channel it keeps an epoch and the next offset, in a table split
//! into stripes behind their own mutexes. A publish takes its stripe's lock
//! across spending the offset and [`Router::dispatch`], so every shard sees
//! a channel's messages in offset order and a refused publish spends no
//! offset.
//!
//! The table holds at most `max_channels` channels. When it is full, a
//! channel that has no subscriber on this node is forgotten (its next
//! publish starts a new epoch); when every channel has subscribers, a
//! publish to a new channel is refused with `limit`.
//!
//! Each channel also keeps its last messages (its history), sharing the
//! published [`Message`] with the shards. A stripe's histories hold at most
//! 1/64 of `history_max_bytes`; the stripe remembers the order its entries
//! came in, so that when it is full the oldest entry of any of its
//! channels goes first. Entries that went otherwise (the channel's
//! `history_size`, its TTL) stay in that order list until it is compacted,
//! which happens when they make up half of it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{page, recover, Page, Start};
use crate::config::Config;
use crate::message::{Epoch, Message, Position, PublishError, Published};
use crate::proto::json::Payload;
use crate::router::{lock, stripe_of, Routed, Router};

const STRIPES: usize = 64;

/// What a history entry counts against `history_max_bytes` besides three
/// times its payload (the message and two encoded forms): the message, its
/// frames' headers, its slot in the channel's ring and in its stripe's
/// order list (measured: ~560 bytes of RSS for a 64-byte payload with one
/// form).
const ENTRY_OVERHEAD: usize = 448;

fn cost(m: &Message) -> usize {
    m.payload.len() * 3 + ENTRY_OVERHEAD
}

/// Drops a ring's entries older than `ttl`; returns how many, and their cost.
fn expire_ring(h: &mut VecDeque<Arc<Message>>, ttl: Duration, now: Instant) -> (usize, usize) {
    let (mut n, mut bytes) = (0, 0);
    while h.front().is_some_and(|m| now.saturating_duration_since(m.published_at) > ttl) {
        if let Some(m) = h.pop_front() {
            n += 1;
            bytes += cost(&m);
        }
    }
    if n > 0 {
        trim(h);
    }
    (n, bytes)
}

/// Gives back a ring's spare room once it holds far less than it did.
fn trim(h: &mut VecDeque<Arc<Message>>) {
    if h.capacity() > 16 && h.len() < h.capacity() / 4 {
        h.shrink_to(h.len() * 2);
    }
}

/// How much history the broker keeps and replays.
#[derive(Debug, Clone)]
pub(crate) struct HistoryLimits {
    /// Each channel's history size and TTL, by namespace.
    pub rules: Arc<crate::config::ChannelRules>,
    /// Bytes per stripe.
    pub stripe_bytes: usize,
    /// Messages one recovery replays at most.
    pub recovery_max: usize,
    /// How long an idempotency key is remembered; zero: keys are ignored.
    pub idempotency_window: Duration,
    /// Idempotency keys a stripe remembers at most.
    pub stripe_keys: usize,
}

impl HistoryLimits {
    pub(crate) fn from_config(c: &Config) -> HistoryLimits {
        HistoryLimits {
            rules: Arc::new(crate::config::ChannelRules::from_config(c)),
            stripe_bytes: c.history_max_bytes / STRIPES,
            recovery_max: c.recovery_max,
            idempotency_window: Duration::from_secs(c.idempotency_window_s),
            stripe_keys: c.idempotency_max_keys.div_ceil(STRIPES),
        }
    }
}

#[derive(Debug)]
struct Counter {
    name: Arc<str>,
    epoch: Epoch,
    next_offset: u64,
    /// The channel's last messages, oldest first, offsets contiguous.
    history: VecDeque<Arc<Message>>,
    /// Its namespace's history size (0: none) and TTL.
    size: usize,
    ttl: Duration,
}

impl Counter {
    fn top(&self) -> u64 {
        self.next_offset - 1
    }
}

/// Why history entries went.
#[derive(Debug, Clone, Copy)]
enum Evicted {
    Size = 0,
    Ttl = 1,
    Bytes = 2,
}

/// History counters of the whole broker.
#[derive(Debug, Default)]
struct HistoryStats {
    entries: AtomicUsize,
    bytes: AtomicUsize,
    evicted: [AtomicU64; 3],
    /// Publishes answered from an idempotency key.
    repeats: AtomicU64,
    keys: AtomicUsize,
}

impl HistoryStats {
    fn evicted(&self, why: Evicted, n: usize) {
        if n > 0 {
            self.evicted[why as usize].fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default)]
struct Stripe {
    map: HashMap<Arc<str>, Counter>,
    /// Every history entry of this stripe's channels, oldest first, as
    /// (channel, epoch, offset); some may be gone already.
    order: VecDeque<(Arc<str>, Epoch, u64)>,
    bytes: usize,
    entries: usize,
    /// Idempotency keys (`channel\nkey`) and the publish each one made.
    keys: HashMap<Box<str>, (Published, Instant)>,
    /// The keys, oldest first.
    key_order: VecDeque<(Box<str>, Instant)>,
}

impl Stripe {
    /// Forgets the keys older than `window`.
    fn expire_keys(&mut self, now: Instant, window: Duration, stats: &HistoryStats) {
        while self.key_order.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) > window) {
            if let Some((k, _)) = self.key_order.pop_front() {
                self.keys.remove(&k);
                stats.keys.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Remembers `key`'s publish; past `cap` keys the oldest goes.
    fn remember(&mut self, key: Box<str>, p: Published, now: Instant, cap: usize, stats: &HistoryStats) {
        self.key_order.push_back((key.clone(), now));
        self.keys.insert(key, (p, now));
        stats.keys.fetch_add(1, Ordering::Relaxed);
        while self.keys.len() > cap {
            let Some((k, _)) = self.key_order.pop_front() else { break };
            self.keys.remove(&k);
            stats.keys.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes `n` entries worth `bytes` off the stripe's (and the broker's) count.
    fn forget(&mut self, stats: &HistoryStats, n: usize, bytes: usize) {
        self.entries -= n;
        self.bytes -= bytes;
        stats.entries.fetch_sub(n, Ordering::Relaxed);
        stats.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Drops the channel's entries older than the TTL.
    fn expire(&mut self, name: &str, stats: &HistoryStats, now: Instant) {
        let Some(c) = self.map.get_mut(name) else { return };
        let (n, bytes) = expire_ring(&mut c.history, c.ttl, now);
        stats.evicted(Evicted::Ttl, n);
        self.forget(stats, n, bytes);
    }

    /// Adds `msg` to its channel's history and enforces every bound.
    fn push(&mut self, msg: Arc<Message>, limits: &HistoryLimits, stats: &HistoryStats, now: Instant) {
        let Some(c) = self.map.get_mut(&*msg.channel) else { return };
        let key = (Arc::clone(&c.name), c.epoch, msg.offset);
        let added = cost(&msg);
        c.history.push_back(msg);
        let (mut n, mut bytes) = (0, 0);
        while c.history.len() > c.size {
            if let Some(m) = c.history.pop_front() {
                n += 1;
                bytes += cost(&m);
            }
        }
        let (expired, expired_bytes) = expire_ring(&mut c.history, c.ttl, now);
        self.order.push_back(key);
        self.entries += 1;
        self.bytes += added;
        stats.entries.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(added, Ordering::Relaxed);
        stats.evicted(Evicted::Size, n);
        stats.evicted(Evicted::Ttl, expired);
        self.forget(stats, n + expired, bytes + expired_bytes);
        while self.bytes > limits.stripe_bytes && self.pop_oldest(stats) {}
        if self.order.len() > 2 * self.entries + 64 {
            let Stripe { map, order, .. } = self;
            order.retain(|(name, epoch, offset)| {
                map.get(name).is_some_and(|c| c.epoch == *epoch && c.history.front().is_some_and(|m| m.offset <= *offset))
            });
        }
    }

    /// Drops the stripe's oldest history entry; false when it has none.
    fn pop_oldest(&mut self, stats: &HistoryStats) -> bool {
        while let Some((name, epoch, offset)) = self.order.pop_front() {
            let Some(c) = self.map.get_mut(&name) else { continue };
            if c.epoch != epoch || c.history.front().is_none_or(|m| m.offset != offset) {
                continue; // gone already
            }
            if let Some(m) = c.history.pop_front() {
                let bytes = cost(&m);
                trim(&mut c.history);
                stats.evicted(Evicted::Bytes, 1);
                self.forget(stats, 1, bytes);
                return true;
            }
        }
        false
    }

    /// Forgets a whole channel, history included.
    fn remove(&mut self, name: &str, stats: &HistoryStats) -> bool {
        let Some(c) = self.map.remove(name) else { return false };
        let bytes = c.history.iter().map(|m| cost(m)).sum();
        self.forget(stats, c.history.len(), bytes);
        true
    }
}

#[derive(Debug)]
pub(crate) struct LocalBroker {
    stripes: Box<[Mutex<Stripe>]>,
    len: AtomicUsize,
    max: usize,
    limits: HistoryLimits,
    stats: HistoryStats,
}

impl LocalBroker {
    pub(crate) fn new(max_channels: usize, limits: HistoryLimits) -> LocalBroker {
        LocalBroker {
            stripes: (0..STRIPES).map(|_| Mutex::new(Stripe::default())).collect(),
            len: AtomicUsize::new(0),
            max: max_channels,
            limits,
            stats: HistoryStats::default(),
        }
    }

    /// Makes sure the stripe has a counter for `name` (with a new epoch);
    /// false when the table is full of channels with subscribers, or full
    /// at all when `evict` is false (a read must not push out another
    /// channel's history).
    fn ensure(&self, router: &Router, st: &mut Stripe, stripe: usize, name: &str, evict: bool) -> bool {
        if !st.map.contains_key(name) {
            let full = self.len.load(Ordering::Relaxed) >= self.max;
            if full && (!evict || !self.evict_idle(router, st, stripe)) {
                return false;
            }
            self.len.fetch_add(1, Ordering::Relaxed);
            let name: Arc<str> = name.into();
            let rules = self.limits.rules.of(&name);
            let (size, ttl) = (rules.history_size, Duration::from_secs(rules.history_ttl_s));
            st.map.insert(Arc::clone(&name), Counter { name, epoch: Epoch::random(), next_offset: 1, history: VecDeque::new(), size, ttl });
        }
        true
    }

    /// Forgets one channel without subscribers, from the locked stripe or
    /// another one that is free right now.
    fn evict_idle(&self, router: &Router, locked: &mut Stripe, stripe: usize) -> bool {
        let remove_idle = |st: &mut Stripe| {
            let idle = st.map.keys().find(|k| !router.has_interest(k)).cloned();
            let removed = idle.is_some_and(|k| st.remove(&k, &self.stats));
            if removed {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            removed
        };
        if remove_idle(locked) {
            return true;
        }
        self.stripes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != stripe)
            .any(|(_, other)| other.try_lock().is_ok_and(|mut st| remove_idle(&mut st)))
    }

    /// Spends the next offset of `channel`, queues the message on every
    /// shard with subscribers and keeps it in the channel's history.
    #[cfg(test)]
    pub(crate) fn publish(&self, router: &Router, channel: &str, payload: Payload) -> Result<Published, PublishError> {
        self.publish_once(router, channel, payload, None, Instant::now())
    }

    /// [`LocalBroker::publish`], unless `key` was used on this channel in
    /// the last `idempotency_window`: then nothing is published and the
    /// first publish's result comes back.
    pub(crate) fn publish_once(
        &self,
        router: &Router,
        channel: &str,
        payload: Payload,
        key: Option<&str>,
        now: Instant,
    ) -> Result<Published, PublishError> {
        let stripe = stripe_of(channel, STRIPES);
        let mut st = lock(&self.stripes[stripe]);
        let window = self.limits.idempotency_window;
        let key = key.filter(|_| !window.is_zero()).map(|k| format!("{channel}\n{k}").into_boxed_str());
        if let Some(k) = &key {
            st.expire_keys(now, window, &self.stats);
            if let Some((p, _)) = st.keys.get(k) {
                self.stats.repeats.fetch_add(1, Ordering::Relaxed);
                return Ok(p.clone());
            }
        }
        let published = self.publish_locked(router, &mut st, stripe, channel, payload)?;
        if let Some(k) = key {
            st.remember(k, published.clone(), now, self.limits.stripe_keys, &self.stats);
        }
        Ok(published)
    }

    fn publish_locked(
        &self,
        router: &Router,
        st: &mut Stripe,
        stripe: usize,
        channel: &str,
        payload: Payload,
    ) -> Result<Published, PublishError> {
        if !self.ensure(router, st, stripe, channel, true) {
            return Err(PublishError::ChannelLimit);
        }
        let Some(c) = st.map.get_mut(channel) else { return Err(PublishError::ChannelLimit) };
        let offset = c.next_offset;
        let msg = Arc::new(Message::new(Arc::clone(&c.name), c.epoch, offset, payload));
        if router.dispatch(channel, || Arc::clone(&msg)) == Routed::Full {
            return Err(PublishError::Overloaded);
        }
        c.next_offset += 1;
        let published = Published { channel: Arc::clone(&c.name), offset, epoch: c.epoch };
        if c.size > 0 {
            let now = msg.published_at;
            st.push(msg, &self.limits, &self.stats, now);
        }
        Ok(published)
    }

    /// The channel's epoch (a new channel gets one now).
    #[cfg(test)]
    pub(crate) fn epoch(&self, router: &Router, channel: &str) -> Option<Epoch> {
        self.with_counter(router, channel, Instant::now(), true, |c| c.epoch)
    }

    /// Runs `f` on the channel's counter (created if needed), its expired
    /// history dropped first, under its stripe's lock.
    fn with_counter<T>(&self, router: &Router, channel: &str, now: Instant, evict: bool, f: impl FnOnce(&Counter) -> T) -> Option<T> {
        let stripe = stripe_of(channel, STRIPES);
        let mut st = lock(&self.stripes[stripe]);
        if !self.ensure(router, &mut st, stripe, channel, evict) {
            return None;
        }
        st.expire(channel, &self.stats, now);
        st.map.get(channel).map(f)
    }

    /// Where a subscription that the router already counts starts: the
    /// channel's epoch and top, and, given a position, what it missed since
    /// then. Read under the lock that publishes take, so every later
    /// message has a higher offset and reaches the subscriber live.
    pub(crate) fn start(&self, router: &Router, channel: &str, since: Option<Position>, now: Instant) -> Option<Start> {
        let limits = &self.limits;
        self.with_counter(router, channel, now, true, |c| Start {
            epoch: c.epoch,
            top: c.top(),
            recovery: since.map(|p| recover(c.epoch, c.top(), &c.history, p, c.size, limits.recovery_max)),
        })
    }

    /// A page of the channel's history: after `since`, or the latest. A
    /// channel not known yet gets a counter only if the table has room:
    /// a read never pushes another channel (and its history) out.
    pub(crate) fn history(&self, router: &Router, channel: &str, since: Option<Position>, limit: usize, now: Instant) -> Option<Page> {
        self.with_counter(router, channel, now, false, |c| page(c.epoch, c.top(), &c.history, since, limit))
    }

    /// Channels whose counters are remembered.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The history lines of the Prometheus exposition.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let s = &self.stats;
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let one = |out: &mut String, name: &str, kind: &str, help: &str, value: u64| {
            head(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        };
        let load = |a: &AtomicUsize| a.load(Ordering::Relaxed) as u64;
        one(out, "herald_history_entries", "gauge", "Messages held in channel histories.", load(&s.entries));
        one(out, "herald_history_bytes", "gauge", "Bytes channel histories count against history_max_bytes.", load(&s.bytes));
        let repeats = s.repeats.load(Ordering::Relaxed);
        one(out, "herald_idempotent_repeats_total", "counter", "Publishes answered from an idempotency key, publishing nothing.", repeats);
        one(out, "herald_idempotency_keys", "gauge", "Idempotency keys remembered.", load(&s.keys));
        head(out, "herald_history_evicted_total", "counter", "History entries dropped, by reason.");
        for (i, reason) in ["size", "ttl", "bytes"].iter().enumerate() {
            let _ = writeln!(out, "herald_history_evicted_total{{reason=\"{reason}\"}} {}", s.evicted[i].load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{Miss, Recovery};

    fn limits(size: usize, stripe_bytes: usize, recovery_max: usize) -> HistoryLimits {
        let mut c = Config::default();
        c.history_size(size).history_ttl_s(300);
        HistoryLimits {
            rules: Arc::new(crate::config::ChannelRules::from_config(&c)),
            stripe_bytes,
            recovery_max,
            idempotency_window: Duration::from_secs(300),
            stripe_keys: 2,
        }
    }

    #[test]
    fn a_repeated_key_publishes_nothing_and_answers_as_the_first_time() {
        let r = Router::new(1, 64, 100);
        let b = LocalBroker::new(100, limits(10, 1 << 20, 100));
        let now = Instant::now();
        let first = b.publish_once(&r, "n", Payload::text("a"), Some("k1"), now).unwrap();
        assert_eq!(b.publish_once(&r, "n", Payload::text("a"), Some("k1"), now).unwrap(), first);
        assert_eq!(b.publish_once(&r, "other", Payload::text("a"), Some("k1"), now).unwrap().offset, 1, "keys are per channel");
        assert_eq!(b.publish_once(&r, "n", Payload::text("b"), None, now).unwrap().offset, 2);
        assert_eq!(b.stats.repeats.load(Ordering::Relaxed), 1);
        let later = now + Duration::from_secs(301);
        assert_eq!(b.publish_once(&r, "n", Payload::text("a"), Some("k1"), later).unwrap().offset, 3, "past the window it publishes");
        // At most 2 keys per stripe here: the oldest goes.
        let st = stripe_of("n", STRIPES);
        let same: Vec<String> = (0..).map(|i| format!("c{i}")).filter(|c| stripe_of(c, STRIPES) == st).take(3).collect();
        for c in &same {
            b.publish_once(&r, c, Payload::text("x"), Some("k"), later).unwrap();
        }
        assert!(lock(&b.stripes[st]).keys.len() <= 2);
        assert_eq!(b.publish_once(&r, &same[2], Payload::text("x"), Some("k"), later).unwrap().offset, 1, "the newest key is kept");
        assert_eq!(b.publish_once(&r, &same[0], Payload::text("x"), Some("k"), later).unwrap().offset, 2, "the oldest was forgotten");
    }

    fn off() -> HistoryLimits {
        limits(0, 0, 1)
    }

    fn offsets(msgs: &[Arc<Message>]) -> Vec<u64> {
        msgs.iter().map(|m| m.offset).collect()
    }

    fn recovered(b: &LocalBroker, r: &Router, ch: &str, since: Position) -> Result<Vec<u64>, Miss> {
        match b.start(r, ch, Some(since), Instant::now()).unwrap().recovery.unwrap() {
            Recovery::Recovered(m) => Ok(offsets(&m)),
            Recovery::Missed(why) => Err(why),
        }
    }

    #[test]
    fn history_keeps_the_last_messages_and_recovers_all_or_nothing() {
        let r = Router::new(1, 64, 100);
        let b = LocalBroker::new(100, limits(3, 1 << 20, 2));
        let epoch = b.epoch(&r, "n").unwrap();
        for _ in 0..5 {
            b.publish(&r, "n", Payload::text("x")).unwrap();
        }
        let start = b.start(&r, "n", None, Instant::now()).unwrap();
        assert_eq!((start.epoch, start.top, start.recovery.is_none()), (epoch, 5, true));
        let at = |offset| Position { epoch, offset };
        assert_eq!(recovered(&b, &r, "n", at(3)), Ok(vec![4, 5]));
        assert_eq!(recovered(&b, &r, "n", at(5)), Ok(vec![]), "at the top: nothing to replay");
        assert_eq!(recovered(&b, &r, "n", at(2)), Err(Miss::TooMany), "3 missed, recovery_max 2");
        let b2 = LocalBroker::new(100, limits(3, 1 << 20, 10));
        let e2 = b2.epoch(&r, "n").unwrap();
        for _ in 0..5 {
            b2.publish(&r, "n", Payload::text("x")).unwrap();
        }
        assert_eq!(recovered(&b2, &r, "n", Position { epoch: e2, offset: 2 }), Ok(vec![3, 4, 5]));
        assert_eq!(recovered(&b2, &r, "n", Position { epoch: e2, offset: 1 }), Err(Miss::TooOld), "2 is gone");
        assert_eq!(recovered(&b2, &r, "n", Position { epoch: e2, offset: 6 }), Err(Miss::Epoch), "ahead of the top");
        assert_eq!(recovered(&b2, &r, "n", Position { epoch: Epoch::random(), offset: 4 }), Err(Miss::Epoch));
        assert_eq!(b2.stats.evicted[Evicted::Size as usize].load(Ordering::Relaxed), 2);
        assert_eq!(b2.stats.entries.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn history_pages() {
        let r = Router::new(1, 64, 100);
        let b = LocalBroker::new(100, limits(10, 1 << 20, 100));
        let epoch = b.epoch(&r, "n").unwrap();
        let empty = b.history(&r, "n", None, 5, Instant::now()).unwrap();
        assert_eq!((empty.top, empty.messages.len(), empty.complete), (0, 0, true));
        for _ in 0..4 {
            b.publish(&r, "n", Payload::text("x")).unwrap();
        }
        let now = Instant::now();
        let latest = b.history(&r, "n", None, 2, now).unwrap();
        assert_eq!((offsets(&latest.messages), latest.top, latest.complete), (vec![3, 4], 4, false));
        let all = b.history(&r, "n", None, 10, now).unwrap();
        assert_eq!((offsets(&all.messages), all.complete), (vec![1, 2, 3, 4], true));
        let after = b.history(&r, "n", Some(Position { epoch, offset: 1 }), 2, now).unwrap();
        assert_eq!((offsets(&after.messages), after.complete), (vec![2, 3], false), "more than the limit follow");
        let rest = b.history(&r, "n", Some(Position { epoch, offset: 2 }), 2, now).unwrap();
        assert_eq!((offsets(&rest.messages), rest.complete), (vec![3, 4], true));
        let other = b.history(&r, "n", Some(Position { epoch: Epoch::random(), offset: 2 }), 2, now).unwrap();
        assert_eq!((other.messages.len(), other.complete), (0, false));
    }

    #[test]
    fn history_older_than_its_ttl_is_not_served() {
        let r = Router::new(1, 64, 100);
        let b = LocalBroker::new(100, limits(10, 1 << 20, 100));
        let epoch = b.epoch(&r, "n").unwrap();
        b.publish(&r, "n", Payload::text("x")).unwrap();
        b.publish(&r, "n", Payload::text("x")).unwrap();
        let later = Instant::now() + Duration::from_secs(301);
        let start = b.start(&r, "n", Some(Position { epoch, offset: 0 }), later).unwrap();
        assert!(matches!(start.recovery, Some(Recovery::Missed(Miss::TooOld))));
        assert_eq!(b.stats.evicted[Evicted::Ttl as usize].load(Ordering::Relaxed), 2);
        assert_eq!((b.stats.entries.load(Ordering::Relaxed), b.stats.bytes.load(Ordering::Relaxed)), (0, 0));
    }

    #[test]
    fn a_full_stripe_drops_its_oldest_entries_first() {
        // Two channels of the same stripe.
        let a = "a0".to_string();
        let b_name = (1..).map(|i| format!("b{i}")).find(|n| stripe_of(n, STRIPES) == stripe_of(&a, STRIPES)).unwrap();
        let r = Router::new(1, 64, 100);
        let entry = 3 + ENTRY_OVERHEAD; // a one-byte payload
        let b = LocalBroker::new(100, limits(100, 3 * entry, 100));
        b.publish(&r, &a, Payload::text("1")).unwrap();
        b.publish(&r, &b_name, Payload::text("1")).unwrap();
        b.publish(&r, &a, Payload::text("2")).unwrap();
        b.publish(&r, &b_name, Payload::text("2")).unwrap();
        let now = Instant::now();
        assert_eq!(offsets(&b.history(&r, &a, None, 10, now).unwrap().messages), vec![2], "a's first entry was the oldest");
        assert_eq!(offsets(&b.history(&r, &b_name, None, 10, now).unwrap().messages), vec![1, 2]);
        assert_eq!(b.stats.evicted[Evicted::Bytes as usize].load(Ordering::Relaxed), 1);
        assert_eq!(b.stats.bytes.load(Ordering::Relaxed), 3 * entry);
    }

    #[test]
    fn the_order_list_stays_bounded() {
        let r = Router::new(1, 64, 100);
        let b = LocalBroker::new(100, limits(3, 1 << 20, 100));
        for _ in 0..10_000 {
            b.publish(&r, "n", Payload::text("x")).unwrap();
        }
        let st = lock(&b.stripes[stripe_of("n", STRIPES)]);
        assert_eq!(st.entries, 3);
        assert!(st.order.len() <= 2 * st.entries + 64, "{} order entries for 3 live ones", st.order.len());
    }

    #[test]
    fn reading_history_never_pushes_out_another_channel() {
        let r = Router::new(1, 64, 100);
        let b = LocalBroker::new(1, limits(10, 1 << 20, 100));
        b.publish(&r, "a", Payload::text("x")).unwrap();
        assert!(b.history(&r, "unknown", None, 10, Instant::now()).is_none(), "the table is full: no room to read an unknown channel");
        assert_eq!(b.history(&r, "a", None, 10, Instant::now()).unwrap().messages.len(), 1, "a keeps its history");
    }

    #[test]
    fn a_forgotten_channel_takes_its_history_with_it() {
        let r = Router::new(1, 64, 100);
        let b = LocalBroker::new(1, limits(10, 1 << 20, 100));
        b.publish(&r, "a", Payload::text("x")).unwrap();
        b.publish(&r, "b", Payload::text("x")).unwrap();
        assert_eq!(b.stats.entries.load(Ordering::Relaxed), 1, "a was forgotten, with its entry");
    }

    #[test]
    fn offsets_are_contiguous_and_outlive_subscribers() {
        let r = Router::new(2, 16, 100);
        let b = LocalBroker::new(100, off());
        r.subscribe("news", 1).unwrap();
        let epoch = b.epoch(&r, "news").unwrap();
        for want in 1..=3 {
            let p = b.publish(&r, "news", Payload::text("x")).unwrap();
            assert_eq!((p.offset, p.epoch), (want, epoch));
        }
        let offsets: Vec<u64> = std::iter::from_fn(|| r.inbox(1).pop()).map(|m| m.offset).collect();
        assert_eq!(offsets, vec![1, 2, 3]);
        r.unsubscribe("news", 1);
        assert_eq!(b.publish(&r, "news", Payload::text("x")).unwrap().offset, 4, "the counter outlives subscribers");
        assert!(r.inbox(1).pop().is_none());
    }

    #[test]
    fn a_full_table_forgets_idle_channels_then_refuses() {
        let r = Router::new(1, 16, 100);
        let b = LocalBroker::new(2, off());
        r.subscribe("a", 0).unwrap();
        b.epoch(&r, "a").unwrap();
        let b1 = b.publish(&r, "b", Payload::text("x")).unwrap();
        // "c" evicts the idle "b"; "b" then comes back with a new epoch.
        b.publish(&r, "c", Payload::text("x")).unwrap();
        assert_eq!(b.len(), 2);
        r.subscribe("c", 0).unwrap();
        assert_eq!(b.publish(&r, "b", Payload::text("x")), Err(PublishError::ChannelLimit));
        r.unsubscribe("c", 0);
        let b2 = b.publish(&r, "b", Payload::text("x")).unwrap();
        assert_eq!(b2.offset, 1);
        assert_ne!(b2.epoch, b1.epoch);
    }

    #[test]
    fn a_full_shard_queue_spends_no_offset() {
        let r = Router::new(1, 1, 10);
        let b = LocalBroker::new(10, off());
        r.subscribe("a", 0).unwrap();
        assert_eq!(b.publish(&r, "a", Payload::text("1")).unwrap().offset, 1);
        assert_eq!(b.publish(&r, "a", Payload::text("2")), Err(PublishError::Overloaded));
        r.inbox(0).pop();
        assert_eq!(b.publish(&r, "a", Payload::text("3")).unwrap().offset, 2);
    }
}
