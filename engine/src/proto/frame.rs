//! WebSocket framing (RFC 6455 §5): the server-frame encoder and a strict
//! client-frame decoder, and their mirror images for clients (load
//! generators, benches, tests): a server-frame header decoder and a
//! client-frame encoder.
//!
//! Server frames are never masked, so one encoded frame is byte-for-byte the
//! same for every subscriber: it is built once and shared by refcount.

use bytes::{BufMut, Bytes, BytesMut};

/// Largest server frame header: 2 bytes + 8-byte extended length.
pub const MAX_SERVER_HEADER: usize = 10;

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    /// Continuation of a fragmented message.
    Continuation = 0x0,
    /// UTF-8 text data.
    Text = 0x1,
    /// Binary data.
    Binary = 0x2,
    /// Connection close.
    Close = 0x8,
    /// Ping.
    Ping = 0x9,
    /// Pong.
    Pong = 0xA,
}

impl OpCode {
    pub(crate) fn from_u8(b: u8) -> Option<OpCode> {
        Some(match b {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong are control frames.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Writes an unmasked server frame header for a payload of `len` bytes into
/// `out` and returns how many bytes it used (2, 4 or 10).
pub fn encode_header(fin: bool, opcode: OpCode, len: usize, out: &mut [u8; MAX_SERVER_HEADER]) -> usize {
    out[0] = (u8::from(fin) << 7) | opcode as u8;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Length of the server frame header for a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    }
}

/// The payload of a complete unmasked server frame (empty if `frame` is
/// too short to be one).
pub fn server_payload(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(header..).unwrap_or(&[])
}

/// Starts a complete single-frame message in a buffer sized for header and
/// payload; the caller then writes exactly `len` payload bytes.
pub fn begin_frame(opcode: OpCode, len: usize) -> BytesMut {
    let mut head = [0u8; MAX_SERVER_HEADER];
    let n = encode_header(true, opcode, len, &mut head);
    let mut buf = BytesMut::with_capacity(n + len);
    buf.put_slice(&head[..n]);
    buf
}

/// Encodes a complete, final, unmasked server frame.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = begin_frame(opcode, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// Encodes a close frame with a status code and a reason, the reason cut at
/// a character boundary so the payload fits a control frame (125 bytes).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let reason = super::truncate_str(reason, 123).as_bytes();
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason);
    encode_frame(OpCode::Close, &payload[..2 + reason.len()])
}

/// A violation of RFC 6455 by the client; each maps to the close code the
/// server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// RSV1–3 set without a negotiated extension.
    #[error("reserved bits set")]
    ReservedBits,
    /// An opcode RFC 6455 reserves.
    #[error("reserved opcode")]
    BadOpcode,
    /// Client frames must be masked (§5.1).
    #[error("client frame not masked")]
    Unmasked,
    /// Server frames must not be masked (§5.1); only a client sees this.
    #[error("server frame masked")]
    Masked,
    /// Control frames cannot be fragmented (§5.5).
    #[error("fragmented control frame")]
    FragmentedControl,
    /// Control frame payloads are at most 125 bytes (§5.5).
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
    /// A continuation with no message in progress, or a new message before
    /// the last one finished.
    #[error("bad continuation")]
    BadContinuation,
    /// A close frame with a 1-byte payload or a code that may not be sent.
    #[error("bad close frame")]
    BadClose,
    /// Text (or a close reason) that is not UTF-8.
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// A frame or reassembled message over the configured maximum (or a
    /// compressed one that inflates past it).
    #[error("message too big")]
    TooLarge,
    /// RSV1 (compressed) on a continuation or control frame.
    #[error("compressed continuation or control frame")]
    CompressedFragment,
    /// A compressed message whose deflate data does not inflate.
    #[error("invalid compressed data")]
    BadDeflate,
}

impl ProtocolError {
    /// The RFC 6455 close code for this error.
    pub fn close_code(self) -> u16 {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::BadDeflate => 1007,
            ProtocolError::TooLarge => 1009,
            _ => 1002,
        }
    }
}

/// A decoded client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// Final fragment of its message.
    pub fin: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key.
    pub mask: [u8; 4],
    /// Bytes of header, including the masking key.
    pub header_len: usize,
    /// Bytes of payload.
    pub payload_len: usize,
    /// RSV1: the first frame of a compressed message (permessage-deflate).
    pub compressed: bool,
}

