//! A published message and its wire forms, each encoded at most once; and
//! what a publish returns.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;

use crate::metrics::ShardMetrics;
use crate::proto::form::Form;
use crate::proto::json::{self, Payload};
use crate::proto::ErrorCode;

/// A channel's epoch: a short random id created with the channel's offset
/// counter. `(epoch, offset)` never repeats for a channel.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch([u8; 8]);

impl Epoch {
    /// A fresh random epoch (8 characters of `[0-9a-z]`).
    pub fn random() -> Epoch {
        const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        Epoch(std::array::from_fn(|_| DIGITS[fastrand::usize(..DIGITS.len())]))
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

/// A place in a channel: its epoch and an offset, written
/// `<epoch>:<offset>` (`k3x9a0qz:17`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// The channel's epoch.
    pub epoch: Epoch,
    /// An offset in that epoch (0: before the first message).
    pub offset: u64,
}

impl Position {
    /// Parses `<epoch>:<offset>`: 8 characters of `[0-9a-z]`, a colon, and
    /// 1 to 20 decimal digits.
    pub fn parse(s: &str) -> Option<Position> {
        let (epoch, offset) = s.split_once(':')?;
        if offset.is_empty() || offset.len() > 20 || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Position { epoch: Epoch::parse(epoch.as_bytes())?, offset: offset.parse().ok()? })
    }
}

impl Position {
    /// A position no channel reaches (the last offset): recovering from it
    /// always answers `recovered: false`. Stands for an id that could not
    /// be read.
    pub(crate) fn nowhere() -> Position {
        Position { epoch: Epoch(*b"00000000"), offset: u64::MAX }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

/// Whether `key` may be an idempotency key: 1 to 128 printable ASCII
/// characters (space to `~`).
pub(crate) fn valid_idempotency_key(key: &str) -> bool {
    (1..=128).contains(&key.len()) && key.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

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

/// Why a publish was refused. Every variant but
/// [`PublishError::OutcomeUnknown`] means nothing was published.
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
    /// The node remembers as many channels as it may, all with subscribers.
    #[error("channel limit reached")]
    ChannelLimit,
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The idempotency key is not 1 to 128 printable ASCII characters.
    #[error("idempotency key must be 1 to 128 printable ASCII characters")]
    BadIdempotencyKey,
    /// Idempotency keys need the local broker for now.
    #[error("idempotency keys are not supported with a Redis broker yet")]
    IdempotencyUnsupported,
    /// The broker (Redis) could not take the publish: nothing was
    /// published, and retrying is safe.
    #[error("broker unavailable, nothing was published: {0}")]
    NotPublished(#[source] BrokerDown),
    /// The broker's (Redis's) answer was lost: the message may or may not
    /// have been published. A retry may publish it twice.
    #[error("the broker's answer was lost, the message may have been published: {0}")]
    OutcomeUnknown(#[source] Uncertain),
}

/// Why the outcome of a publish is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Uncertain {
    /// No answer within the broker's timeout (milliseconds).
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The connection dropped with the command sent.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
}

/// Why the broker could not take a publish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerDown {
    /// Not connected to Redis (yet, or any more).
    #[error("not connected to Redis")]
    NotConnected,
    /// Redis answered with an error.
    #[error("Redis refused: {0}")]
    Refused(String),
}

/// Counts a publish in `metrics` once its result is known.
pub(crate) fn count_publish(metrics: &ShardMetrics, r: &Result<Published, PublishError>) {
    match r {
        Ok(_) => metrics.published.inc(),
        Err(PublishError::Overloaded) => metrics.publish_overloaded.inc(),
        Err(_) => {}
    }
}

impl PublishError {
    /// The protocol error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            PublishError::BadChannel(_) => ErrorCode::BadChannel,
            PublishError::TooLarge { .. } => ErrorCode::TooLarge,
            PublishError::Overloaded => ErrorCode::Overloaded,
            PublishError::ChannelLimit => ErrorCode::Limit,
            PublishError::BadIdempotencyKey | PublishError::IdempotencyUnsupported => ErrorCode::BadRequest,
            PublishError::ShuttingDown | PublishError::NotPublished(_) | PublishError::OutcomeUnknown(_) => ErrorCode::Unavailable,
        }
    }
}

/// A publish on its way: done already (the local broker, or a refusal), or
/// waiting for the broker's answer (Redis).
pub(crate) enum PublishFuture {
    Ready(Option<Result<Published, PublishError>>),
    Waiting(std::pin::Pin<Box<dyn std::future::Future<Output = Result<Published, PublishError>> + Send>>),
}

impl PublishFuture {
    /// The result, if the publish is done without waiting.
    pub(crate) fn ready(&mut self) -> Option<Result<Published, PublishError>> {
        match self {
            PublishFuture::Ready(r) => r.take(),
            PublishFuture::Waiting(_) => None,
        }
    }
}

