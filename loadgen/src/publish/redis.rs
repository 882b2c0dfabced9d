//! Publishing by Redis `PUBLISH`, pipelined on one multiplexed connection.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::State;

pub(super) async fn redis_conn(
    conn: redis::aio::MultiplexedConnection,
    names: Vec<String>,
    channels: u64,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    state: Rc<RefCell<State>>,
) {
    // Requests are pipelined on the one connection; each answer settles
    // its message.
    while let Some((g, body)) = rx.recv().await {
        state.borrow_mut().sent(g);
        let mut conn = conn.clone();
        let name = names[(g % channels) as usize].clone();
        let state = Rc::clone(&state);
        tokio::task::spawn_local(async move {
            let r: redis::RedisResult<i64> = redis::cmd("PUBLISH").arg(&name).arg(&body[..]).query_async(&mut conn).await;
            state.borrow_mut().done(g, r.map(|_| ()).map_err(|_| "redis".to_string()));
        });
    }
}
