//! Presence in Redis: for channel `chat:1`, the hash
//! `herald:{chat:1}:presence` (field `<node>|<user>`: the user's
//! connections on that node; `<node>|` for anonymous ones) and the sorted
//! set `herald:{chat:1}:presence:nodes` (each node, scored with the time
//! its entries expire). The hash tag keeps both in the channel's slot.
//!
//! - One writer per node, a task on the broker thread, writes the node's
//!   entries in the order the node's table changed: shards queue each
//!   change (the user's connection count after it, taken under the table's
//!   lock) in a bounded queue, and the writer sets the absolute count.
//!   Counts are absolute, so a write that failed is repaired by any later
//!   one, and a burst of changes to one entry is written once (the last).
//!   A full queue turns into a rewrite of every channel, never a lost
//!   change.
//! - When a user's entry on this node appears or goes and no other live
//!   node has the user, the script publishes `join` (`leave`) on the
//!   channel's pub/sub channel as `p1|j|<node>|<user>` (`p1|l|…`): every
//!   other node delivers it, and this node delivers it itself once the
//!   script answers (its own Redis subscription may not be in place yet).
//! - Every `presence_ttl_s / 3` the writer rewrites the node's entries of
//!   every presence channel from its table (repairing what a failed write
//!   or a Redis restart lost) and renews its score. A node whose score
//!   passed is dead: the first live node to refresh removes its entries,
//!   and announces the leave of its users found nowhere else.
//! - When the node stops, the writer removes its entries and announces
//!   the leave of its users, so a rolling restart does not count them
//!   twice.
//! - A read counts the entries of live nodes only.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::script::Publisher;
use super::Shared;
use crate::broker::HistoryError;
use crate::presence::Snapshot;

/// Changes waiting for the writer; past it, a rewrite of every channel.
pub(crate) const QUEUE: usize = 65_536;

/// How long a stopping node spends removing its entries, at most (within
/// the 2 s `RedisBroker::stop` waits for the broker thread).
const RETIRE_WITHIN: Duration = Duration::from_millis(1500);

/// One change of the node's table: `user`'s connections on this node in
/// `channel` are now `count`.
#[derive(Debug)]
pub(crate) struct Change {
    pub channel: Arc<str>,
    pub user: Arc<str>,
    pub count: u64,
    pub announce: bool,
}

/// Sets one user's count on this node. KEYS: hash, nodes, pub/sub channel.
/// ARGV: node, user, count, ttl ms, announce, publish verb. Returns
/// whether it announced.
const SET_LUA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[4])
local f = ARGV[1] .. '|' .. ARGV[2]
local old = tonumber(redis.call('HGET', KEYS[1], f) or '0')
local n = tonumber(ARGV[3])
if n > 0 then redis.call('HSET', KEYS[1], f, ARGV[3]) else redis.call('HDEL', KEYS[1], f) end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
if ARGV[5] == '1' and ARGV[2] ~= '' and (old > 0) ~= (n > 0) then
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')) do
    if other ~= ARGV[1] and redis.call('HEXISTS', KEYS[1], other .. '|' .. ARGV[2]) == 1 then return 0 end
  end
  redis.call(ARGV[6], KEYS[3], 'p1|' .. (n > 0 and 'j' or 'l') .. '|' .. ARGV[1] .. '|' .. ARGV[2])
  return 1
end
return 0
";

/// Sweeps dead nodes and rewrites this node's entries (none: the node
/// leaves the channel). KEYS as above. ARGV: node, ttl ms, announce,
/// publish verb, then user and count pairs. Returns the dead nodes swept
/// and the events published, `j<user>` or `l<user>`.
const REWRITE_LUA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[2])
local node = ARGV[1]
local changed = {}
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
if #dead > 0 then
  local isdead = {}
  for _, d in ipairs(dead) do isdead[d] = true end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    local bar = string.find(f, '|', 1, true)
    if bar and isdead[string.sub(f, 1, bar - 1)] then
      redis.call('HDEL', KEYS[1], f)
      local u = string.sub(f, bar + 1)
      if u ~= '' then changed[u] = 'l' end
    end
  end
