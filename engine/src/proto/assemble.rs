//! Message reassembly over decoded client frames (RFC 6455 §5.4).
//!
//! An unfragmented data frame is handed back without a copy; fragments are
//! gathered into one buffer whose size is capped at the configured maximum,
//! so an endless fragment stream is refused, never buffered. A compressed
//! message (permessage-deflate) is inflated once complete, into at most the
//! same maximum.

use super::deflate::{self, Context, InflateError};
use super::frame::{FrameHead, OpCode, ProtocolError};

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A text message, valid UTF-8.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
    /// A ping; answer with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong.
    Pong,
    /// A close frame, with its status code and reason if it had one.
    Close(Option<(u16, &'a str)>),
}

/// Gathers fragments into messages. One per connection; holds no memory
/// while no fragmented message is in progress (but the client's
/// compression context, when it agreed context takeover).
#[derive(Debug)]
pub struct Assembler {
    max_message: usize,
    partial: Option<(OpCode, Vec<u8>)>,
    /// The message in progress started with RSV1.
    compressed: bool,
    /// permessage-deflate agreed, with the client's context when it takes
    /// its context over between messages.
    deflate: Option<Option<Context>>,
    /// The last compressed message, inflated, until [`Assembler::finish`].
    inflated: Vec<u8>,
    stats: InflateStats,
}

/// Compressed messages inflated, with their bytes before and after.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InflateStats {
    /// Messages inflated.
    pub messages: u64,
    /// Compressed bytes.
    pub bytes_in: u64,
    /// Inflated bytes.
    pub bytes_out: u64,
}

impl Assembler {
    /// A new assembler refusing messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Assembler {
        Assembler { max_message, partial: None, compressed: false, deflate: None, inflated: Vec::new(), stats: InflateStats::default() }
    }

    /// Accepts compressed messages (permessage-deflate agreed), inflated
    /// with `context` as the dictionary when the client keeps one (each
    /// inflated message, compressed frames joined, capped at `max_message`).
    pub fn with_deflate(mut self, context: Option<Context>) -> Assembler {
        self.deflate = Some(context);
        self
    }

    /// Bytes held for a message in progress, and the compression context.
    pub fn buffered(&self) -> usize {
        self.partial.as_ref().map_or(0, |(_, b)| b.capacity())
            + self.inflated.capacity()
            + self.deflate.as_ref().and_then(|c| c.as_ref()).map_or(0, Context::held)
    }

    /// Takes one frame whose payload is already unmasked. Returns a message
    /// when one is complete, `None` while fragments are still coming.
    pub fn push<'a>(&'a mut self, head: &FrameHead, payload: &'a [u8]) -> Result<Option<Incoming<'a>>, ProtocolError> {
        self.finish();
        if head.compressed && self.deflate.is_none() {
            return Err(ProtocolError::ReservedBits);
        }
        match head.opcode {
            OpCode::Ping => Ok(Some(Incoming::Ping(payload))),
            OpCode::Pong => Ok(Some(Incoming::Pong)),
            OpCode::Close => parse_close(payload).map(|c| Some(Incoming::Close(c))),
            OpCode::Text | OpCode::Binary if self.partial.is_some() => Err(ProtocolError::BadContinuation),
            OpCode::Text | OpCode::Binary if head.fin && head.compressed => {
                self.inflated = inflate(payload, &mut self.deflate, self.max_message)?;
                self.stats.count(payload.len(), self.inflated.len());
                data(head.opcode, &self.inflated).map(Some)
            }
            OpCode::Text | OpCode::Binary if head.fin => data(head.opcode, payload).map(Some),
            OpCode::Text | OpCode::Binary => {
                if payload.len() > self.max_message {
                    return Err(ProtocolError::TooLarge);
                }
                self.compressed = head.compressed;
                self.partial = Some((head.opcode, payload.to_vec()));
                Ok(None)
            }
            OpCode::Continuation => {
                let Some((_, buf)) = self.partial.as_mut() else {
                    return Err(ProtocolError::BadContinuation);
                };
                let needed = buf.len() + payload.len();
                if needed > self.max_message {
                    self.partial = None;
                    return Err(ProtocolError::TooLarge);
                }
                if needed > buf.capacity() {
                    // Grow geometrically (many small fragments stay linear)
                    // but never past the cap: the buffer is bounded by
                    // `max_message`, not twice it.
                    let target = needed.max(buf.capacity().saturating_mul(2)).min(self.max_message);
                    buf.reserve_exact(target - buf.len());
                }
                buf.extend_from_slice(payload);
                if !head.fin {
                    return Ok(None);
                }
                let (op, buf) = self.partial.take().unwrap_or((OpCode::Binary, Vec::new()));
                if self.compressed {
                    self.inflated = inflate(&buf, &mut self.deflate, self.max_message)?;
                    self.stats.count(buf.len(), self.inflated.len());
                    return data(op, &self.inflated).map(Some);
                }
                // Keep the finished buffer until the caller is done with the message.
                self.partial = Some((OpCode::Continuation, buf));
                let done = self.partial.as_ref().map_or(&[][..], |(_, b)| b.as_slice());
                data(op, done).map(Some)
            }
        }
    }

    /// What was inflated since the last call.
    pub fn take_stats(&mut self) -> InflateStats {
        std::mem::take(&mut self.stats)
    }

    /// Releases the buffer of a message that [`Assembler::push`] completed
    /// (the next `push` does it too).
    pub fn finish(&mut self) {
        if matches!(self.partial, Some((OpCode::Continuation, _))) {
            self.partial = None;
        }
        if self.inflated.capacity() > 0 {
            self.inflated = Vec::new();
        }
    }
}

