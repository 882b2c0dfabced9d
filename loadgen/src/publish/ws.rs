//! Publishing on WebSockets: Herald's `publish` command (its replies
//! settle each message) or the payload as a raw text frame.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use herald::proto::frame::OpCode;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

use super::{Queue, State, BACKLOG};
use crate::net::{self, Url};
use crate::ws as wire;

/// Opens a publisher WebSocket; its reader settles replies (`herald`:
/// `published` / `error` with the message's `id`) and answers pings.
pub(super) async fn ws_conn(
    url: &Url,
    path: &str,
    state: Rc<RefCell<State>>,
    replies: bool,
) -> anyhow::Result<(Queue, tokio::task::JoinHandle<()>)> {
    let addr = url.resolve().await?;
    let mut stream =
        net::connect(addr, None, Duration::from_secs(10)).await.map_err(|e| anyhow::anyhow!("cannot connect to {url}: {e}"))?;
    let first = match tokio::time::timeout(Duration::from_secs(10), wire::upgrade(&mut stream, url, path)).await {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("publisher handshake with {url}{path}: {e}"))?,
        Err(_) => anyhow::bail!("publisher handshake with {url}{path}: no answer within 10 s"),
    };
    let (mut read, write) = stream.into_split();
    let (tx, rx) = mpsc::channel::<(u64, Bytes)>(BACKLOG);
    let (pong_tx, pong_rx) = mpsc::channel::<Bytes>(16);
    let writer = tokio::task::spawn_local(ws_writer(write, rx, pong_rx, Rc::clone(&state), replies));
    tokio::task::spawn_local(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = first;
        let mut masker = wire::Masker::new(7);
        let id_finder = memchr::memmem::Finder::new(br#""id":"#);
        let mut tmp = vec![0u8; 64 * 1024];
        loop {
            let mut at = 0;
            loop {
                let (f, used) = match wire::parse_frame(&buf[at..]) {
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
                            if (g as usize) < state.borrow().status.len() {
                                state.borrow_mut().done(g, kind);
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
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
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

async fn ws_writer(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    mut pongs: mpsc::Receiver<Bytes>,
    state: Rc<RefCell<State>>,
    replies: bool,
) {
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some((g, frame)) = m else { return };
                state.borrow_mut().sent(g);
                let r = write.write_all(&frame).await;
                if r.is_err() {
                    state.borrow_mut().done(g, Err("io".into()));
                } else if !replies {
                    state.borrow_mut().done(g, Ok(()));
                }
            }
            Some(p) = pongs.recv() => {
                let _ = write.write_all(&p).await;
            }
        }
    }
}
