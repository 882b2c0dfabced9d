//! JSON on the wire: string escaping, the message envelope and the replies
//! to client commands. All writers here produce complete, pre-encoded
//! WebSocket frames or SSE events.

use bytes::{BufMut, Bytes, BytesMut};

use super::form::Form;
use super::frame::{self, OpCode};
use super::ErrorCode;

/// A message payload: JSON embedded verbatim, or text embedded as a JSON
/// string. Cloning shares the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    bytes: Bytes,
    is_json: bool,
}

/// The payload given as JSON is not valid JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload is not valid JSON: {0}")]
pub struct InvalidJson(pub String);

impl Payload {
    /// A JSON payload, embedded verbatim in the envelope. It is validated,
    /// and line breaks between its tokens become spaces so the envelope
    /// stays one line (JSON strings cannot hold raw line breaks, so no
    /// value changes).
    pub fn json(bytes: impl Into<Bytes>) -> Result<Payload, InvalidJson> {
        let bytes = bytes.into();
        validate_json(&bytes)?;
        Ok(Payload::json_prevalidated(bytes))
    }

    /// A JSON payload the caller has already validated.
    pub(crate) fn json_prevalidated(bytes: Bytes) -> Payload {
        let bytes = if bytes.iter().any(|&b| b == b'\n' || b == b'\r') {
            let v: Vec<u8> = bytes.iter().map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }).collect();
            Bytes::from(v)
        } else {
            bytes
        };
        Payload { bytes, is_json: true }
    }

    /// A text payload, embedded in the envelope as a JSON string.
    pub fn text(text: impl Into<String>) -> Payload {
        Payload { bytes: Bytes::from(text.into()), is_json: false }
    }

    /// A text payload from bytes that must be UTF-8.
    pub fn text_from_utf8(bytes: Bytes) -> Result<Payload, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Payload { bytes, is_json: false })
    }

    /// The payload bytes as given (the `raw` format sends these).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether the payload is embedded verbatim as JSON.
    pub fn is_json(&self) -> bool {
        self.is_json
    }

    /// Length of the payload.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Length of the payload as a JSON value.
    fn json_len(&self) -> usize {
        if self.is_json {
            self.bytes.len()
        } else {
            escaped_len(&self.bytes)
        }
    }

    fn write_json(&self, out: &mut BytesMut) {
        if self.is_json {
            out.put_slice(&self.bytes);
        } else {
            write_escaped(out, &self.bytes);
        }
    }
}

/// Deepest nesting of arrays and objects accepted in a JSON payload (the
/// limit serde_json and most parsers apply when reading it back).
pub const MAX_JSON_DEPTH: usize = 128;

