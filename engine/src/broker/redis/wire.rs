//! What Herald writes into Redis: key and channel names, and the body of a
//! published message.
//!
//! - Channel `news` with prefix `herald:` is the Redis channel
//!   `herald:{news}`, its counter hash `herald:{news}:meta` (fields `o`,
//!   the last offset, and `e`, the epoch), its history stream
//!   `herald:{news}:history` (entry id `<offset>-0`, fields `d`, the
//!   `{kind}{payload}` tail, and `t`, the publish time in ms) and its
//!   idempotency keys `herald:{news}:idem:<key>` (`<offset>|<epoch>`). The
//!   hash tag puts them all in one cluster slot, so each script runs on one
//!   node.
//! - A message body is `h1|{epoch}|{offset}|{kind}{payload}`, `kind` being
//!   `j` (JSON) or `t` (text). The publish script writes the head; Herald
//!   writes `{kind}{payload}` ([`encode_tail`]).

use std::sync::Arc;

use bytes::Bytes;

use crate::message::Epoch;
use crate::proto::json::Payload;
use crate::proto::resp;

/// Key and channel names under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Names {
        Names { prefix: prefix.to_string() }
    }

    /// The Redis channel of a Herald channel.
    pub(crate) fn channel(&self, channel: &str) -> String {
        format!("{}{{{channel}}}", self.prefix)
    }

    /// The counter hash of a Herald channel.
    pub(crate) fn meta_key(&self, channel: &str) -> String {
        format!("{}{{{channel}}}:meta", self.prefix)
    }

    /// The stream holding a Herald channel's history.
    pub(crate) fn stream_key(&self, channel: &str) -> String {
        format!("{}{{{channel}}}:history", self.prefix)
    }

    /// The key remembering a publish made with idempotency key `key`.
    pub(crate) fn idempotency_key(&self, channel: &str, key: &str) -> String {
        format!("{}{{{channel}}}:idem:{key}", self.prefix)
    }

    /// The hash of a presence channel's entries (`<node>|<user>`).
    pub(crate) fn presence_key(&self, channel: &str) -> String {
        format!("{}{{{channel}}}:presence", self.prefix)
    }

    /// The sorted set of the nodes with entries in a presence channel.
    pub(crate) fn presence_nodes_key(&self, channel: &str) -> String {
        format!("{}{{{channel}}}:presence:nodes", self.prefix)
    }

    /// The Redis channel of the nodes' server API commands.
    pub(crate) fn control_channel(&self) -> String {
        format!("{}control", self.prefix)
    }

    /// The Herald channel of a Redis channel name (`{prefix}{name}`).
    pub(crate) fn herald_channel<'a>(&self, redis_channel: &'a [u8]) -> Option<&'a str> {
        let rest = redis_channel.strip_prefix(self.prefix.as_bytes())?;
        let name = rest.strip_prefix(b"{")?.strip_suffix(b"}")?;
        std::str::from_utf8(name).ok()
    }

    /// A (S)SUBSCRIBE or (S)UNSUBSCRIBE command for `channels`.
    pub(crate) fn sub_command(&self, sharded: bool, subscribe: bool, channels: &[Arc<str>]) -> Vec<u8> {
        let verb: &[u8] = match (sharded, subscribe) {
            (false, true) => b"SUBSCRIBE",
            (false, false) => b"UNSUBSCRIBE",
            (true, true) => b"SSUBSCRIBE",
            (true, false) => b"SUNSUBSCRIBE",
        };
        let names: Vec<String> = channels.iter().map(|c| self.channel(c)).collect();
        let mut args: Vec<&[u8]> = vec![verb];
        args.extend(names.iter().map(|n| n.as_bytes()));
        let mut out = Vec::new();
        resp::command(&mut out, &args);
        out
    }
}

