//! Publishing by HTTP `POST`, pipelined on keep-alive connections.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::State;
use crate::http1::parse_response;
use crate::net::{self, Url};

/// Requests in flight on one HTTP connection at most; past it the
/// connection stops writing and its queue fills up.
const MAX_IN_FLIGHT: usize = 4096;

/// One pipelined HTTP/1.1 connection: requests are written as they come,
/// without waiting for answers, and the answers settle them in order.
/// Each channel always uses the same connection, so the target receives a
/// channel's messages in order.
pub(super) async fn http_conn(
    addr: SocketAddr,
    url: Url,
    names: Vec<String>,
    channels: u64,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    state: Rc<RefCell<State>>,
) {
    // A server may close a keep-alive connection (a request limit, an
    // error): reconnect and go on; what was in flight is counted failed.
    loop {
        let stream = match net::connect(addr, None, Duration::from_secs(10)).await {
            Ok(s) => s,
            Err(e) => {
                // Nothing to talk to: refuse one message, then try again.
                let Some((g, _)) = rx.recv().await else { return };
                state.borrow_mut().done(g, Err(format!("connect_{}", e.kind)));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if http_session(stream, &url, &names, channels, &mut rx, &state).await {
            return;
        }
    }
}

/// Serves one connection; returns true when the queue closed (the run is
/// over), false when the connection failed.
async fn http_session(
    stream: tokio::net::TcpStream,
    url: &Url,
    names: &[String],
    channels: u64,
    rx: &mut mpsc::Receiver<(u64, Bytes)>,
    state: &Rc<RefCell<State>>,
) -> bool {
    let host = url.authority();
    let (mut read, mut write) = stream.into_split();
    let in_flight: Rc<RefCell<VecDeque<u64>>> = Rc::default();
    let room = Rc::new(tokio::sync::Notify::new());
    let reader = {
        let in_flight = Rc::clone(&in_flight);
        let state = Rc::clone(state);
        let room = Rc::clone(&room);
        tokio::task::spawn_local(async move {
            use tokio::io::AsyncReadExt;
            let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
            let mut ended = "io_closed";
            'read: loop {
                // Settle every complete response in `buf`.
                loop {
                    match parse_response(&buf) {
                        Ok(Some((status, used))) => {
                            buf.drain(..used);
                            let Some(g) = in_flight.borrow_mut().pop_front() else {
                                ended = "unexpected_response";
                                break 'read;
                            };
                            let r = if (200..300).contains(&status) { Ok(()) } else { Err(format!("http_{status}")) };
                            state.borrow_mut().done(g, r);
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
                    Ok(_) => {}
                }
            }
            for g in in_flight.borrow_mut().drain(..) {
                state.borrow_mut().done(g, Err(ended.to_string()));
            }
            room.notify_one();
        })
    };
    let mut out = Vec::with_capacity(64 * 1024);
    let mut itoa = itoa::Buffer::new();
    let closed = loop {
        let Some(first) = rx.recv().await else { break true };
        let mut next = Some(first);
        // Coalesce what is queued into one write.
        while let Some((g, body)) = next.take() {
            let path = url.path_for(&names[(g % channels) as usize]);
            out.extend_from_slice(b"POST ");
            out.extend_from_slice(path.as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
            out.extend_from_slice(host.as_bytes());
            out.extend_from_slice(b"\r\nContent-Type: text/plain\r\nContent-Length: ");
            out.extend_from_slice(itoa.format(body.len()).as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(&body);
            state.borrow_mut().sent(g);
            in_flight.borrow_mut().push_back(g);
            if out.len() < 64 * 1024 && in_flight.borrow().len() < MAX_IN_FLIGHT {
                next = rx.try_recv().ok();
            }
        }
        if reader.is_finished() || write.write_all(&out).await.is_err() {
            break false;
        }
        out.clear();
        while in_flight.borrow().len() >= MAX_IN_FLIGHT && !reader.is_finished() {
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
    for g in in_flight.borrow_mut().drain(..) {
        state.borrow_mut().done(g, Err("io".into()));
    }
    closed
}