/// Checks that `bytes` is one valid JSON value nested at most
/// [`MAX_JSON_DEPTH`] deep.
pub fn validate_json(bytes: &[u8]) -> Result<(), InvalidJson> {
    // Skipping a value has no depth limit in serde_json: check depth first.
    if !depth_within(bytes, MAX_JSON_DEPTH) {
        return Err(InvalidJson(format!("nested deeper than {MAX_JSON_DEPTH} levels")));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map(|_| ()).map_err(|e| InvalidJson(e.to_string()))
}

/// Whether the brackets of `bytes` (outside strings) nest at most `max` deep.
fn depth_within(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_str {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

fn escape_of(b: u8) -> Option<&'static [u8]> {
    Some(match b {
        b'"' => b"\\\"",
        b'\\' => b"\\\\",
        b'\n' => b"\\n",
        b'\r' => b"\\r",
        b'\t' => b"\\t",
        0x08 => b"\\b",
        0x0C => b"\\f",
        0..=0x1F => return Some(b"\\u00"), // followed by two hex digits
        _ => return None,
    })
}

/// Length of `s` as a quoted, escaped JSON string.
pub fn escaped_len(s: &[u8]) -> usize {
    2 + s
        .iter()
        .map(|&b| match escape_of(b) {
            Some(e) if e == b"\\u00" => 6,
            Some(e) => e.len(),
            None => 1,
        })
        .sum::<usize>()
}

/// Writes `s` (UTF-8) as a quoted, escaped JSON string.
pub fn write_escaped(out: &mut impl BufMut, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.put_u8(b'"');
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        if let Some(e) = escape_of(b) {
            out.put_slice(&s[start..i]);
            out.put_slice(e);
            if e == b"\\u00" {
                out.put_slice(&[HEX[(b >> 4) as usize], HEX[(b & 0xF) as usize]]);
            }
            start = i + 1;
        }
    }
    out.put_slice(&s[start..]);
    out.put_u8(b'"');
}

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

const ENV_A: &[u8] = b"{\"channel\":\"";
const ENV_B: &[u8] = b"\",\"offset\":";
const ENV_C: &[u8] = b",\"data\":";

fn envelope_len(channel: &str, offset: u64, payload: &Payload) -> usize {
    ENV_A.len() + channel.len() + ENV_B.len() + digits(offset) + ENV_C.len() + payload.json_len() + 1
}

/// Channel names never need escaping (see [`super::channel`]).
fn write_envelope(out: &mut BytesMut, channel: &str, offset: u64, payload: &Payload) {
    out.put_slice(ENV_A);
    out.put_slice(channel.as_bytes());
    out.put_slice(ENV_B);
    out.put_slice(itoa::Buffer::new().format(offset).as_bytes());
    out.put_slice(ENV_C);
    payload.write_json(out);
    out.put_u8(b'}');
}

/// The `format=json` WebSocket frame:
/// `{"channel":"news","offset":17,"data":<payload>}` in one text frame.
pub fn ws_json(channel: &str, offset: u64, payload: &Payload) -> Bytes {
    let len = envelope_len(channel, offset, payload);
    let mut out = frame::begin_frame(OpCode::Text, len);
    write_envelope(&mut out, channel, offset, payload);
    debug_assert_eq!(out.len(), frame::header_len(len) + len);
    out.freeze()
}

/// The `format=raw` WebSocket frame: the payload alone, as text.
pub fn ws_raw(payload: &Payload) -> Bytes {
    frame::encode_frame(OpCode::Text, payload.as_bytes())
}

/// The `format=json` SSE event: one `data:` line holding the envelope.
pub fn sse_json(channel: &str, offset: u64, payload: &Payload) -> Bytes {
    let len = envelope_len(channel, offset, payload);
    let mut out = BytesMut::with_capacity(6 + len + 2);
    out.put_slice(b"data: ");
    write_envelope(&mut out, channel, offset, payload);
    out.put_slice(b"\n\n");
    out.freeze()
}

/// An SSE event preceded by its `id: <epoch>:<offset>` line.
pub fn with_sse_id(epoch: &str, offset: u64, event: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + epoch.len() + 22 + event.len());
    out.put_slice(b"id: ");
    out.put_slice(epoch.as_bytes());
    out.put_u8(b':');
    out.put_slice(itoa::Buffer::new().format(offset).as_bytes());
    out.put_u8(b'\n');
    out.put_slice(event);
    out.freeze()
}

/// The `event: subscribed` SSE event of a one-channel `format=json` stream:
/// `{"channel":…,"epoch":…,"offset":…}`, plus `"recovered":…` when a
/// position was given.
pub fn sse_subscribed(channel: &str, epoch: &str, offset: u64, recovered: Option<bool>) -> Bytes {
    let mut r = Vec::with_capacity(96);
    r.extend_from_slice(b"{\"channel\":");
    write_escaped(&mut r, channel.as_bytes());
    r.extend_from_slice(b",\"epoch\":");
    write_escaped(&mut r, epoch.as_bytes());
    r.extend_from_slice(b",\"offset\":");
    r.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
    if let Some(rec) = recovered {
        r.extend_from_slice(if rec { b",\"recovered\":true" } else { b",\"recovered\":false" });
    }
    r.push(b'}');
    let mut out = BytesMut::with_capacity(r.len() + 24);
    out.put_slice(b"event: subscribed\n");
    super::sse::write_event(&mut out, &r);
    out.freeze()
}

