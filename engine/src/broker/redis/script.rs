//! The publisher connection and the scripts it runs.
//!
//! - The publish script increments the channel's counter, reads or creates
//!   its epoch, appends the message to the channel's stream (its history)
//!   and PUBLISHes (SPUBLISH) it carrying both: an offset is never spent
//!   without its message, a message is in history exactly when it was
//!   published, and every node sees one order per channel. Given an
//!   idempotency key it first looks the key up, and answers a repeat with
//!   the first publish's offset and epoch, publishing nothing.
//! - The read script reads the epoch (creating it), the top and a range of
//!   the stream at one instant.
//!
//! A new epoch empties the stream: it holds one epoch's messages, its ids
//! being their offsets (`17-0`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::wire::{self, Names};
use crate::message::{BrokerDown, Epoch, Message, Position, PublishError, Published, Uncertain};
use crate::proto::json::Payload;

const PUBLISH_LUA: &str = r"
if KEYS[4] then
  local first = redis.call('GET', KEYS[4])
  if first then
    local bar = string.find(first, '|', 1, true)
    return {tonumber(string.sub(first, 1, bar - 1)), string.sub(first, bar + 1), 1}
  end
end
local o = redis.call('HINCRBY', KEYS[1], 'o', 1)
-- Integers as digits (Lua's default number format is %.14g).
local n = string.format('%d', o)
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e)
  redis.call('DEL', KEYS[3])
end
if ARGV[3] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
if ARGV[5] ~= '0' then
  local t = redis.call('TIME')
  local ms = t[1] * 1000 + math.floor(t[2] / 1000)
  local add = {'XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], n .. '-0', 'd', ARGV[2], 't', string.format('%d', ms)}
  local r = redis.pcall(unpack(add))
  if type(r) == 'table' and r.err then
    -- The stream holds ids past this epoch's counter (written by hand?):
    -- it is not this epoch's history any more.
    redis.log(redis.LOG_WARNING, 'herald: history stream ' .. KEYS[3] .. ' out of order, emptied: ' .. r.err)
    redis.call('DEL', KEYS[3])
    redis.call(unpack(add))
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
redis.call(ARGV[4], KEYS[2], 'h1|' .. e .. '|' .. n .. '|' .. ARGV[2])
if KEYS[4] then redis.call('SET', KEYS[4], n .. '|' .. e, 'PX', ARGV[7]) end
return {o, e, 0}
";

const READ_LUA: &str = r"
if redis.call('HSETNX', KEYS[1], 'e', ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2])
end
if ARGV[2] ~= '0' and redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local e = redis.call('HGET', KEYS[1], 'e')
local o = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local count = tonumber(ARGV[5])
local entries = {}
if count > 0 then
  if ARGV[6] == 'latest' then
    entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', count)
  elseif (ARGV[6] == 'after' or ARGV[6] == 'recent') and ARGV[3] == e then
    local since = tonumber(ARGV[4])
    if since < o and (ARGV[7] == '0' or o - since <= count) then
      local from = string.format('%d', since + 1) .. '-0'
      if ARGV[6] == 'after' then
        entries = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', count)
      else
        entries = redis.call('XREVRANGE', KEYS[2], '+', from, 'COUNT', count)
      end
    end
  end
end
return {e, o, now, entries}
";

/// The slot map of a cluster: `(first slot, last slot, node address)`.
pub(crate) type SlotMap = Vec<(u16, u16, (String, u16))>;

/// A connection that runs commands (redis-rs reconnects it by itself).
#[derive(Clone)]
pub(crate) enum Publisher {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Publisher {
    pub(crate) async fn connect(
        cluster: bool,
        seeds: &[redis::ConnectionInfo],
        certs: Option<redis::TlsCertificates>,
        timeout: Duration,
    ) -> redis::RedisResult<Publisher> {
        if cluster {
            // No retries: a publish retried after an I/O error could run its
            // script twice (two offsets for one message).
            let mut builder =
                redis::cluster::ClusterClient::builder(seeds.to_vec()).connection_timeout(timeout).response_timeout(timeout).retries(0);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            Ok(Publisher::Cluster(builder.build()?.get_async_connection().await?))
        } else {
            let client = match certs {
                Some(certs) => redis::Client::build_with_tls(seeds[0].clone(), certs)?,
                None => redis::Client::open(seeds[0].clone())?,
            };
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            Ok(Publisher::Single(redis::aio::ConnectionManager::new_with_config(client, cfg).await?))
        }
    }

