//! The lock-free inbound queue of each shard, and the dispatch of a message
//! to every shard in a channel's shard set.
//!
//! Each shard's queue is a bounded crossbeam `ArrayQueue`. A publisher first
//! reserves a slot on every target shard (all or nothing), so a publish is
//! either queued everywhere or refused as `overloaded` before an offset is
//! spent. The shard is woken only when it was asleep.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use tokio::sync::Notify;

use crate::message::Message;

/// A set of shards, as a bit mask (at most [`crate::config::MAX_SHARDS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ShardSet(u128);

impl ShardSet {
    pub(crate) fn insert(&mut self, shard: usize) {
        self.0 |= 1 << shard;
    }
    pub(crate) fn remove(&mut self, shard: usize) {
        self.0 &= !(1 << shard);
    }
    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub(crate) fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(i)
        })
    }
}

#[derive(Debug)]
pub(crate) struct Inbox {
    queue: ArrayQueue<Arc<Message>>,
    reserved: AtomicUsize,
    sleeping: AtomicBool,
    notify: Notify,
}

impl Inbox {
    fn new(capacity: usize) -> Inbox {
        Inbox { queue: ArrayQueue::new(capacity), reserved: AtomicUsize::new(0), sleeping: AtomicBool::new(false), notify: Notify::new() }
    }

    fn try_reserve(&self) -> bool {
        let cap = self.queue.capacity();
        self.reserved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| (r < cap).then_some(r + 1)).is_ok()
    }

    fn release(&self) {
        self.reserved.fetch_sub(1, Ordering::AcqRel);
    }

    /// Pops one message (shard thread only).
    pub(crate) fn pop(&self) -> Option<Arc<Message>> {
        let m = self.queue.pop()?;
        self.release();
        Some(m)
    }

    /// Waits until the queue has something (shard thread only).
    pub(crate) async fn wait(&self) {
        loop {
            self.sleeping.store(true, Ordering::SeqCst);
            if !self.queue.is_empty() {
                self.sleeping.store(false, Ordering::SeqCst);
                return;
            }
            self.notify.notified().await;
            if !self.queue.is_empty() {
                return;
            }
        }
    }

    fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }
}

/// Refused: a target shard's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overloaded;

#[derive(Debug)]
pub(crate) struct Dispatch {
    inboxes: Box<[Inbox]>,
}

impl Dispatch {
    pub(crate) fn new(shards: usize, capacity: usize) -> Dispatch {
        Dispatch { inboxes: (0..shards).map(|_| Inbox::new(capacity)).collect() }
    }

    pub(crate) fn inbox(&self, shard: usize) -> &Inbox {
        &self.inboxes[shard]
    }

    /// Reserves one slot on every shard of `set`, or none.
    pub(crate) fn reserve(&self, set: ShardSet) -> Result<(), Overloaded> {
        for (n, shard) in set.iter().enumerate() {
            if !self.inboxes[shard].try_reserve() {
                for undo in set.iter().take(n) {
                    self.inboxes[undo].release();
                }
                return Err(Overloaded);
            }
        }
        Ok(())
    }

    /// Queues `msg` on every shard of `set`; [`Dispatch::reserve`] must have
    /// succeeded for the same set.
    pub(crate) fn push(&self, set: ShardSet, msg: &Arc<Message>) {
        for shard in set.iter() {
            // The reservation guarantees room: pushes never exceed reservations.
            let _ = self.inboxes[shard].queue.push(Arc::clone(msg));
        }
    }

    /// Wakes the shards of `set` that are asleep.
    pub(crate) fn wake(&self, set: ShardSet) {
        for shard in set.iter() {
            self.inboxes[shard].wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::json::Payload;

    #[test]
    fn shard_set_iterates_members() {
        let mut s = ShardSet::default();
        for i in [0, 5, 64, 127] {
            s.insert(i);
        }
        s.remove(5);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 64, 127]);
    }

    #[test]
    fn reservation_is_all_or_nothing() {
        let d = Dispatch::new(2, 1);
        let mut both = ShardSet::default();
        both.insert(0);
        both.insert(1);
        let mut one = ShardSet::default();
        one.insert(1);
        assert_eq!(d.reserve(one), Ok(()));
        d.push(one, &Arc::new(Message::new("c".into(), crate::Epoch::random(), 1, Payload::text("x"))));
        assert_eq!(d.reserve(both), Err(Overloaded));
        // Shard 0's slot was released by the failed reservation.
        let mut zero = ShardSet::default();
        zero.insert(0);
        assert_eq!(d.reserve(zero), Ok(()));
        assert!(d.inbox(1).pop().is_some());
        assert_eq!(d.reserve(one), Ok(()));
    }
}
