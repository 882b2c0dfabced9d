//! permessage-deflate for the client, beneath tungstenite (which has no
//! extension support): the stream offers
//! `permessage-deflate; server_no_context_takeover`, and once the server
//! agreed, every compressed message it sends (RSV1, possibly fragmented)
//! is inflated and handed up as one plain frame. Server frames are never
//! masked, so rewriting them needs no key. What the client sends goes
//! uncompressed (RFC 7692 lets each message choose): its commands are
//! small, the server's broadcasts are what compression is for.
//!
//! With `server_no_context_takeover` every message inflates on its own, so
//! the stream keeps no LZ77 window; an inflated message is capped at
//! [`MAX_MESSAGE`] (tungstenite's own default), past which reading fails.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The offer sent in `Sec-WebSocket-Extensions`.
pub(crate) const OFFER: &str = "permessage-deflate; server_no_context_takeover";

/// Largest inflated message (and compressed message) accepted.
pub(crate) const MAX_MESSAGE: usize = 64 << 20;

const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// A server-to-client stream that inflates compressed messages.
pub(crate) struct Inflating<S> {
    inner: S,
    /// Bytes read from `inner`, not yet handed up.
    raw: Vec<u8>,
    /// Bytes ready for tungstenite.
    ready: Vec<u8>,
    at: usize,
    /// The response head has passed.
    head_done: bool,
    /// The server agreed permessage-deflate.
    enabled: bool,
    /// A compressed message in fragments: its opcode and data so far.
    gathering: Option<(u8, Vec<u8>)>,
    inflater: Decompress,
}

impl<S> Inflating<S> {
    pub(crate) fn new(inner: S) -> Inflating<S> {
        Inflating {
            inner,
            raw: Vec::new(),
            ready: Vec::new(),
            at: 0,
            head_done: false,
            enabled: false,
            gathering: None,
            inflater: Decompress::new(false),
        }
    }

    /// Moves what can be handed up from `raw` to `ready`.
    fn process(&mut self) -> io::Result<()> {
        if !self.head_done {
            let Some(end) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                if self.raw.len() > 16 * 1024 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "response head over 16 KiB"));
                }
                return Ok(());
            };
            let head: Vec<u8> = self.raw.drain(..end + 4).collect();
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            self.enabled = text
                .lines()
                .any(|l| l.strip_prefix("sec-websocket-extensions:").is_some_and(|v| v.trim().starts_with("permessage-deflate")));
            self.ready.extend_from_slice(&head);
            self.head_done = true;
        }
        if !self.enabled {
            self.ready.append(&mut self.raw);
            return Ok(());
        }
        loop {
            let Some((header, len)) = frame_len(&self.raw) else { return Ok(()) };
            if len > MAX_MESSAGE as u64 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "frame over 64 MiB"));
            }
            let total = header + len as usize;
            if self.raw.len() < total {
                return Ok(());
            }
            let (b0, opcode) = (self.raw[0], self.raw[0] & 0x0F);
            let fin = b0 & 0x80 != 0;
            let rsv1 = b0 & 0x40 != 0;
            let bad = |m: &str| Err(io::Error::new(io::ErrorKind::InvalidData, m.to_string()));
            if self.raw[1] & 0x80 != 0 {
                return bad("masked server frame");
            }
            if rsv1 && !matches!(opcode, 1 | 2) {
                return bad("RSV1 on a continuation or control frame");
            }
            if matches!(opcode, 1 | 2) && self.gathering.is_some() {
                return bad("a new message inside a compressed fragmented one");
            }
            let continuing = opcode == 0 && self.gathering.is_some();
            if !(rsv1 || continuing) {
                self.ready.extend_from_slice(&self.raw[..total]);
                self.raw.drain(..total);
                continue;
            }
            let (op, data) = self.gathering.get_or_insert_with(|| (opcode, Vec::new()));
            let op = *op;
            if data.len() + total - header > MAX_MESSAGE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "compressed message over 64 MiB"));
            }
            data.extend_from_slice(&self.raw[header..total]);
            self.raw.drain(..total);
            if !fin {
                continue;
            }
            let data = self.gathering.take().map(|(_, d)| d).unwrap_or_default();
            let message = inflate(&mut self.inflater, &data)?;
            write_frame(&mut self.ready, op, &message);
        }
    }
}