impl std::future::Future for PublishFuture {
    type Output = Result<Published, PublishError>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            // Polled again after completion: a caller bug; answer as if shutting down.
            PublishFuture::Ready(r) => std::task::Poll::Ready(r.take().unwrap_or(Err(PublishError::ShuttingDown))),
            PublishFuture::Waiting(f) => f.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for PublishFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PublishFuture::Ready(_) => "PublishFuture::Ready",
            PublishFuture::Waiting(_) => "PublishFuture::Waiting",
        })
    }
}

/// What travels through the shards' queues: a publication, or a notice
/// about its channel that a Redis node sends its subscribers in order with
/// the publications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Publication,
    /// The channel's epoch changed to the message's `epoch`: what follows
    /// starts again from offset 1.
    Epoch,
    /// Offsets `offset..=to` of the message's epoch are lost for good (the
    /// stream no longer held them when the node filled a gap).
    Lagged {
        to: u64,
    },
    /// A user (the payload) joined the channel (its first connection
    /// subscribed) or left it (its last one went). Not positioned: it
    /// passes seams without moving them, and is queued like a reply.
    Presence {
        join: bool,
    },
}

/// What encoding a message takes besides its form: the shard's counters
/// and the compression settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Encode<'a> {
    pub metrics: &'a ShardMetrics,
    /// zlib level of compressed forms.
    pub level: u32,
    /// Payloads under this many bytes stay plain in compressed forms.
    pub min_bytes: usize,
}

impl<'a> Encode<'a> {
    /// With the defaults of [`crate::Config`].
    pub(crate) fn new(metrics: &'a ShardMetrics) -> Encode<'a> {
        Encode { metrics, level: 1, min_bytes: 128 }
    }

    /// Compresses a reply or a frame of one connection's (not a message's:
    /// those are compressed once, by [`Message::frame`]); counted as
    /// `source="reply"`. Frames that gain nothing come back as they are.
    pub(crate) fn deflate_reply(&self, frame: Bytes, limit: usize) -> Bytes {
        if crate::proto::frame::server_payload(&frame).len() > limit {
            return frame;
        }
        self.deflate(&frame, 1).unwrap_or(frame)
    }

    /// Deflates `plain`, counting it under `source` (0 message, 1 reply).
    pub(crate) fn deflate(&self, plain: &Bytes, source: usize) -> Option<Bytes> {
        use crate::proto::deflate::{deflate_frame, Plain};
        let m = self.metrics;
        match deflate_frame(plain, self.level, self.min_bytes) {
            Ok(z) => {
                m.compressed[source].inc();
                m.compression_in.add(crate::proto::frame::server_payload(plain).len() as u64);
                m.compression_out.add(crate::proto::frame::server_payload(&z).len() as u64);
                Some(z)
            }
            Err(Plain::NotData) => None,
            Err(Plain::Small) => {
                m.compression_skipped[0].inc();
                None
            }
            Err(Plain::NoGain) => {
                m.compression_skipped[1].inc();
                None
            }
        }
    }
}

/// One published message, shared by refcount between the shards that have
/// subscribers to its channel.
#[derive(Debug)]
pub(crate) struct Message {
    pub channel: Arc<str>,
    /// The channel's epoch when it was published.
    pub epoch: Epoch,
    pub offset: u64,
    pub payload: Payload,
    pub published_at: Instant,
    pub kind: Kind,
    forms: [OnceLock<Bytes>; 8],
}

impl Message {
    pub(crate) fn new(channel: Arc<str>, epoch: Epoch, offset: u64, payload: Payload) -> Message {
        Message { channel, epoch, offset, payload, published_at: Instant::now(), kind: Kind::Publication, forms: Default::default() }
    }

    /// A notice of `kind` (not a publication) for `channel`.
    pub(crate) fn notice(channel: Arc<str>, epoch: Epoch, offset: u64, kind: Kind) -> Message {
        Message { kind, ..Message::new(channel, epoch, offset, Payload::text("")) }
    }

    /// An epoch or lagged notice (never dropped).
    pub(crate) fn is_notice(&self) -> bool {
        matches!(self.kind, Kind::Epoch | Kind::Lagged { .. })
    }

    /// A join or leave event of `user` on `channel`.
    pub(crate) fn presence(channel: Arc<str>, user: &str, join: bool) -> Message {
        Message { kind: Kind::Presence { join }, ..Message::new(channel, Epoch::random(), 0, Payload::text(user)) }
    }

    pub(crate) fn is_presence(&self) -> bool {
        matches!(self.kind, Kind::Presence { .. })
    }

