//! Publishing on WebSockets: Herald's `publish` command (its replies
//! settle each message, and may bound how many are in flight) or the
//! payload as a raw text frame.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use herald::proto::frame::OpCode;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, Notify};

use super::{Item, Queue, State, BACKLOG};
use crate::clock;
use crate::net::{self, Url};
use crate::ws as wire;

/// How long a command may await its reply, with an in-flight limit, before
/// the publisher stops waiting and counts it failed (`reply_timeout`): a
/// reply that never comes must not stall a closed loop for good.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Write times kept at most without an in-flight limit (about 32 bytes
/// each, 2 MiB in all): replies that never come must not grow the map
/// without bound. Past it, commands are settled but not timed.
const MAX_TIMED: usize = 65_536;

/// Commands written and awaiting their reply, shared by a connection's
/// writer and reader.
#[derive(Default)]
struct Pending {
    /// Message → when its command was written (process-epoch ns).
    written: RefCell<HashMap<u64, u64>>,
    /// A reply arrived: the writer may have room again.
    room: Notify,
}

/// Opens a publisher WebSocket; with `replies` (Herald's `publish`
/// command, at most that many awaiting their reply; `usize::MAX`:
/// unlimited) its reader settles replies (`published` / `error` with the
/// message's `id`). It always answers pings.
pub(super) async fn ws_conn(
    url: &Url,
    path: &str,
    state: Rc<RefCell<State>>,
    replies: Option<usize>,
) -> anyhow::Result<(Queue, tokio::task::JoinHandle<()>)> {
    let addr = url.resolve().await?;
    let mut stream =
        net::connect(addr, None, Duration::from_secs(10)).await.map_err(|e| anyhow::anyhow!("cannot connect to {url}: {e}"))?;
    let first = match tokio::time::timeout(Duration::from_secs(10), wire::upgrade(&mut stream, url, path, false)).await {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("publisher handshake with {url}{path}: {e}"))?.0,
        Err(_) => anyhow::bail!("publisher handshake with {url}{path}: no answer within 10 s"),
    };
    let (mut read, write) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Item>(BACKLOG);
    let (pong_tx, pong_rx) = mpsc::channel::<Bytes>(16);
    let pending = Rc::new(Pending::default());
    let writer = tokio::task::spawn_local(ws_writer(write, rx, pong_rx, Rc::clone(&state), replies.map(|l| (Rc::clone(&pending), l))));
    let replies = replies.is_some();
    tokio::task::spawn_local(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = first;
        let mut masker = wire::Masker::new(7);
        let id_finder = memchr::memmem::Finder::new(br#""id":"#);
        let mut tmp = vec![0u8; 64 * 1024];
        // When the bytes being parsed were read.
        let mut read_ns = clock::now_ns();
        loop {
            let mut at = 0;
            loop {
                let (f, used) = match wire::parse_frame(&buf[at..], false) {
                    Ok(Some(x)) => x,
                    Ok(None) => break,
                    // Not a WebSocket stream any more: stop reading it.
                    Err(_) => return,
                };
                at += used;
                match f.op {
                    OpCode::Text if replies => {
                        let failed = memchr::memmem::find(f.payload, br#""op":"error""#).is_some();
                        let id = id_finder.find(f.payload).and_then(|i| {
                            let digits: &[u8] = &f.payload[i + 5..];
                            let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
                            std::str::from_utf8(&digits[..end]).ok()?.parse::<u64>().ok()
                        });
                        if let Some(g) = id {
                            let kind = if failed { Err(reply_code(f.payload)) } else { Ok(()) };
                            let written = pending.written.borrow_mut().remove(&g);
                            let mut st = state.borrow_mut();
                            // Not awaited any more: it timed out, or the id is not ours.
                            if st.awaiting(g) {
                                if let Some(w) = written {
                                    st.round_trip(g, w, read_ns);
                                }
                                st.done(g, kind);
                            }
                            drop(st);
                            if written.is_some() {
                                pending.room.notify_one();
                            }
                        }
                    }
                    OpCode::Ping => {
                        let mut pong = Vec::new();
                        wire::client_frame(&mut pong, OpCode::Pong, f.payload, masker.next());
                        let _ = pong_tx.try_send(Bytes::from(pong));
                    }
                    OpCode::Close => return,
                    _ => {}
                }
            }
            buf.drain(..at);
            match read.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    read_ns = clock::now_ns();
                    buf.extend_from_slice(&tmp[..n]);
                }
            }
        }
    });
    Ok((tx, writer))
}

