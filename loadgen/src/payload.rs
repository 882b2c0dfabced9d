//! The payload every published message carries: a marker, the message's
//! sequence number and its intended send time, padded to the asked size.
//!
//! `lg:<run>:<seq>:<intended_ns>:xxxx…` (`run` is a random number per run,
//! so messages of another run on the same channels are told apart) is plain
//! ASCII with no character that
//! JSON escapes, so it survives being embedded in any envelope (Herald's
//! `{"channel":…,"data":"lg:…"}`, a raw frame, an SSE `data:` line) and is
//! found again by searching for the marker: the receive path parses no JSON.

use memchr::memmem;

const MARKER: &[u8] = b"lg:";

/// Writes the payload of message `seq` of run `run` into `out` (cleared
/// first).
pub fn encode(out: &mut Vec<u8>, run: u64, seq: u64, intended_ns: u64, size: usize) {
    out.clear();
    out.extend_from_slice(MARKER);
    out.extend_from_slice(itoa::Buffer::new().format(run).as_bytes());
    out.push(b':');
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.push(b':');
    out.extend_from_slice(itoa::Buffer::new().format(intended_ns).as_bytes());
    out.push(b':');
    if out.len() < size {
        out.resize(size, b'x');
    }
}

/// Writes message `seq`'s payload as a JSON document of `size` bytes (at
/// least its ~60-byte frame): `{"m":"lg:…:","items":[{"id":…,"title":…,
/// "done":…,"owner":…,"updated":…},…]}` whose records differ per message,
/// so it compresses as a real change set does (3–5× with deflate), not as
/// padding does.
pub fn encode_json(out: &mut Vec<u8>, run: u64, seq: u64, intended_ns: u64, size: usize) {
    const WORDS: [&str; 16] = [
        "milk", "report", "invoice", "review", "deploy", "garden", "ticket", "draft", "budget", "meeting", "backup", "design", "refund",
        "launch", "survey", "travel",
    ];
    let mut marker = Vec::with_capacity(48);
    encode(&mut marker, run, seq, intended_ns, 0);
    out.clear();
    out.extend_from_slice(b"{\"m\":\"");
    out.extend_from_slice(&marker);
    out.extend_from_slice(b"\",\"items\":[");
    // A cheap generator seeded by the message: every message differs.
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ run | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut item = String::with_capacity(160);
    let mut first = true;
    loop {
        let r = next();
        item.clear();
        use std::fmt::Write as _;
        let _ = write!(
            item,
            r#"{}{{"id":{},"title":"{} {} {}","done":{},"owner":"user-{}","updated":"2026-12-01T{:02}:{:02}:{:02}Z"}}"#,
            if first { "" } else { "," },
            r % 100_000,
            WORDS[(r >> 20) as usize % 16],
            WORDS[(r >> 24) as usize % 16],
            (r >> 28) % 1000,
            r & 1 == 1,
            (r >> 40) % 50,
            (r >> 44) % 24,
            (r >> 50) % 60,
            (r >> 56) % 60
        );
        if out.len() + item.len() + 2 > size {
            break;
        }
        out.extend_from_slice(item.as_bytes());
        first = false;
    }
    out.extend_from_slice(b"]");
    // Pad to the size with a note made of words.
    if out.len() + 11 <= size {
        out.extend_from_slice(b",\"note\":\"");
        while out.len() + 2 < size {
            let w = WORDS[next() as usize % 16];
            let room = size - 2 - out.len();
            out.extend_from_slice(&w.as_bytes()[..w.len().min(room)]);
            if out.len() + 2 < size {
                out.push(b' ');
            }
        }
        out.push(b'"');
    }
    while out.len() + 1 < size {
        out.push(b' ');
    }
    out.push(b'}');
}

/// A payload found in received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub run: u64,
    pub seq: u64,
    pub intended_ns: u64,
}

/// Calls `f` for every payload in `data` (a server may batch several
/// messages into one frame or line).
#[inline]
pub fn find_all(finder: &memmem::Finder<'_>, data: &[u8], mut f: impl FnMut(Found)) {
    for at in finder.find_iter(data) {
        if let Some(found) = parse_at(&data[at + MARKER.len()..]) {
            f(found);
        }
    }
}

#[inline]
fn parse_at(rest: &[u8]) -> Option<Found> {
    let (run, n) = parse_u64(rest)?;
    let rest = rest.get(n + 1..)?;
    let (seq, n) = parse_u64(rest)?;
    let rest = rest.get(n + 1..)?;
    let (intended_ns, _) = parse_u64(rest)?;
    Some(Found { run, seq, intended_ns })
}

/// The marker finder (build once per thread or task, reuse).
pub fn finder() -> memmem::Finder<'static> {
    memmem::Finder::new(MARKER)
}

#[inline]
fn parse_u64(s: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &b in s.iter().take(20) {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        n += 1;
    }
    (n > 0 && s.get(n) == Some(&b':')).then_some((v, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(data: &[u8]) -> Vec<Found> {
        let mut v = Vec::new();
        find_all(&finder(), data, |f| v.push(f));
        v
    }

    #[test]
    fn round_trips_inside_an_envelope_and_pads() {
        let mut p = Vec::new();
        encode(&mut p, 5, 42, 1_234_567_890, 64);
        assert_eq!(p.len(), 64);
        assert!(p.starts_with(b"lg:5:42:1234567890:xx"));
        let env = format!(r#"{{"channel":"c","offset":9,"data":"{}"}}"#, std::str::from_utf8(&p).unwrap());
        assert_eq!(find(env.as_bytes()), [Found { run: 5, seq: 42, intended_ns: 1_234_567_890 }]);
    }

    #[test]
    fn json_payloads_are_json_of_the_size_and_carry_the_marker() {
        let mut p = Vec::new();
        for size in [0, 60, 100, 1024, 4096] {
            encode_json(&mut p, 5, 42, 99, size);
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap_or_else(|e| panic!("{size}: {e}"));
            assert!(v["items"].is_array());
            if size >= 100 {
                assert_eq!(p.len(), size);
            }
            assert_eq!(find(&p), [Found { run: 5, seq: 42, intended_ns: 99 }]);
        }
        let mut q = Vec::new();
        encode_json(&mut q, 5, 43, 99, 4096);
        assert_ne!(p[40..], q[40..], "each message differs");
    }

    #[test]
    fn never_shorter_than_its_header() {
        let mut p = Vec::new();
        encode(&mut p, 1, 7, 99, 1);
        assert_eq!(p, b"lg:1:7:99:");
    }

    #[test]
    fn finds_every_payload_of_a_batch() {
        let batch = b"{\"data\":\"lg:1:3:10:xx\"}\n{\"data\":\"lg:1:4:11:\"}";
        assert_eq!(find(batch).iter().map(|f| f.seq).collect::<Vec<_>>(), [3, 4]);
    }

    #[test]
    fn rejects_truncated_or_foreign_text() {
        for bad in [&b"no marker here"[..], b"lg:12", b"lg:1:12:34", b"lg:1::34:", b"lg:1:99999999999999999999999:1:"] {
            assert!(find(bad).is_empty(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
