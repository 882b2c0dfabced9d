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

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::message::{Epoch, Message, PublishError, Published};
use crate::proto::json::Payload;
use crate::router::{lock, stripe_of, Routed, Router};

const STRIPES: usize = 64;

#[derive(Debug)]
struct Counter {
    name: Arc<str>,
    epoch: Epoch,
    next_offset: u64,
}

type Stripe = Mutex<HashMap<Arc<str>, Counter>>;

#[derive(Debug)]
pub(crate) struct LocalBroker {
    stripes: Box<[Stripe]>,
    len: AtomicUsize,
    max: usize,
}

impl LocalBroker {
    pub(crate) fn new(max_channels: usize) -> LocalBroker {
        LocalBroker { stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(), len: AtomicUsize::new(0), max: max_channels }
    }

    /// The counter of `name`, created (with a new epoch) if needed.
    fn counter<'a>(&self, router: &Router, map: &'a mut HashMap<Arc<str>, Counter>, stripe: usize, name: &str) -> Option<&'a mut Counter> {
        if !map.contains_key(name) {
            if self.len.load(Ordering::Relaxed) >= self.max && !self.evict_idle(router, map, stripe) {
                return None;
            }
            self.len.fetch_add(1, Ordering::Relaxed);
            let name: Arc<str> = name.into();
            map.insert(Arc::clone(&name), Counter { name, epoch: Epoch::random(), next_offset: 1 });
        }
        map.get_mut(name)
    }

    /// Forgets one channel without subscribers, from the locked stripe or
    /// another one that is free right now.
    fn evict_idle(&self, router: &Router, locked: &mut HashMap<Arc<str>, Counter>, stripe: usize) -> bool {
        let remove_idle = |map: &mut HashMap<Arc<str>, Counter>| {
            let idle = map.keys().find(|k| !router.has_interest(k)).cloned();
            let removed = idle.is_some_and(|k| map.remove(&k).is_some());
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
            .any(|(_, other)| other.try_lock().is_ok_and(|mut m| remove_idle(&mut m)))
    }

    /// Spends the next offset of `channel` and queues the message on every
    /// shard with subscribers.
    pub(crate) fn publish(&self, router: &Router, channel: &str, payload: Payload) -> Result<Published, PublishError> {
        let stripe = stripe_of(channel, STRIPES);
        let mut map = lock(&self.stripes[stripe]);
        let c = self.counter(router, &mut map, stripe, channel).ok_or(PublishError::ChannelLimit)?;
        let offset = c.next_offset;
        let routed = router.dispatch(channel, || Message::new(Arc::clone(&c.name), offset, payload));
        if routed == Routed::Full {
            return Err(PublishError::Overloaded);
        }
        c.next_offset += 1;
        Ok(Published { channel: Arc::clone(&c.name), offset, epoch: c.epoch })
    }

    /// The channel's epoch (a new channel gets one now). `None` when the
    /// table is full of channels with subscribers.
    pub(crate) fn epoch(&self, router: &Router, channel: &str) -> Option<Epoch> {
        let stripe = stripe_of(channel, STRIPES);
        let mut map = lock(&self.stripes[stripe]);
        self.counter(router, &mut map, stripe, channel).map(|c| c.epoch)
    }

    /// Channels whose counters are remembered.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_contiguous_and_outlive_subscribers() {
        let r = Router::new(2, 16, 100);
        let b = LocalBroker::new(100);
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
        let b = LocalBroker::new(2);
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
        let b = LocalBroker::new(10);
        r.subscribe("a", 0).unwrap();
        assert_eq!(b.publish(&r, "a", Payload::text("1")).unwrap().offset, 1);
        assert_eq!(b.publish(&r, "a", Payload::text("2")), Err(PublishError::Overloaded));
        r.inbox(0).pop();
        assert_eq!(b.publish(&r, "a", Payload::text("3")).unwrap().offset, 2);
    }
}
