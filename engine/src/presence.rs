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

    /// A connection of `user` (none: anonymous) subscribed to `channel`.
    /// Returns whether it is the user's first on this node.
    pub(crate) fn add(&self, channel: &Arc<str>, user: Option<&str>) -> bool {
        let mut map = self.stripe(channel);
        let e = map.entry(Arc::clone(channel)).or_default();
        e.clients += 1;
        let Some(user) = user else {
            e.anonymous += 1;
            if e.anonymous == 1 {
                self.entries.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        };
        match e.users.get_mut(user) {
            Some(n) => {
                *n += 1;
                false
            }
            None => {
                e.users.insert(user.into(), 1);
                self.entries.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }

    /// A connection of `user` left `channel`. Returns whether it was the
    /// user's last on this node.
    pub(crate) fn remove(&self, channel: &str, user: Option<&str>) -> bool {
        let mut map = self.stripe(channel);
        let Some(e) = map.get_mut(channel) else { return false };
        let mut last = false;
        match user {
            Some(user) => {
                let Some(n) = e.users.get_mut(user) else { return false };
                *n -= 1;
                if *n == 0 {
                    e.users.remove(user);
                    self.entries.fetch_sub(1, Ordering::Relaxed);
                    last = true;
                }
            }
            None if e.anonymous == 0 => return false,
            None => {
                e.anonymous -= 1;
                if e.anonymous == 0 {
                    self.entries.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        e.clients -= 1;
        if e.clients == 0 {
            map.remove(channel);
        }
        last
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

    #[test]
    fn users_are_counted_once_and_connections_each() {
        let p = Presence::default();
        let ch: Arc<str> = "chat:1".into();
        assert!(p.add(&ch, Some("42")), "the user's first connection");
        assert!(!p.add(&ch, Some("42")), "a second device");
        assert!(p.add(&ch, Some("7")));
        assert!(!p.add(&ch, None), "anonymous: no user");
        assert_eq!(p.read("chat:1"), Snapshot { clients: 4, users: vec!["42".into(), "7".into()] });
        assert_eq!(p.entries(), 3);
        assert!(!p.remove("chat:1", Some("42")), "one device left");
        assert!(p.remove("chat:1", Some("42")), "the last one");
        assert!(!p.remove("chat:1", None));
        assert_eq!(p.entries(), 1);
        assert_eq!(p.all(), vec![(ch, vec![("7".into(), 1)])]);
        assert!(p.remove("chat:1", Some("7")));
        assert_eq!(p.read("chat:1"), Snapshot::default());
        assert_eq!(p.entries(), 0);
        assert!(!p.remove("chat:1", Some("7")), "nothing to remove");
    }
}
