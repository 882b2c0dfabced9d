//! Publishing by Redis `PUBLISH` on one multiplexed connection: pipelined,
//! or with at most a given number awaiting their integer reply.

use std::cell::RefCell;
use std::rc::Rc;

use tokio::sync::{mpsc, Semaphore};

use super::{Item, State};
use crate::clock;

pub(super) async fn redis_conn(
    conn: redis::aio::MultiplexedConnection,
    names: Vec<String>,
    channels: u64,
    inflight: Option<usize>,
    mut rx: mpsc::Receiver<Item>,
    state: Rc<RefCell<State>>,
) {
    // Requests are pipelined on the one connection; each answer settles
    // its message. With a limit, a request waits for a permit: one of the
    // earlier requests answered.
    let permits = inflight.map(|n| Rc::new(Semaphore::new(n.max(1))));
    while let Some(Item { g, due_ns, bytes: body }) = rx.recv().await {
        if let Some(s) = &permits {
            // Never closed (this function owns it): acquiring cannot fail.
            if let Ok(p) = s.acquire().await {
                // Given back by the request's task when its answer is in.
                p.forget();
            }
        }
        let now = clock::now_ns();
        state.borrow_mut().sent(g, due_ns, now);
        let mut conn = conn.clone();
        let name = names[(g % channels) as usize].clone();
        let state = Rc::clone(&state);
        let permits = permits.clone();
        tokio::task::spawn_local(async move {
            let r: redis::RedisResult<i64> = redis::cmd("PUBLISH").arg(&name).arg(&body[..]).query_async(&mut conn).await;
            let mut st = state.borrow_mut();
            // An error is mostly a lost connection, not a reply: not timed.
            if r.is_ok() {
                st.round_trip(g, now, clock::now_ns());
            }
            st.done(g, r.map(|_| ()).map_err(|_| "redis".to_string()));
            if let Some(s) = permits {
                s.add_permits(1);
            }
        });
    }
}
