//! The Redis broker's view of each channel this node subscribes to: the
//! generation of its Redis subscription, whether Redis confirmed it (with
//! the channel's epoch), and the position expected next.
//!
//! Messages reach the shards in offset order, each once:
//!
//! - one already delivered (read from the stream first) is dropped;
//! - a jump in offsets, or a new epoch, is a gap: the node reads the
//!   missing range from the channel's stream ([`Fill`], run by the
//!   subscriber connection) and delivers it before later messages, which
//!   wait meanwhile (at most [`HELD_MAX`] per channel; past it they are
//!   dropped and read back from the stream too). A new epoch is announced
//!   to the subscribers first, and filled from offset 1. What the stream no
//!   longer holds is delivered as a `lagged` notice and counted.
//!
//! An entry lives from the coordinator's subscribe to its release. Lock
//! order: this table's lock, then the router's (never the reverse), so a
//! release decided here cannot race a shard's first subscriber: either the
//! router shows that subscriber and nothing is released, or the
//! subscriber's confirmation check comes after the release and waits for
//! the next subscription.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::message::{Epoch, Kind, Message};
use crate::proto::json::Payload;
use crate::router::{lock, stripe_of, Routed, Router};

const STRIPES: usize = 16;
/// Messages of one channel waiting for a fill, at most, and their bytes.
pub(crate) const HELD_MAX: usize = 16_384;
pub(crate) const HELD_MAX_BYTES: usize = 8 << 20;
/// Bytes of messages waiting for fills on this node, at most. Past either
/// bound a message is not kept: the fill reads it back from the stream.
pub(crate) const HELD_BUDGET_BYTES: usize = 256 << 20;

/// A message from Redis, not yet delivered.
#[derive(Debug, Clone)]
pub(crate) struct Incoming {
    pub epoch: Epoch,
    pub offset: u64,
    pub payload: Payload,
}

#[derive(Debug)]
struct Sub {
    /// The channel's shared name.
    name: Arc<str>,
    /// Bumped at each subscribe and release; confirmations and losses of
    /// an older generation are ignored.
    gen: u64,
    /// Redis confirmed the current generation; the channel's epoch.
    confirmed: Option<Epoch>,
    /// The epoch and offset expected next, once known.
    expect: Option<(Epoch, u64)>,
    /// A fill is running: what came from Redis meanwhile, in order, and
    /// its bytes.
    held: Option<VecDeque<Incoming>>,
    held_bytes: usize,
    /// Identifies the running fill: a fill of an older entry or an
    /// earlier fill does not touch this one.
    fill_id: u64,
    /// The position expected when Redis acknowledged the subscription,
    /// in order with the messages (see [`Channels::at_top`]).
    at_ack: Option<Option<(Epoch, u64)>>,
    /// Where the running fill must read up to once `held` is empty: the
    /// last message dropped because `held` was full, or the top read after
    /// a reconnect.
    dropped: Option<(Epoch, u64)>,
}

/// A range of a channel to read from its stream and deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fill {
    pub channel: Arc<str>,
    /// The fill's id in its channel's entry.
    pub id: u64,
    pub epoch: Epoch,
    pub from: u64,
    pub to: u64,
    /// The epoch is new: announce it first.
    pub announce: bool,
}

/// What became of a message from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// Queued on every interested shard.
    Queued,
    /// Delivered before (read from the stream): dropped.
    Duplicate,
    /// Waiting for a running fill.
    Held,
    /// A gap before it: the fill to run; the message waits for it.
    Gap(Fill),
    /// No shard has subscribers (any more).
    NoInterest,
    /// A shard's queue is full: nothing was queued; retry.
    Full,
}

/// The next step of a running fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Fill this range next.
    Fill(Fill),
    /// A shard's queue is full: wait, then drain again.
    Full,
    /// Done: the channel is back to live delivery.
    Done,
}

type Stripe = Mutex<HashMap<Arc<str>, Sub>>;

