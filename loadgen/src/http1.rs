//! The client side of HTTP/1.1 that loadgen needs: the request/response
//! exchange that opens a WebSocket or an SSE stream, splitting pipelined
//! responses, and a streaming chunked-body decoder.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::net::{ConnectError, Url};

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// A response head: status and the headers loadgen cares about.
#[derive(Debug, Default)]
pub struct Head {
    pub status: u16,
    pub chunked: bool,
    pub content_type: String,
    /// `Sec-WebSocket-Extensions` values.
    pub extensions: Vec<String>,
}

/// Sends `request` and reads the response head; returns it with any bytes
/// that followed it.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, request: &[u8]) -> Result<(Head, Vec<u8>), ConnectError> {
    stream.write_all(request).await.map_err(|e| ConnectError::io(&e))?;
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 2048];
    loop {
        let n = stream.read(&mut tmp).await.map_err(|e| ConnectError::io(&e))?;
        if n == 0 {
            return Err(ConnectError::new("closed", "the server closed the connection during the handshake"));
        }
        buf.extend_from_slice(&tmp[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let mut head = Head { status: resp.code.unwrap_or(0), ..Head::default() };
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        head.chunked = String::from_utf8_lossy(h.value).to_ascii_lowercase().contains("chunked");
                    } else if h.name.eq_ignore_ascii_case("content-type") {
                        head.content_type = String::from_utf8_lossy(h.value).into_owned();
                    } else if h.name.eq_ignore_ascii_case("sec-websocket-extensions") {
                        head.extensions.push(String::from_utf8_lossy(h.value).into_owned());
                    }
                }
                return Ok((head, buf.split_off(len)));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(ConnectError::new("bad_response", "response head over 16 KiB")),
            Err(e) => return Err(ConnectError::new("bad_response", format!("unparsable response: {e}"))),
        }
    }
}

pub fn refused(status: u16) -> ConnectError {
    let kind = match status {
        400 => "http_400",
        403 => "http_403",
        404 => "http_404",
        429 => "http_429",
        500..=599 => "http_5xx",
        _ => "http_other",
    };
    ConnectError::new(kind, format!("the server answered HTTP {status}"))
}

/// Opens an SSE stream on `stream`; returns whether the body is chunked
/// and bytes received after the head.
pub async fn sse_open<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, url: &Url, path: &str) -> Result<(bool, Vec<u8>), ConnectError> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n", url.authority());
    let (head, rest) = exchange(stream, req.as_bytes()).await?;
    if head.status != 200 {
        return Err(refused(head.status));
    }
    if !head.content_type.starts_with("text/event-stream") {
        return Err(ConnectError::new("bad_response", format!("content-type {:?} is not text/event-stream", head.content_type)));
    }
    Ok((head.chunked, rest))
}

/// One response parsed by [`parse_response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Bytes of head and body.
    pub len: usize,
    /// The server closes the connection after it (`Connection: close`).
    pub close: bool,
}

/// Parses one HTTP response at the start of `buf`, or `None` if incomplete.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > 64 * 1024 => return Err("response_head_too_large"),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("bad_response"),
    };
    let status = resp.code.unwrap_or(0);
    let mut length = 0usize;
    let mut chunked = false;
    let mut close = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok()).ok_or("bad_content_length")?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.eq_ignore_ascii_case(b"chunked");
        }
    }
    if chunked {
        let mut d = Dechunker::default();
        let mut sink = Vec::new();
        // Feed byte ranges until the body ends to find its length.
        let body = &buf[head..];
        let mut at = 0;
        while at < body.len() {
            let end = (at + 4096).min(body.len());
            let done = d.feed(&body[at..end], &mut sink).map_err(|_| "bad_chunked_body")?;
            sink.clear();
            if done {
                return Ok(Some(Response { status, len: head + d.consumed_total(), close }));
            }
            at = end;
        }
        return Ok(None);
    }
    if buf.len() < head + length {
        return Ok(None);
    }
    Ok(Some(Response { status, len: head + length, close }))
}
/// Decodes an HTTP/1.1 chunked body as it streams in.
#[derive(Debug, Default)]
pub struct Dechunker {
    state: Chunk,
    size: u64,
    consumed: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    #[default]
    Size,
    /// Skipping a chunk extension up to the line end.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line or the final CRLF.
    TrailerStart,
    /// Inside a trailer line.
    TrailerLine,
    /// The final CRLF's LF is due.
    FinalLf,
    /// The body is over.
    Done,
}