    /// Runs a script on a clone of the connection (clones share it).
    pub(crate) async fn invoke<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> redis::RedisResult<T> {
        match self.clone() {
            Publisher::Single(mut c) => inv.invoke_async(&mut c).await,
            Publisher::Cluster(mut c) => inv.invoke_async(&mut c).await,
        }
    }
}

/// What the scripts are told of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// The counter's expiry after the channel's last publish (0: never).
    pub counter_ttl_ms: u64,
    /// Each channel's history: messages kept in its stream, at least (0:
    /// none), and for how long, by namespace.
    pub rules: crate::config::ChannelRules,
    pub idempotency_window_ms: u64,
}

impl Limits {
    /// `channel`'s history size and TTL in ms.
    pub(crate) fn history(&self, channel: &str) -> (usize, u64) {
        let r = self.rules.of(channel);
        (r.history_size, r.history_ttl_s.saturating_mul(1000).max(1))
    }
}

impl Limits {
    pub(crate) fn from_config(c: &crate::config::Config) -> Limits {
        Limits {
            counter_ttl_ms: c.redis_counter_ttl_ms,
            rules: crate::config::ChannelRules::from_config(c),
            idempotency_window_ms: c.idempotency_window_s.saturating_mul(1000).max(1),
        }
    }
}

/// What a read of a channel's stream asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Read {
    /// The epoch and top only.
    Top,
    /// Messages after `since`, the first `count` of them; with `capped`,
    /// none unless all of them (top − since) fit in `count`.
    After { since: Position, count: usize, capped: bool },
    /// Messages after `since`, the last `count` of them (what a
    /// subscriber at or after `since` can recover); with `capped` as above.
    Recent { since: Position, count: usize, capped: bool },
    /// The latest `count` messages.
    Latest(usize),
}

/// A channel's epoch, top and the messages a [`Read`] asked for (in
/// order, none older than `history_ttl_s`).
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub epoch: Epoch,
    pub top: u64,
    pub history: VecDeque<Arc<Message>>,
}

/// Why a script's answer was not used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScriptError {
    #[error("no answer within {0} ms")]
    Timeout(u128),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Parse(#[from] redis::ParsingError),
    #[error("unexpected answer: {0}")]
    Answer(&'static str),
}

/// The scripts, with what they need to name keys.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub names: Names,
    sharded: bool,
    timeout: Duration,
    limits: Limits,
    publish: redis::Script,
    read: redis::Script,
}