#[derive(Debug)]
pub(crate) struct Channels {
    stripes: Box<[Stripe]>,
    /// Bytes held behind fills, all channels together.
    held_bytes: std::sync::atomic::AtomicUsize,
    /// The last fill id given (ids are unique across entries).
    fills: std::sync::atomic::AtomicU64,
}

/// What a held message counts against the held bounds.
fn held_len(m: &Incoming) -> usize {
    m.payload.len() + 64
}

impl Sub {
    /// Makes the running fill read up to `(epoch, offset)` when what waits
    /// behind it is delivered.
    fn read_back_to(&mut self, epoch: Epoch, offset: u64) {
        if self.dropped.is_none_or(|(e, o)| e != epoch || o < offset) {
            self.dropped = Some((epoch, offset));
        }
    }

    /// Takes the first held message off, with its bytes; returns them.
    fn unhold_front(&mut self) -> usize {
        let len = self.held.as_mut().and_then(VecDeque::pop_front).map_or(0, |m| held_len(&m));
        self.held_bytes -= len;
        len
    }

    /// Starts fill `id`: later messages wait behind it.
    fn next_fill(&mut self, id: u64) -> u64 {
        self.fill_id = id;
        if self.held.is_none() {
            self.held = Some(VecDeque::new());
        }
        self.fill_id
    }
}

/// Where a message stands against the position expected next.
fn classify(expect: Option<(Epoch, u64)>, epoch: Epoch, offset: u64) -> Option<Result<(), (u64, bool)>> {
    match expect {
        None => Some(Ok(())),
        Some((e, want)) if e == epoch && offset == want => Some(Ok(())),
        Some((e, want)) if e == epoch && offset < want => None,
        // Fill `want..offset`, or a new epoch from 1.
        Some((e, want)) if e == epoch => Some(Err((want, false))),
        Some(_) => Some(Err((1, true))),
    }
}

impl Channels {
    pub(crate) fn new() -> Channels {
        Channels {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            held_bytes: Default::default(),
            fills: Default::default(),
        }
    }

    fn stripe(&self, channel: &str) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Sub>> {
        lock(&self.stripes[stripe_of(channel, STRIPES)])
    }

    /// The coordinator subscribes the node to `channel`: a new generation,
    /// not confirmed yet. A new entry expects nothing yet (what was
    /// published before is no gap); an existing one (the subscription moved
    /// or was lost while subscribers stayed) keeps its position, so what
    /// was published meanwhile is filled.
    pub(crate) fn subscribe(&self, channel: &Arc<str>) -> u64 {
        let mut map = self.stripe(channel);
        let sub = map.entry(Arc::clone(channel)).or_insert_with(|| Sub {
            name: Arc::clone(channel),
            gen: 0,
            confirmed: None,
            expect: None,
            held: None,
            held_bytes: 0,
            fill_id: 0,
            at_ack: None,
            dropped: None,
        });
        sub.gen += 1;
        sub.confirmed = None;
        sub.at_ack = None;
        sub.gen
    }

    /// Redis acknowledged subscription `gen`: from here on every message
    /// reaches this node. Notes the position expected now, in order with
    /// the messages, for [`Channels::at_top`].
    pub(crate) fn acked(&self, channel: &str, gen: u64) {
        if let Some(sub) = self.stripe(channel).get_mut(channel).filter(|s| s.gen == gen) {
            sub.at_ack = Some(sub.expect);
        }
    }

    /// The coordinator may unsubscribe the node from `channel` only if no
    /// shard has subscribers now (decided under this table's lock).
    pub(crate) fn release(&self, router: &Router, channel: &str) -> bool {
        let mut map = self.stripe(channel);
        if router.has_interest(channel) {
            return false;
        }
        if let Some(sub) = map.remove(channel) {
            self.release_held(sub.held_bytes);
        }
        true
    }

    /// Redis confirmed subscription `gen` with the channel's epoch
    /// (`Some`), or lost it (`None`); ignored for another generation.
    pub(crate) fn confirm(&self, channel: &str, gen: u64, epoch: Option<Epoch>) {
        if let Some(sub) = self.stripe(channel).get_mut(channel).filter(|s| s.gen == gen) {
            sub.confirmed = epoch;
        }
    }