impl Dechunker {
    /// Appends the decoded bytes of `input` to `out`; `Err` on malformed
    /// framing, `Ok(true)` once the body has ended.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool, &'static str> {
        let before = input.len();
        let r = self.feed_inner(input, out);
        self.consumed += before - r.1;
        r.0
    }

    /// Input bytes taken so far (up to the end of the body once it ended).
    pub fn consumed_total(&self) -> usize {
        self.consumed
    }

    fn feed_inner(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> (Result<bool, &'static str>, usize) {
        macro_rules! fail {
            ($e:expr) => {
                return (Err($e), input.len())
            };
        }
        while !input.is_empty() {
            match self.state {
                Chunk::Size => {
                    let b = input[0];
                    input = &input[1..];
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            let d = (b as char).to_digit(16).unwrap_or(0);
                            let Some(v) = self.size.checked_mul(16) else { fail!("chunk size overflow") };
                            self.size = v + u64::from(d);
                        }
                        b';' | b' ' | b'\t' => self.state = Chunk::Ext,
                        b'\r' => self.state = Chunk::SizeLf,
                        _ => fail!("bad chunk size"),
                    }
                }
                Chunk::Ext => {
                    if let Some(i) = memchr::memchr(b'\r', input) {
                        input = &input[i + 1..];
                        self.state = Chunk::SizeLf;
                    } else {
                        input = &[];
                    }
                }
                Chunk::SizeLf => {
                    if input[0] != b'\n' {
                        fail!("bad chunk line end");
                    }
                    input = &input[1..];
                    self.state = if self.size == 0 { Chunk::TrailerStart } else { Chunk::Data };
                }
                Chunk::Data => {
                    let n = (self.size as usize).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = Chunk::DataCr;
                    }
                }
                Chunk::DataCr | Chunk::DataLf => {
                    let want = if self.state == Chunk::DataCr { b'\r' } else { b'\n' };
                    if input[0] != want {
                        fail!("bad chunk end");
                    }
                    input = &input[1..];
                    self.state = if self.state == Chunk::DataCr { Chunk::DataLf } else { Chunk::Size };
                }
                Chunk::TrailerStart => {
                    self.state = if input[0] == b'\r' { Chunk::FinalLf } else { Chunk::TrailerLine };
                    input = &input[1..];
                }
                Chunk::TrailerLine => {
                    if let Some(i) = memchr::memchr(b'\n', input) {
                        input = &input[i + 1..];
                        self.state = Chunk::TrailerStart;
                    } else {
                        input = &[];
                    }
                }
                Chunk::FinalLf => {
                    if input[0] != b'\n' {
                        fail!("bad final line end");
                    }
                    input = &input[1..];
                    self.state = Chunk::Done;
                    return (Ok(true), input.len());
                }
                Chunk::Done => return (Ok(true), input.len()),
            }
        }
        (Ok(self.state == Chunk::Done), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_responses_are_split_by_length() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\nConnection: Close\r\n\r\n2\r\nab\r\n0\r\n\r\n";
        let Response { status, len: n, close } = parse_response(two).unwrap().unwrap();
        assert_eq!((status, &two[n..n + 8], close), (200, &b"HTTP/1.1"[..], false));
        let rest = &two[n..];
        assert_eq!(parse_response(rest).unwrap(), Some(Response { status: 503, len: rest.len(), close: true }));
        assert_eq!(parse_response(&rest[..rest.len() - 1]).unwrap(), None);
        assert_eq!(parse_response(&two[..n - 1]).unwrap(), None);
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn dechunks_across_arbitrary_splits() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        for split in 0..body.len() {
            let mut d = Dechunker::default();
            let mut out = Vec::new();
            let a = d.feed(&body[..split], &mut out).unwrap();
            let b = d.feed(&body[split..], &mut out).unwrap();
            assert_eq!(out, b"hello world");
            assert!(a || b);
            assert_eq!(d.consumed_total(), body.len());
        }
        // Trailers, and bytes after the body are not taken.
        let mut d = Dechunker::default();
        let mut out = Vec::new();
        assert_eq!(d.feed(b"1\r\na\r\n0\r\nx-t: 1\r\n\r\nHTTP/1.1", &mut out), Ok(true));
        assert_eq!(d.consumed_total(), 19);
        assert!(Dechunker::default().feed(b"zz\r\n", &mut Vec::new()).is_err());
    }
}