impl InflateStats {
    fn count(&mut self, bytes_in: usize, bytes_out: usize) {
        self.messages += 1;
        self.bytes_in += bytes_in as u64;
        self.bytes_out += bytes_out as u64;
    }
}

fn inflate(data: &[u8], deflate: &mut Option<Option<Context>>, cap: usize) -> Result<Vec<u8>, ProtocolError> {
    let context = deflate.as_mut().and_then(Option::as_mut);
    deflate::inflate(data, context, cap).map_err(|e| match e {
        InflateError::TooLarge => ProtocolError::TooLarge,
        InflateError::Invalid => ProtocolError::BadDeflate,
    })
}

fn data(op: OpCode, payload: &[u8]) -> Result<Incoming<'_>, ProtocolError> {
    if op == OpCode::Text {
        std::str::from_utf8(payload).map(Incoming::Text).map_err(|_| ProtocolError::InvalidUtf8)
    } else {
        Ok(Incoming::Binary(payload))
    }
}

/// Close codes a peer may send (RFC 6455 §7.4, IANA registry).
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, ProtocolError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ProtocolError::BadClose),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(ProtocolError::BadClose);
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fin: bool, opcode: OpCode, len: usize) -> FrameHead {
        FrameHead { fin, opcode, mask: [0; 4], header_len: 6, payload_len: len, compressed: false }
    }

    fn zhead(fin: bool, opcode: OpCode, len: usize) -> FrameHead {
        FrameHead { compressed: true, ..head(fin, opcode, len) }
    }

    fn deflated(msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(deflate::deflate_into(msg, 6, &mut out));
        out
    }

    #[test]
    fn compressed_messages_inflate_whole_or_fragmented() {
        let msg = "hello hello hello hello hello hello".as_bytes();
        let z = deflated(msg);
        let mut a = Assembler::new(100).with_deflate(None);
        assert_eq!(a.push(&zhead(true, OpCode::Text, z.len()), &z), Ok(Some(Incoming::Text(std::str::from_utf8(msg).unwrap()))));
        // Fragmented: RSV1 on the first frame only, pings between.
        let (x, y) = z.split_at(3);
        assert_eq!(a.push(&zhead(false, OpCode::Binary, x.len()), x), Ok(None));
        assert_eq!(a.push(&head(true, OpCode::Ping, 0), b""), Ok(Some(Incoming::Ping(b""))));
        assert_eq!(a.push(&head(true, OpCode::Continuation, y.len()), y), Ok(Some(Incoming::Binary(msg))));
        // A plain message still passes on a compressing connection.
        assert_eq!(a.push(&head(true, OpCode::Text, 2), b"hi"), Ok(Some(Incoming::Text("hi"))));
        a.finish();
        assert_eq!(a.buffered(), 0);
    }

    #[test]
    fn compressed_messages_are_capped_checked_and_refused_without_agreement() {
        let z = deflated(&[b'a'; 5000]);
        assert!(z.len() < 100);
        let mut a = Assembler::new(4096).with_deflate(None);
        assert_eq!(a.push(&zhead(true, OpCode::Binary, z.len()), &z), Err(ProtocolError::TooLarge));
        let bad_utf8 = deflated(&[0xff; 300]);
        assert_eq!(a.push(&zhead(true, OpCode::Text, bad_utf8.len()), &bad_utf8), Err(ProtocolError::InvalidUtf8));
        assert_eq!(a.push(&zhead(true, OpCode::Text, 4), b"\xff\xff\xff\xff"), Err(ProtocolError::BadDeflate));
        let mut plain = Assembler::new(4096);
        assert_eq!(plain.push(&zhead(true, OpCode::Text, z.len()), &z), Err(ProtocolError::ReservedBits));
    }

    #[test]
    fn whole_frames_pass_through() {
        let mut a = Assembler::new(100);
        assert_eq!(a.push(&head(true, OpCode::Text, 2), b"hi"), Ok(Some(Incoming::Text("hi"))));
        assert_eq!(a.push(&head(true, OpCode::Binary, 1), b"\xff"), Ok(Some(Incoming::Binary(b"\xff"))));
        assert_eq!(a.push(&head(true, OpCode::Ping, 1), b"p"), Ok(Some(Incoming::Ping(b"p"))));
        assert_eq!(a.push(&head(true, OpCode::Text, 1), b"\xff"), Err(ProtocolError::InvalidUtf8));
        assert_eq!(a.buffered(), 0);
    }

    #[test]
    fn fragments_reassemble_with_control_frames_between() {
        let mut a = Assembler::new(100);
        assert_eq!(a.push(&head(false, OpCode::Text, 3), b"hel"), Ok(None));
        assert_eq!(a.push(&head(true, OpCode::Ping, 0), b""), Ok(Some(Incoming::Ping(b""))));
        assert_eq!(a.push(&head(false, OpCode::Continuation, 1), b"l"), Ok(None));
        assert_eq!(a.push(&head(true, OpCode::Continuation, 1), b"o"), Ok(Some(Incoming::Text("hello"))));
        a.finish();
        assert_eq!(a.buffered(), 0);
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted() {
        let mut a = Assembler::new(100);
        let e = "é".as_bytes();
        assert_eq!(a.push(&head(false, OpCode::Text, 1), &e[..1]), Ok(None));
        assert_eq!(a.push(&head(true, OpCode::Continuation, 1), &e[1..]), Ok(Some(Incoming::Text("é"))));
    }

    #[test]
    fn reassembled_size_is_capped() {
        let mut a = Assembler::new(10);
        assert_eq!(a.push(&head(false, OpCode::Binary, 6), &[0; 6]), Ok(None));
        assert_eq!(a.push(&head(false, OpCode::Continuation, 6), &[0; 6]), Err(ProtocolError::TooLarge));
        assert_eq!(a.buffered(), 0);
    }

    #[test]
    fn continuation_rules() {
        let mut a = Assembler::new(10);
        assert_eq!(a.push(&head(true, OpCode::Continuation, 0), b""), Err(ProtocolError::BadContinuation));
        assert_eq!(a.push(&head(false, OpCode::Text, 1), b"a"), Ok(None));
        assert_eq!(a.push(&head(true, OpCode::Text, 1), b"b"), Err(ProtocolError::BadContinuation));
    }

    #[test]
    fn close_frames() {
        let mut a = Assembler::new(10);
        assert_eq!(a.push(&head(true, OpCode::Close, 0), b""), Ok(Some(Incoming::Close(None))));
        assert_eq!(a.push(&head(true, OpCode::Close, 4), b"\x03\xe8ok"), Ok(Some(Incoming::Close(Some((1000, "ok"))))));
        assert_eq!(a.push(&head(true, OpCode::Close, 1), b"\x03"), Err(ProtocolError::BadClose));
        assert_eq!(a.push(&head(true, OpCode::Close, 2), b"\x03\xed"), Err(ProtocolError::BadClose)); // 1005
        assert_eq!(a.push(&head(true, OpCode::Close, 3), b"\x03\xe8\xff"), Err(ProtocolError::InvalidUtf8));
        for ok in [1000, 1003, 1007, 1011, 3000, 4999] {
            assert!(close_code_allowed(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!close_code_allowed(bad), "{bad}");
        }
    }
}
