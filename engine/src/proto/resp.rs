//! The part of RESP2 (the Redis protocol) that Herald's Redis subscriber
//! connections speak: command encoding, and a decoder that takes complete
//! values off the front of a read buffer without copying bulk strings.
//!
//! Herald reads its pub/sub connections itself rather than through
//! redis-rs's pub/sub stream, whose internal queue is unbounded: here a
//! slow node stops reading, TCP pushes back, and Redis's own output-buffer
//! limit ends the connection, which Herald counts as a gap.

use bytes::{Buf, Bytes, BytesMut};

/// Largest bulk string accepted (a message body). A Herald publisher sends
/// at most its `max_message_bytes` plus a short header.
pub const MAX_BULK: usize = 64 * 1024 * 1024;
/// Most elements in one array (pub/sub pushes have 3 or 4).
const MAX_ARRAY: usize = 1024;

/// One RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(Bytes),
    /// `-ERR …`
    Error(Bytes),
    /// `:42`
    Int(i64),
    /// `$n` bulk string; `None` for the null bulk string.
    Bulk(Option<Bytes>),
    /// `*n` array; `None` for the null array.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The bytes of a simple or bulk string.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Resp::Simple(b) | Resp::Bulk(Some(b)) => Some(b),
            _ => None,
        }
    }
}

/// The stream is not RESP2 (or breaks Herald's limits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad RESP from Redis: {0}")]
pub struct RespError(pub &'static str);

/// Appends a command (an array of bulk strings) to `out`.
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(args.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        out.extend_from_slice(itoa::Buffer::new().format(a.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Takes one complete value off the front of `buf`; `Ok(None)` when more
/// bytes are needed (nothing is consumed then).
pub fn decode(buf: &mut BytesMut) -> Result<Option<Resp>, RespError> {
    let Some(len) = scan(buf, 0, 0)? else { return Ok(None) };
    let mut whole = buf.split_to(len).freeze();
    Ok(Some(build(&mut whole)))
}

/// The end of the line starting at `at` (the index of its `\r`).
fn line_end(buf: &[u8], at: usize) -> Option<usize> {
    let i = memchr_crlf(&buf[at..])?;
    Some(at + i)
}

fn memchr_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn parse_int(b: &[u8]) -> Result<i64, RespError> {
    let s = std::str::from_utf8(b).map_err(|_| RespError("integer is not ASCII"))?;
    s.parse().map_err(|_| RespError("bad integer"))
}

/// Length of the complete value at `at`, if it is all there.
fn scan(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, RespError> {
    if depth > 4 {
        return Err(RespError("arrays nested too deep"));
    }
    let Some(&kind) = buf.get(at) else { return Ok(None) };
    let Some(end) = line_end(buf, at + 1) else {
        if buf.len() - at > 64 * 1024 {
            return Err(RespError("line too long"));
        }
        return Ok(None);
    };
    let after = end + 2;
    match kind {
        b'+' | b'-' => Ok(Some(after - at)),
        b':' => parse_int(&buf[at + 1..end]).map(|_| Some(after - at)),
        b'$' => {
            let n = parse_int(&buf[at + 1..end])?;
            if n < 0 {
                return Ok(Some(after - at));
            }
            let n = n as usize;
            if n > MAX_BULK {
                return Err(RespError("bulk string too large"));
            }
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            if &buf[after + n..after + n + 2] != b"\r\n" {
                return Err(RespError("bulk string not followed by CRLF"));
            }
            Ok(Some(after + n + 2 - at))
        }
        b'*' => {
            let n = parse_int(&buf[at + 1..end])?;
            if n < 0 {
                return Ok(Some(after - at));
            }
            if n as usize > MAX_ARRAY {
                return Err(RespError("array too long"));
            }
            let mut pos = after;
            for _ in 0..n {
                match scan(buf, pos, depth + 1)? {
                    Some(len) => pos += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(pos - at))
        }
        _ => Err(RespError("unknown type byte")),
    }
}

/// Builds the value that [`scan`] measured; `b` holds it whole.
fn build(b: &mut Bytes) -> Resp {
    let kind = b[0];
    let end = memchr_crlf(b).unwrap_or(b.len());
    let head = b.slice(1..end);
    b.advance(end + 2);
    let int = || parse_int(&head).unwrap_or(0);
    match kind {
        b'+' => Resp::Simple(head),
        b'-' => Resp::Error(head),
        b':' => Resp::Int(int()),
        b'$' => {
            let n = int();
            if n < 0 {
                return Resp::Bulk(None);
            }
            let data = b.split_to(n as usize);
            b.advance(2);
            Resp::Bulk(Some(data))
        }
        _ => {
            let n = int();
            if n < 0 {
                return Resp::Array(None);
            }
            Resp::Array(Some((0..n).map(|_| build(b)).collect()))
        }
    }
}

/// The Redis Cluster hash slot of a key: CRC16/XMODEM of the key, or of
/// its `{hash tag}` when it has a non-empty one, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(key)) % 16384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8]) -> Vec<Resp> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(v) = decode(&mut buf).unwrap() {
            out.push(v);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        out
    }

    fn bulk(s: &str) -> Resp {
        Resp::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())))
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(&mut out, &[b"SUBSCRIBE", b"herald:{news}"]);
        assert_eq!(out, b"*2\r\n$9\r\nSUBSCRIBE\r\n$13\r\nherald:{news}\r\n");
    }

    #[test]
    fn decodes_pushes_replies_and_errors() {
        let v = all(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$5\r\nhe\r\nl\r\n+PONG\r\n-MOVED 3999 127.0.0.1:7001\r\n$-1\r\n*-1\r\n");
        assert_eq!(v[0], Resp::Array(Some(vec![bulk("subscribe"), bulk("a"), Resp::Int(1)])));
        assert_eq!(v[1], Resp::Array(Some(vec![bulk("message"), bulk("a"), bulk("he\r\nl")])), "bulk strings are binary-safe");
        assert_eq!(v[2], Resp::Simple(Bytes::from_static(b"PONG")));
        assert_eq!(v[3], Resp::Error(Bytes::from_static(b"MOVED 3999 127.0.0.1:7001")));
        assert_eq!((&v[4], &v[5]), (&Resp::Bulk(None), &Resp::Array(None)));
    }

    #[test]
    fn incomplete_input_consumes_nothing() {
        let whole = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$5\r\nhello\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
        assert_eq!(all(whole).len(), 1);
    }

    #[test]
    fn garbage_and_oversize_are_errors() {
        for bad in [&b"?what\r\n"[..], b"$5\r\nhelloXX", b":abc\r\n", b"$999999999999\r\n"] {
            assert!(decode(&mut BytesMut::from(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384, "an empty tag hashes the whole key");
        assert_eq!(key_slot(b"herald:{news}"), key_slot(b"herald:{news}:meta"));
    }
}
