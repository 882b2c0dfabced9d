//! Entry points of the fuzz targets (`engine/fuzz`), kept in the library
//! so the corpus is also replayed by a normal test
//! (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes and panics only
//! when an invariant breaks.

use bytes::BytesMut;

use super::assemble::{Assembler, Incoming};
use super::frame;
use super::json::{self, Payload};

/// The client command parser: any UTF-8 text gets a command or an error
/// with a known code, never a panic; a command's channel obeys the rules.
pub fn command(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = super::command::parse(text, 4096);
    if let Ok(cmd) = parsed.command {
        use super::command::Command;
        let channel = match &cmd {
            Command::Subscribe { channel, .. }
            | Command::Unsubscribe { channel }
            | Command::Publish { channel, .. }
            | Command::History { channel, .. }
            | Command::Presence { channel } => channel,
            Command::Auth { .. } => return,
        };
        assert!(super::channel::validate(channel).is_ok(), "accepted a bad channel {channel:?}");
    }
}

/// The client frame decoder and message assembler over a byte stream,
/// as a connection feeds them: never a panic, never a message over the cap.
pub fn frames(data: &[u8]) {
    let max = 1024;
    feed(&mut Assembler::new(max), data, max, false, max);
}

/// Feeds the client frames in `data` to `asm` as a connection does (with
/// `compression` agreed or not), checking that no message passes `max`
/// and the assembler never holds more than `held`.
fn feed(asm: &mut Assembler, data: &[u8], max: usize, compression: bool, held: usize) {
    let mut buf = data.to_vec();
    let mut pos = 0;
    while pos < buf.len() {
        let head = match frame::decode_head_ext(&buf[pos..], max, compression) {
            Ok(Some(h)) if buf.len() - pos >= h.total_len() => h,
            _ => return,
        };
        let payload = &mut buf[pos + head.header_len..pos + head.total_len()];
        frame::apply_mask(payload, head.mask);
        match asm.push(&head, payload) {
            Ok(Some(Incoming::Text(t))) => assert!(t.len() <= max),
            Ok(Some(Incoming::Binary(b))) => assert!(b.len() <= max),
            Ok(_) => {}
            Err(_) => return,
        }
        // Plain: what reassembly holds, the finished message's buffer
        // included; compressed: what stays once the message is handled
        // (the inflated buffer is released then), the context included.
        let before = asm.buffered();
        asm.finish();
        let kept = if compression { asm.buffered() } else { before };
        assert!(kept <= held, "reassembly or context over its cap");
        pos += head.total_len();
    }
}

/// permessage-deflate: the input as extension offers and answers, as
/// deflate data inflated under a cap, and (after a mode byte) as client
/// frames on a connection that agreed compression, with or without a
/// client context: never a panic, never a message or a buffer over its cap.
pub fn deflate(data: &[u8]) {
    use super::deflate::{self, Context};
    let Some((&mode, rest)) = data.split_first() else { return };
    if let Ok(s) = std::str::from_utf8(rest) {
        let _ = deflate::negotiate([s]).map(|a| a.response());
        let _ = deflate::accept_response([s]);
    }
    let max = 1024;
    if let Ok(out) = deflate::inflate(rest, None, max) {
        assert!(out.len() <= max, "inflated past the cap");
    }
    let bits = 8 + mode % 8;
    let mut asm = Assembler::new(max).with_deflate((mode & 0x80 != 0).then(|| Context::new(bits)));
    feed(&mut asm, rest, max, true, max + (1 << 15));
}

/// The RESP decoder of the Redis subscriber connections.
pub fn resp(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = super::resp::decode(&mut buf) {}
}

/// Encoders against decoders: an SSE event's `data:` lines give back the
/// payload (line breaks normalised to `\n`), and a text payload's JSON
/// envelope parses back to the same string.
pub fn encoders(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let event = super::sse::encode_event(text.as_bytes());
    let event = std::str::from_utf8(&event).expect("SSE events are UTF-8");
    assert!(event.ends_with("\n\n"));
    let lines: Vec<&str> = event[..event.len() - 2].split('\n').map(|l| l.strip_prefix("data: ").expect("every line is data")).collect();
    assert_eq!(lines.join("\n"), text.replace("\r\n", "\n").replace('\r', "\n"));

    let env = json::ws_json("fuzz", 7, &Payload::text(text));
    let head = match env[1] & 0x7F {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let body = &env[head..];
    let v: serde_json::Value = serde_json::from_slice(body).expect("the envelope is JSON");
    assert_eq!(v["data"].as_str(), Some(text));
    assert_eq!(v["offset"].as_u64(), Some(7));
}

/// Connection tokens and grants, the parts Herald owns around the JWT
/// crate: any text as a token gets an identity or an error, never a
/// panic, and an accepted one names a valid user; grants made from any
/// text never open another user's channel. Input: grant patterns
/// (comma separated), a newline, a token.
pub fn tokens(data: &[u8]) {
    use std::sync::OnceLock;
    static AUTH: OnceLock<crate::auth::Auth> = OnceLock::new();
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (grants, token) = text.split_once('\n').unwrap_or((text, text));
    let id = crate::auth::Identity::new("42").subscribe(grants.split(',')).publish(grants.split(','));
    for ch in grants.split(',').chain(["user:43", "user:42"]) {
        if let Some(user) = ch.strip_prefix("user:") {
            assert_eq!(id.may_subscribe(ch), user == "42", "{ch:?}");
        }
    }
    let auth = AUTH.get_or_init(|| {
        let c = crate::config::AuthConfig {
            hmac_secret: Some(crate::auth::Secret::new("a-fuzzing-secret-of-some-length")),
            max_token_bytes: 4096,
            ..Default::default()
        };
        crate::auth::Auth::from_config(&c).expect("an HMAC key")
    });
    if let Ok(identity) = auth.verify(token) {
        assert!(crate::proto::channel::validate(identity.user()).is_ok() && !identity.user().contains(':'));
    }
}
