//! The channel table: for each channel, its epoch, its next offset (local
//! broker) and the set of shards with subscribers. With the Redis broker
//! it also keeps whether Redis confirmed this node's subscription and the
//! offset expected next, to count gaps.
//!
//! The table is split into stripes, each behind its own mutex, so publishes
//! to different channels rarely meet. A publish takes its stripe's lock for
//! the few instructions that spend an offset and queue the message on the
//! shards, so every shard sees a channel's messages in offset order. Nothing
//! on the per-subscriber path takes a lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{PublishError, Published};
use crate::message::{Epoch, Message};
use crate::proto::json::Payload;
use crate::shard::inbox::{Dispatch, ShardSet};

const STRIPES: usize = 64;

#[derive(Debug)]
struct Entry {
    name: Arc<str>,
    shards: ShardSet,
    epoch: Epoch,
    next_offset: u64,
    /// Redis broker: Redis confirmed this node's subscription.
    confirmed: bool,
    /// Redis broker: generation of the node's subscription, bumped by the
    /// broker's coordinator at each subscribe and release; confirmations
    /// and losses of an older generation are ignored.
    sub_gen: u64,
    /// Redis broker: the epoch and offset expected next, once a message came.
    expect: Option<(Epoch, u64)>,
}

/// What became of a message from the Redis broker.
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

type Stripe = Mutex<HashMap<Arc<str>, Entry>>;

#[derive(Debug)]
pub(crate) struct ChannelTable {
    stripes: Box<[Stripe]>,
    len: AtomicUsize,
    max: usize,
}

/// The table is full of channels that have subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableFull;

fn stripe_of(name: &str) -> usize {
    // FNV-1a: cheap and good enough to spread names over stripes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name.as_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % STRIPES as u64) as usize
}