impl FrameHead {
    /// Header plus payload.
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Decodes a client frame header from the start of `buf`.
///
/// `Ok(None)` means the header is not complete yet: read more. A header
/// that declares a payload over `max_payload` is refused before anything is
/// buffered for it.
pub fn decode_head(buf: &[u8], max_payload: usize) -> Result<Option<FrameHead>, ProtocolError> {
    decode_head_ext(buf, max_payload, false)
}

/// Checks the reserved bits: RSV2 and RSV3 are never set; RSV1 only with
/// `compression` agreed, and then only on the first frame of a data
/// message. Returns RSV1.
fn check_rsv(b0: u8, opcode: OpCode, compression: bool) -> Result<bool, ProtocolError> {
    let rsv1 = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (rsv1 && !compression) {
        return Err(ProtocolError::ReservedBits);
    }
    if rsv1 && !matches!(opcode, OpCode::Text | OpCode::Binary) {
        return Err(ProtocolError::CompressedFragment);
    }
    Ok(rsv1)
}

/// [`decode_head`] on a connection that agreed permessage-deflate when
/// `compression` is true: RSV1 then marks a compressed message
/// ([`FrameHead::compressed`]).
pub fn decode_head_ext(buf: &[u8], max_payload: usize, compression: bool) -> Result<Option<FrameHead>, ProtocolError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 && !compression {
        return Err(ProtocolError::ReservedBits);
    }
    let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(ProtocolError::BadOpcode)?;
    let compressed = check_rsv(b0, opcode, compression)?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(ProtocolError::Unmasked);
    }
    if opcode.is_control() && !fin {
        return Err(ProtocolError::FragmentedControl);
    }
    let (len_bytes, short) = match b1 & 0x7F {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(n as usize)),
    };
    if opcode.is_control() && short.is_none() {
        return Err(ProtocolError::ControlTooLong);
    }
    if buf.len() < 2 + len_bytes {
        if let Some(n) = short {
            check_len(opcode, n as u64, max_payload)?;
        }
        return Ok(None);
    }
    let payload_len = match short {
        Some(n) => n as u64,
        None if len_bytes == 2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        None => u64::from_be_bytes([buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8], buf[9]]),
    };
    // Refuse an oversized frame from its length alone, before the mask arrives.
    check_len(opcode, payload_len, max_payload)?;
    let header_len = 2 + len_bytes + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    let m = header_len - 4;
    Ok(Some(FrameHead {
        fin,
        opcode,
        mask: [buf[m], buf[m + 1], buf[m + 2], buf[m + 3]],
        header_len,
        // check_len bounded it by max_payload, a usize.
        payload_len: payload_len as usize,
        compressed,
    }))
}

fn check_len(opcode: OpCode, len: u64, max_payload: usize) -> Result<(), ProtocolError> {
    if opcode.is_control() && len > 125 {
        Err(ProtocolError::ControlTooLong)
    } else if len > max_payload as u64 {
        Err(ProtocolError::TooLarge)
    } else {
        Ok(())
    }
}

/// A decoded server frame header, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHead {
    /// Final fragment of its message.
    pub fin: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// Bytes of header (2, 4 or 10: server frames carry no mask).
    pub header_len: usize,
    /// Bytes of payload.
    pub payload_len: usize,
    /// RSV1: the first frame of a compressed message (permessage-deflate).
    pub compressed: bool,
}