/// Header length and payload length of the server frame at the start of
/// `buf`, once its header is complete.
fn frame_len(buf: &[u8]) -> Option<(usize, u64)> {
    let b1 = *buf.get(1)?;
    match b1 & 0x7F {
        126 => Some((4, u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)))),
        127 => Some((10, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?))),
        n => Some((2, u64::from(n))),
    }
}

fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(n as u8);
    } else if n <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

fn inflate(d: &mut Decompress, data: &[u8]) -> io::Result<Vec<u8>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    d.reset(false);
    let mut out = Vec::with_capacity((data.len() * 4).clamp(64, MAX_MESSAGE + 1));
    for mut input in [data, &TAIL[..]] {
        loop {
            if out.len() == out.capacity() {
                if out.len() > MAX_MESSAGE {
                    return Err(bad("inflated message over 64 MiB"));
                }
                out.reserve_exact(out.capacity().min(MAX_MESSAGE + 1 - out.len()).max(1));
            }
            let before = d.total_in();
            let status = d.decompress_vec(input, &mut out, FlushDecompress::None).map_err(|_| bad("invalid compressed data"))?;
            input = &input[(d.total_in() - before) as usize..];
            if out.len() > MAX_MESSAGE {
                return Err(bad("inflated message over 64 MiB"));
            }
            match status {
                Status::StreamEnd => return Ok(out),
                _ if input.is_empty() && out.len() < out.capacity() => break,
                Status::BufError if out.len() < out.capacity() => return Err(bad("invalid compressed data")),
                _ => {}
            }
        }
    }
    Ok(out)
}

impl<S: AsyncRead + Unpin> AsyncRead for Inflating<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.at);
                buf.put_slice(&this.ready[this.at..this.at + n]);
                this.at += n;
                if this.at == this.ready.len() {
                    this.ready.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // EOF: whatever is left unparsed goes up as it is.
                this.ready.append(&mut this.raw);
                if this.ready.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.raw.extend_from_slice(rb.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inflating<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};
    use tokio::io::AsyncReadExt;

    fn deflated(msg: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::new(6), false);
        let mut out = Vec::with_capacity(msg.len() + 64);
        c.compress_vec(msg, &mut out, FlushCompress::Sync).unwrap();
        out.truncate(out.len() - 4);
        out
    }

    #[tokio::test]
    async fn compressed_frames_come_up_plain_and_the_rest_as_it_was() {
        let msg = b"{\"op\":\"message\",\"data\":\"hello hello hello hello\"}".repeat(3);
        let z = deflated(&msg);
        let mut wire =
            b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n"
                .to_vec();
        // Whole, then in two fragments with a ping between, then a plain frame.
        wire.push(0xC1);
        wire.push(z.len() as u8);
        wire.extend_from_slice(&z);
        wire.extend_from_slice(&[0x41, 4]);
        wire.extend_from_slice(&z[..4]);
        wire.extend_from_slice(&[0x89, 0]);
        wire.push(0x80);
        wire.push((z.len() - 4) as u8);
        wire.extend_from_slice(&z[4..]);
        wire.extend_from_slice(&[0x81, 2, b'h', b'i']);
        let mut s = Inflating::new(&wire[..]);
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let head_len = wire.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let mut want = wire[..head_len].to_vec();
        write_frame(&mut want, 1, &msg);
        want.extend_from_slice(&[0x89, 0]);
        write_frame(&mut want, 1, &msg);
        want.extend_from_slice(&[0x81, 2, b'h', b'i']);
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn without_the_extension_nothing_is_touched() {
        let wire = b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi\xc1\x01x".to_vec();
        let mut s = Inflating::new(&wire[..]);
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, wire);
    }

    #[tokio::test]
    async fn frames_no_server_may_send_are_errors() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n".to_vec();
        for frames in [&[0xC9u8, 0][..], &[0xC0, 0], &[0x81, 0x80, 0, 0, 0, 0], &[0x41, 1, 0, 0x81, 0]] {
            let mut wire = head.clone();
            wire.extend_from_slice(frames);
            let mut got = Vec::new();
            assert!(Inflating::new(&wire[..]).read_to_end(&mut got).await.is_err(), "{frames:?}");
        }
    }

    #[test]
    fn a_bomb_is_an_error_not_an_allocation() {
        let mut c = Compress::new(Compression::new(9), false);
        let zeros = vec![0u8; MAX_MESSAGE + 4096];
        let mut z = Vec::with_capacity(1 << 20);
        c.compress_vec(&zeros, &mut z, FlushCompress::Sync).unwrap();
        assert!(inflate(&mut Decompress::new(false), &z[..z.len() - 4]).is_err());
    }
}