end
local mine = node .. '|'
local keep = {}
for i = 5, #ARGV, 2 do keep[ARGV[i]] = ARGV[i + 1] end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, #mine) == mine then
    local u = string.sub(f, #mine + 1)
    if not keep[u] then
      redis.call('HDEL', KEYS[1], f)
      if u ~= '' then changed[u] = 'l' end
    end
  end
end
for u, c in pairs(keep) do
  if redis.call('HSET', KEYS[1], mine .. u, c) == 1 and u ~= '' then
    if changed[u] then changed[u] = nil else changed[u] = 'j' end
  end
end
if #ARGV >= 5 then
  redis.call('ZADD', KEYS[2], now + ttl, node)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('ZREM', KEYS[2], node)
end
local events = {}
if ARGV[3] == '1' then
  local live = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
  for u, kind in pairs(changed) do
    local elsewhere = false
    for _, n in ipairs(live) do
      if n ~= node and redis.call('HEXISTS', KEYS[1], n .. '|' .. u) == 1 then elsewhere = true break end
    end
    if not elsewhere then
      redis.call(ARGV[4], KEYS[3], 'p1|' .. kind .. '|' .. node .. '|' .. u)
      events[#events + 1] = kind .. u
    end
  end
end
return {#dead, events}
";

const READ_LUA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local live = {}
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')) do live[n] = true end
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f = all[i]
  local bar = string.find(f, '|', 1, true)
  if bar and live[string.sub(f, 1, bar - 1)] then
    out[#out + 1] = string.sub(f, bar + 1)
    out[#out + 1] = all[i + 1]
  end
end
return out
";

/// The presence scripts.
#[derive(Debug)]
pub(crate) struct PresenceScripts {
    set: redis::Script,
    rewrite: redis::Script,
    read: redis::Script,
}

impl Default for PresenceScripts {
    fn default() -> PresenceScripts {
        PresenceScripts { set: redis::Script::new(SET_LUA), rewrite: redis::Script::new(REWRITE_LUA), read: redis::Script::new(READ_LUA) }
    }
}

/// A presence body on a channel's pub/sub channel: (join, node, user).
pub(crate) fn parse_event(body: &[u8]) -> Option<(bool, &str, &str)> {
    let rest = body.strip_prefix(b"p1|")?;
    let (kind, rest) = (rest.first()?, rest.get(1..)?.strip_prefix(b"|")?);
    let bar = rest.iter().position(|&b| b == b'|')?;
    let (node, user) = (std::str::from_utf8(&rest[..bar]).ok()?, std::str::from_utf8(&rest[bar + 1..]).ok()?);
    if user.is_empty() {
        return None;
    }
    match kind {
        b'j' => Some((true, node, user)),
        b'l' => Some((false, node, user)),
        _ => None,
    }
}

async fn invoke<T: redis::FromRedisValue>(p: &Publisher, inv: &redis::ScriptInvocation<'_>, timeout: Duration) -> Result<T, String> {
    match tokio::time::timeout(timeout, p.invoke::<T>(inv)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

impl Shared {
    fn presence_keys<'a>(&self, inv: &mut redis::ScriptInvocation<'a>, channel: &str) {
        let n = &self.scripts.names;
        inv.key(n.presence_key(channel)).key(n.presence_nodes_key(channel)).key(n.channel(channel));
    }

    fn publish_verb(&self) -> &'static str {
        if self.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// Queues a change of the node's table for the writer (called under
    /// the table's lock, so the queue holds the changes in their order).
    pub(crate) fn presence_changed(&self, change: Change) {
        if self.presence_queue.push(change).is_err() {
            self.presence_overflow.store(true, Ordering::Release);
        }
        self.presence_wake.notify_one();
    }

    /// Sets one entry; returns whether a join or leave was announced.
    async fn set_entry(&self, p: &Publisher, c: &Change) -> Result<bool, String> {
        let mut inv = self.presence_scripts.set.prepare_invoke();
        self.presence_keys(&mut inv, &c.channel);
        inv.arg(&*self.node)
            .arg(&*c.user)
            .arg(c.count)
            .arg(self.presence_ttl_ms)
            .arg(if c.announce { "1" } else { "0" })
            .arg(self.publish_verb());
        invoke::<u8>(p, &inv, self.timeout).await.map(|a| a == 1)
    }

    /// Rewrites this node's entries of `channel` (`entries` empty: it
    /// leaves the channel), sweeping dead nodes; delivers the events it
    /// announced here.
    async fn rewrite(&self, p: &Publisher, channel: &str, entries: &[(Arc<str>, u64)]) -> Result<(), String> {
        let announce = self.scripts.limits().rules.of(channel).join_leave;
        let mut inv = self.presence_scripts.rewrite.prepare_invoke();
        self.presence_keys(&mut inv, channel);
        inv.arg(&*self.node).arg(self.presence_ttl_ms).arg(if announce { "1" } else { "0" }).arg(self.publish_verb());
        for (user, n) in entries {
            inv.arg(&**user).arg(*n);
        }
        let (dead, events) = invoke::<(u64, Vec<String>)>(p, &inv, self.timeout).await?;
        if dead > 0 {
            self.metrics.presence_swept.fetch_add(dead, Ordering::Relaxed);
            tracing::info!(%channel, nodes = dead, "removed the presence of nodes that stopped refreshing it");
        }
        for e in &events {
            if let Some(user) = e.strip_prefix('j') {
                self.presence_event(channel, user, true);
            } else if let Some(user) = e.strip_prefix('l') {
                self.presence_event(channel, user, false);
            }
        }
        Ok(())
    }

    /// The node's presence writer: applies the queued changes in order
    /// (the last of each entry), rewrites every channel every
    /// `presence_ttl_s / 3` (and after the queue overflowed), and removes
    /// the node's entries when the broker stops.
    pub(crate) async fn write_presence(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let every = Duration::from_millis(self.presence_ttl_ms / 3).max(Duration::from_millis(100));
        let mut next_rewrite = tokio::time::Instant::now() + every;
        // Channels this node may have entries in, in Redis.
        let mut written: HashSet<Arc<str>> = HashSet::new();
        loop {
            let stopping = tokio::select! {
                _ = self.presence_wake.notified() => false,
                _ = tokio::time::sleep_until(next_rewrite) => false,
                _ = stop.changed() => true,
            };
            let Some(p) = self.publisher.get() else {
                if stopping {
                    return;
                }
                // Not connected yet: the queue keeps the changes (bounded).
                next_rewrite = tokio::time::Instant::now() + every;
                continue;
            };
            self.apply_queued(p, &mut written).await;
            if stopping {
                let retire = async {
                    for channel in &written {
                        if let Err(e) = self.rewrite(p, channel, &[]).await {
                            tracing::debug!(%channel, error = %e, "cannot remove this node's presence");
                        }
                    }
                };
                let _ = tokio::time::timeout(RETIRE_WITHIN, retire).await;
                return;
            }
            let overflowed = self.presence_overflow.swap(false, Ordering::AcqRel);
            if overflowed || tokio::time::Instant::now() >= next_rewrite {
                next_rewrite = tokio::time::Instant::now() + every;
                let table: HashMap<Arc<str>, Vec<(Arc<str>, u64)>> = self.presence.all().into_iter().collect();
                // Channels the node left since, once more with no entries.
                let gone: Vec<Arc<str>> = written.iter().filter(|c| !table.contains_key(*c)).cloned().collect();
                for channel in gone {
                    match self.rewrite(p, &channel, &[]).await {
                        Ok(()) => {
                            written.remove(&channel);
                        }
                        Err(e) => {
                            self.presence.errors.inc();
                            tracing::debug!(%channel, error = %e, "cannot refresh presence");
                        }
                    }
                }
                for (channel, entries) in &table {
                    written.insert(Arc::clone(channel));
                    if let Err(e) = self.rewrite(p, channel, entries).await {
                        self.presence.errors.inc();
                        tracing::debug!(%channel, error = %e, "cannot refresh presence");
                    }
                }
            }
        }
    }

    /// Applies every queued change, the last one of each entry.
    async fn apply_queued(&self, p: &Publisher, written: &mut HashSet<Arc<str>>) {
        let mut order: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        let mut last: HashMap<(Arc<str>, Arc<str>), Change> = HashMap::new();
        while let Some(c) = self.presence_queue.pop() {
            let key = (Arc::clone(&c.channel), Arc::clone(&c.user));
            if last.insert(key.clone(), c).is_none() {
                order.push(key);
            }
        }
        for key in order {
            let Some(c) = last.remove(&key) else { continue };
            written.insert(Arc::clone(&c.channel));
            match self.set_entry(p, &c).await {
                Ok(true) => self.presence_event(&c.channel, &c.user, c.count > 0),
                Ok(false) => {}
                Err(e) => {
                    // The next rewrite repairs it.
                    self.presence.errors.inc();
                    tracing::debug!(channel = %c.channel, error = %e, "cannot write presence into Redis");
                }
            }
        }
    }

    /// Delivers a join or leave event to this node's subscribers.
    pub(crate) fn presence_event(&self, channel: &str, user: &str, join: bool) {
        self.presence.announce(&self.router, channel, user, join);
    }

    /// `channel`'s presence across the live nodes.
    pub(crate) async fn presence_read(&self, channel: &str, shard: Option<usize>) -> Result<Snapshot, HistoryError> {
        let p = self.publisher_for(shard).ok_or_else(|| HistoryError::Unavailable("not connected to Redis".into()))?;
        let mut inv = self.presence_scripts.read.prepare_invoke();
        self.presence_keys(&mut inv, channel);
        let pairs: Vec<(String, u64)> = invoke(p, &inv, self.timeout).await.map_err(HistoryError::Unavailable)?;
        let mut snap = Snapshot::default();
        let mut users = std::collections::BTreeSet::new();
        for (user, n) in pairs {
            snap.clients += n;
            if !user.is_empty() {
                users.insert(user);
            }
        }
        snap.users = users.into_iter().map(Arc::from).collect();
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_parse() {
        assert_eq!(super::parse_event(b"p1|j|n1|42"), Some((true, "n1", "42")));
        assert_eq!(super::parse_event(b"p1|l|n1|a|b"), Some((false, "n1", "a|b")));
        for bad in [&b"p1|j|n1|"[..], b"p1|x|n|1", b"p1|j|n", b"p2|j|n|1", b"p1|j|n|\xff"] {
            assert_eq!(super::parse_event(bad), None, "{bad:?}");
        }
    }
}