impl ServerHead {
    /// Header plus payload.
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Decodes a server (unmasked) frame header from the start of `buf`, for
/// clients.
///
/// `Ok(None)` means the header is not complete yet: read more. It says
/// nothing of the payload, which may still be arriving: the frame is
/// complete once `buf` holds [`ServerHead::total_len`] bytes. The checks
/// mirror [`decode_head`]: reserved bits and opcodes, fragmented or long
/// control frames, a mask, and a declared payload over `max_payload` (from
/// the length alone) are errors.
#[inline]
pub fn decode_server_head(buf: &[u8], max_payload: usize) -> Result<Option<ServerHead>, ProtocolError> {
    decode_server_head_ext(buf, max_payload, false)
}

/// [`decode_server_head`] for a client that agreed permessage-deflate when
/// `compression` is true (RSV1 then marks a compressed message).
#[inline]
pub fn decode_server_head_ext(buf: &[u8], max_payload: usize, compression: bool) -> Result<Option<ServerHead>, ProtocolError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 && !compression {
        return Err(ProtocolError::ReservedBits);
    }
    let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(ProtocolError::BadOpcode)?;
    let compressed = check_rsv(b0, opcode, compression)?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 != 0 {
        return Err(ProtocolError::Masked);
    }
    if opcode.is_control() && !fin {
        return Err(ProtocolError::FragmentedControl);
    }
    let (header_len, payload_len) = match b1 & 0x7F {
        126 | 127 if opcode.is_control() => return Err(ProtocolError::ControlTooLong),
        126 if buf.len() >= 4 => (4, u64::from(u16::from_be_bytes([buf[2], buf[3]]))),
        127 if buf.len() >= 10 => (10, u64::from_be_bytes([buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8], buf[9]])),
        126 | 127 => return Ok(None),
        n => (2, u64::from(n)),
    };
    check_len(opcode, payload_len, max_payload)?;
    // check_len bounded it by max_payload, a usize.
    Ok(Some(ServerHead { fin, opcode, header_len, payload_len: payload_len as usize, compressed }))
}

