//! The publisher connection and the scripts it runs.
//!
//! One Lua script increments the channel's counter, reads or creates its
//! epoch and PUBLISHes (SPUBLISH) the message carrying both: an offset is
//! never spent without its message, and every node sees one order per
//! channel.

use std::time::Duration;

use super::wire::{self, Names};
use crate::message::{BrokerDown, Epoch, PublishError, Published, Uncertain};
use crate::proto::json::Payload;

const PUBLISH_LUA: &str = r"
local o = redis.call('HINCRBY', KEYS[1], 'o', 1)
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e)
end
if ARGV[3] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call(ARGV[4], KEYS[2], 'h1|' .. e .. '|' .. o .. '|' .. ARGV[2])
return {o, e}
";

const EPOCH_LUA: &str = r"
redis.call('HSETNX', KEYS[1], 'e', ARGV[1])
if ARGV[2] ~= '0' and redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('HGET', KEYS[1], 'e')
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
    pub(crate) async fn connect(cluster: bool, seeds: &[redis::ConnectionInfo], timeout: Duration) -> redis::RedisResult<Publisher> {
        if cluster {
            // No retries: a publish retried after an I/O error could run its
            // script twice (two offsets for one message).
            let client = redis::cluster::ClusterClient::builder(seeds.to_vec())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(0)
                .build()?;
            Ok(Publisher::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(seeds[0].clone())?;
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            Ok(Publisher::Single(redis::aio::ConnectionManager::new_with_config(client, cfg).await?))
        }
    }

    /// Runs a script on a clone of the connection (clones share it).
    async fn invoke<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> redis::RedisResult<T> {
        match self.clone() {
            Publisher::Single(mut c) => inv.invoke_async(&mut c).await,
            Publisher::Cluster(mut c) => inv.invoke_async(&mut c).await,
        }
    }
}

/// The scripts, with what they need to name keys.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub names: Names,
    sharded: bool,
    timeout: Duration,
    ttl_ms: u64,
    publish: redis::Script,
    epoch: redis::Script,
}

impl Scripts {
    pub(crate) fn new(names: Names, sharded: bool, timeout: Duration, ttl_ms: u64) -> Scripts {
        Scripts { names, sharded, timeout, ttl_ms, publish: redis::Script::new(PUBLISH_LUA), epoch: redis::Script::new(EPOCH_LUA) }
    }

    /// Publishes through Redis: the offset and epoch come back from it.
    pub(crate) async fn publish(&self, publisher: &Publisher, channel: &str, payload: &Payload) -> Result<Published, PublishError> {
        let mut inv = self.publish.prepare_invoke();
        inv.key(self.names.meta_key(channel))
            .key(self.names.channel(channel))
            .arg(Epoch::random().as_str())
            .arg(wire::encode_tail(payload))
            .arg(self.ttl_ms)
            .arg(if self.sharded { "SPUBLISH" } else { "PUBLISH" });
        match tokio::time::timeout(self.timeout, publisher.invoke::<(u64, String)>(&inv)).await {
            Ok(Ok((offset, epoch))) => match Epoch::parse(epoch.as_bytes()) {
                Some(epoch) => Ok(Published { channel: channel.into(), offset, epoch }),
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

    /// The channel's epoch in Redis (created if it has none yet).
    pub(crate) async fn fetch_epoch(&self, publisher: &Publisher, channel: &str) -> Option<Epoch> {
        let mut inv = self.epoch.prepare_invoke();
        inv.key(self.names.meta_key(channel)).arg(Epoch::random().as_str()).arg(self.ttl_ms);
        match tokio::time::timeout(self.timeout, publisher.invoke::<String>(&inv)).await {
            Ok(Ok(e)) => Epoch::parse(e.as_bytes()),
            _ => None,
        }
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
