//! The WebSocket connection's state machine, without I/O.
//!
//! [`Session`] takes the bytes a client sent and the time (`now`), and
//! gives back what to do: messages to act on, frames to send, when to wake
//! up next, when to close and when the connection is over. The caller
//! (Herald's shard) only moves bytes and runs the commands. Time is a
//! parameter, so every timer is tested here with made-up instants.
//!
//! Phases: `Open` (reading and writing) → `Closing` (a close frame is
//! queued after what is left; the client's input is read and dropped, and
//! the close must complete within `close_timeout`) → over. The idle timer
//! pings a silent client every `ping_interval` and closes it with 1001
//! "idle timeout" after `idle_timeout` without a byte.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::assemble::{Assembler, Incoming};
use super::frame::{self, OpCode, ProtocolError};

/// The session's timers and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Ping a client silent for this long.
    pub ping_interval: Duration,
    /// Close a client silent for this long.
    pub idle_timeout: Duration,
    /// How long closing may take.
    pub close_timeout: Duration,
    /// Largest frame payload and reassembled message.
    pub max_message: usize,
}

/// Why a session closes (mapped to a disconnect reason by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// The client sent a close frame.
    Client,
    /// Nothing received for the idle timeout.
    Idle,
    /// The client broke RFC 6455.
    Protocol(ProtocolError),
}

/// What the session wants done, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete text message to act on.
    Text(&'a str),
    /// A complete binary message to act on.
    Binary(&'a [u8]),
    /// A frame to queue (a pong, a ping).
    Send(Bytes),
    /// Start closing: queue this close frame after what is queued.
    Close(CloseCause, Bytes),
}

/// What a timer that fired means.
#[derive(Debug, PartialEq, Eq)]
pub enum Timer {
    /// Nothing to do now.
    Idle,
    /// Queue this ping.
    Ping(Bytes),
    /// Start closing with this close frame.
    Close(CloseCause, Bytes),
    /// The close did not complete in time: drop the connection.
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Closing { deadline: Instant },
}

/// One WebSocket connection's protocol state. It holds bytes only while a
/// frame or a fragmented message is partly received.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    assembler: Assembler,
    /// Bytes of a partly received frame.
    partial: Vec<u8>,
    last_rx: Instant,
    last_ping: Instant,
    phase: Phase,
    /// permessage-deflate agreed: RSV1 marks compressed messages.
    compression: bool,
}

impl Session {
    /// A session opened at `now`.
    pub fn new(cfg: SessionConfig, now: Instant) -> Session {
        Session {
            cfg,
            assembler: Assembler::new(cfg.max_message),
            partial: Vec::new(),
            last_rx: now,
            last_ping: now,
            phase: Phase::Open,
            compression: false,
        }
    }

    /// Compressed messages inflated since the last call.
    pub fn take_inflate_stats(&mut self) -> super::assemble::InflateStats {
        self.assembler.take_stats()
    }

    /// Accepts compressed messages (permessage-deflate agreed), with the
    /// client's context when it keeps one between messages.
    pub fn with_deflate(mut self, context: Option<super::deflate::Context>) -> Session {
        self.assembler = Assembler::new(self.cfg.max_message).with_deflate(context);
        self.compression = true;
        self
    }

    /// Whether the session is closing (input is then dropped).
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    /// Enters the closing phase at `now` (also when the caller closes for
    /// its own reasons, such as a slow consumer or a drain).
    pub fn start_closing(&mut self, now: Instant) {
        if !self.is_closing() {
            self.phase = Phase::Closing { deadline: now + self.cfg.close_timeout };
            self.partial = Vec::new();
        }
    }

    /// When the caller must call [`Session::on_timer`] next.
    pub fn deadline(&self) -> Instant {
        match self.phase {
            Phase::Closing { deadline } => deadline,
            Phase::Open => {
                let ping = self.last_rx.max(self.last_ping) + self.cfg.ping_interval;
                (self.last_rx + self.cfg.idle_timeout).min(ping)
            }
        }
    }

