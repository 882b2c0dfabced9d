//! Message reassembly over decoded client frames (RFC 6455 §5.4).
//!
//! An unfragmented data frame is handed back without a copy; fragments are
//! gathered into one buffer whose size is capped at the configured maximum,
//! so an endless fragment stream is refused, never buffered.

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
/// while no fragmented message is in progress.
#[derive(Debug)]
pub struct Assembler {
    max_message: usize,
    partial: Option<(OpCode, Vec<u8>)>,
}

impl Assembler {
    /// A new assembler refusing messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Assembler {
        Assembler { max_message, partial: None }
    }

    /// Bytes held for a message in progress.
    pub fn buffered(&self) -> usize {
        self.partial.as_ref().map_or(0, |(_, b)| b.capacity())
    }

    /// Takes one frame whose payload is already unmasked. Returns a message
    /// when one is complete, `None` while fragments are still coming.
    pub fn push<'a>(&'a mut self, head: &FrameHead, payload: &'a [u8]) -> Result<Option<Incoming<'a>>, ProtocolError> {
        self.finish();
        match head.opcode {
            OpCode::Ping => Ok(Some(Incoming::Ping(payload))),
            OpCode::Pong => Ok(Some(Incoming::Pong)),
            OpCode::Close => parse_close(payload).map(|c| Some(Incoming::Close(c))),
            OpCode::Text | OpCode::Binary if self.partial.is_some() => Err(ProtocolError::BadContinuation),
            OpCode::Text | OpCode::Binary if head.fin => data(head.opcode, payload).map(Some),
            OpCode::Text | OpCode::Binary => {
                if payload.len() > self.max_message {
                    return Err(ProtocolError::TooLarge);
                }
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
                // Keep the finished buffer until the caller is done with the message.
                self.partial = Some((OpCode::Continuation, buf));
                let done = self.partial.as_ref().map_or(&[][..], |(_, b)| b.as_slice());
                data(op, done).map(Some)
            }
        }
    }

    /// Releases the buffer of a message that [`Assembler::push`] completed
    /// (the next `push` does it too).
    pub fn finish(&mut self) {
        if matches!(self.partial, Some((OpCode::Continuation, _))) {
            self.partial = None;
        }
    }
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
        FrameHead { fin, opcode, mask: [0; 4], header_len: 6, payload_len: len }
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