/// The `format=raw` SSE event: the payload as `data:` lines.
pub fn sse_raw(payload: &Payload) -> Bytes {
    super::sse::encode_event(payload.as_bytes())
}

/// Builder for a one-line JSON reply object, finished as a text frame.
struct Reply(Vec<u8>);

impl Reply {
    fn new(op: &str) -> Reply {
        let mut v = Vec::with_capacity(96);
        v.extend_from_slice(b"{\"op\":\"");
        v.extend_from_slice(op.as_bytes());
        v.push(b'"');
        Reply(v)
    }

    fn str_field(mut self, name: &str, value: &str) -> Reply {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b"\":");
        write_escaped(&mut self.0, value.as_bytes());
        self
    }

    fn raw_field(mut self, name: &str, value: &str) -> Reply {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b"\":");
        self.0.extend_from_slice(value.as_bytes());
        self
    }

    fn id(self, id: Option<&str>) -> Reply {
        match id {
            Some(id) => self.raw_field("id", id),
            None => self,
        }
    }

    fn frame(mut self) -> Bytes {
        self.0.push(b'}');
        frame::encode_frame(OpCode::Text, &self.0)
    }
}

/// `{"op":"subscribed","channel":…,"epoch":…,"offset":…,"recovered":…}`,
/// `offset` and `recovered` when known, plus `id` when given.
pub fn reply_subscribed(channel: &str, epoch: &str, offset: Option<u64>, recovered: Option<bool>, id: Option<&str>) -> Bytes {
    let mut r = Reply::new("subscribed").str_field("channel", channel).str_field("epoch", epoch);
    if let Some(o) = offset {
        r = r.raw_field("offset", itoa::Buffer::new().format(o));
    }
    if let Some(rec) = recovered {
        r = r.raw_field("recovered", if rec { "true" } else { "false" });
    }
    r.id(id).frame()
}

/// A page of history: `{"channel":…,"epoch":…,"offset":<top>,"publications":[{"offset":…,"data":…},…],"complete":…}`,
/// as the `history` reply (with `op` and `id`) or the HTTP body (without).
/// Publications that would take the body past `max_bytes` are left out,
/// and the page is then not `complete`.
#[allow(clippy::too_many_arguments)]
pub fn history_body<'a>(
    op: bool,
    channel: &str,
    epoch: &str,
    top: u64,
    publications: impl Iterator<Item = (u64, &'a Payload)>,
    mut complete: bool,
    id: Option<&str>,
    max_bytes: usize,
) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(256);
    if op {
        out.put_slice(b"{\"op\":\"history\",\"channel\":");
    } else {
        out.put_slice(b"{\"channel\":");
    }
    write_escaped(&mut out, channel.as_bytes());
    out.put_slice(b",\"epoch\":");
    write_escaped(&mut out, epoch.as_bytes());
    out.put_slice(b",\"offset\":");
    out.put_slice(itoa::Buffer::new().format(top).as_bytes());
    out.put_slice(b",\"publications\":[");
    for (i, (offset, payload)) in publications.enumerate() {
        // 64: the rest of the object around the publications.
        if out.len() + payload.json_len() + 48 + 64 > max_bytes {
            complete = false;
            break;
        }
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(b"{\"offset\":");
        out.put_slice(itoa::Buffer::new().format(offset).as_bytes());
        out.put_slice(b",\"data\":");
        payload.write_json(&mut out);
        out.put_u8(b'}');
    }
    out.put_slice(if complete { b"],\"complete\":true" } else { b"],\"complete\":false" });
    if let Some(id) = id {
        out.put_slice(b",\"id\":");
        out.put_slice(id.as_bytes());
    }
    out.put_u8(b'}');
    out.to_vec()
}

/// `{"op":"unsubscribed","channel":…}`, plus `id` when given.
pub fn reply_unsubscribed(channel: &str, id: Option<&str>) -> Bytes {
    Reply::new("unsubscribed").str_field("channel", channel).id(id).frame()
}