    /// Takes bytes read from the client at `now`; hands every event to
    /// `on`, which returns whether to go on (false: the caller started
    /// closing). `buf` is the caller's read buffer: complete frames are
    /// unmasked in place and handled without a copy; an incomplete tail
    /// is kept.
    pub fn receive(&mut self, buf: &mut [u8], now: Instant, mut on: impl FnMut(Event<'_>) -> bool) {
        if self.is_closing() {
            return;
        }
        self.last_rx = now;
        if self.partial.is_empty() {
            let used = self.process(buf, &mut on);
            if !self.is_closing() {
                self.partial.extend_from_slice(&buf[used..]);
            }
        } else {
            let mut partial = std::mem::take(&mut self.partial);
            partial.extend_from_slice(buf);
            let used = self.process(&mut partial, &mut on);
            if !self.is_closing() {
                partial.drain(..used);
                if !partial.is_empty() {
                    self.partial = partial;
                }
            }
        }
    }

    /// Decodes and handles every complete frame in `buf`; returns the bytes
    /// used.
    fn process(&mut self, buf: &mut [u8], on: &mut impl FnMut(Event<'_>) -> bool) -> usize {
        let mut pos = 0;
        while !self.is_closing() {
            let head = match frame::decode_head_ext(&buf[pos..], self.cfg.max_message, self.compression) {
                Ok(Some(h)) if buf.len() - pos >= h.total_len() => h,
                Ok(_) => break,
                Err(e) => {
                    self.protocol_error(e, on);
                    break;
                }
            };
            let payload = &mut buf[pos + head.header_len..pos + head.total_len()];
            frame::apply_mask(payload, head.mask);
            pos += head.total_len();
            let event = match self.assembler.push(&head, payload) {
                Ok(None) | Ok(Some(Incoming::Pong)) => continue,
                Ok(Some(Incoming::Text(t))) => Event::Text(t),
                Ok(Some(Incoming::Binary(b))) => Event::Binary(b),
                Ok(Some(Incoming::Ping(p))) => Event::Send(frame::encode_frame(OpCode::Pong, p)),
                Ok(Some(Incoming::Close(code))) => {
                    let reply = match code {
                        Some((code, _)) => frame::encode_close(code, ""),
                        None => frame::encode_frame(OpCode::Close, b""),
                    };
                    Event::Close(CloseCause::Client, reply)
                }
                Err(e) => {
                    self.protocol_error(e, on);
                    break;
                }
            };
            let closes = matches!(event, Event::Close(..));
            let go_on = on(event);
            // An inflated message is not kept past its handling: an idle
            // client must not pin up to the cap with one small frame.
            self.assembler.finish();
            if closes || !go_on {
                // The caller's time of the close is the read's.
                let now = self.last_rx;
                self.start_closing(now);
            }
        }
        pos
    }

    fn protocol_error(&mut self, e: ProtocolError, on: &mut impl FnMut(Event<'_>) -> bool) {
        on(Event::Close(CloseCause::Protocol(e), frame::encode_close(e.close_code(), &e.to_string())));
        let now = self.last_rx;
        self.start_closing(now);
    }

    /// The timer fired at `now`.
    pub fn on_timer(&mut self, now: Instant) -> Timer {
        if let Phase::Closing { deadline } = self.phase {
            return if now >= deadline { Timer::Expired } else { Timer::Idle };
        }
        let silent = now.saturating_duration_since(self.last_rx);
        if silent >= self.cfg.idle_timeout {
            self.start_closing(now);
            return Timer::Close(CloseCause::Idle, frame::encode_close(1001, "idle timeout"));
        }
        if silent >= self.cfg.ping_interval && now.saturating_duration_since(self.last_ping) >= self.cfg.ping_interval {
            self.last_ping = now;
            return Timer::Ping(frame::encode_frame(OpCode::Ping, b""));
        }
        Timer::Idle
    }
}

/// The `:` comment that keeps an idle SSE stream open, without I/O: due
/// when nothing was sent for `interval`.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    interval: Duration,
    last_sent: Instant,
}

impl Keepalive {
    /// A stream that sent its first bytes at `now`.
    pub fn new(interval: Duration, now: Instant) -> Keepalive {
        Keepalive { interval, last_sent: now }
    }

    /// Something was sent at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// When to check next.
    pub fn deadline(&self) -> Instant {
        self.last_sent + self.interval
    }

    /// Whether a keep-alive is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_sent) >= self.interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: SessionConfig = SessionConfig {
        ping_interval: Duration::from_secs(25),
        idle_timeout: Duration::from_secs(60),
        close_timeout: Duration::from_secs(5),
        max_message: 1024,
    };

    fn client_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let op = OpCode::from_u8(op).expect("a known opcode");
        frame::encode_client_frame(&mut out, fin, op, payload, [1, 2, 3, 4]);
        out
    }

    /// Feeds `bytes` and collects what the session says, as text.
    fn feed(s: &mut Session, bytes: &[u8], now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = bytes.to_vec();
        s.receive(&mut buf, now, |e| {
            out.push(match e {
                Event::Text(t) => format!("text {t}"),
                Event::Binary(b) => format!("binary {}", b.len()),
                Event::Send(f) => format!("send {:02x}", f[0]),
                Event::Close(cause, f) => format!("close {cause:?} {}", u16::from_be_bytes([f[2], f[3]])),
            });
            true
        });
        out
    }

    #[test]
    fn a_silent_client_is_pinged_then_closed() {
        let t0 = Instant::now();
        let mut s = Session::new(CFG, t0);
        assert_eq!(s.deadline(), t0 + CFG.ping_interval);
        assert_eq!(s.on_timer(t0 + Duration::from_secs(24)), Timer::Idle);
        assert!(matches!(s.on_timer(t0 + CFG.ping_interval), Timer::Ping(f) if f[..] == [0x89, 0]));
        assert_eq!(s.deadline(), t0 + Duration::from_secs(50), "the next ping, one interval after this one");
        assert!(matches!(s.on_timer(t0 + Duration::from_secs(50)), Timer::Ping(_)));
        assert_eq!(s.deadline(), t0 + CFG.idle_timeout, "the idle deadline comes before the next ping");
        match s.on_timer(t0 + CFG.idle_timeout) {
            Timer::Close(CloseCause::Idle, f) => assert_eq!(&f[..4], &[0x88, 14, 0x03, 0xE9]),
            other => panic!("{other:?}"),
        }
        assert!(s.is_closing());
        assert_eq!(s.deadline(), t0 + CFG.idle_timeout + CFG.close_timeout);
        assert_eq!(s.on_timer(t0 + Duration::from_secs(62)), Timer::Idle);
        assert_eq!(s.on_timer(t0 + Duration::from_secs(65)), Timer::Expired);
    }

