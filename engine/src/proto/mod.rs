//! Sans-I/O protocol code: pure functions over byte slices.
//!
//! Nothing in here touches a socket, a clock or a runtime. Encoders write
//! into freshly allocated [`bytes::Bytes`] that the caller shares by
//! refcount; decoders read from caller-owned buffers and say `Ok(None)`
//! ("read more") before they allocate anything.
//!
//! - [`form`]: the wire forms of a message (WebSocket or SSE, envelope or raw).
//! - [`frame`]: WebSocket server-frame encoder and strict client-frame decoder.
//! - [`assemble`]: message reassembly over client frames, with a size cap.
//! - [`deflate`]: permessage-deflate: negotiation, compress once, capped inflate.
//! - [`sse`]: Server-Sent-Events event encoder.
//! - [`json`]: JSON string escaping and the wire envelope / reply encoders.
//! - [`command`]: the client command parser.
//! - [`channel`]: channel-name rules.
//! - [`session`]: the WebSocket connection's state machine (timers, close
//!   handshake, what to do with each frame), with time as a parameter.
//! - [`resp`]: the RESP2 subset of Herald's Redis subscriber connections.

pub mod assemble;
pub mod channel;
pub mod command;
pub mod deflate;
pub mod form;
pub mod frame;
#[doc(hidden)]
pub mod fuzz;
pub mod json;
pub mod resp;
pub mod session;
pub mod sse;

/// The longest prefix of `s` that is at most `max` bytes and ends at a
/// character boundary: for quoting untrusted text in a bounded message.
pub fn truncate_str(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Error codes of protocol v1, sent in `{"op":"error","code":…}` replies and
/// in HTTP error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed command: not JSON, missing or mistyped field, wrong frame type.
    BadRequest,
    /// The `op` field names no known command.
    UnknownOp,
    /// The channel name breaks the channel-name rules.
    BadChannel,
    /// The payload is larger than the configured maximum message size.
    TooLarge,
    /// A configured limit was reached (subscriptions, channels, connections).
    Limit,
    /// The operation is not allowed on this connection or server.
    Forbidden,
    /// The server cannot take the publish now (a shard's queue is full); retry.
    Overloaded,
    /// The broker behind the server is unreachable; retry.
    Unavailable,
    /// No valid token or API key was given where one is needed.
    Unauthorized,
}

impl ErrorCode {
    /// Every code, in a fixed order (metrics use it).
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::BadChannel,
        ErrorCode::TooLarge,
        ErrorCode::Limit,
        ErrorCode::Forbidden,
        ErrorCode::Overloaded,
        ErrorCode::Unavailable,
        ErrorCode::Unauthorized,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::BadChannel => "bad_channel",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Limit => "limit",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }

    /// Position in [`ErrorCode::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::truncate_str;

    #[test]
    fn truncate_str_cuts_at_a_character_boundary() {
        assert_eq!(truncate_str("abc", 5), "abc");
        assert_eq!(truncate_str("abc", 3), "abc");
        assert_eq!(truncate_str("abc", 2), "ab");
        assert_eq!(truncate_str("abc", 0), "");
        // "é" is 2 bytes, "€" 3: a cut inside one keeps the bytes before it.
        assert_eq!(truncate_str("aé", 2), "a");
        assert_eq!(truncate_str("aé", 3), "aé");
        assert_eq!(truncate_str("€€", 5), "€");
        assert_eq!(truncate_str("€", 2), "");
    }
}
