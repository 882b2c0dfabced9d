//! The lean client side of WebSockets: the upgrade, server frames found in
//! a read buffer without allocating, masked client frames.

use herald::proto::frame::{self, OpCode, ProtocolError};
use tokio::net::TcpStream;

use crate::http1::{exchange, refused};
use crate::net::{ConnectError, Url};

/// Opens a WebSocket on `stream`; returns bytes received after the head.
pub async fn upgrade(stream: &mut TcpStream, url: &Url, path: &str) -> Result<Vec<u8>, ConnectError> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {}\r\n\r\n",
        url.authority(),
        "bG9hZGdlbi1oZXJhbGQtMQ=="
    );
    let (head, rest) = exchange(stream, req.as_bytes()).await?;
    if head.status != 101 {
        return Err(refused(head.status));
    }
    Ok(rest)
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
}

/// Parses the frame at the start of `buf`: `Ok(None)` when more bytes are
/// needed, else the frame (borrowed from `buf`) and the bytes it took.
#[inline]
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, ProtocolError> {
    let Some(head) = frame::decode_server_head(buf, MAX_FRAME)? else { return Ok(None) };
    let end = head.total_len();
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((Frame { op: head.opcode, payload: &buf[head.header_len..end] }, end)))
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
        let (fr, n) = parse_frame(&f).unwrap().unwrap();
        assert_eq!((fr.op, fr.payload, n), (OpCode::Text, &b"abc"[..], 5));
        // The header is complete but its payload is not.
        assert!(parse_frame(&f[..4]).unwrap().is_none());
        let mut f = vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0];
        assert!(parse_frame(&f).unwrap().is_none());
        f.extend(std::iter::repeat_n(0u8, 65536));
        let (fr, n) = parse_frame(&f).unwrap().unwrap();
        assert_eq!((fr.op, fr.payload.len(), n), (OpCode::Binary, 65536, 65546));
        assert_eq!(parse_frame(&[0x81, 0x81, 0, 0, 0, 0, 0]).unwrap_err(), ProtocolError::Masked);
    }

    #[test]
    fn client_frames_are_masked() {
        let mut out = Vec::new();
        client_frame(&mut out, OpCode::Text, b"hi", [1, 2, 3, 4]);
        assert_eq!(out, [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
    }
}