impl ChannelTable {
    pub(crate) fn new(max_channels: usize) -> ChannelTable {
        ChannelTable { stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(), len: AtomicUsize::new(0), max: max_channels }
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        // A panic while holding a stripe cannot leave an entry half-written
        // (every update is a plain field store), so a poisoned lock is safe to use.
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gets the entry for `name`, creating it (with a new epoch) if needed.
    fn entry<'a>(&self, map: &'a mut HashMap<Arc<str>, Entry>, stripe: usize, name: &str) -> Result<&'a mut Entry, TableFull> {
        if !map.contains_key(name) {
            if self.len.load(Ordering::Relaxed) >= self.max && !self.evict_idle(map, stripe) {
                return Err(TableFull);
            }
            self.len.fetch_add(1, Ordering::Relaxed);
            let name: Arc<str> = name.into();
            let entry = Entry {
                name: Arc::clone(&name),
                shards: ShardSet::default(),
                epoch: Epoch::random(),
                next_offset: 1,
                confirmed: false,
                sub_gen: 0,
                expect: None,
            };
            map.insert(name, entry);
        }
        map.get_mut(name).ok_or(TableFull)
    }

    /// Forgets one channel without subscribers, from the locked stripe or
    /// another one that is free right now.
    fn evict_idle(&self, locked: &mut HashMap<Arc<str>, Entry>, stripe: usize) -> bool {
        if remove_idle(locked) {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return true;
        }
        for (i, other) in self.stripes.iter().enumerate() {
            if i == stripe {
                continue;
            }
            if let Ok(mut map) = other.try_lock() {
                if remove_idle(&mut map) {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    return true;
                }
            }
        }
        false
    }

    /// Spends the next offset of `channel` and queues the message on every
    /// shard with subscribers, atomically with respect to other publishes
    /// to the channel.
    pub(crate) fn publish(&self, dispatch: &Dispatch, channel: &str, payload: Payload) -> Result<Published, PublishError> {
        let stripe = stripe_of(channel);
        let mut map = self.lock(stripe);
        let entry = self.entry(&mut map, stripe, channel).map_err(|_| PublishError::ChannelLimit)?;
        let shards = entry.shards;
        dispatch.reserve(shards).map_err(|_| PublishError::Overloaded)?;
        let offset = entry.next_offset;
        entry.next_offset += 1;
        let published = Published { channel: Arc::clone(&entry.name), offset, epoch: entry.epoch };
        if !shards.is_empty() {
            let msg = Arc::new(Message::new(Arc::clone(&entry.name), offset, payload));
            dispatch.push(shards, &msg);
        }
        drop(map);
        dispatch.wake(shards);
        Ok(published)
    }

    /// Adds `shard` to the channel's shard set (its first local
    /// subscriber). The flag says whether the node had no subscriber to the
    /// channel before.
    pub(crate) fn subscribe(&self, channel: &str, shard: usize) -> Result<(Arc<str>, Epoch, bool), TableFull> {
        let stripe = stripe_of(channel);
        let mut map = self.lock(stripe);
        let entry = self.entry(&mut map, stripe, channel)?;
        let first = entry.shards.is_empty();
        entry.shards.insert(shard);
        Ok((Arc::clone(&entry.name), entry.epoch, first))
    }

    /// Removes `shard` from the channel's shard set (its last local
    /// subscriber left). The entry stays, keeping the offset counter.
    /// Returns whether the node now has no subscriber to the channel.
    pub(crate) fn unsubscribe(&self, channel: &str, shard: usize) -> bool {
        let mut map = self.lock(stripe_of(channel));
        match map.get_mut(channel) {
            Some(e) => {
                let had = !e.shards.is_empty();
                e.shards.remove(shard);
                had && e.shards.is_empty()
            }
            None => false,
        }
    }

    /// Whether some shard has subscribers to `channel`.
    pub(crate) fn has_interest(&self, channel: &str) -> bool {
        self.lock(stripe_of(channel)).get(channel).is_some_and(|e| !e.shards.is_empty())
    }

    /// Every channel with subscribers on this node.
    pub(crate) fn interested(&self) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        for i in 0..STRIPES {
            out.extend(self.lock(i).values().filter(|e| !e.shards.is_empty()).map(|e| Arc::clone(&e.name)));
        }
        out
    }

    /// Redis broker: the coordinator subscribes the node to `channel` (a
    /// new generation, not confirmed yet). `fresh` (the node had no
    /// subscription) also forgets the expected offset: messages published
    /// before the subscription are not a gap.
    pub(crate) fn broker_subscribe(&self, channel: &str, fresh: bool) -> u64 {
        let mut map = self.lock(stripe_of(channel));
        let Some(e) = map.get_mut(channel) else { return 0 };
        e.sub_gen += 1;
        e.confirmed = false;
        if fresh {
            e.expect = None;
        }
        e.sub_gen
    }

    /// Redis broker: the coordinator may unsubscribe the node from
    /// `channel` only if no shard has subscribers now; decided under the
    /// stripe lock, so a subscriber arriving after it waits for the next
    /// subscription's confirmation.
    pub(crate) fn broker_release(&self, channel: &str) -> bool {
        let mut map = self.lock(stripe_of(channel));
        let Some(e) = map.get_mut(channel) else { return true };
        if !e.shards.is_empty() {
            return false;
        }
        e.sub_gen += 1;
        e.confirmed = false;
        true
    }

    /// Redis broker: Redis confirmed subscription `gen` (with the channel's
    /// epoch), or lost it; ignored for an older generation.
    pub(crate) fn broker_confirm(&self, channel: &str, gen: u64, confirmed: bool, epoch: Option<Epoch>) {
        if let Some(e) = self.lock(stripe_of(channel)).get_mut(channel) {
            if e.sub_gen != gen {
                return;
            }
            e.confirmed = confirmed;
            if let Some(epoch) = epoch {
                e.epoch = epoch;
            }
        }
    }

    /// Redis broker: the channel's epoch once Redis confirmed the node's
    /// subscription.
    pub(crate) fn broker_epoch(&self, channel: &str) -> Option<Epoch> {
        self.lock(stripe_of(channel)).get(channel).filter(|e| e.confirmed).map(|e| e.epoch)
    }

    /// Redis broker: queues a message that came back from Redis on every
    /// interested shard, checking its offset against the one expected.
    pub(crate) fn deliver(&self, dispatch: &Dispatch, channel: &str, epoch: Epoch, offset: u64, payload: &Payload) -> Delivered {
        let mut map = self.lock(stripe_of(channel));
        let Some(entry) = map.get_mut(channel) else { return Delivered::NoInterest };
        let shards = entry.shards;
        if shards.is_empty() {
            return Delivered::NoInterest;
        }
        let (missed, reset) = match entry.expect {
            None => (0, false),
            Some((e, want)) if e == epoch && offset >= want => (offset - want, false),
            Some(_) => (0, true),
        };
        if dispatch.reserve(shards).is_err() {
            return Delivered::Full;
        }
        entry.epoch = epoch;
        entry.expect = Some((epoch, offset + 1));
        let msg = Arc::new(Message::new(Arc::clone(&entry.name), offset, payload.clone()));
        dispatch.push(shards, &msg);
        drop(map);
        dispatch.wake(shards);
        Delivered::Queued { missed, reset }
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

fn remove_idle(map: &mut HashMap<Arc<str>, Entry>) -> bool {
    let idle = map.iter().find(|(_, e)| e.shards.is_empty()).map(|(k, _)| Arc::clone(k));
    idle.is_some_and(|k| map.remove(&k).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_contiguous_and_reach_subscribed_shards_only() {
        let d = Dispatch::new(2, 16);
        let t = ChannelTable::new(100);
        let (_, epoch, first) = t.subscribe("news", 1).unwrap();
        assert!(first);
        for want in 1..=3 {
            let p = t.publish(&d, "news", Payload::text("x")).unwrap();
            assert_eq!((p.offset, p.epoch), (want, epoch));
        }
        assert!(d.inbox(0).pop().is_none());
        let offsets: Vec<u64> = std::iter::from_fn(|| d.inbox(1).pop()).map(|m| m.offset).collect();
        assert_eq!(offsets, vec![1, 2, 3]);
        assert!(t.unsubscribe("news", 1), "the last subscriber left");
        assert_eq!(t.publish(&d, "news", Payload::text("x")).unwrap().offset, 4, "the counter outlives subscribers");
        assert!(d.inbox(1).pop().is_none());
    }

    #[test]
    fn a_full_table_forgets_idle_channels_then_refuses() {
        let d = Dispatch::new(1, 16);
        let t = ChannelTable::new(2);
        t.subscribe("a", 0).unwrap();
        let b1 = t.publish(&d, "b", Payload::text("x")).unwrap();
        // "c" evicts the idle "b"; "b" then comes back with a new epoch.
        t.publish(&d, "c", Payload::text("x")).unwrap();
        assert_eq!(t.len(), 2);
        t.subscribe("c", 0).unwrap();
        assert_eq!(t.publish(&d, "b", Payload::text("x")), Err(PublishError::ChannelLimit));
        t.unsubscribe("c", 0);
        let b2 = t.publish(&d, "b", Payload::text("x")).unwrap();
        assert_eq!(b2.offset, 1);
        assert_ne!(b2.epoch, b1.epoch);
    }

    #[test]
    fn broker_deliveries_count_gaps_and_restarts() {
        let d = Dispatch::new(2, 16);
        let t = ChannelTable::new(10);
        let p = Payload::text("x");
        let e1 = Epoch::random();
        assert_eq!(t.deliver(&d, "a", e1, 1, &p), Delivered::NoInterest);
        t.subscribe("a", 0).unwrap();
        assert!(!t.subscribe("a", 1).unwrap().2, "not the node's first subscriber");
        let queued = |missed, reset| Delivered::Queued { missed, reset };
        assert_eq!(t.deliver(&d, "a", e1, 5, &p), queued(0, false), "the first message sets the baseline");
        assert_eq!(t.deliver(&d, "a", e1, 6, &p), queued(0, false));
        assert_eq!(t.deliver(&d, "a", e1, 9, &p), queued(2, false), "7 and 8 were missed");
        assert_eq!(t.deliver(&d, "a", e1, 4, &p), queued(0, true), "offsets went back (Redis restored an older snapshot)");
        let e2 = Epoch::random();
        assert_eq!(t.deliver(&d, "a", e2, 1, &p), queued(0, true), "a new epoch restarts the offsets");
        let got: Vec<u64> = std::iter::from_fn(|| d.inbox(1).pop()).map(|m| m.offset).collect();
        assert_eq!(got, vec![5, 6, 9, 4, 1]);
        let g1 = t.broker_subscribe("a", true);
        assert_eq!(t.deliver(&d, "a", e2, 40, &p), queued(0, false), "a fresh subscription is not a gap");
        assert_eq!(t.broker_epoch("a"), None, "not confirmed yet");
        t.broker_confirm("a", g1, true, Some(e1));
        assert_eq!(t.broker_epoch("a"), Some(e1), "the epoch Redis gave for the reply");
        assert_eq!(t.deliver(&d, "a", e2, 42, &p), queued(1, false), "gaps are checked against the last message, not the reply's epoch");
        // Generations: a late confirmation of an older subscription is ignored.
        let g2 = t.broker_subscribe("a", false);
        t.broker_confirm("a", g1, true, None);
        assert_eq!(t.broker_epoch("a"), None);
        t.broker_confirm("a", g2, true, None);
        assert!(t.broker_epoch("a").is_some());
        assert_eq!(t.interested(), vec![Arc::<str>::from("a")]);
        assert!(!t.broker_release("a"), "shards still subscribe");
        t.unsubscribe("a", 0);
        t.unsubscribe("a", 1);
        assert!(t.broker_release("a"));
        t.broker_confirm("a", g2, true, None);
        assert_eq!(t.broker_epoch("a"), None, "released: the old confirmation does not count");
        assert!(t.interested().is_empty());
    }

    #[test]
    fn a_full_shard_queue_spends_no_offset() {
        let d = Dispatch::new(1, 1);
        let t = ChannelTable::new(10);
        t.subscribe("a", 0).unwrap();
        assert_eq!(t.publish(&d, "a", Payload::text("1")).unwrap().offset, 1);
        assert_eq!(t.publish(&d, "a", Payload::text("2")), Err(PublishError::Overloaded));
        d.inbox(0).pop();
        assert_eq!(t.publish(&d, "a", Payload::text("3")).unwrap().offset, 2);
    }
}