/// The part of a message body that Herald writes: `{kind}{payload}`.
pub(crate) fn encode_tail(payload: &Payload) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + 1);
    body.push(if payload.is_json() { b'j' } else { b't' });
    body.extend_from_slice(payload.as_bytes());
    body
}

/// Parses a message body without copying the payload.
pub(crate) fn parse_body(body: &Bytes) -> Option<(Epoch, u64, Payload)> {
    let rest = body.strip_prefix(b"h1|")?;
    let epoch = Epoch::parse(rest.get(..8)?)?;
    let rest = rest.get(8..)?.strip_prefix(b"|")?;
    let bar = rest.iter().position(|&b| b == b'|')?;
    let offset: u64 = std::str::from_utf8(&rest[..bar]).ok()?.parse().ok()?;
    // Offsets start at 1; the last one has no successor.
    if offset == 0 || offset == u64::MAX {
        return None;
    }
    let start = body.len() - rest.len() + bar + 1;
    Some((epoch, offset, parse_tail(&body.slice(start..))?))
}

/// Parses `{kind}{payload}` without copying the payload.
pub(crate) fn parse_tail(tail: &Bytes) -> Option<Payload> {
    let data = tail.slice(1..);
    match tail.first()? {
        b'j' => Some(Payload::json_prevalidated(data)),
        b't' => Payload::text_from_utf8(data).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head the publish script prepends (`'h1|' .. e .. '|' .. o .. '|'`).
    fn script_head(epoch: Epoch, offset: u64) -> Vec<u8> {
        format!("h1|{epoch}|{offset}|").into_bytes()
    }

    #[test]
    fn bodies_round_trip() {
        let epoch = Epoch::random();
        for payload in [Payload::text("h|i"), Payload::json(Bytes::from_static(br#"{"a":[1,"|"]}"#)).unwrap(), Payload::text("")] {
            let mut body = script_head(epoch, 17);
            body.extend_from_slice(&encode_tail(&payload));
            let (e, o, p) = parse_body(&Bytes::from(body)).unwrap();
            assert_eq!((e, o, p.as_bytes(), p.is_json()), (epoch, 17, payload.as_bytes(), payload.is_json()));
        }
    }

    #[test]
    fn message_bodies_parse_without_copying_the_payload() {
        let body = Bytes::from_static(b"h1|abcd1234|17|j{\"a\":1}");
        let (e, o, p) = parse_body(&body).unwrap();
        assert_eq!((e.as_str(), o, p.as_bytes(), p.is_json()), ("abcd1234", 17, &b"{\"a\":1}"[..], true));
        assert_eq!(p.as_bytes().as_ptr(), body[16..].as_ptr());
        for bad in [
            &b"h2|abcd1234|1|tx"[..],
            b"h1|abcd1234|0|tx",
            b"h1|abcd1234|18446744073709551615|tx",
            b"h1|abcd|1|tx",
            b"h1|abcd1234|x|tx",
            b"h1|abcd1234|1|qx",
            b"h1|abcd1234|1|t\xff",
        ] {
            assert!(parse_body(&Bytes::copy_from_slice(bad)).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn names_round_trip_and_share_a_slot() {
        let n = Names::new("herald:");
        let ch = n.channel("chat:room/1");
        assert_eq!(ch, "herald:{chat:room/1}");
        assert_eq!(n.herald_channel(ch.as_bytes()), Some("chat:room/1"));
        assert_eq!(n.herald_channel(b"other:{x}"), None);
        for key in [n.meta_key("chat:room/1"), n.stream_key("chat:room/1"), n.idempotency_key("chat:room/1", "k{1}")] {
            assert_eq!(resp::key_slot(ch.as_bytes()), resp::key_slot(key.as_bytes()), "{key}");
        }
        let cmd = n.sub_command(true, true, &["a".into()]);
        assert_eq!(cmd, b"*2\r\n$10\r\nSSUBSCRIBE\r\n$10\r\nherald:{a}\r\n");
    }
}
