//! The Redis broker's view of each channel this node subscribes to: the
//! generation of its Redis subscription, whether Redis confirmed it (with
//! the channel's epoch), and the offset expected next, to count gaps.
//!
//! An entry lives from the coordinator's subscribe to its release. Lock
//! order: this table's lock, then the router's (never the reverse), so a
//! release decided here cannot race a shard's first subscriber: either the
//! router shows that subscriber and nothing is released, or the
//! subscriber's confirmation check comes after the release and waits for
//! the next subscription.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::message::{Epoch, Message};
use crate::proto::json::Payload;
use crate::router::{lock, stripe_of, Routed, Router};

const STRIPES: usize = 16;

#[derive(Debug, Default)]
struct Sub {
    /// Bumped at each subscribe and release; confirmations and losses of
    /// an older generation are ignored.
    gen: u64,
    /// Redis confirmed the current generation; the channel's epoch.
    confirmed: Option<Epoch>,
    /// The epoch and offset expected next, once a message came.
    expect: Option<(Epoch, u64)>,
}

/// What became of a message from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// Queued on every interested shard; `missed` offsets were skipped
    /// before it, or the channel's offsets restarted (`reset`: a new epoch,
    /// or an offset not after the last one, as when Redis comes back from
    /// an older snapshot). Either is a gap.
    Queued { missed: u64, reset: bool },
    /// No shard has subscribers (any more).
    NoInterest,
    /// A shard's queue is full: nothing was queued; retry.
    Full,
}

type Stripe = Mutex<HashMap<Arc<str>, Sub>>;

#[derive(Debug)]
pub(crate) struct Channels {
    stripes: Box<[Stripe]>,
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
    /// forgets the expected offset: messages published before the
    /// subscription are not a gap.
    pub(crate) fn subscribe(&self, channel: &Arc<str>, fresh: bool) -> u64 {
        let mut map = self.stripe(channel);
        let sub = map.entry(Arc::clone(channel)).or_default();
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

    /// Queues a message that came back from Redis on every interested
    /// shard, checking its offset against the one expected.
    pub(crate) fn deliver(&self, router: &Router, channel: &str, epoch: Epoch, offset: u64, payload: &Payload) -> Delivered {
        let mut map = self.stripe(channel);
        let Some((name, sub)) = map.get_key_value(channel) else { return Delivered::NoInterest };
        let (missed, reset) = match sub.expect {
            None => (0, false),
            Some((e, want)) if e == epoch && offset >= want => (offset - want, false),
            Some(_) => (0, true),
        };
        let name = Arc::clone(name);
        match router.dispatch(channel, || Arc::new(Message::new(name, epoch, offset, payload.clone()))) {
            Routed::NoInterest => Delivered::NoInterest,
            Routed::Full => Delivered::Full,
            Routed::Queued => {
                if let Some(sub) = map.get_mut(channel) {
                    sub.expect = Some((epoch, offset + 1));
                }
                Delivered::Queued { missed, reset }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_count_gaps_and_restarts() {
        let r = Router::new(2, 16, 10);
        let t = Channels::new();
        let p = Payload::text("x");
        let a: Arc<str> = "a".into();
        let e1 = Epoch::random();
        assert_eq!(t.deliver(&r, "a", e1, 1, &p), Delivered::NoInterest, "not subscribed");
        r.subscribe("a", 0).unwrap();
        r.subscribe("a", 1).unwrap();
        let g1 = t.subscribe(&a, true);
        let queued = |missed, reset| Delivered::Queued { missed, reset };
        assert_eq!(t.deliver(&r, "a", e1, 5, &p), queued(0, false), "the first message sets the baseline");
        assert_eq!(t.deliver(&r, "a", e1, 6, &p), queued(0, false));
        assert_eq!(t.deliver(&r, "a", e1, 9, &p), queued(2, false), "7 and 8 were missed");
        assert_eq!(t.deliver(&r, "a", e1, 4, &p), queued(0, true), "offsets went back (Redis restored an older snapshot)");
        let e2 = Epoch::random();
        assert_eq!(t.deliver(&r, "a", e2, 1, &p), queued(0, true), "a new epoch restarts the offsets");
        let got: Vec<u64> = std::iter::from_fn(|| r.inbox(1).pop()).map(|m| m.offset).collect();
        assert_eq!(got, vec![5, 6, 9, 4, 1]);
        assert_eq!(t.confirmed("a"), None, "not confirmed yet");
        t.confirm("a", g1, Some(e1));
        assert_eq!(t.confirmed("a"), Some(e1), "the epoch Redis gave for the reply");
        assert_eq!(t.deliver(&r, "a", e2, 3, &p), queued(1, false), "gaps are checked against the last message, not the reply's epoch");
        let g2 = t.subscribe(&a, true);
        assert_eq!(t.deliver(&r, "a", e2, 40, &p), queued(0, false), "a fresh subscription is not a gap");
        // Generations: a late confirmation of an older subscription is ignored.
        t.confirm("a", g1, Some(e1));
        assert_eq!(t.confirmed("a"), None);
        t.confirm("a", g2, Some(e2));
        assert_eq!(t.confirmed("a"), Some(e2));
        assert!(!t.release(&r, "a"), "shards still subscribe");
        r.unsubscribe("a", 0);
        r.unsubscribe("a", 1);
        assert!(t.release(&r, "a"));
        t.confirm("a", g2, Some(e2));
        assert_eq!(t.confirmed("a"), None, "released: the old confirmation does not count");
    }

    #[test]
    fn a_full_shard_queue_is_retried_without_a_false_gap() {
        let r = Router::new(1, 1, 10);
        let t = Channels::new();
        let p = Payload::text("x");
        r.subscribe("a", 0).unwrap();
        t.subscribe(&"a".into(), true);
        let e = Epoch::random();
        assert_eq!(t.deliver(&r, "a", e, 1, &p), Delivered::Queued { missed: 0, reset: false });
        assert_eq!(t.deliver(&r, "a", e, 2, &p), Delivered::Full);
        r.inbox(0).pop();
        assert_eq!(t.deliver(&r, "a", e, 2, &p), Delivered::Queued { missed: 0, reset: false });
    }
}