/// Appends a masked client frame to `out` (§5.2): header, masking key and
/// the payload masked with it. Nothing is allocated beyond `out`'s growth.
pub fn encode_client_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8], mask: [u8; 4]) {
    let n = payload.len();
    out.reserve(14 + n);
    out.push((u8::from(fin) << 7) | opcode as u8);
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Unmasks (or masks) `payload` in place with `mask` (§5.3).
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut v = [0u8; 8];
        v.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(v) ^ word).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(frame: &[u8]) -> (u8, u8, usize) {
        (frame[0], frame[1], frame.len())
    }

    #[test]
    fn length_forms_at_the_boundaries() {
        let f = encode_frame(OpCode::Text, &[b'a'; 125]);
        assert_eq!(head_of(&f), (0x81, 125, 127));

        let f = encode_frame(OpCode::Text, &[b'a'; 126]);
        assert_eq!(&f[..4], &[0x81, 126, 0, 126]);
        assert_eq!(f.len(), 4 + 126);

        let f = encode_frame(OpCode::Binary, &vec![0u8; 65535]);
        assert_eq!(&f[..4], &[0x82, 126, 0xFF, 0xFF]);
        assert_eq!(f.len(), 4 + 65535);

        let f = encode_frame(OpCode::Binary, &vec![0u8; 65536]);
        assert_eq!(&f[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(f.len(), 10 + 65536);
    }

    #[test]
    fn control_frames() {
        assert_eq!(&encode_frame(OpCode::Ping, b"hi")[..], &[0x89, 2, b'h', b'i']);
        assert_eq!(&encode_frame(OpCode::Pong, b"")[..], &[0x8A, 0]);
        assert_eq!(&encode_close(1008, "slow consumer")[..4], &[0x88, 15, 0x03, 0xF0]);
        assert_eq!(&encode_close(1000, "")[..], &[0x88, 2, 0x03, 0xE8]);
        // A long reason is cut to fit 125 bytes, at a character boundary.
        let long = "é".repeat(100);
        let f = encode_close(1001, &long);
        assert_eq!(f[1] as usize, f.len() - 2);
        assert!(f.len() - 2 <= 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    fn client_frame(fin: bool, op: OpCode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_client_frame(&mut v, fin, op, payload, mask);
        v
    }

    #[test]
    fn client_frames_from_literal_bytes_at_the_length_boundaries() {
        let mask = [1, 2, 3, 4];
        let f = client_frame(true, OpCode::Text, b"hi", mask);
        assert_eq!(f, [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
        let f = client_frame(false, OpCode::Binary, &[0; 125], mask);
        assert_eq!(&f[..6], &[0x02, 0x80 | 125, 1, 2, 3, 4]);
        assert_eq!(f.len(), 6 + 125);
        let f = client_frame(true, OpCode::Binary, &[0; 126], mask);
        assert_eq!(&f[..8], &[0x82, 0x80 | 126, 0, 126, 1, 2, 3, 4]);
        assert_eq!(f.len(), 8 + 126);
        let f = client_frame(true, OpCode::Binary, &vec![0; 65535], mask);
        assert_eq!(&f[..8], &[0x82, 0x80 | 126, 0xFF, 0xFF, 1, 2, 3, 4]);
        assert_eq!(f.len(), 8 + 65535);
        let f = client_frame(true, OpCode::Binary, &vec![0; 65536], mask);
        assert_eq!(&f[..14], &[0x82, 0x80 | 127, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4]);
        assert_eq!(f.len(), 14 + 65536);
        // Zero payload bytes masked with the key read back as the key.
        assert_eq!(&f[14..18], &mask);
        // Appends: what `out` held stays.
        let mut out = vec![0xEE];
        encode_client_frame(&mut out, true, OpCode::Pong, b"", mask);
        assert_eq!(out, [0xEE, 0x8A, 0x80, 1, 2, 3, 4]);
    }

    fn server_head(fin: bool, opcode: OpCode, header_len: usize, payload_len: usize) -> Option<ServerHead> {
        Some(ServerHead { fin, opcode, header_len, payload_len, compressed: false })
    }

    #[test]
    fn server_heads_from_literal_bytes_at_the_length_boundaries() {
        let max = 1 << 20;
        assert_eq!(decode_server_head(&[0x81, 125], max), Ok(server_head(true, OpCode::Text, 2, 125)));
        assert_eq!(decode_server_head(&[0x01, 0], max), Ok(server_head(false, OpCode::Text, 2, 0)));
        assert_eq!(decode_server_head(&[0x82, 126, 0, 126], max), Ok(server_head(true, OpCode::Binary, 4, 126)));
        assert_eq!(decode_server_head(&[0x80, 126, 0xFF, 0xFF], max), Ok(server_head(true, OpCode::Continuation, 4, 65535)));
        assert_eq!(decode_server_head(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0], max), Ok(server_head(true, OpCode::Binary, 10, 65536)));
        assert_eq!(decode_server_head(&[0x88, 2, 0x03, 0xE8], max), Ok(server_head(true, OpCode::Close, 2, 2)));
        assert_eq!(decode_server_head(&[0x89, 0], max).unwrap().unwrap().total_len(), 2);
        // Whatever follows the header (payload, the next frame) is not read.
        assert_eq!(decode_server_head(&[0x81, 1, b'x', 0xFF, 0xFF], max), Ok(server_head(true, OpCode::Text, 2, 1)));
    }

    #[test]
    fn server_heads_round_trip_the_encoder() {
        for n in [0usize, 1, 125, 126, 65535, 65536] {
            let f = encode_frame(OpCode::Text, &vec![b'a'; n]);
            let head = decode_server_head(&f, 1 << 20).unwrap().unwrap();
            assert_eq!((head.header_len, head.payload_len), (header_len(n), n));
            assert_eq!(head.total_len(), f.len());
        }
    }

    #[test]
    fn incomplete_server_heads_ask_for_more() {
        assert_eq!(decode_server_head(&[], 1024), Ok(None));
        assert_eq!(decode_server_head(&[0x81], 1024), Ok(None));
        for cut in 2..4 {
            assert_eq!(decode_server_head(&[0x81, 126, 0x01, 0x00][..cut], 1024), Ok(None), "cut at {cut}");
        }
        let long = [0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0];
        for cut in 2..10 {
            assert_eq!(decode_server_head(&long[..cut], 1 << 20), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn server_heads_refuse_what_a_server_may_not_send() {
        let max = 1024;
        assert_eq!(decode_server_head(&[0x81, 0x80], max), Err(ProtocolError::Masked));
        assert_eq!(decode_server_head(&[0xC1, 0], max), Err(ProtocolError::ReservedBits));
        assert_eq!(decode_server_head(&[0x83, 0], max), Err(ProtocolError::BadOpcode));
        assert_eq!(decode_server_head(&[0x09, 0], max), Err(ProtocolError::FragmentedControl));
        assert_eq!(decode_server_head(&[0x89, 126], max), Err(ProtocolError::ControlTooLong));
        assert_eq!(decode_server_head(&[0x8A, 126, 0, 1], max), Err(ProtocolError::ControlTooLong));
        assert_eq!(decode_server_head(&[0x81, 126, 0x04, 0x01], max), Err(ProtocolError::TooLarge));
        assert_eq!(decode_server_head(&[0x81, 126, 0x04, 0x00], max), Ok(server_head(true, OpCode::Text, 4, 1024)));
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(decode_server_head(&huge, max), Err(ProtocolError::TooLarge));
    }

    #[test]
    fn decodes_each_length_form_and_unmasks() {
        for n in [0usize, 1, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let wire = client_frame(true, OpCode::Binary, &payload, [1, 2, 3, 4]);
            let head = decode_head(&wire, 1 << 20).unwrap().unwrap();
            assert_eq!(head.payload_len, n);
            assert_eq!(head.total_len(), wire.len());
            let mut p = wire[head.header_len..].to_vec();
            apply_mask(&mut p, head.mask);
            assert_eq!(p, payload);
        }
    }

    #[test]
    fn incomplete_headers_ask_for_more() {
        let wire = client_frame(true, OpCode::Text, &[b'x'; 300], [9, 9, 9, 9]);
        for cut in 0..8 {
            assert_eq!(decode_head(&wire[..cut], 1 << 20), Ok(None), "cut at {cut}");
        }
        assert!(decode_head(&wire[..8], 1 << 20).unwrap().is_some());
    }

    #[test]
    fn refuses_protocol_violations() {
        let max = 1024;
        assert_eq!(decode_head(&[0x81, 0x00], max), Err(ProtocolError::Unmasked));
        assert_eq!(decode_head(&[0xC1, 0x80], max), Err(ProtocolError::ReservedBits));
        assert_eq!(decode_head(&[0x83, 0x80], max), Err(ProtocolError::BadOpcode));
        assert_eq!(decode_head(&[0x0B, 0x80], max), Err(ProtocolError::BadOpcode));
        assert_eq!(decode_head(&[0x09, 0x80], max), Err(ProtocolError::FragmentedControl));
        assert_eq!(decode_head(&[0x89, 0xFE, 0, 126], max), Err(ProtocolError::ControlTooLong));
        assert_eq!(decode_head(&[0x81, 0xFE, 0x04, 0x01], max), Err(ProtocolError::TooLarge));
        // A declared 2^63-byte length is refused from the header alone.
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(decode_head(&huge, max), Err(ProtocolError::TooLarge));
        assert_eq!(ProtocolError::TooLarge.close_code(), 1009);
        assert_eq!(ProtocolError::InvalidUtf8.close_code(), 1007);
        assert_eq!(ProtocolError::Unmasked.close_code(), 1002);
    }

    #[test]
    fn rsv1_marks_a_compressed_message_only_where_agreed() {
        let max = 1024;
        let f = client_frame(true, OpCode::Text, b"x", [1, 2, 3, 4]);
        let mut z = f.clone();
        z[0] |= 0x40;
        assert_eq!(decode_head(&z, max), Err(ProtocolError::ReservedBits));
        assert!(decode_head_ext(&z, max, true).unwrap().unwrap().compressed);
        assert!(!decode_head_ext(&f, max, true).unwrap().unwrap().compressed);
        // Not on continuations or control frames; RSV2 and RSV3 never.
        assert_eq!(decode_head_ext(&[0xC0, 0x80, 0, 0, 0, 0], max, true), Err(ProtocolError::CompressedFragment));
        assert_eq!(decode_head_ext(&[0xC9, 0x80, 0, 0, 0, 0], max, true), Err(ProtocolError::CompressedFragment));
        assert_eq!(decode_head_ext(&[0xA1, 0x80, 0, 0, 0, 0], max, true), Err(ProtocolError::ReservedBits));
        assert_eq!(decode_head_ext(&[0x91, 0x80, 0, 0, 0, 0], max, true), Err(ProtocolError::ReservedBits));
        assert_eq!(ProtocolError::BadDeflate.close_code(), 1007);
        assert_eq!(ProtocolError::CompressedFragment.close_code(), 1002);
        // The client side mirrors it.
        assert_eq!(decode_server_head(&[0xC1, 1, b'x'], max), Err(ProtocolError::ReservedBits));
        assert!(decode_server_head_ext(&[0xC1, 1, b'x'], max, true).unwrap().unwrap().compressed);
        assert_eq!(decode_server_head_ext(&[0xCA, 0], max, true), Err(ProtocolError::CompressedFragment));
    }

    #[test]
    fn mask_is_its_own_inverse_at_every_alignment() {
        for n in 0..40 {
            let orig: Vec<u8> = (0..n as u8).collect();
            let mut p = orig.clone();
            apply_mask(&mut p, [0xA, 0xB, 0xC, 0xD]);
            if n > 0 {
                assert_ne!(p, orig);
            }
            apply_mask(&mut p, [0xA, 0xB, 0xC, 0xD]);
            assert_eq!(p, orig);
        }
    }
}