    /// The complete frame or event for `form`, encoded on first use by
    /// whichever shard needs it first; every later caller shares the bytes.
    /// A compressed form is deflated from the plain one at most once; when
    /// it would not gain it shares the plain frame.
    #[inline]
    pub(crate) fn frame(&self, form: Form, enc: &Encode<'_>) -> &Bytes {
        let metrics = enc.metrics;
        self.forms[form as usize].get_or_init(|| {
            if form.is_deflate() {
                let plain = self.frame(form.plain(), enc);
                return match enc.deflate(plain, 0) {
                    Some(z) => {
                        metrics.encoded[form as usize].inc();
                        z
                    }
                    None => plain.clone(),
                };
            }
            match self.kind {
                Kind::Publication => {}
                // Raw forms carry payloads alone: an empty frame is not sent.
                Kind::Epoch => return json::epoch_notice(form, &self.channel, self.epoch.as_str()).unwrap_or_default(),
                Kind::Lagged { to } => return json::lagged(form, &self.channel, self.offset, to).unwrap_or_default(),
                Kind::Presence { join } => {
                    let user = std::str::from_utf8(self.payload.as_bytes()).unwrap_or("");
                    return json::presence_event(form, &self.channel, user, join).unwrap_or_default();
                }
            }
            metrics.encoded[form as usize].inc();
            match form {
                Form::WsJson => json::ws_json(&self.channel, self.offset, &self.payload),
                Form::WsRaw => json::ws_raw(&self.payload),
                Form::SseJson => json::sse_json(&self.channel, self.offset, &self.payload),
                Form::SseRaw => json::sse_raw(&self.payload),
                Form::SseJsonId => {
                    json::with_sse_id(self.epoch.as_str(), self.offset, &json::sse_json(&self.channel, self.offset, &self.payload))
                }
                Form::SseRawId => json::with_sse_id(self.epoch.as_str(), self.offset, &json::sse_raw(&self.payload)),
                // Made from the plain forms above.
                Form::WsJsonDeflate | Form::WsRawDeflate => Bytes::new(),
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
    fn positions_round_trip_and_reject_what_is_not_one() {
        let p = Position::parse("k3x9a0qz:17").unwrap();
        assert_eq!((p.epoch.as_str(), p.offset), ("k3x9a0qz", 17));
        assert_eq!(p.to_string(), "k3x9a0qz:17");
        assert_eq!(Position::parse("k3x9a0qz:0").unwrap().offset, 0);
        for bad in [
            "",
            "k3x9a0qz",
            "k3x9a0qz:",
            "k3x9a0qz:+1",
            "k3x9a0qz:-1",
            "k3x9a0qz: 1",
            "K3X9A0QZ:1",
            "short:1",
            "k3x9a0qz:1:2",
            "k3x9a0qz:99999999999999999999",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn each_form_is_encoded_once() {
        let m = ShardMetrics::default();
        let enc = Encode::new(&m);
        let msg = Message::new("c".into(), Epoch::random(), 1, Payload::text("x"));
        let a = msg.frame(Form::WsJson, &enc).clone();
        let b = msg.frame(Form::WsJson, &enc).clone();
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same bytes are shared");
        msg.frame(Form::SseRaw, &enc);
        assert_eq!(m.encoded[Form::WsJson as usize].get(), 1);
        assert_eq!(m.encoded[Form::SseRaw as usize].get(), 1);
        assert_eq!(m.encoded[Form::WsRaw as usize].get(), 0);
    }

    #[test]
    fn the_compressed_form_is_deflated_once_and_shared() {
        let m = ShardMetrics::default();
        let enc = Encode::new(&m);
        let big = Payload::text("all work and no play ".repeat(50));
        let msg = Message::new("c".into(), Epoch::random(), 1, big);
        let z = msg.frame(Form::WsJsonDeflate, &enc).clone();
        assert!(crate::proto::deflate::is_compressed(&z));
        for _ in 0..100 {
            assert_eq!(msg.frame(Form::WsJsonDeflate, &enc).as_ptr(), z.as_ptr());
        }
        assert_eq!(m.encoded[Form::WsJsonDeflate as usize].get(), 1);
        assert_eq!(m.compressed[0].get(), 1);
        let plain = msg.frame(Form::WsJson, &enc);
        assert_eq!(m.encoded[Form::WsJson as usize].get(), 1, "the plain form was made once, for both");
        let inflated = crate::proto::deflate::inflate(crate::proto::frame::server_payload(&z), None, 1 << 20).unwrap();
        assert_eq!(inflated, crate::proto::frame::server_payload(plain));
        // Under compression_min_bytes the plain bytes are shared as they are.
        let small = Message::new("c".into(), Epoch::random(), 2, Payload::text("x"));
        assert_eq!(small.frame(Form::WsJsonDeflate, &enc).as_ptr(), small.frame(Form::WsJson, &enc).as_ptr());
        assert_eq!(m.encoded[Form::WsJsonDeflate as usize].get(), 1);
        assert_eq!(m.compression_skipped[0].get(), 1);
    }
}