/// `{"op":"published","channel":…,"offset":…,"epoch":…}`, plus `id` when given.
pub fn reply_published(channel: &str, offset: u64, epoch: &str, id: Option<&str>) -> Bytes {
    Reply::new("published")
        .str_field("channel", channel)
        .raw_field("offset", itoa::Buffer::new().format(offset))
        .str_field("epoch", epoch)
        .id(id)
        .frame()
}

/// The notice to a subscriber that missed `from..=to` of `channel` under
/// the `drop` policy: `{"op":"lagged","channel":…,"missed_from":…,"missed_to":…}`
/// as a WebSocket text frame (JSON format) or an SSE event named `lagged`;
/// none for the raw formats, which carry payloads only.
pub(crate) fn lagged(form: Form, channel: &str, from: u64, to: u64) -> Option<Bytes> {
    let mut r = Reply::new("lagged").str_field("channel", channel);
    r = r.raw_field("missed_from", itoa::Buffer::new().format(from));
    r = r.raw_field("missed_to", itoa::Buffer::new().format(to));
    r.0.push(b'}');
    match form.plain() {
        Form::WsJson => Some(frame::encode_frame(OpCode::Text, &r.0)),
        Form::SseJson | Form::SseJsonId => {
            let mut out = BytesMut::with_capacity(r.0.len() + 24);
            out.put_slice(b"event: lagged\n");
            super::sse::write_event(&mut out, &r.0);
            Some(out.freeze())
        }
        Form::WsRaw | Form::SseRaw | Form::SseRawId | Form::WsJsonDeflate | Form::WsRawDeflate => None,
    }
}

/// `{"op":"join","channel":…,"user":…}` (or `leave`); on SSE the same
/// object as an `event: join` (`leave`). Raw forms: `None`.
pub(crate) fn presence_event(form: Form, channel: &str, user: &str, join: bool) -> Option<Bytes> {
    let op = if join { "join" } else { "leave" };
    let r = Reply::new(op).str_field("channel", channel).str_field("user", user);
    match form.plain() {
        Form::WsJson => Some(r.frame()),
        Form::SseJson | Form::SseJsonId => {
            let mut body = r.0;
            body.push(b'}');
            let mut out = BytesMut::with_capacity(body.len() + 24);
            out.put_slice(if join { b"event: join\n" } else { b"event: leave\n" });
            super::sse::write_event(&mut out, &body);
            Some(out.freeze())
        }
        Form::WsRaw | Form::SseRaw | Form::SseRawId | Form::WsJsonDeflate | Form::WsRawDeflate => None,
    }
}

/// `{"op":"presence","channel":…,"clients":…,"users":[…]}` (with
/// `"truncated":true` when users were left out), plus `id` when given.
pub(crate) fn reply_presence(channel: &str, clients: u64, users: &[&str], truncated: bool, id: Option<&str>) -> Bytes {
    let mut r = Reply::new("presence").str_field("channel", channel).raw_field("clients", itoa::Buffer::new().format(clients));
    let mut list = Vec::with_capacity(users.iter().map(|u| u.len() + 3).sum::<usize>() + 2);
    list.push(b'[');
    for (i, u) in users.iter().enumerate() {
        if i > 0 {
            list.push(b',');
        }
        write_escaped(&mut list, u.as_bytes());
    }
    list.push(b']');
    r = r.raw_field("users", std::str::from_utf8(&list).unwrap_or("[]"));
    if truncated {
        r = r.raw_field("truncated", "true");
    }
    r.id(id).frame()
}