    #[test]
    fn anything_received_defers_ping_and_idle() {
        let t0 = Instant::now();
        let mut s = Session::new(CFG, t0);
        let t1 = t0 + Duration::from_secs(20);
        assert!(feed(&mut s, &client_frame(true, 0xA, b""), t1).is_empty(), "a pong is only a sign of life");
        assert_eq!(s.on_timer(t0 + CFG.ping_interval), Timer::Idle);
        assert_eq!(s.deadline(), t1 + CFG.ping_interval);
        assert!(matches!(s.on_timer(t0 + CFG.idle_timeout), Timer::Ping(_)), "pinged, not closed: idle counts from the last byte received");
        assert!(matches!(s.on_timer(t1 + CFG.idle_timeout), Timer::Close(CloseCause::Idle, _)));
    }

    #[test]
    fn pings_are_answered_and_messages_handed_over() {
        let t0 = Instant::now();
        let mut s = Session::new(CFG, t0);
        let mut bytes = client_frame(true, 0x9, b"hi");
        bytes.extend(client_frame(false, 0x1, b"hel"));
        bytes.extend(client_frame(true, 0x0, b"lo"));
        bytes.extend(client_frame(true, 0x2, b"xyz"));
        assert_eq!(feed(&mut s, &bytes, t0), ["send 8a", "text hello", "binary 3"]);
    }

    #[test]
    fn frames_split_across_reads_are_kept_until_complete() {
        let t0 = Instant::now();
        let mut s = Session::new(CFG, t0);
        let f = client_frame(true, 0x1, b"split");
        for i in 0..f.len() - 1 {
            assert!(feed(&mut s, &f[i..i + 1], t0).is_empty(), "byte {i}");
        }
        assert_eq!(feed(&mut s, &f[f.len() - 1..], t0), ["text split"]);
        assert!(s.partial.is_empty(), "nothing held once the frame is complete");
    }

    #[test]
    fn a_client_close_is_answered_and_input_then_dropped() {
        let t0 = Instant::now();
        let mut s = Session::new(CFG, t0);
        let mut bytes = client_frame(true, 0x8, &1000u16.to_be_bytes());
        bytes.extend(client_frame(true, 0x1, b"after"));
        assert_eq!(feed(&mut s, &bytes, t0), ["close Client 1000"]);
        assert!(s.is_closing());
        assert!(feed(&mut s, &client_frame(true, 0x1, b"later"), t0).is_empty());
        assert_eq!(s.deadline(), t0 + CFG.close_timeout);
    }

    #[test]
    fn protocol_errors_close_with_their_code() {
        let t0 = Instant::now();
        let mut s = Session::new(CFG, t0);
        // An unmasked client frame.
        assert_eq!(feed(&mut s, &[0x81, 0x01, b'x'], t0), ["close Protocol(Unmasked) 1002"]);
        let mut s = Session::new(CFG, t0);
        // A header declaring 2048 bytes, over max_message: refused before any payload arrives.
        assert_eq!(feed(&mut s, &[0x81, 0xFE, 0x08, 0x00, 1, 2, 3, 4], t0), ["close Protocol(TooLarge) 1009"]);
        let mut s = Session::new(CFG, t0);
        let mut bytes = Vec::new();
        for i in 0..11 {
            bytes.extend(client_frame(false, if i == 0 { 0x1 } else { 0x0 }, &[b'a'; 100]));
        }
        assert_eq!(feed(&mut s, &bytes, t0), ["close Protocol(TooLarge) 1009"], "fragments past max_message");
    }

    #[test]
    fn the_caller_may_stop_after_any_message() {
        let t0 = Instant::now();
        let mut s = Session::new(CFG, t0);
        let mut bytes = client_frame(true, 0x1, b"one");
        bytes.extend(client_frame(true, 0x1, b"two"));
        let mut seen = Vec::new();
        s.receive(&mut bytes, t0, |e| {
            seen.push(format!("{e:?}"));
            false
        });
        assert_eq!(seen.len(), 1, "nothing after the caller started closing");
        assert!(s.is_closing());
    }

    #[test]
    fn keepalive_is_due_after_a_quiet_interval() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(Duration::from_secs(15), t0);
        assert!(!k.due(t0 + Duration::from_secs(14)));
        k.sent(t0 + Duration::from_secs(10));
        assert!(!k.due(t0 + Duration::from_secs(15)), "a message sent meanwhile counts");
        assert_eq!(k.deadline(), t0 + Duration::from_secs(25));
        assert!(k.due(t0 + Duration::from_secs(25)));
    }
}