impl Scripts {
    pub(crate) fn new(names: Names, sharded: bool, timeout: Duration, limits: Limits) -> Scripts {
        Scripts { names, sharded, timeout, limits, publish: redis::Script::new(PUBLISH_LUA), read: redis::Script::new(READ_LUA) }
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Publishes through Redis: the offset and epoch come back from it,
    /// and whether it repeated an earlier publish with the same
    /// idempotency key (which published nothing).
    pub(crate) async fn publish(
        &self,
        publisher: &Publisher,
        channel: &str,
        payload: &Payload,
        key: Option<&str>,
    ) -> Result<(Published, bool), PublishError> {
        let l = &self.limits;
        let (size, ttl_ms) = l.history(channel);
        let mut inv = self.publish.prepare_invoke();
        inv.key(self.names.meta_key(channel)).key(self.names.channel(channel)).key(self.names.stream_key(channel));
        if let Some(key) = key {
            inv.key(self.names.idempotency_key(channel, key));
        }
        inv.arg(Epoch::random().as_str())
            .arg(wire::encode_tail(payload))
            .arg(l.counter_ttl_ms)
            .arg(if self.sharded { "SPUBLISH" } else { "PUBLISH" })
            .arg(size)
            .arg(ttl_ms)
            .arg(l.idempotency_window_ms);
        match tokio::time::timeout(self.timeout, publisher.invoke::<(u64, String, u8)>(&inv)).await {
            Ok(Ok((offset, epoch, repeat))) => match Epoch::parse(epoch.as_bytes()) {
                Some(epoch) => Ok((Published { channel: channel.into(), offset, epoch }, repeat == 1)),
                // The script published with that epoch, and every node drops
                // the message as malformed: it reached no one.
                None => {
                    Err(PublishError::NotPublished(BrokerDown::Refused(format!("the channel's epoch in Redis is malformed: {epoch:?}"))))
                }
            },
            // An I/O error may come after the command was sent: the script
            // may have run. A refused connection, or Redis's own error reply
            // (the command was refused, or the script failed before it
            // published), is sure.
            Ok(Err(e)) if e.is_io_error() && !e.is_connection_refusal() => {
                Err(PublishError::OutcomeUnknown(Uncertain::ConnectionLost(e.to_string())))
            }
            Ok(Err(e)) => Err(PublishError::NotPublished(BrokerDown::Refused(e.to_string()))),
            Err(_) => Err(PublishError::OutcomeUnknown(Uncertain::Timeout(self.timeout.as_millis() as u64))),
        }
    }

    /// Reads a channel's epoch (created if it has none yet), its top and
    /// what `what` asks of its stream, in one script.
    pub(crate) async fn read(&self, publisher: &Publisher, channel: &Arc<str>, what: Read) -> Result<Snapshot, ScriptError> {
        let l = &self.limits;
        let (since, count, mode, capped) = match what {
            Read::Top => (None, 0, "top", false),
            Read::After { since, count, capped } => (Some(since), count, "after", capped),
            Read::Recent { since, count, capped } => (Some(since), count, "recent", capped),
            Read::Latest(count) => (None, count, "latest", false),
        };
        let (size, ttl_ms) = l.history(channel);
        let count = if size == 0 { 0 } else { count };
        let mut inv = self.read.prepare_invoke();
        inv.key(self.names.meta_key(channel))
            .key(self.names.stream_key(channel))
            .arg(Epoch::random().as_str())
            .arg(l.counter_ttl_ms)
            .arg(since.map_or(String::new(), |p| p.epoch.to_string()))
            .arg(since.map_or(0, |p| p.offset))
            .arg(count)
            .arg(mode)
            .arg(if capped { "1" } else { "0" });
        let (epoch, top, now_ms, entries) =
            match tokio::time::timeout(self.timeout, publisher.invoke::<(String, u64, u64, Vec<redis::Value>)>(&inv)).await {
                Ok(r) => r?,
                Err(_) => return Err(ScriptError::Timeout(self.timeout.as_millis())),
            };
        let epoch = Epoch::parse(epoch.as_bytes()).ok_or(ScriptError::Answer("the channel's epoch in Redis is malformed"))?;
        let oldest = now_ms.saturating_sub(ttl_ms);
        let mut history = VecDeque::with_capacity(entries.len());
        for entry in entries {
            let (id, fields) = redis::from_redis_value::<(String, Vec<Bytes>)>(entry)?;
            let offset =
                id.split_once('-').and_then(|(o, _)| o.parse::<u64>().ok()).filter(|o| *o > 0).ok_or(ScriptError::Answer("a stream id"))?;
            let (mut data, mut at) = (None, 0u64);
            for pair in fields.chunks_exact(2) {
                match &pair[0][..] {
                    b"d" => data = Some(pair[1].clone()),
                    b"t" => at = std::str::from_utf8(&pair[1]).ok().and_then(|t| t.parse().ok()).unwrap_or(0),
                    _ => {}
                }
            }
            let payload = data.and_then(|d| wire::parse_tail(&d)).ok_or(ScriptError::Answer("a stream entry"))?;
            // Older than the history's ttl: as good as gone.
            if at < oldest || offset > top {
                continue;
            }
            history.push_back(Arc::new(Message::new(Arc::clone(channel), epoch, offset, payload)));
        }
        if mode == "latest" || mode == "recent" {
            history.make_contiguous().reverse();
        }
        Ok(Snapshot { epoch, top, history })
    }
}

/// Why the slot map could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SlotsError {
    #[error("not a cluster connection")]
    NotCluster,
    #[error("no answer in time")]
    Timeout,
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("CLUSTER SLOTS answered something other than an array")]
    NotArray,
}

/// Reads `CLUSTER SLOTS` into a slot map of the masters; `seed_host`
/// stands in for a master announced without a host.
pub(crate) async fn cluster_slots(publisher: &Publisher, timeout: Duration, seed_host: &str) -> Result<SlotMap, SlotsError> {
    let Publisher::Cluster(mut c) = publisher.clone() else { return Err(SlotsError::NotCluster) };
    let v: redis::Value =
        tokio::time::timeout(timeout, redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c)).await.map_err(|_| SlotsError::Timeout)??;
    let mut map = Vec::new();
    let redis::Value::Array(ranges) = v else { return Err(SlotsError::NotArray) };
    for r in ranges {
        let redis::Value::Array(r) = r else { continue };
        let (Some(redis::Value::Int(a)), Some(redis::Value::Int(b)), Some(redis::Value::Array(master))) = (r.first(), r.get(1), r.get(2))
        else {
            continue;
        };
        let host = match master.first() {
            Some(redis::Value::BulkString(h)) if !h.is_empty() => String::from_utf8_lossy(h).into_owned(),
            _ => seed_host.to_string(),
        };
        let Some(redis::Value::Int(port)) = master.get(1) else { continue };
        map.push((*a as u16, *b as u16, (host, *port as u16)));
    }
    Ok(map)
}
