//! The client command parser: one JSON object per WebSocket text frame.
//!
//! ```text
//! {"op":"subscribe","channel":"news","id":1}
//! {"op":"subscribe","channel":"news","since":"k3x9a0qz:17"}
//! {"op":"unsubscribe","channel":"news"}
//! {"op":"publish","channel":"news","data":<any JSON>}
//! {"op":"history","channel":"news","since":"k3x9a0qz:17","limit":100}
//! {"op":"auth","token":"<JWT>"}
//! {"op":"presence","channel":"chat:1"}
//! ```

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::channel;
use super::ErrorCode;

/// A parsed client command.
#[derive(Debug, PartialEq)]
pub enum Command<'a> {
    /// Subscribe to a channel.
    Subscribe {
        /// Channel name, checked against the rules.
        channel: Cow<'a, str>,
        /// The position to recover from (`<epoch>:<offset>`, not checked here).
        since: Option<Cow<'a, str>>,
    },
    /// Unsubscribe from a channel.
    Unsubscribe {
        /// Channel name, checked against the rules.
        channel: Cow<'a, str>,
    },
    /// Publish `data` (verbatim JSON text) to a channel.
    Publish {
        /// Channel name, checked against the rules.
        channel: Cow<'a, str>,
        /// The JSON value as it appeared in the command.
        data: &'a str,
        /// Publish at most once per key and channel (checked by the broker).
        idempotency_key: Option<Cow<'a, str>>,
    },
    /// Read a channel's history.
    History {
        /// Channel name, checked against the rules.
        channel: Cow<'a, str>,
        /// After this position (not checked here); none: the latest.
        since: Option<Cow<'a, str>>,
        /// At most this many messages (at least 1).
        limit: Option<u64>,
    },
    /// Read who is subscribed to a channel.
    Presence {
        /// Channel name, checked against the rules.
        channel: Cow<'a, str>,
    },
    /// Authenticate the connection, or refresh its token.
    Auth {
        /// The connection token (not checked here).
        token: Cow<'a, str>,
    },
}

/// A refused command: the code and message of the error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// Error code for the reply.
    pub code: ErrorCode,
    /// Human-readable message for the reply.
    pub message: Cow<'static, str>,
}

impl CommandError {
    fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> CommandError {
        CommandError { code, message: message.into() }
    }
}

/// The outcome of parsing one frame: the request `id` to echo (when one
/// could be read) and the command or the error to reply with.
#[derive(Debug, PartialEq)]
pub struct Parsed<'a> {
    /// The `id` field as JSON number text, echoed verbatim in the reply.
    pub id: Option<&'a str>,
    /// The command, or why it was refused.
    pub command: Result<Command<'a>, CommandError>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    // `null` is a payload like any other: present-but-null is `Some`.
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<Cow<'a, str>>,
    limit: Option<u64>,
    #[serde(borrow)]
    idempotency_key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
}

/// `null` is a value like any other: present-but-null is `Some`.
pub(crate) fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue as Deserialize<'de>>::deserialize(d).map(Some)
}

/// Parses one command. `max_payload` caps the size of a publish's `data`.
pub fn parse(input: &str, max_payload: usize) -> Parsed<'_> {
    // A derived struct would also accept a JSON array of its fields.
    if !input.trim_start().starts_with('{') {
        return Parsed { id: None, command: Err(CommandError::new(ErrorCode::BadRequest, "a command is one JSON object")) };
    }
    let wire: Wire<'_> = match serde_json::from_str(input) {
        Ok(w) => w,
        Err(e) => {
            let msg = if e.is_syntax() || e.is_eof() { format!("not a JSON object: {e}") } else { format!("bad command: {e}") };
            return Parsed { id: None, command: Err(CommandError::new(ErrorCode::BadRequest, msg)) };
        }
    };
    let id = wire.id.map(RawValue::get);
    if let Some(raw) = id {
        if !raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            return Parsed { id: None, command: Err(CommandError::new(ErrorCode::BadRequest, "\"id\" must be a number")) };
        }
    }
    Parsed { id, command: command(wire, max_payload) }
}