/// The notice that a channel's epoch changed under a subscription:
/// `{"op":"epoch","channel":…,"epoch":…}` (SSE: `event: epoch` with the
/// object without `op`). Raw forms carry payloads only: `None`.
pub(crate) fn epoch_notice(form: Form, channel: &str, epoch: &str) -> Option<Bytes> {
    match form.plain() {
        Form::WsJson => Some(Reply::new("epoch").str_field("channel", channel).str_field("epoch", epoch).frame()),
        Form::SseJson | Form::SseJsonId => {
            let mut r = Vec::with_capacity(48 + channel.len());
            r.extend_from_slice(b"{\"channel\":");
            write_escaped(&mut r, channel.as_bytes());
            r.extend_from_slice(b",\"epoch\":");
            write_escaped(&mut r, epoch.as_bytes());
            r.push(b'}');
            let mut out = BytesMut::with_capacity(r.len() + 24);
            out.put_slice(b"event: epoch\n");
            super::sse::write_event(&mut out, &r);
            Some(out.freeze())
        }
        Form::WsRaw | Form::SseRaw | Form::SseRawId | Form::WsJsonDeflate | Form::WsRawDeflate => None,
    }
}

/// `{"op":"authed","user":…,"expires_at":…}` (`expires_at` when the
/// identity expires), plus `id` when given.
pub(crate) fn reply_authed(user: &str, expires_at: Option<u64>, id: Option<&str>) -> Bytes {
    let mut r = Reply::new("authed").str_field("user", user);
    if let Some(at) = expires_at {
        r = r.raw_field("expires_at", itoa::Buffer::new().format(at));
    }
    r.id(id).frame()
}

/// `{"op":"error","code":…,"message":…}`, plus `id` when given.
pub fn reply_error(code: ErrorCode, message: &str, id: Option<&str>) -> Bytes {
    Reply::new("error").str_field("code", code.as_str()).str_field("message", message).id(id).frame()
}