    /// The channel's epoch once Redis confirmed the node's subscription.
    pub(crate) fn confirmed(&self, channel: &str) -> Option<Epoch> {
        self.stripe(channel).get(channel).and_then(|s| s.confirmed)
    }

    /// Subscription `gen` is in place and the channel is at `(epoch,
    /// top)`, read after Redis acknowledged it: what was published while
    /// the node was not subscribed (a lost connection, a moved slot) is a
    /// fill. Returns it, and whether the offsets went back in the same
    /// epoch (Redis restored an older snapshot: counted as a gap, nothing
    /// to fill). Messages delivered live since the acknowledgement (they
    /// may be newer than `top`) are never delivered again.
    pub(crate) fn at_top(&self, channel: &str, gen: u64, epoch: Epoch, top: u64) -> (Option<Fill>, bool) {
        let mut map = self.stripe(channel);
        let Some(sub) = map.get_mut(channel) else { return (None, false) };
        if sub.gen != gen {
            return (None, false);
        }
        if sub.held.is_some() {
            // A fill is running: it reads up to the top when it is done.
            sub.read_back_to(epoch, top);
            return (None, false);
        }
        let unchanged = sub.at_ack.is_some_and(|at| at == sub.expect);
        let (from, announce) = match sub.expect {
            None => {
                sub.expect = Some((epoch, top + 1));
                return (None, false);
            }
            Some((e, want)) if e == epoch && top >= want => (want, false),
            Some((e, want)) if e == epoch => {
                // Nothing came since the acknowledgement, yet the top is
                // below what was delivered: Redis went back.
                let back = unchanged && top + 1 < want;
                if back {
                    sub.expect = Some((epoch, top + 1));
                }
                return (None, back);
            }
            // Live messages of the new epoch would have started a fill.
            Some(_) => (1, true),
        };
        let fill = Fill {
            channel: Arc::clone(&sub.name),
            id: sub.next_fill(self.fills.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1),
            epoch,
            from,
            to: top,
            announce,
        };
        (Some(fill), false)
    }

