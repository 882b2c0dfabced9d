//! The lean client side of WebSockets: the upgrade, server frames found in
//! a read buffer without allocating, masked client frames.

use herald::proto::deflate::{self, Agreed};
use herald::proto::frame::{self, OpCode, ProtocolError};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http1::{exchange, refused};
use crate::net::{ConnectError, Url};

/// Opens a WebSocket on `stream`, offering permessage-deflate when
/// `compression`; returns bytes received after the head and what the
/// server agreed.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    url: &Url,
    path: &str,
    compression: bool,
) -> Result<(Vec<u8>, Option<Agreed>), ConnectError> {
    let offer = if compression { format!("Sec-WebSocket-Extensions: {}\r\n", deflate::CLIENT_OFFER) } else { String::new() };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {}\r\n{offer}\r\n",
        url.authority(),
        "bG9hZGdlbi1oZXJhbGQtMQ=="
    );
    let (head, rest) = exchange(stream, req.as_bytes()).await?;
    if head.status != 101 {
        return Err(refused(head.status));
    }
    let agreed = if compression {
        deflate::accept_response(head.extensions.iter().map(String::as_str)).map_err(|e| ConnectError::new("bad_extension", e))?
    } else if !head.extensions.is_empty() {
        return Err(ConnectError::new("bad_extension", "the server answered an extension that was not offered"));
    } else {
        None
    };
    Ok((rest, agreed))
}

/// Largest server frame accepted. Payloads are at most 16 MiB (loadgen's
/// `--payload` limit) plus the server's envelope: anything larger is not a
/// frame loadgen sent.
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// One complete server frame inside a buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    pub op: OpCode,
    pub payload: &'a [u8],
    /// The final frame of its message.
    pub fin: bool,
    /// RSV1: the first frame of a compressed message.
    pub compressed: bool,
}

/// Parses the frame at the start of `buf`: `Ok(None)` when more bytes are
/// needed, else the frame (borrowed from `buf`) and the bytes it took.
#[inline]
pub fn parse_frame(buf: &[u8], compression: bool) -> Result<Option<(Frame<'_>, usize)>, ProtocolError> {
    let Some(head) = frame::decode_server_head_ext(buf, MAX_FRAME, compression)? else { return Ok(None) };
    let end = head.total_len();
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((Frame { op: head.opcode, payload: &buf[head.header_len..end], fin: head.fin, compressed: head.compressed }, end)))
}

/// Largest inflated message accepted.
pub const MAX_MESSAGE: usize = MAX_FRAME;

/// A subscriber's compressed-message state: the message being gathered
/// (a compressed message may come in fragments) and, when the server keeps
/// its context between messages, that context.
#[derive(Debug, Default)]
pub struct Inflate {
    /// Fragments of a compressed message so far.
    gathering: Option<Vec<u8>>,
    context: Option<deflate::Context>,
}

impl Inflate {
    pub fn new(agreed: &Agreed) -> Inflate {
        Inflate { gathering: None, context: agreed.server_context() }
    }

    /// Takes a data frame; returns the message to look at when one is
    /// complete: the frame's own payload if it is plain, else the inflated
    /// message (written to `out`).
    pub fn frame<'a>(&mut self, f: &Frame<'a>, out: &'a mut Vec<u8>) -> Result<Option<&'a [u8]>, String> {
        if f.compressed || (f.op == OpCode::Continuation && self.gathering.is_some()) {
            let buf = self.gathering.get_or_insert_with(Vec::new);
            if buf.len() + f.payload.len() > MAX_MESSAGE {
                return Err("compressed message over 64 MiB".into());
            }
            buf.extend_from_slice(f.payload);
            if !f.fin {
                return Ok(None);
            }
            let data = self.gathering.take().unwrap_or_default();
            *out = deflate::inflate(&data, self.context.as_mut(), MAX_MESSAGE).map_err(|e| e.to_string())?;
            return Ok(Some(out.as_slice()));
        }
        Ok(Some(f.payload))
    }
}

/// Appends a masked client frame (FIN set) to `out`.
pub fn client_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], mask: [u8; 4]) {
    frame::encode_client_frame(out, true, opcode, payload, mask);
}

/// A cheap mask source (RFC 6455 wants unpredictable keys against proxy
/// cache poisoning; a load generator on loopback needs only variety).
#[derive(Debug)]
pub struct Masker(u64);

impl Masker {
    pub fn new(seed: u64) -> Masker {
        Masker(seed | 1)
    }

    pub fn next(&mut self) -> [u8; 4] {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 as u32).to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_frames_and_waits_for_their_payload() {
        let f = [0x81, 3, b'a', b'b', b'c', 0x8A];
        let (fr, n) = parse_frame(&f, false).unwrap().unwrap();
        assert_eq!((fr.op, fr.payload, n), (OpCode::Text, &b"abc"[..], 5));
        // The header is complete but its payload is not.
        assert!(parse_frame(&f[..4], false).unwrap().is_none());
        let mut f = vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0];
        assert!(parse_frame(&f, false).unwrap().is_none());
        f.extend(std::iter::repeat_n(0u8, 65536));
        let (fr, n) = parse_frame(&f, false).unwrap().unwrap();
        assert_eq!((fr.op, fr.payload.len(), n), (OpCode::Binary, 65536, 65546));
        assert_eq!(parse_frame(&[0x81, 0x81, 0, 0, 0, 0, 0], false).unwrap_err(), ProtocolError::Masked);
    }

    #[test]
    fn compressed_messages_inflate_whole_and_fragmented() {
        let text = b"lg:1:2:3: and some words, and some words, and some words".repeat(4);
        let plain = herald::proto::frame::encode_frame(OpCode::Text, &text);
        let z = deflate::deflate_frame(&plain, 1, 0).unwrap();
        assert!(parse_frame(&z, false).is_err(), "RSV1 without compression agreed");
        let agreed = deflate::negotiate(["permessage-deflate"]).unwrap();
        let mut inf = Inflate::new(&agreed);
        let (f, _) = parse_frame(&z, true).unwrap().unwrap();
        let mut out = Vec::new();
        assert_eq!(inf.frame(&f, &mut out).unwrap(), Some(&text[..]));
        // The same deflate data in two fragments.
        let payload = frame::server_payload(&z);
        let (a, b) = payload.split_at(5);
        let first = Frame { op: OpCode::Text, payload: a, fin: false, compressed: true };
        let second = Frame { op: OpCode::Continuation, payload: b, fin: true, compressed: false };
        let mut out = Vec::new();
        assert_eq!(inf.frame(&first, &mut out).unwrap(), None);
        let mut out = Vec::new();
        assert_eq!(inf.frame(&second, &mut out).unwrap(), Some(&text[..]));
    }

    #[test]
    fn client_frames_are_masked() {
        let mut out = Vec::new();
        client_frame(&mut out, OpCode::Text, b"hi", [1, 2, 3, 4]);
        assert_eq!(out, [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
    }
}
