//! Who is subscribed to each presence channel on this node: connections,
//! and connections per user.
//!
//! The table is split into stripes behind their own mutexes, like the
//! router's; it is touched when a subscription to a presence channel
//! starts or ends and when presence is read, never on the delivery path.
//! It holds one entry per (channel, user) with a subscription here, so it
//! is bounded by the subscriptions (`max_connections` ×
//! `max_subscriptions`). With a Redis broker it is also what this node
//! writes into Redis, and rewrites there if Redis lost it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::metrics::Counter;
use crate::router::{lock, stripe_of};

const STRIPES: usize = 64;

/// Users listed by a presence read at most; `truncated` past it.
pub(crate) const MAX_USERS: usize = 1000;

/// One channel's presence on this node.
#[derive(Debug, Default)]
struct Entry {
    /// Subscribed connections, anonymous ones included.
    clients: u64,
    /// Connections without a user.
    anonymous: u64,
    /// Connections per user.
    users: HashMap<Arc<str>, u32>,
}

/// A channel's presence as read: connections, and distinct users sorted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub clients: u64,
    pub users: Vec<Arc<str>>,
}

impl Snapshot {
    /// The `presence` reply (users cut at [`MAX_USERS`]).
    pub(crate) fn reply(&self, channel: &str, id: Option<&str>) -> bytes::Bytes {
        let users: Vec<&str> = self.users.iter().take(MAX_USERS).map(|u| &**u).collect();
        crate::proto::json::reply_presence(channel, self.clients, &users, self.users.len() > MAX_USERS, id)
    }

    /// The body of `GET /presence/{channel}`.
    pub(crate) fn body(&self, channel: &str) -> serde_json::Value {
        let users: Vec<&str> = self.users.iter().take(MAX_USERS).map(|u| &**u).collect();
        let mut v = serde_json::json!({"channel": channel, "clients": self.clients, "users": users});
        if self.users.len() > MAX_USERS {
            v["truncated"] = true.into();
        }
        v
    }
}

type Stripe = Mutex<HashMap<Arc<str>, Entry>>;

/// A channel's users on this node and their connections (`""`: the
/// anonymous ones).
pub(crate) type Users = Vec<(Arc<str>, u64)>;

/// The node's presence table.
#[derive(Debug)]
pub(crate) struct Presence {
    stripes: Box<[Stripe]>,
    /// (channel, user) entries, anonymous connections' counted once per
    /// channel.
    entries: AtomicUsize,
    /// Join and leave events sent to subscribers, and those a full shard
    /// queue refused.
    pub joins: Counter,
    pub leaves: Counter,
    pub dropped: Counter,
    /// Presence writes Redis did not take (repaired by the next refresh).
    pub errors: Counter,
}

impl Default for Presence {
    fn default() -> Presence {
        Presence {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            entries: AtomicUsize::new(0),
            joins: Counter::default(),
            leaves: Counter::default(),
            dropped: Counter::default(),
            errors: Counter::default(),
        }
    }
}