    fn release_held(&self, bytes: usize) {
        self.held_bytes.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queues a message that came from Redis on every interested shard,
    /// in order: or drops it as delivered already, or holds it behind a
    /// fill.
    pub(crate) fn deliver(&self, router: &Router, channel: &str, m: &Incoming) -> Delivered {
        let mut map = self.stripe(channel);
        let Some(sub) = map.get_mut(channel) else { return Delivered::NoInterest };
        if sub.held.is_some() {
            let len = held_len(m);
            let full = sub.held.as_ref().is_some_and(|h| h.len() >= HELD_MAX) || sub.held_bytes + len > HELD_MAX_BYTES;
            let budget = self.held_bytes.fetch_add(len, std::sync::atomic::Ordering::Relaxed) + len <= HELD_BUDGET_BYTES;
            if full || !budget {
                // Read back from the stream when the fill is done.
                self.release_held(len);
                sub.read_back_to(m.epoch, m.offset);
            } else if let Some(held) = &mut sub.held {
                sub.held_bytes += len;
                held.push_back(m.clone());
            }
            return Delivered::Held;
        }
        match classify(sub.expect, m.epoch, m.offset) {
            None => Delivered::Duplicate,
            Some(Err((from, announce))) => {
                let fill = Fill {
                    channel: Arc::clone(&sub.name),
                    id: sub.next_fill(self.fills.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1),
                    epoch: m.epoch,
                    from,
                    to: m.offset - 1,
                    announce,
                };
                let len = held_len(m);
                self.held_bytes.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                sub.held_bytes = len;
                sub.held = Some(VecDeque::from([m.clone()]));
                Delivered::Gap(fill)
            }
            Some(Ok(())) => {
                let name = Arc::clone(&sub.name);
                match router.dispatch(channel, || Arc::new(Message::new(name, m.epoch, m.offset, m.payload.clone()))) {
                    Routed::NoInterest => Delivered::NoInterest,
                    Routed::Full => Delivered::Full,
                    Routed::Queued => {
                        sub.expect = Some((m.epoch, m.offset + 1));
                        Delivered::Queued
                    }
                }
            }
        }
    }

    /// Queues one message of a fill (a notice, a message read from the
    /// stream) on every interested shard. `None` once the channel has no
    /// subscribers here (the fill stops).
    pub(crate) fn deliver_filled(&self, router: &Router, fill: &Fill, msg: &Arc<Message>) -> Option<Routed> {
        let map = self.stripe(&msg.channel);
        map.get(&*msg.channel).filter(|s| s.fill_id == fill.id && s.held.is_some())?;
        match router.dispatch(&msg.channel, || Arc::clone(msg)) {
            Routed::NoInterest => None,
            r => Some(r),
        }
    }

    /// A fill delivered everything up to `fill.to`: delivers what waited
    /// meanwhile, until it finds another gap (the next fill) or is done.
    pub(crate) fn drain(&self, router: &Router, fill: &Fill) -> Step {
        let mut map = self.stripe(&fill.channel);
        let Some(sub) = map.get_mut(&*fill.channel).filter(|s| s.fill_id == fill.id && s.held.is_some()) else { return Step::Done };
        let name = Arc::clone(&sub.name);
        if sub.expect.is_none_or(|(e, want)| e != fill.epoch || want <= fill.to) {
            sub.expect = Some((fill.epoch, fill.to + 1));
        }
        loop {
            let Some(held) = &mut sub.held else { return Step::Done };
            let Some(m) = held.front() else {
                // Dropped while held: read back from the stream.
                if let Some((epoch, offset)) = sub.dropped.take() {
                    if let Some(Err((from, announce))) = classify(sub.expect, epoch, offset + 1) {
                        return Step::Fill(Fill { channel: name, id: fill.id, epoch, from, to: offset, announce });
                    }
                }
                self.end_fill(sub);
                return Step::Done;
            };
            match classify(sub.expect, m.epoch, m.offset) {
                None => {
                    let len = sub.unhold_front();
                    self.release_held(len);
                }
                Some(Err((from, announce))) => {
                    return Step::Fill(Fill { channel: name, id: fill.id, epoch: m.epoch, from, to: m.offset - 1, announce });
                }
                Some(Ok(())) => {
                    let (epoch, offset, payload) = (m.epoch, m.offset, m.payload.clone());
                    match router.dispatch(&name, || Arc::new(Message::new(Arc::clone(&name), epoch, offset, payload))) {
                        Routed::NoInterest => {
                            self.end_fill(sub);
                            return Step::Done;
                        }
                        Routed::Full => return Step::Full,
                        Routed::Queued => {
                            let len = sub.unhold_front();
                            self.release_held(len);
                            sub.expect = Some((epoch, offset + 1));
                        }
                    }
                }
            }
        }
    }

    /// Gives up a fill (the channel has no subscribers here any more).
    pub(crate) fn abandon(&self, fill: &Fill) {
        if let Some(sub) = self.stripe(&fill.channel).get_mut(&*fill.channel).filter(|s| s.fill_id == fill.id) {
            sub.dropped = None;
            self.end_fill(sub);
        }
    }

    /// Back to live delivery: nothing held any more.
    fn end_fill(&self, sub: &mut Sub) {
        sub.held = None;
        self.release_held(std::mem::take(&mut sub.held_bytes));
    }
}

/// The messages a fill delivers, in order: the epoch notice if the epoch
/// is new, then every offset of `from..=to`, read from the stream, or a
/// `lagged` notice for each run the stream no longer holds. Returns them
/// with the number of offsets read and lost.
pub(crate) fn fill_messages(fill: &Fill, read: &[Arc<Message>]) -> (Vec<Arc<Message>>, u64, u64) {
    let mut out = Vec::with_capacity(read.len() + 2);
    if fill.announce {
        out.push(Arc::new(Message::notice(Arc::clone(&fill.channel), fill.epoch, 0, Kind::Epoch)));
    }
    let (mut next, mut found, mut lost) = (fill.from, 0, 0);
    for m in read.iter().filter(|m| m.epoch == fill.epoch && (fill.from..=fill.to).contains(&m.offset)) {
        if m.offset < next {
            continue;
        }
        if m.offset > next {
            out.push(Arc::new(Message::notice(Arc::clone(&fill.channel), fill.epoch, next, Kind::Lagged { to: m.offset - 1 })));
            lost += m.offset - next;
        }
        out.push(Arc::new(Message::new(Arc::clone(&fill.channel), m.epoch, m.offset, m.payload.clone())));
        found += 1;
        next = m.offset + 1;
    }
    if next <= fill.to {
        out.push(Arc::new(Message::notice(Arc::clone(&fill.channel), fill.epoch, next, Kind::Lagged { to: fill.to })));
        lost += fill.to + 1 - next;
    }
    (out, found, lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(epoch: Epoch, offset: u64) -> Incoming {
        Incoming { epoch, offset, payload: Payload::text("x") }
    }

    fn drained(r: &Router, shard: usize) -> Vec<(Kind, u64)> {
        std::iter::from_fn(|| r.inbox(shard).pop()).map(|m| (m.kind, m.offset)).collect()
    }

    fn msg(ch: &Arc<str>, epoch: Epoch, offset: u64) -> Arc<Message> {
        Arc::new(Message::new(Arc::clone(ch), epoch, offset, Payload::text("x")))
    }

    /// Delivers what the stream gave for `fill`, then what waited.
    fn finish(t: &Channels, r: &Router, fill: &Fill, read: &[Arc<Message>]) -> Step {
        for m in &fill_messages(fill, read).0 {
            assert_eq!(t.deliver_filled(r, fill, m), Some(Routed::Queued));
        }
        t.drain(r, fill)
    }

    const P: Kind = Kind::Publication;

    #[test]
    fn in_order_messages_pass_repeats_drop_and_a_jump_holds_later_ones_behind_a_fill() {
        let r = Router::new(2, 64, 10);
        let t = Channels::new();
        let a: Arc<str> = "a".into();
        let e1 = Epoch::random();
        assert_eq!(t.deliver(&r, "a", &inc(e1, 1)), Delivered::NoInterest, "not subscribed");
        r.subscribe("a", 0).unwrap();
        r.subscribe("a", 1).unwrap();
        t.subscribe(&a);
        assert_eq!(t.deliver(&r, "a", &inc(e1, 5)), Delivered::Queued, "the first message sets the baseline");
        assert_eq!(t.deliver(&r, "a", &inc(e1, 6)), Delivered::Queued);
        assert_eq!(t.deliver(&r, "a", &inc(e1, 6)), Delivered::Duplicate);
        let Delivered::Gap(fill) = t.deliver(&r, "a", &inc(e1, 9)) else { panic!("7 and 8 are missing") };
        assert_eq!((fill.from, fill.to, fill.announce), (7, 8, false));
        assert_eq!(t.deliver(&r, "a", &inc(e1, 10)), Delivered::Held);
        assert_eq!(drained(&r, 1), vec![(P, 5), (P, 6)], "nothing after the gap yet");
        // The stream still holds 8 only.
        let (_, found, lost) = fill_messages(&fill, &[msg(&a, e1, 8)]);
        assert_eq!((found, lost), (1, 1));
        assert_eq!(finish(&t, &r, &fill, &[msg(&a, e1, 8)]), Step::Done);
        assert_eq!(drained(&r, 0)[2..], [(Kind::Lagged { to: 7 }, 7), (P, 8), (P, 9), (P, 10)]);
        assert_eq!(t.deliver(&r, "a", &inc(e1, 11)), Delivered::Queued, "live again");
        assert_eq!(t.held_bytes.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing held any more");
    }

    #[test]
    fn a_new_epoch_is_announced_and_filled_from_one() {
        let r = Router::new(1, 64, 10);
        let t = Channels::new();
        let a: Arc<str> = "a".into();
        r.subscribe("a", 0).unwrap();
        t.subscribe(&a);
        let (e1, e2) = (Epoch::random(), Epoch::random());
        assert_eq!(t.deliver(&r, "a", &inc(e1, 3)), Delivered::Queued);
        let Delivered::Gap(fill) = t.deliver(&r, "a", &inc(e2, 2)) else { panic!("a new epoch is a gap") };
        assert_eq!((fill.epoch, fill.from, fill.to, fill.announce), (e2, 1, 1, true));
        assert_eq!(finish(&t, &r, &fill, &[msg(&a, e2, 1)]), Step::Done);
        let got: Vec<(Kind, Epoch, u64)> = std::iter::from_fn(|| r.inbox(0).pop()).map(|m| (m.kind, m.epoch, m.offset)).collect();
        assert_eq!(got, vec![(P, e1, 3), (Kind::Epoch, e2, 0), (P, e2, 1), (P, e2, 2)]);
    }

    #[test]
    fn the_top_after_a_reconnect_fills_what_was_published_meanwhile() {
        let r = Router::new(1, 64, 10);
        let t = Channels::new();
        let a: Arc<str> = "a".into();
        r.subscribe("a", 0).unwrap();
        let g = t.subscribe(&a);
        let e = Epoch::random();
        t.acked("a", g);
        assert_eq!(t.at_top("a", g, e, 4), (None, false), "a new subscription starts at the top");
        assert_eq!(t.deliver(&r, "a", &inc(e, 3)), Delivered::Duplicate, "published before it");
        assert_eq!(t.deliver(&r, "a", &inc(e, 5)), Delivered::Queued);
        // The connection came back; 6 and 7 were published meanwhile.
        t.acked("a", g);
        let (fill, back) = t.at_top("a", g, e, 7);
        let fill = fill.expect("a fill");
        assert_eq!((fill.from, fill.to, back), (6, 7, false));
        assert_eq!(t.deliver(&r, "a", &inc(e, 7)), Delivered::Held, "a late copy waits");
        assert_eq!(t.deliver(&r, "a", &inc(e, 8)), Delivered::Held);
        let read: Vec<_> = (6..=7).map(|o| msg(&a, e, o)).collect();
        assert_eq!(finish(&t, &r, &fill, &read), Step::Done);
        assert_eq!(drained(&r, 0), vec![(P, 5), (P, 6), (P, 7), (P, 8)]);
        // Redis came back from an older snapshot: nothing came since the
        // acknowledgement and the top is below what was delivered.
        t.acked("a", g);
        assert_eq!(t.at_top("a", g, e, 2), (None, true), "offsets went back: counted, nothing to fill");
    }

    #[test]
    fn live_messages_newer_than_the_top_read_are_not_delivered_again() {
        let r = Router::new(1, 64, 10);
        let t = Channels::new();
        let a: Arc<str> = "a".into();
        r.subscribe("a", 0).unwrap();
        let g = t.subscribe(&a);
        let e = Epoch::random();
        t.acked("a", g);
        t.at_top("a", g, e, 100);
        // The connection came back with nothing missed: the top read says
        // 100, but 101 and 102 arrived live before its answer was handled.
        t.acked("a", g);
        assert_eq!(t.deliver(&r, "a", &inc(e, 101)), Delivered::Queued);
        assert_eq!(t.deliver(&r, "a", &inc(e, 102)), Delivered::Queued);
        assert_eq!(t.at_top("a", g, e, 100), (None, false), "no false rewind, nothing filled");
        assert_eq!(t.deliver(&r, "a", &inc(e, 103)), Delivered::Queued, "still in order");
        assert_eq!(drained(&r, 0), vec![(P, 101), (P, 102), (P, 103)]);
    }

    #[test]
    fn a_subscription_moved_with_subscribers_keeps_its_place_and_fills_the_move() {
        let r = Router::new(1, 64, 10);
        let t = Channels::new();
        let a: Arc<str> = "a".into();
        r.subscribe("a", 0).unwrap();
        let g1 = t.subscribe(&a);
        let e = Epoch::random();
        t.acked("a", g1);
        t.at_top("a", g1, e, 0);
        assert_eq!(t.deliver(&r, "a", &inc(e, 1)), Delivered::Queued);
        // A slot moved: subscribed again elsewhere, 2 and 3 published meanwhile.
        let g2 = t.subscribe(&a);
        t.acked("a", g2);
        let (fill, _) = t.at_top("a", g2, e, 3);
        let fill = fill.expect("the move is filled");
        assert_eq!((fill.from, fill.to), (2, 3));
    }

    #[test]
    fn a_fill_of_a_released_entry_does_not_touch_the_next_one() {
        let r = Router::new(1, 64, 10);
        let t = Channels::new();
        let a: Arc<str> = "a".into();
        r.subscribe("a", 0).unwrap();
        t.subscribe(&a);
        let e = Epoch::random();
        t.deliver(&r, "a", &inc(e, 1));
        let Delivered::Gap(old) = t.deliver(&r, "a", &inc(e, 5)) else { panic!() };
        r.unsubscribe("a", 0);
        assert!(t.release(&r, "a"));
        r.subscribe("a", 0).unwrap();
        t.subscribe(&a);
        t.deliver(&r, "a", &inc(e, 20));
        let Delivered::Gap(new) = t.deliver(&r, "a", &inc(e, 23)) else { panic!() };
        assert_eq!(t.deliver_filled(&r, &old, &msg(&a, e, 2)), None, "the old fill stops");
        assert_eq!(t.drain(&r, &old), Step::Done);
        t.abandon(&old);
        assert_eq!(t.deliver(&r, "a", &inc(e, 24)), Delivered::Held, "the new fill still holds");
        assert_eq!(finish(&t, &r, &new, &[msg(&a, e, 21), msg(&a, e, 22)]), Step::Done);
        let got: Vec<u64> = drained(&r, 0).into_iter().map(|(_, o)| o).collect();
        assert_eq!(got, vec![1, 20, 21, 22, 23, 24]);
    }

    #[test]
    fn a_full_shard_queue_is_retried_without_a_false_gap() {
        let r = Router::new(1, 1, 10);
        let t = Channels::new();
        r.subscribe("a", 0).unwrap();
        t.subscribe(&"a".into());
        let e = Epoch::random();
        assert_eq!(t.deliver(&r, "a", &inc(e, 1)), Delivered::Queued);
        assert_eq!(t.deliver(&r, "a", &inc(e, 2)), Delivered::Full);
        r.inbox(0).pop();
        assert_eq!(t.deliver(&r, "a", &inc(e, 2)), Delivered::Queued);
    }

    #[test]
    fn generations_keep_late_confirmations_out() {
        let r = Router::new(1, 16, 10);
        let t = Channels::new();
        let a: Arc<str> = "a".into();
        r.subscribe("a", 0).unwrap();
        let (e1, e2) = (Epoch::random(), Epoch::random());
        let g1 = t.subscribe(&a);
        assert_eq!(t.confirmed("a"), None, "not confirmed yet");
        let g2 = t.subscribe(&a);
        t.confirm("a", g1, Some(e1));
        assert_eq!(t.confirmed("a"), None, "a late confirmation of an older subscription is ignored");
        t.confirm("a", g2, Some(e2));
        assert_eq!(t.confirmed("a"), Some(e2));
        assert!(!t.release(&r, "a"), "a shard still subscribes");
        r.unsubscribe("a", 0);
        assert!(t.release(&r, "a"));
        t.confirm("a", g2, Some(e2));
        assert_eq!(t.confirmed("a"), None, "released: the old confirmation does not count");
    }
}