fn reply_code(reply: &[u8]) -> String {
    let Some(i) = memchr::memmem::find(reply, br#""code":""#) else { return "error".into() };
    let rest = &reply[i + 8..];
    let end = memchr::memchr(b'"', rest).unwrap_or(0);
    format!("error_{}", String::from_utf8_lossy(&rest[..end]))
}

/// Writes commands as they come while fewer than the limit await their
/// reply (`pending`: `None` for raw frames, which have no reply), and the
/// pongs the reader asks for at any time.
async fn ws_writer(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Item>,
    mut pongs: mpsc::Receiver<Bytes>,
    state: Rc<RefCell<State>>,
    pending: Option<(Rc<Pending>, usize)>,
) {
    let timeout_ns = REPLY_TIMEOUT.as_nanos() as u64;
    loop {
        // Room for one more, or until when to wait for a reply before
        // giving up on the oldest.
        let oldest = match &pending {
            Some((p, limit)) if p.written.borrow().len() >= *limit => p.written.borrow().values().min().copied(),
            _ => None,
        };
        let room = oldest.is_none();
        let wait = Duration::from_nanos((oldest.unwrap_or(0) + timeout_ns).saturating_sub(clock::now_ns()));
        let notified = pending.as_ref().map(|(p, _)| p.room.notified());
        tokio::select! {
            m = rx.recv(), if room => {
                let Some(Item { g, due_ns, bytes }) = m else {
                    // Keep the connection open until the last replies are
                    // in: a server may drop the replies to a client that
                    // half-closed, and a missing reply counts as published.
                    let deadline = clock::now_ns() + timeout_ns;
                    while pending.is_some() && state.borrow().any_awaiting() && clock::now_ns() < deadline {
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(10)) => {}
                            Some(p) = pongs.recv() => {
                                let _ = write.write_all(&p).await;
                            }
                        }
                    }
                    return;
                };
                let now = clock::now_ns();
                state.borrow_mut().sent(g, due_ns, now);
                if let Some((p, limit)) = &pending {
                    let mut w = p.written.borrow_mut();
                    if *limit != usize::MAX || w.len() < MAX_TIMED {
                        w.insert(g, now);
                    }
                }
                let r = write.write_all(&bytes).await;
                if r.is_err() {
                    if let Some((p, _)) = &pending {
                        p.written.borrow_mut().remove(&g);
                    }
                    state.borrow_mut().done(g, Err("io".into()));
                } else if pending.is_none() {
                    state.borrow_mut().done(g, Ok(()));
                }
            }
            () = async { if let Some(n) = notified { n.await } }, if !room => {}
            () = tokio::time::sleep(wait), if !room => {
                if let Some((p, _)) = &pending {
                    expire(p, &state, clock::now_ns().saturating_sub(timeout_ns));
                }
            }
            Some(p) = pongs.recv() => {
                let _ = write.write_all(&p).await;
            }
        }
    }
}

/// Gives up on the commands written before `before_ns`: failed, as
/// `reply_timeout`.
fn expire(p: &Pending, state: &RefCell<State>, before_ns: u64) {
    let mut st = state.borrow_mut();
    p.written.borrow_mut().retain(|&g, &mut w| {
        if w > before_ns {
            return true;
        }
        if st.awaiting(g) {
            st.done(g, Err("reply_timeout".into()));
        }
        false
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::publish::Status;
    use crate::stats;

    #[test]
    fn expire_gives_up_only_on_old_commands_still_awaited() {
        let state = RefCell::new(State {
            status: vec![Status::Sent, Status::Sent, Status::Ok],
            errors: BTreeMap::new(),
            rtt: stats::histogram(),
            first_measured: 0,
            lag: None,
        });
        let p = Pending::default();
        p.written.borrow_mut().extend([(0, 100), (1, 900), (2, 100)]);
        expire(&p, &state, 500);
        let st = state.borrow();
        assert_eq!(st.status, [Status::Failed, Status::Sent, Status::Ok], "2 was answered already");
        assert_eq!(st.errors.get("reply_timeout"), Some(&1));
        assert_eq!(p.written.borrow().keys().copied().collect::<Vec<_>>(), [1]);
    }
}
