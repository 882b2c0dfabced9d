//! The router: for each channel with subscribers on this node, the set of
//! shards that have them, and the only path from a broker onto the shards.
//!
//! The table is split into stripes, each behind its own mutex, so channels
//! rarely meet. An entry lives while some shard has subscribers to its
//! channel; the router knows nothing of offsets or epochs (the broker owns
//! those). [`Router::dispatch`] takes the stripe's lock for the few
//! instructions that queue a message on the shards, so a broker that calls
//! it in offset order (under its own per-channel lock) gets every shard to
//! see a channel's messages in offset order. Nothing on the per-subscriber
//! path takes a lock.
//!
//! Lock order: a broker may call the router while holding its own lock; the
//! router never calls a broker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::message::Message;
use crate::shard::inbox::{Dispatch, Inbox, ShardSet};

const STRIPES: usize = 64;

type Stripe = Mutex<HashMap<Arc<str>, ShardSet>>;

/// The table holds `max_channels` channels with subscribers already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("channel limit reached")]
pub(crate) struct ChannelLimit;

/// What became of a message handed to [`Router::dispatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Routed {
    /// Queued on every shard with subscribers.
    Queued,
    /// No shard has subscribers: nothing to do.
    NoInterest,
    /// A shard's queue is full: nothing was queued anywhere.
    Full,
}

#[derive(Debug)]
pub(crate) struct Router {
    stripes: Box<[Stripe]>,
    len: AtomicUsize,
    max: usize,
    dispatch: Dispatch,
}

/// The stripe of a channel name.
pub(crate) fn stripe_of(name: &str, stripes: usize) -> usize {
    // FNV-1a: cheap and good enough to spread names over stripes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name.as_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % stripes as u64) as usize
}

/// Locks a stripe. A panic while holding one cannot leave an entry
/// half-written (every update is a plain store), so a poisoned lock is
/// safe to use.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Router {
    pub(crate) fn new(shards: usize, shard_queue_capacity: usize, max_channels: usize) -> Router {
        Router {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            len: AtomicUsize::new(0),
            max: max_channels,
            dispatch: Dispatch::new(shards, shard_queue_capacity),
        }
    }

    fn stripe(&self, channel: &str) -> MutexGuard<'_, HashMap<Arc<str>, ShardSet>> {
        lock(&self.stripes[stripe_of(channel, STRIPES)])
    }

    /// The inbound queue of `shard`.
    pub(crate) fn inbox(&self, shard: usize) -> &Inbox {
        self.dispatch.inbox(shard)
    }

    /// Adds `shard` to the channel's shard set (its first local
    /// subscriber). Returns the shared name, and whether the node had no
    /// subscriber to the channel before.
    pub(crate) fn subscribe(&self, channel: &str, shard: usize) -> Result<(Arc<str>, bool), ChannelLimit> {
        let mut map = self.stripe(channel);
        if let Some((name, _)) = map.get_key_value(channel) {
            let name = Arc::clone(name);
            if let Some(set) = map.get_mut(channel) {
                set.insert(shard);
            }
            return Ok((name, false));
        }
        // Counted under the stripe lock: two stripes may race past the
        // limit by one entry each, never further.
        if self.len.load(Ordering::Relaxed) >= self.max {
            return Err(ChannelLimit);
        }
        self.len.fetch_add(1, Ordering::Relaxed);
        let name: Arc<str> = channel.into();
        let mut set = ShardSet::default();
        set.insert(shard);
        map.insert(Arc::clone(&name), set);
        Ok((name, true))
    }

    /// Removes `shard` from the channel's shard set (its last local
    /// subscriber left). Returns whether the node now has no subscriber to
    /// the channel.
    pub(crate) fn unsubscribe(&self, channel: &str, shard: usize) -> bool {
        let mut map = self.stripe(channel);
        let Some(set) = map.get_mut(channel) else { return false };
        set.remove(shard);
        if !set.is_empty() {
            return false;
        }
        map.remove(channel);
        self.len.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Whether some shard has subscribers to `channel`.
    pub(crate) fn has_interest(&self, channel: &str) -> bool {
        self.stripe(channel).contains_key(channel)
    }

    /// Every channel with subscribers on this node.
    pub(crate) fn interested(&self) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        for s in self.stripes.iter() {
            out.extend(lock(s).keys().cloned());
        }
        out
    }

    /// Channels with subscribers on this node.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Queues a message on every shard with subscribers to its channel, or
    /// on none. `build` makes the message and runs only when it will be
    /// queued somewhere, under the stripe's lock; a broker spends the
    /// message's offset inside it, so a full queue spends none.
    pub(crate) fn dispatch(&self, channel: &str, build: impl FnOnce() -> Arc<Message>) -> Routed {
        let map = self.stripe(channel);
        let Some(&shards) = map.get(channel) else { return Routed::NoInterest };
        if self.dispatch.reserve(shards).is_err() {
            return Routed::Full;
        }
        self.dispatch.push(shards, &build());
        drop(map);
        self.dispatch.wake(shards);
        Routed::Queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::json::Payload;

    fn msg(offset: u64) -> Arc<Message> {
        Arc::new(Message::new("news".into(), crate::message::Epoch::random(), offset, Payload::text("x")))
    }

    #[test]
    fn messages_reach_subscribed_shards_only() {
        let r = Router::new(2, 16, 100);
        assert_eq!(r.dispatch("news", || msg(1)), Routed::NoInterest);
        let (name, first) = r.subscribe("news", 1).unwrap();
        assert!(first);
        assert!(!r.subscribe("news", 1).unwrap().1, "not the node's first subscriber");
        for o in 1..=3 {
            assert_eq!(r.dispatch(&name, || msg(o)), Routed::Queued);
        }
        assert!(r.inbox(0).pop().is_none());
        let offsets: Vec<u64> = std::iter::from_fn(|| r.inbox(1).pop()).map(|m| m.offset).collect();
        assert_eq!(offsets, vec![1, 2, 3]);
        assert_eq!(r.interested(), vec![name]);
        assert!(r.unsubscribe("news", 1), "the last subscriber left");
        assert!(!r.has_interest("news"));
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn a_full_queue_builds_nothing() {
        let r = Router::new(1, 1, 10);
        r.subscribe("news", 0).unwrap();
        assert_eq!(r.dispatch("news", || msg(1)), Routed::Queued);
        let built = std::cell::Cell::new(false);
        let routed = r.dispatch("news", || {
            built.set(true);
            msg(2)
        });
        assert_eq!(routed, Routed::Full);
        assert!(!built.get(), "no message (and no offset) for a full queue");
        r.inbox(0).pop();
        assert_eq!(r.dispatch("news", || msg(2)), Routed::Queued);
    }

    #[test]
    fn the_channel_limit_counts_channels_with_subscribers() {
        let r = Router::new(1, 16, 2);
        r.subscribe("a", 0).unwrap();
        r.subscribe("b", 0).unwrap();
        assert_eq!(r.subscribe("c", 0), Err(ChannelLimit));
        r.subscribe("a", 0).unwrap();
        r.unsubscribe("b", 0);
        assert!(r.subscribe("c", 0).is_ok());
    }
}
