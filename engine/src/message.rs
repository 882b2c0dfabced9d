//! A published message and its wire forms, each encoded at most once.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;

use crate::metrics::{Form, ShardMetrics};
use crate::proto::json::{self, Payload};

/// A channel's epoch: a short random id created with the channel's offset
/// counter. `(epoch, offset)` never repeats for a channel.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch([u8; 8]);

impl Epoch {
    /// A fresh random epoch (8 characters of `[0-9a-z]`).
    pub fn random() -> Epoch {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        let mut n = h.finish();
        let mut out = [0u8; 8];
        for b in &mut out {
            *b = b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize];
            n /= 36;
        }
        Epoch(out)
    }

    /// An epoch received as text (8 characters of `[0-9a-z]`).
    pub fn parse(s: &[u8]) -> Option<Epoch> {
        let bytes: [u8; 8] = s.try_into().ok()?;
        bytes.iter().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()).then_some(Epoch(bytes))
    }

    /// The epoch as text.
    pub fn as_str(&self) -> &str {
        // Built only from ASCII alphanumerics above.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({})", self.as_str())
    }
}

/// One published message, shared by refcount between the shards that have
/// subscribers to its channel.
#[derive(Debug)]
pub(crate) struct Message {
    pub channel: Arc<str>,
    pub offset: u64,
    pub payload: Payload,
    pub published_at: Instant,
    forms: [OnceLock<Bytes>; 4],
}

impl Message {
    pub(crate) fn new(channel: Arc<str>, offset: u64, payload: Payload) -> Message {
        Message { channel, offset, payload, published_at: Instant::now(), forms: Default::default() }
    }

    /// The complete frame or event for `form`, encoded on first use by
    /// whichever shard needs it first; every later caller shares the bytes.
    #[inline]
    pub(crate) fn frame(&self, form: Form, metrics: &ShardMetrics) -> &Bytes {
        self.forms[form as usize].get_or_init(|| {
            metrics.encoded[form as usize].inc();
            match form {
                Form::WsJson => json::ws_json(&self.channel, self.offset, &self.payload),
                Form::WsRaw => json::ws_raw(&self.payload),
                Form::SseJson => json::sse_json(&self.channel, self.offset, &self.payload),
                Form::SseRaw => json::sse_raw(&self.payload),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_short_and_distinct() {
        let a = Epoch::random();
        let b = Epoch::random();
        assert_eq!(a.as_str().len(), 8);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn each_form_is_encoded_once() {
        let m = ShardMetrics::default();
        let msg = Message::new("c".into(), 1, Payload::text("x"));
        let a = msg.frame(Form::WsJson, &m).clone();
        let b = msg.frame(Form::WsJson, &m).clone();
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same bytes are shared");
        msg.frame(Form::SseRaw, &m);
        assert_eq!(m.encoded[Form::WsJson as usize].get(), 1);
        assert_eq!(m.encoded[Form::SseRaw as usize].get(), 1);
        assert_eq!(m.encoded[Form::WsRaw as usize].get(), 0);
    }
}