fn command(wire: Wire<'_>, max_payload: usize) -> Result<Command<'_>, CommandError> {
    let op = wire.op.ok_or_else(|| CommandError::new(ErrorCode::BadRequest, "missing \"op\""))?;
    let known = matches!(op.as_ref(), "subscribe" | "unsubscribe" | "publish" | "history" | "auth" | "presence");
    if !known {
        return Err(CommandError::new(ErrorCode::UnknownOp, format!("unknown op {:?}", super::truncate_str(&op, 64))));
    }
    if op == "auth" {
        let token = wire.token.ok_or_else(|| CommandError::new(ErrorCode::BadRequest, "missing \"token\""))?;
        return Ok(Command::Auth { token });
    }
    let channel = wire.channel.ok_or_else(|| CommandError::new(ErrorCode::BadRequest, "missing \"channel\""))?;
    channel::validate(&channel).map_err(|e| CommandError::new(ErrorCode::BadChannel, e.to_string()))?;
    match op.as_ref() {
        "subscribe" => Ok(Command::Subscribe { channel, since: wire.since }),
        "unsubscribe" => Ok(Command::Unsubscribe { channel }),
        "presence" => Ok(Command::Presence { channel }),
        "history" => match wire.limit {
            Some(0) => Err(CommandError::new(ErrorCode::BadRequest, "\"limit\" must be at least 1")),
            limit => Ok(Command::History { channel, since: wire.since, limit }),
        },
        _ => {
            let data = wire.data.ok_or_else(|| CommandError::new(ErrorCode::BadRequest, "missing \"data\""))?.get();
            // Skipping a raw value has no depth limit; check it like any JSON
            // payload so subscribers never get JSON nested past the limit.
            super::json::validate_json(data.as_bytes())
                .map_err(|e| CommandError::new(ErrorCode::BadRequest, format!("bad \"data\": {e}")))?;
            if data.len() > max_payload {
                return Err(CommandError::new(
                    ErrorCode::TooLarge,
                    format!("data is {} bytes, over the limit of {max_payload}", data.len()),
                ));
            }
            Ok(Command::Publish { channel, data, idempotency_key: wire.idempotency_key })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &str) -> (Option<&str>, Command<'_>) {
        let p = parse(input, 100);
        (p.id, p.command.unwrap())
    }

    fn err(input: &str) -> ErrorCode {
        parse(input, 100).command.unwrap_err().code
    }

    #[test]
    fn parses_the_commands() {
        assert_eq!(ok(r#"{"op":"subscribe","channel":"news"}"#), (None, Command::Subscribe { channel: "news".into(), since: None }));
        assert_eq!(ok(r#"{"id":7,"op":"unsubscribe","channel":"news"}"#), (Some("7"), Command::Unsubscribe { channel: "news".into() }));
        assert_eq!(ok(r#"{"op":"presence","channel":"chat:1"}"#).1, Command::Presence { channel: "chat:1".into() });
        assert_eq!(
            ok(r#"{"op":"publish","channel":"n","data":{"x":[1, 2]},"id":-1.5}"#),
            (Some("-1.5"), Command::Publish { channel: "n".into(), data: r#"{"x":[1, 2]}"#, idempotency_key: None })
        );
        // `null` is a payload like any other.
        assert_eq!(
            ok(r#"{"op":"publish","channel":"n","data":null}"#).1,
            Command::Publish { channel: "n".into(), data: "null", idempotency_key: None }
        );
        // Escaped channel names are decoded before the rules apply.
        assert_eq!(ok(r#"{"op":"subscribe","channel":"\u0061b"}"#).1, Command::Subscribe { channel: "ab".into(), since: None });
    }

    #[test]
    fn parses_since_and_history() {
        assert_eq!(
            ok(r#"{"op":"subscribe","channel":"n","since":"k3x9a0qz:17"}"#).1,
            Command::Subscribe { channel: "n".into(), since: Some("k3x9a0qz:17".into()) }
        );
        assert_eq!(
            ok(r#"{"op":"history","channel":"n","since":"k3x9a0qz:17","limit":5,"id":2}"#),
            (Some("2"), Command::History { channel: "n".into(), since: Some("k3x9a0qz:17".into()), limit: Some(5) })
        );
        assert_eq!(ok(r#"{"op":"history","channel":"n"}"#).1, Command::History { channel: "n".into(), since: None, limit: None });
        for bad in [
            r#"{"op":"history","channel":"n","limit":0}"#,
            r#"{"op":"history","channel":"n","limit":-1}"#,
            r#"{"op":"history","channel":"n","limit":1.5}"#,
            r#"{"op":"subscribe","channel":"n","since":17}"#,
        ] {
            assert_eq!(err(bad), ErrorCode::BadRequest, "{bad}");
        }
    }

    #[test]
    fn error_codes() {
        assert_eq!(err("not json"), ErrorCode::BadRequest);
        assert_eq!(err("[1,2]"), ErrorCode::BadRequest);
        assert_eq!(err(r#"["subscribe","news",null,7]"#), ErrorCode::BadRequest);
        assert_eq!(err(r#"{"channel":"x"}"#), ErrorCode::BadRequest);
        assert_eq!(err(r#"{"op":"subscribe"}"#), ErrorCode::BadRequest);
        assert_eq!(err(r#"{"op":5,"channel":"x"}"#), ErrorCode::BadRequest);
        assert_eq!(err(r#"{"op":"publish","channel":"x"}"#), ErrorCode::BadRequest);
        assert_eq!(err(r#"{"op":"subscribe","channel":"x","id":"abc"}"#), ErrorCode::BadRequest);
        assert_eq!(err(r#"{"op":"dance","channel":"x"}"#), ErrorCode::UnknownOp);
        assert_eq!(err(r#"{"op":"subscribe","channel":"bad name"}"#), ErrorCode::BadChannel);
        assert_eq!(err(r#"{"op":"subscribe","channel":""}"#), ErrorCode::BadChannel);
        let big = format!(r#"{{"op":"publish","channel":"x","data":"{}"}}"#, "y".repeat(200));
        assert_eq!(err(&big), ErrorCode::TooLarge);
    }

    #[test]
    fn id_is_echoed_with_errors_after_it_was_read() {
        let p = parse(r#"{"op":"dance","channel":"x","id":42}"#, 100);
        assert_eq!(p.id, Some("42"));
        assert_eq!(p.command.unwrap_err().code, ErrorCode::UnknownOp);
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!(r#"{{"op":"publish","channel":"x","data":{}1{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(parse(&deep, usize::MAX).command.unwrap_err().code, ErrorCode::BadRequest);
    }
}
