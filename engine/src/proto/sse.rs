//! Server-Sent-Events encoding (HTML Living Standard §9.2).

use bytes::{BufMut, Bytes, BytesMut};

/// The keep-alive comment sent on an idle stream.
pub const KEEPALIVE: &[u8] = b":\n\n";

/// Encodes `data` as one event: a `data: ` line per line of `data` (split
/// at `\r\n`, `\n` or `\r`, as an SSE parser splits), then a blank line. A
/// client's `event.data` is `data` with line ends normalised to `\n`.
pub fn encode_event(data: &[u8]) -> Bytes {
    let lines = 1 + count_line_breaks(data);
    let mut out = BytesMut::with_capacity(data.len() + lines * 7 + 1);
    write_event(&mut out, data);
    out.freeze()
}

/// Appends the event for `data` to `out`.
pub fn write_event(out: &mut BytesMut, data: &[u8]) {
    let mut rest = data;
    loop {
        out.put_slice(b"data: ");
        match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => {
                out.put_slice(&rest[..i]);
                out.put_u8(b'\n');
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
            None => {
                out.put_slice(rest);
                out.put_slice(b"\n\n");
                return;
            }
        }
    }
}

fn count_line_breaks(data: &[u8]) -> usize {
    data.iter().filter(|&&b| b == b'\n' || b == b'\r').count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line() {
        assert_eq!(&encode_event(b"hello")[..], b"data: hello\n\n");
        assert_eq!(&encode_event(b"")[..], b"data: \n\n");
    }

    #[test]
    fn embedded_line_ends() {
        assert_eq!(&encode_event(b"a\nb")[..], b"data: a\ndata: b\n\n");
        assert_eq!(&encode_event(b"a\r\nb")[..], b"data: a\ndata: b\n\n");
        assert_eq!(&encode_event(b"a\rb")[..], b"data: a\ndata: b\n\n");
        assert_eq!(&encode_event(b"a\n\nb")[..], b"data: a\ndata: \ndata: b\n\n");
        assert_eq!(&encode_event(b"a\n")[..], b"data: a\ndata: \n\n");
        assert_eq!(&encode_event(b"\r\n")[..], b"data: \ndata: \n\n");
    }

    /// Decodes events the way an SSE client does, to check the round trip.
    fn client_parse(stream: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(stream).unwrap();
        let mut events = Vec::new();
        let mut data: Option<String> = None;
        for line in text.split('\n') {
            if line.is_empty() {
                if let Some(d) = data.take() {
                    events.push(d);
                }
            } else if let Some(v) = line.strip_prefix("data:") {
                let v = v.strip_prefix(' ').unwrap_or(v);
                data = Some(match data {
                    Some(d) => format!("{d}\n{v}"),
                    None => v.to_string(),
                });
            }
        }
        events
    }

    #[test]
    fn round_trips_through_a_client_parser() {
        for payload in ["x", "line1\nline2", "crlf\r\nnext", " leading space", "", "tail\n"] {
            let ev = encode_event(payload.as_bytes());
            let normalised = payload.replace("\r\n", "\n").replace('\r', "\n");
            assert_eq!(client_parse(&ev), vec![normalised], "{payload:?}");
        }
    }
}
