//! An SSE connection's pump: moves frames from the connection's outbound
//! queue into a small channel that the HTTP response body reads, and keeps
//! an idle stream open with `:` comments.
//!
//! The channel holds at most [`SSE_CHANNEL_FRAMES`] frames; behind it the
//! outbound queue holds the usual `outbound_queue_bytes`, so a client that
//! stops reading meets the slow-consumer policy like a WebSocket does.

use std::future::poll_fn;
use std::rc::Rc;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::conn::{Conn, Transport};
use super::Shard;
use crate::config::Config;
use crate::metrics::Disconnect;
use crate::proto::session::Keepalive;
use crate::proto::sse::KEEPALIVE;

/// Frames buffered between the pump and the response body.
pub(crate) const SSE_CHANNEL_FRAMES: usize = 16;

/// Sent first, so the client sees the stream open once it is subscribed.
const OPENED: &[u8] = b":ok\n\n";

enum Next {
    Frame(Bytes),
    Done(Disconnect),
}

/// Runs until the connection closes or the client goes away. Ends the body
/// cleanly, or with an error (the connection is then cut) for a slow consumer.
pub(crate) async fn pump(shard: Rc<Shard>, conn: Rc<Conn>, tx: mpsc::Sender<Bytes>, abort: oneshot::Sender<()>) {
    let mut keepalive = Keepalive::new(Config::dur(shard.config().sse_keepalive_ms), Instant::now());
    let timer = tokio::time::sleep_until(keepalive.deadline().into());
    tokio::pin!(timer);
    let mut next_frame = Some(Bytes::from_static(OPENED));
    let reason = 'outer: loop {
        if let Some(frame) = next_frame.take() {
            tokio::select! {
                biased;
                r = tx.send(frame) => {
                    if r.is_err() {
                        break 'outer Disconnect::Client;
                    }
                    keepalive.sent(Instant::now());
                }
                _ = slow_consumer(&conn) => break 'outer Disconnect::SlowConsumer,
            }
        }
        let next = poll_fn(|cx| {
            let mut out = conn.out.borrow_mut();
            out.set_waker(cx.waker());
            if let Some(f) = out.pop_frame(shard.metrics(), Transport::Sse) {
                return Poll::Ready(Next::Frame(f));
            }
            if out.closing().is_none() {
                // A subscriber that dropped frames and caught up is told.
                drop(out);
                conn.caught_up(shard.config().outbound_queue_bytes, shard.metrics());
                out = conn.out.borrow_mut();
                if let Some(f) = out.pop_frame(shard.metrics(), Transport::Sse) {
                    return Poll::Ready(Next::Frame(f));
                }
            }
            match out.closing() {
                Some(c) => Poll::Ready(Next::Done(c.reason)),
                None => Poll::Pending,
            }
        });
        tokio::select! {
            biased;
            n = next => match n {
                Next::Frame(f) => next_frame = Some(f),
                Next::Done(reason) => break reason,
            },
            _ = tx.closed() => break Disconnect::Client,
            _ = &mut timer => {
                if keepalive.due(Instant::now()) {
                    next_frame = Some(Bytes::from_static(KEEPALIVE));
                    keepalive.sent(Instant::now());
                }
                timer.as_mut().reset(keepalive.deadline().into());
            }
        }
    };
    if reason == Disconnect::SlowConsumer {
        let _ = abort.send(());
    }
    drop(tx);
    shard.remove_conn(&conn, reason);
}

/// Resolves once the connection is closed as a slow consumer.
async fn slow_consumer(conn: &Conn) {
    poll_fn(|cx| {
        let mut out = conn.out.borrow_mut();
        out.set_waker(cx.waker());
        match out.closing() {
            Some(c) if c.reason == Disconnect::SlowConsumer => Poll::Ready(()),
            _ => Poll::Pending,
        }
    })
    .await
}