impl Presence {
    fn stripe(&self, channel: &str) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        lock(&self.stripes[stripe_of(channel, STRIPES)])
    }

    /// A connection of `user` (none: anonymous) subscribed to `channel`
    /// (`joined`) or left it. `then` runs under the table's lock with the
    /// user's connections here after the change (so whatever it queues is
    /// in the order of the changes), unless nothing changed.
    pub(crate) fn change(&self, channel: &Arc<str>, user: Option<&str>, joined: bool, then: impl FnOnce(u64)) {
        let mut map = self.stripe(channel);
        let count = if joined { self.add(&mut map, channel, user) } else { self.remove(&mut map, channel, user) };
        if let Some(n) = count {
            then(n);
        }
    }

    fn add(&self, map: &mut HashMap<Arc<str>, Entry>, channel: &Arc<str>, user: Option<&str>) -> Option<u64> {
        let e = map.entry(Arc::clone(channel)).or_default();
        e.clients += 1;
        let Some(user) = user else {
            e.anonymous += 1;
            if e.anonymous == 1 {
                self.entries.fetch_add(1, Ordering::Relaxed);
            }
            return Some(e.anonymous);
        };
        match e.users.get_mut(user) {
            Some(n) => {
                *n += 1;
                Some(u64::from(*n))
            }
            None => {
                e.users.insert(user.into(), 1);
                self.entries.fetch_add(1, Ordering::Relaxed);
                Some(1)
            }
        }
    }

    fn remove(&self, map: &mut HashMap<Arc<str>, Entry>, channel: &str, user: Option<&str>) -> Option<u64> {
        let e = map.get_mut(channel)?;
        let left = match user {
            Some(user) => {
                let n = e.users.get_mut(user)?;
                *n -= 1;
                let left = u64::from(*n);
                if left == 0 {
                    e.users.remove(user);
                    self.entries.fetch_sub(1, Ordering::Relaxed);
                }
                left
            }
            None if e.anonymous == 0 => return None,
            None => {
                e.anonymous -= 1;
                if e.anonymous == 0 {
                    self.entries.fetch_sub(1, Ordering::Relaxed);
                }
                e.anonymous
            }
        };
        e.clients -= 1;
        if e.clients == 0 {
            map.remove(channel);
        }
        Some(left)
    }

    /// Queues `user`'s join (or leave) of `channel` on the shards with
    /// subscribers to it, and counts it.
    pub(crate) fn announce(&self, router: &crate::router::Router, channel: &str, user: &str, join: bool) {
        use crate::router::Routed;
        let event = || Arc::new(crate::message::Message::presence(channel.into(), user, join));
        match router.dispatch(channel, event) {
            Routed::Queued if join => self.joins.inc(),
            Routed::Queued => self.leaves.inc(),
            Routed::Full => self.dropped.inc(),
            Routed::NoInterest => {}
        }
    }

    /// This node's presence in `channel`.
    pub(crate) fn read(&self, channel: &str) -> Snapshot {
        let map = self.stripe(channel);
        let Some(e) = map.get(channel) else { return Snapshot::default() };
        let mut users: Vec<Arc<str>> = e.users.keys().cloned().collect();
        users.sort_unstable();
        Snapshot { clients: e.clients, users }
    }

    /// Every channel's entries, as (channel, [(user, connections)]), the
    /// anonymous ones under the user `""`.
    pub(crate) fn all(&self) -> Vec<(Arc<str>, Users)> {
        let mut out = Vec::new();
        for s in self.stripes.iter() {
            for (ch, e) in lock(s).iter() {
                let mut list: Vec<(Arc<str>, u64)> = e.users.iter().map(|(u, &n)| (Arc::clone(u), u64::from(n))).collect();
                if e.anonymous > 0 {
                    list.push(("".into(), e.anonymous));
                }
                out.push((Arc::clone(ch), list));
            }
        }
        out
    }

    /// (channel, user) entries held.
    pub(crate) fn entries(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The user's connections after the change, or None when nothing changed.
    fn change(p: &Presence, ch: &Arc<str>, user: Option<&str>, joined: bool) -> Option<u64> {
        let mut after = None;
        p.change(ch, user, joined, |n| after = Some(n));
        after
    }

    #[test]
    fn users_are_counted_once_and_connections_each() {
        let p = Presence::default();
        let ch: Arc<str> = "chat:1".into();
        assert_eq!(change(&p, &ch, Some("42"), true), Some(1), "the user's first connection");
        assert_eq!(change(&p, &ch, Some("42"), true), Some(2), "a second device");
        assert_eq!(change(&p, &ch, Some("7"), true), Some(1));
        assert_eq!(change(&p, &ch, None, true), Some(1), "anonymous connections are counted together");
        assert_eq!(p.read("chat:1"), Snapshot { clients: 4, users: vec!["42".into(), "7".into()] });
        assert_eq!(p.entries(), 3);
        assert_eq!(change(&p, &ch, Some("42"), false), Some(1), "one device left");
        assert_eq!(change(&p, &ch, Some("42"), false), Some(0), "the last one");
        assert_eq!(change(&p, &ch, None, false), Some(0));
        assert_eq!(p.entries(), 1);
        assert_eq!(p.all(), vec![(Arc::clone(&ch), vec![("7".into(), 1)])]);
        assert_eq!(change(&p, &ch, Some("7"), false), Some(0));
        assert_eq!(p.read("chat:1"), Snapshot::default());
        assert_eq!(p.entries(), 0);
        assert_eq!(change(&p, &ch, Some("7"), false), None, "nothing to remove");
        assert_eq!(change(&p, &ch, None, false), None);
    }
}
