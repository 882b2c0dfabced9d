//! Brokers: where a publish goes before it reaches the shards.
//!
//! - [`local`]: the default, in-process broker. Offsets and epochs live in
//!   this node's channel table.
//! - [`redis`]: `redis` and `redis-cluster`. Offsets and epochs live in
//!   Redis; every node delivers what comes back from Redis.

pub(crate) mod local;
pub(crate) mod redis;

use std::sync::Arc;

use crate::message::Epoch;
use crate::proto::ErrorCode;

/// A publish accepted by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The channel.
    pub channel: Arc<str>,
    /// The message's offset in its channel (from 1).
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: Epoch,
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The channel name breaks the rules.
    #[error("{0}")]
    BadChannel(#[from] crate::proto::channel::ChannelError),
    /// The payload is over the maximum message size.
    #[error("payload is {size} bytes, over the limit of {max}")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A shard's queue is full; retry later.
    #[error("server overloaded: a shard queue is full")]
    Overloaded,
    /// The channel table is full of channels with subscribers.
    #[error("channel limit reached")]
    ChannelLimit,
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The broker (Redis) did not take the publish: it could not be
    /// reached (nothing was published), or did not answer in time (the
    /// message may have been published; the text says which).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

impl PublishError {
    /// The protocol error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            PublishError::BadChannel(_) => ErrorCode::BadChannel,
            PublishError::TooLarge { .. } => ErrorCode::TooLarge,
            PublishError::Overloaded => ErrorCode::Overloaded,
            PublishError::ChannelLimit => ErrorCode::Limit,
            PublishError::ShuttingDown | PublishError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}
