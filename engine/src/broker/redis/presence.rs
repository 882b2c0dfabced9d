//! Presence in Redis: for channel `chat:1`, the hash
//! `herald:{chat:1}:presence` (field `<node>|<user>`, the user's
//! connections on that node; `<node>|` for anonymous ones) and the sorted
//! set `herald:{chat:1}:presence:nodes` (each node, scored with the time
//! its entries expire). The hash tag keeps both in the channel's slot.
//!
//! - Each subscribe or unsubscribe of a presence channel runs the update
//!   script on the shard's own connection. When a user's field appears
//!   (or goes) and no other live node has the user, the script publishes
//!   the `join` (`leave`) event on the channel's pub/sub channel, as
//!   `p1|j|<node>|<user>` (`p1|l|…`): every other node with subscribers
//!   delivers it, and this node delivers it itself once the script
//!   answers (its own Redis subscription may not be in place yet).
//! - Every `presence_ttl_s / 3` each node refreshes its score in every
//!   presence channel it has entries in. A node whose score passed is dead:
//!   the first live node to refresh removes its fields, and announces the
//!   leave of its users found nowhere else.
//! - Redis losing its data (a restart without persistence) loses presence:
//!   it counts the subscriptions made after. (Writing a node's whole table
//!   back would race the updates in flight from its shards.)
//! - A read counts the fields of live nodes only.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::script::Publisher;
use super::Shared;
use crate::broker::HistoryError;
use crate::presence::Snapshot;
use crate::router::Routed;

const UPDATE_LUA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[4])
local f = ARGV[1] .. '|' .. ARGV[2]
local n = redis.call('HINCRBY', KEYS[1], f, ARGV[3])
if n <= 0 then redis.call('HDEL', KEYS[1], f) end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local join = ARGV[3] == '1'
if ARGV[5] == '1' and ARGV[2] ~= '' and ((join and n == 1) or (not join and n <= 0)) then
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')) do
    if other ~= ARGV[1] and redis.call('HEXISTS', KEYS[1], other .. '|' .. ARGV[2]) == 1 then return {n, 0} end
  end
  redis.call(ARGV[6], KEYS[3], 'p1|' .. (join and 'j' or 'l') .. '|' .. ARGV[1] .. '|' .. ARGV[2])
  return {n, 1}
end
return {n, 0}
";

const REFRESH_LUA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[2])
local gone = {}
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
      if u ~= '' then gone[u] = true end
    end
  end
end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local left = {}
if ARGV[3] == '1' then
  local live = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
  for u, _ in pairs(gone) do
    local found = false
    for _, n in ipairs(live) do
      if redis.call('HEXISTS', KEYS[1], n .. '|' .. u) == 1 then found = true break end
    end
    if not found then
      redis.call(ARGV[4], KEYS[3], 'p1|l|' .. ARGV[1] .. '|' .. u)
      left[#left + 1] = u
    end
  end
end
return {#dead, left}
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
    update: redis::Script,
    refresh: redis::Script,
    read: redis::Script,
}

impl Default for PresenceScripts {
    fn default() -> PresenceScripts {
        PresenceScripts {
            update: redis::Script::new(UPDATE_LUA),
            refresh: redis::Script::new(REFRESH_LUA),
            read: redis::Script::new(READ_LUA),
        }
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

    /// One connection of `user` ("" anonymous) more (`delta` 1) or fewer
    /// (-1) in `channel` on this node; `announce`: join and leave events.
    pub(crate) async fn presence_update(
        &self,
        channel: &str,
        user: &str,
        delta: i8,
        announce: bool,
        shard: Option<usize>,
    ) -> Result<(), String> {
        let p = self.publisher_for(shard).ok_or("not connected to Redis")?;
        let mut inv = self.presence_scripts.update.prepare_invoke();
        self.presence_keys(&mut inv, channel);
        inv.arg(&*self.node).arg(user).arg(delta).arg(self.presence_ttl_ms).arg(if announce { "1" } else { "0" }).arg(self.publish_verb());
        let (_, announced) = invoke::<(i64, u8)>(p, &inv, self.timeout).await?;
        if announced == 1 {
            self.presence_event(channel, user, delta == 1);
        }
        Ok(())
    }

    /// Delivers a join or leave event to this node's subscribers.
    pub(crate) fn presence_event(&self, channel: &str, user: &str, join: bool) {
        let event = || Arc::new(crate::message::Message::presence(channel.into(), user, join));
        match self.router.dispatch(channel, event) {
            Routed::Queued if join => self.presence.joins.inc(),
            Routed::Queued => self.presence.leaves.inc(),
            Routed::Full => self.presence.dropped.inc(),
            Routed::NoInterest => {}
        }
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

    /// Refreshes this node's score in each presence channel it has
    /// entries in, sweeping dead nodes' entries; runs until the broker
    /// stops.
    pub(crate) async fn refresh_presence(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let every = Duration::from_millis(self.presence_ttl_ms / 3).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let Some(p) = self.publisher.get() else { continue };
            for (channel, _) in self.presence.all() {
                let rules = self.scripts.limits().rules.of(&channel);
                let mut inv = self.presence_scripts.refresh.prepare_invoke();
                self.presence_keys(&mut inv, &channel);
                inv.arg(&*self.node).arg(self.presence_ttl_ms).arg(if rules.join_leave { "1" } else { "0" }).arg(self.publish_verb());
                match invoke::<(u64, Vec<String>)>(p, &inv, self.timeout).await {
                    Ok((dead, left)) => {
                        if dead > 0 {
                            self.metrics.presence_swept.fetch_add(dead, Ordering::Relaxed);
                            tracing::info!(%channel, nodes = dead, left = left.len(), "removed the presence of nodes that stopped refreshing it");
                        }
                        for user in &left {
                            self.presence_event(&channel, user, false);
                        }
                    }
                    Err(e) => {
                        self.presence.errors.inc();
                        tracing::debug!(%channel, error = %e, "cannot refresh presence");
                    }
                }
            }
        }
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
