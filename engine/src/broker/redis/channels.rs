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
/// Messages of one channel waiting for a fill, at most.
pub(crate) const HELD_MAX: usize = 16_384;

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
    /// A fill is running: what came from Redis meanwhile, in order.
    held: Option<VecDeque<Incoming>>,
    /// Where the running fill must read up to once `held` is empty: the
    /// last message dropped because `held` was full, or the top read after
    /// a reconnect.
    dropped: Option<(Epoch, u64)>,
}

/// A range of a channel to read from its stream and deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fill {
    pub channel: Arc<str>,
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
        Channels { stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    fn stripe(&self, channel: &str) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Sub>> {
        lock(&self.stripes[stripe_of(channel, STRIPES)])
    }

    /// The coordinator subscribes the node to `channel`: a new generation,
    /// not confirmed yet. `fresh` (the node had no subscription) also
    /// forgets the expected position: messages published before the
    /// subscription are not a gap.
    pub(crate) fn subscribe(&self, channel: &Arc<str>, fresh: bool) -> u64 {
        let mut map = self.stripe(channel);
        let sub = map.entry(Arc::clone(channel)).or_insert_with(|| Sub {
            name: Arc::clone(channel),
            gen: 0,
            confirmed: None,
            expect: None,
            held: None,
            dropped: None,
        });
        sub.gen += 1;
        sub.confirmed = None;
        if fresh {
            sub.expect = None;
        }
        sub.gen
    }

    /// The coordinator may unsubscribe the node from `channel` only if no
    /// shard has subscribers now (decided under this table's lock).
    pub(crate) fn release(&self, router: &Router, channel: &str) -> bool {
        let mut map = self.stripe(channel);
        if router.has_interest(channel) {
            return false;
        }
        map.remove(channel);
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
    /// top)`, read after it: what was published while the node was not
    /// subscribed (a lost connection) is a fill. Returns it, and whether
    /// the offsets went back in the same epoch (Redis restored an older
    /// snapshot: counted as a gap, nothing to fill).
    pub(crate) fn at_top(&self, channel: &str, gen: u64, epoch: Epoch, top: u64) -> (Option<Fill>, bool) {
        let mut map = self.stripe(channel);
        let Some(sub) = map.get_mut(channel) else { return (None, false) };
        let name = Arc::clone(&sub.name);
        if sub.gen != gen {
            return (None, false);
        }
        if sub.held.is_some() {
            // A fill is running: it reads up to the top when it is done.
            if sub.dropped.is_none_or(|(e, o)| e != epoch || o < top) {
                sub.dropped = Some((epoch, top));
            }
            return (None, false);
        }
        let fill = match sub.expect {
            None => {
                sub.expect = Some((epoch, top + 1));
                return (None, false);
            }
            Some((e, want)) if e == epoch && top + 1 < want => {
                sub.expect = Some((epoch, top + 1));
                return (None, true);
            }
            Some((e, want)) if e == epoch => {
                if top < want {
                    return (None, false);
                }
                Fill { channel: Arc::clone(&name), epoch, from: want, to: top, announce: false }
            }
            Some(_) => Fill { channel: name, epoch, from: 1, to: top, announce: true },
        };
        sub.held = Some(VecDeque::new());
        (Some(fill), false)
    }

    /// Queues a message that came from Redis on every interested shard,
    /// in order: or drops it as delivered already, or holds it behind a
    /// fill.
    pub(crate) fn deliver(&self, router: &Router, channel: &str, m: &Incoming) -> Delivered {
        let mut map = self.stripe(channel);
        let Some(sub) = map.get_mut(channel) else { return Delivered::NoInterest };
        if let Some(held) = &mut sub.held {
            if held.len() >= HELD_MAX {
                // Read back from the stream when the fill is done.
                sub.dropped = Some((m.epoch, m.offset));
            } else {
                held.push_back(m.clone());
            }
            return Delivered::Held;
        }
        match classify(sub.expect, m.epoch, m.offset) {
            None => Delivered::Duplicate,
            Some(Err((from, announce))) => {
                let fill = Fill { channel: Arc::clone(&sub.name), epoch: m.epoch, from, to: m.offset - 1, announce };
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
    pub(crate) fn deliver_filled(&self, router: &Router, msg: &Arc<Message>) -> Option<Routed> {
        let map = self.stripe(&msg.channel);
        map.get(&*msg.channel)?;
        match router.dispatch(&msg.channel, || Arc::clone(msg)) {
            Routed::NoInterest => None,
            r => Some(r),
        }
    }

    /// A fill delivered everything up to `fill.to`: delivers what waited
    /// meanwhile, until it finds another gap (the next fill) or is done.
    pub(crate) fn drain(&self, router: &Router, fill: &Fill) -> Step {
        let mut map = self.stripe(&fill.channel);
        let Some(sub) = map.get_mut(&*fill.channel) else { return Step::Done };
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
                        return Step::Fill(Fill { channel: name, epoch, from, to: offset, announce });
                    }
                }
                sub.held = None;
                return Step::Done;
            };
            match classify(sub.expect, m.epoch, m.offset) {
                None => {
                    held.pop_front();
                }
                Some(Err((from, announce))) => {
                    return Step::Fill(Fill { channel: name, epoch: m.epoch, from, to: m.offset - 1, announce });
                }
                Some(Ok(())) => {
                    let (epoch, offset, payload) = (m.epoch, m.offset, m.payload.clone());
                    match router.dispatch(&name, || Arc::new(Message::new(Arc::clone(&name), epoch, offset, payload))) {
                        Routed::NoInterest => {
                            sub.held = None;
                            return Step::Done;
                        }
                        Routed::Full => return Step::Full,
                        Routed::Queued => {
                            held.pop_front();
                            sub.expect = Some((epoch, offset + 1));
                        }
                    }
                }
            }
        }
    }

    /// Gives up a fill (the channel has no subscribers here any more).
    pub(crate) fn abandon(&self, channel: &str) {
        if let Some(sub) = self.stripe(channel).get_mut(channel) {
            sub.held = None;
            sub.dropped = None;
        }
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
        t.subscribe(&a, true);
        assert_eq!(t.deliver(&r, "a", &inc(e1, 5)), Delivered::Queued, "the first message sets the baseline");
        assert_eq!(t.deliver(&r, "a", &inc(e1, 6)), Delivered::Queued);
        assert_eq!(t.deliver(&r, "a", &inc(e1, 6)), Delivered::Duplicate);
        let fill = Fill { channel: Arc::clone(&a), epoch: e1, from: 7, to: 8, announce: false };
        assert_eq!(t.deliver(&r, "a", &inc(e1, 9)), Delivered::Gap(fill.clone()), "7 and 8 are missing");
        assert_eq!(t.deliver(&r, "a", &inc(e1, 10)), Delivered::Held);
        assert_eq!(drained(&r, 1), vec![(P, 5), (P, 6)], "nothing after the gap yet");
        // The stream still holds 8 only.
        let read = [Arc::new(Message::new(Arc::clone(&a), e1, 8, Payload::text("x")))];
        let (msgs, found, lost) = fill_messages(&fill, &read);
        assert_eq!((found, lost), (1, 1));
        for m in &msgs {
            assert_eq!(t.deliver_filled(&r, m), Some(Routed::Queued));
        }
        assert_eq!(t.drain(&r, &fill), Step::Done);
        assert_eq!(drained(&r, 0)[2..], [(Kind::Lagged { to: 7 }, 7), (P, 8), (P, 9), (P, 10)]);
        assert_eq!(t.deliver(&r, "a", &inc(e1, 11)), Delivered::Queued, "live again");
    }

    #[test]
    fn a_new_epoch_is_announced_and_filled_from_one() {
        let r = Router::new(1, 64, 10);
        let t = Channels::new();
        let a: Arc<str> = "a".into();
        r.subscribe("a", 0).unwrap();
        t.subscribe(&a, true);
        let (e1, e2) = (Epoch::random(), Epoch::random());
        assert_eq!(t.deliver(&r, "a", &inc(e1, 3)), Delivered::Queued);
        let Delivered::Gap(fill) = t.deliver(&r, "a", &inc(e2, 2)) else { panic!("a new epoch is a gap") };
        assert_eq!((fill.epoch, fill.from, fill.to, fill.announce), (e2, 1, 1, true));
        let read = [Arc::new(Message::new(Arc::clone(&a), e2, 1, Payload::text("x")))];
        for m in &fill_messages(&fill, &read).0 {
            t.deliver_filled(&r, m);
        }
        assert_eq!(t.drain(&r, &fill), Step::Done);
        let got: Vec<(Kind, Epoch, u64)> = std::iter::from_fn(|| r.inbox(0).pop()).map(|m| (m.kind, m.epoch, m.offset)).collect();
        assert_eq!(got, vec![(P, e1, 3), (Kind::Epoch, e2, 0), (P, e2, 1), (P, e2, 2)]);
    }

    #[test]
    fn the_top_after_a_reconnect_fills_what_was_published_meanwhile() {
        let r = Router::new(1, 64, 10);
        let t = Channels::new();
        let a: Arc<str> = "a".into();
        r.subscribe("a", 0).unwrap();
        let g = t.subscribe(&a, true);
        let e = Epoch::random();
        assert_eq!(t.at_top("a", g, e, 4), (None, false), "a fresh subscription starts at the top");
        assert_eq!(t.deliver(&r, "a", &inc(e, 3)), Delivered::Duplicate, "published before it");
        assert_eq!(t.deliver(&r, "a", &inc(e, 5)), Delivered::Queued);
        // The connection came back; 6 and 7 were published meanwhile.
        let (fill, reset) = t.at_top("a", g, e, 7);
        assert_eq!((fill.clone().map(|f| (f.from, f.to)), reset), (Some((6, 7)), false));
        assert_eq!(t.deliver(&r, "a", &inc(e, 7)), Delivered::Held, "a late copy waits");
        assert_eq!(t.deliver(&r, "a", &inc(e, 8)), Delivered::Held);
        let fill = fill.unwrap();
        let read: Vec<_> = (6..=7).map(|o| Arc::new(Message::new(Arc::clone(&a), e, o, Payload::text("x")))).collect();
        for m in &fill_messages(&fill, &read).0 {
            t.deliver_filled(&r, m);
        }
        assert_eq!(t.drain(&r, &fill), Step::Done);
        assert_eq!(drained(&r, 0), vec![(P, 5), (P, 6), (P, 7), (P, 8)]);
        assert_eq!(t.at_top("a", g, e, 2), (None, true), "offsets went back: counted, nothing to fill");
    }

    #[test]
    fn a_full_shard_queue_is_retried_without_a_false_gap() {
        let r = Router::new(1, 1, 10);
        let t = Channels::new();
        r.subscribe("a", 0).unwrap();
        t.subscribe(&"a".into(), true);
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
        let g1 = t.subscribe(&a, true);
        assert_eq!(t.confirmed("a"), None, "not confirmed yet");
        let g2 = t.subscribe(&a, true);
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
