//! Publishing by HTTP `POST` on keep-alive connections: pipelined, or with
//! at most a given number of requests awaiting their response.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{Item, Sign, State};
use crate::clock;
use crate::http1::{parse_response, Response};
use crate::net::{self, Url};

/// Requests in flight on one HTTP connection at most; past it the
/// connection stops writing and its queue fills up.
const MAX_IN_FLIGHT: usize = super::MAX_INFLIGHT;

/// Where a connection's requests go and what they carry besides their
/// body.
pub(super) struct Target {
    pub url: Url,
    /// Channel names; message `g` goes to `names[g % names.len()]`.
    pub names: Vec<String>,
    pub content_type: String,
    pub sign: Option<Sign>,
    /// Requests awaiting their answer at most.
    pub limit: usize,
}

/// One HTTP/1.1 connection: requests are written as they come, without
/// waiting for answers while fewer than `limit` await theirs (pipelined
/// when the limit is unlimited), and the answers settle them in order.
/// With `limit` 1 each request waits for the previous response: a closed
/// loop. Each channel always uses the same connection, so the target
/// receives a channel's messages in order.
pub(super) async fn http_conn(addr: SocketAddr, mut target: Target, mut rx: mpsc::Receiver<Item>, state: Rc<RefCell<State>>) {
    target.limit = target.limit.clamp(1, MAX_IN_FLIGHT);
    // A message taken from the queue but not sent: the connection had closed.
    let mut carry = None;
    // A server may close a keep-alive connection (a request limit, an
    // error, `Connection: close` after every answer): reconnect and go on;
    // what was in flight is counted failed.
    loop {
        let stream = match net::open(&target.url, addr, None, Duration::from_secs(10)).await {
            Ok(s) => s,
            Err(e) => {
                // Nothing to talk to: refuse one message, then try again.
                let next = match carry.take() {
                    Some(item) => Some(item),
                    None => rx.recv().await,
                };
                let Some(Item { g, .. }) = next else { return };
                state.borrow_mut().done(g, Err(format!("connect_{}", e.kind)));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let done = match stream {
            net::Stream::Plain(tcp) => {
                let (read, write) = tcp.into_split();
                http_session(read, write, &target, &mut rx, &mut carry, &state).await
            }
            net::Stream::Tls(tls) => {
                let (read, write) = tokio::io::split(*tls);
                http_session(read, write, &target, &mut rx, &mut carry, &state).await
            }
        };
        if done {
            return;
        }
    }
}

/// Serves one connection; returns true when the queue closed (the run is
/// over), false when the connection failed.
async fn http_session<R, W>(
    mut read: R,
    mut write: W,
    target: &Target,
    rx: &mut mpsc::Receiver<Item>,
    carry: &mut Option<Item>,
    state: &Rc<RefCell<State>>,
) -> bool
where
    R: tokio::io::AsyncRead + Unpin + 'static,
    W: tokio::io::AsyncWrite + Unpin,
{
    let Target { url, names, limit, .. } = target;
    let limit = *limit;
    let host = url.authority();
    // `(message, when its request was written)`, oldest first.
    let in_flight: Rc<RefCell<VecDeque<(u64, u64)>>> = Rc::default();
    let room = Rc::new(tokio::sync::Notify::new());
    // Set when the reader stops: the connection takes no more requests.
    let closing = Rc::new(std::cell::Cell::new(false));
    let reader = {
        let closing = Rc::clone(&closing);
        let in_flight = Rc::clone(&in_flight);
        let state = Rc::clone(state);
        let room = Rc::clone(&room);
        tokio::task::spawn_local(async move {
            use tokio::io::AsyncReadExt;
            let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
            let mut ended = "io_closed";
            // When the bytes being parsed were read.
            let mut read_ns = 0;
            'read: loop {
                // Settle every complete response in `buf`.
                loop {
                    match parse_response(&buf) {
                        Ok(Some(Response { status, len, close })) => {
                            buf.drain(..len);
                            let Some((g, written_ns)) = in_flight.borrow_mut().pop_front() else {
                                ended = "unexpected_response";
                                break 'read;
                            };
                            let r = if (200..300).contains(&status) { Ok(()) } else { Err(format!("http_{status}")) };
                            let mut st = state.borrow_mut();
                            st.round_trip(g, written_ns, read_ns);
                            st.done(g, r);
                            drop(st);
                            if close {
                                // The server closes after this answer: what
                                // was sent behind it is lost, and the next
                                // request goes on a new connection.
                                ended = "closed_by_server";
                                break 'read;
                            }
                            room.notify_one();
                        }
                        Ok(None) => break,
                        Err(e) => {
                            ended = e;
                            break 'read;
                        }
                    }
                }
                buf.reserve(16 * 1024);
                match read.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => read_ns = clock::now_ns(),
                }
            }
            for (g, _) in in_flight.borrow_mut().drain(..) {
                state.borrow_mut().done(g, Err(ended.to_string()));
            }
            closing.set(true);
            room.notify_one();
        })
    };
    let mut out = Vec::with_capacity(64 * 1024);
    let mut itoa = itoa::Buffer::new();
    let closed = loop {
        let first = match carry.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => break true,
            },
        };
        if closing.get() {
            *carry = Some(first);
            break false;
        }
        // The batch is written right after it is built (microseconds).
        let now = clock::now_ns();
        let mut next = Some(first);
        // Coalesce what is queued into one write.
        while let Some(Item { g, due_ns, bytes: body }) = next.take() {
            let path = url.path_for(&names[(g % names.len() as u64) as usize]);
            out.extend_from_slice(b"POST ");
            out.extend_from_slice(path.as_bytes());
            if let Some(sign) = &target.sign {
                let unix_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                out.push(if path.contains('?') { b'&' } else { b'?' });
                out.extend_from_slice(sign.query(&path, &body, unix_s).as_bytes());
            }
            out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
            out.extend_from_slice(host.as_bytes());
            out.extend_from_slice(b"\r\nContent-Type: ");
            out.extend_from_slice(target.content_type.as_bytes());
            out.extend_from_slice(b"\r\nContent-Length: ");
            out.extend_from_slice(itoa.format(body.len()).as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(&body);
            state.borrow_mut().sent(g, due_ns, now);
            in_flight.borrow_mut().push_back((g, now));
            if out.len() < 64 * 1024 && in_flight.borrow().len() < limit {
                next = rx.try_recv().ok();
            }
        }
        // Flushed: over TLS the records wait in the stream until then.
        if reader.is_finished() || write.write_all(&out).await.is_err() || write.flush().await.is_err() {
            break false;
        }
        out.clear();
        while in_flight.borrow().len() >= limit && !reader.is_finished() {
            room.notified().await;
        }
    };
    // Keep the connection open until the last answers are in: closing the
    // write side early can make a server drop the requests it has not read.
    while closed && !in_flight.borrow().is_empty() && !reader.is_finished() {
        room.notified().await;
    }
    drop(write);
    reader.abort();
    for (g, _) in in_flight.borrow_mut().drain(..) {
        state.borrow_mut().done(g, Err("io".into()));
    }
    closed
}