/// The HTTP error body: `{"code":…,"message":…}`.
pub fn http_error_body(code: &str, message: &str) -> Bytes {
    let mut v = Vec::with_capacity(64 + message.len());
    v.extend_from_slice(b"{\"code\":");
    write_escaped(&mut v, code.as_bytes());
    v.extend_from_slice(b",\"message\":");
    write_escaped(&mut v, message.as_bytes());
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

/// The HTTP publish reply: `{"channel":…,"offset":…,"epoch":…}`.
pub fn http_published_body(channel: &str, offset: u64, epoch: &str) -> Bytes {
    let mut v = Vec::with_capacity(64 + channel.len());
    v.extend_from_slice(b"{\"channel\":");
    write_escaped(&mut v, channel.as_bytes());
    v.extend_from_slice(b",\"offset\":");
    v.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
    v.extend_from_slice(b",\"epoch\":");
    write_escaped(&mut v, epoch.as_bytes());
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of_frame(f: &[u8]) -> &str {
        assert_eq!(f[0], 0x81);
        let hl = match f[1] & 0x7F {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        std::str::from_utf8(&f[hl..]).unwrap()
    }

    #[test]
    fn envelope_json_payload_verbatim() {
        let p = Payload::json(Bytes::from_static(br#"{"a":[1,2]}"#)).unwrap();
        let f = ws_json("news", 17, &p);
        assert_eq!(text_of_frame(&f), r#"{"channel":"news","offset":17,"data":{"a":[1,2]}}"#);
    }

    #[test]
    fn envelope_text_payload_escaped() {
        let p = Payload::text("he said \"hi\"\n\\ \u{1} é");
        let f = ws_json("c", 1, &p);
        let t = text_of_frame(&f);
        assert_eq!(t, "{\"channel\":\"c\",\"offset\":1,\"data\":\"he said \\\"hi\\\"\\n\\\\ \\u0001 é\"}");
        let v: serde_json::Value = serde_json::from_str(t).unwrap();
        assert_eq!(v["data"], "he said \"hi\"\n\\ \u{1} é");
    }

    #[test]
    fn envelope_lengths_cross_the_frame_boundaries() {
        for n in [0usize, 80, 90, 100, 65_400, 65_535, 70_000] {
            let p = Payload::text("x".repeat(n));
            let f = ws_json("ch", 123_456, &p);
            let v: serde_json::Value = serde_json::from_str(text_of_frame(&f)).unwrap();
            assert_eq!(v["data"].as_str().unwrap().len(), n);
            assert_eq!(v["offset"], 123_456);
        }
    }

    #[test]
    fn json_payload_validation_and_one_line() {
        assert!(Payload::json(Bytes::from_static(b"{bad")).is_err());
        let p = Payload::json(Bytes::from_static(b"{\n  \"a\": \"b\"\r\n}")).unwrap();
        assert_eq!(p.as_bytes(), b"{   \"a\": \"b\"  }");
        let ev = sse_json("n", 2, &p);
        assert_eq!(&ev[..], b"data: {\"channel\":\"n\",\"offset\":2,\"data\":{   \"a\": \"b\"  }}\n\n");
    }

    #[test]
    fn nesting_is_capped() {
        let ok = format!("{}1{}", "[".repeat(128), "]".repeat(128));
        assert!(Payload::json(Bytes::from(ok)).is_ok());
        let deep = format!("{}1{}", "[".repeat(129), "]".repeat(129));
        assert!(Payload::json(Bytes::from(deep)).is_err());
        // Brackets inside strings do not count.
        let s = format!("[\"{}\\\"\"]", "[".repeat(500));
        assert!(Payload::json(Bytes::from(s)).is_ok());
    }

    #[test]
    fn raw_forms() {
        let p = Payload::text("a\nb");
        assert_eq!(&ws_raw(&p)[..], b"\x81\x03a\nb");
        assert_eq!(&sse_raw(&p)[..], b"data: a\ndata: b\n\n");
    }

    #[test]
    fn replies() {
        assert_eq!(
            text_of_frame(&reply_subscribed("news", "k3x9", None, None, None)),
            r#"{"op":"subscribed","channel":"news","epoch":"k3x9"}"#
        );
        assert_eq!(
            text_of_frame(&reply_subscribed("news", "k3x9", Some(25), Some(true), Some("1"))),
            r#"{"op":"subscribed","channel":"news","epoch":"k3x9","offset":25,"recovered":true,"id":1}"#
        );
        let (a, b) = (Payload::text("a\"b"), Payload::json(&b"{\"x\":1}"[..]).unwrap());
        let page = history_body(true, "n", "k3x9", 9, [(8, &a), (9, &b)].into_iter(), false, Some("2"), 1 << 20);
        assert_eq!(
            std::str::from_utf8(&page).unwrap(),
            r#"{"op":"history","channel":"n","epoch":"k3x9","offset":9,"publications":[{"offset":8,"data":"a\"b"},{"offset":9,"data":{"x":1}}],"complete":false,"id":2}"#
        );
        let empty = history_body(false, "n", "k3x9", 0, std::iter::empty(), true, None, 1 << 20);
        assert_eq!(std::str::from_utf8(&empty).unwrap(), r#"{"channel":"n","epoch":"k3x9","offset":0,"publications":[],"complete":true}"#);
        // Past the byte budget the page is cut, and says so.
        let cut = history_body(false, "n", "k3x9", 9, [(8, &a), (9, &b)].into_iter(), true, None, 200);
        assert_eq!(
            std::str::from_utf8(&cut).unwrap(),
            r#"{"channel":"n","epoch":"k3x9","offset":9,"publications":[{"offset":8,"data":"a\"b"}],"complete":false}"#
        );
        assert_eq!(text_of_frame(&reply_unsubscribed("news", Some("7"))), r#"{"op":"unsubscribed","channel":"news","id":7}"#);
        assert_eq!(
            text_of_frame(&reply_published("news", 17, "k3x9", Some("2"))),
            r#"{"op":"published","channel":"news","offset":17,"epoch":"k3x9","id":2}"#
        );
        assert_eq!(
            text_of_frame(&reply_error(ErrorCode::BadChannel, "bad \"x\"", None)),
            r#"{"op":"error","code":"bad_channel","message":"bad \"x\""}"#
        );
        assert_eq!(&http_published_body("n", 3, "e")[..], b"{\"channel\":\"n\",\"offset\":3,\"epoch\":\"e\"}\n");
    }
}
