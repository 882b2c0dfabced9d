//! The control channel: server API commands that every node carries out
//! (disconnect a user, unsubscribe a user from a channel) travel as Redis
//! pub/sub messages on `{prefix}control`, `c1|<node id>|<command>`.
//!
//! Every node keeps one subscriber connection to it (through redis-rs:
//! commands are few and come from authenticated API calls), reconnecting
//! with backoff; a node skips its own commands (it carried them out before
//! sending). A node cut off from Redis when a command is sent misses it:
//! the sender's answer counts the nodes reached.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;

use super::{Backoff, Shared};

/// The body of a command message from node `node`.
pub(crate) fn encode(node: &str, cmd: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + node.len() + cmd.len());
    body.extend_from_slice(b"c1|");
    body.extend_from_slice(node.as_bytes());
    body.push(b'|');
    body.extend_from_slice(cmd);
    body
}

/// The sending node and command of a body.
pub(crate) fn decode(body: &[u8]) -> Option<(&str, &[u8])> {
    let rest = body.strip_prefix(b"c1|")?;
    let bar = rest.iter().position(|&b| b == b'|')?;
    Some((std::str::from_utf8(&rest[..bar]).ok()?, &rest[bar + 1..]))
}

/// Keeps this node subscribed to the control channel until the broker
/// stops, handing other nodes' commands to the engine.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    let channel = shared.scripts.names.control_channel();
    let mut backoff = Backoff::default();
    let mut seed = 0;
    loop {
        let info = shared.seeds[seed % shared.seeds.len()].clone();
        seed += 1;
        let session = async {
            let client = shared.client(info)?;
            let mut pubsub = tokio::time::timeout(shared.timeout, client.get_async_pubsub())
                .await
                .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
            pubsub.subscribe(&channel).await?;
            shared.control_up.store(true, Ordering::Release);
            tracing::debug!("subscribed to the control channel");
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                shared.handle_command(msg.get_payload_bytes());
            }
            Ok::<(), redis::RedisError>(())
        };
        let outcome = tokio::select! {
            r = session => r,
            _ = stop.changed() => return,
        };
        let was_up = shared.control_up.swap(false, Ordering::AcqRel);
        match outcome {
            Ok(()) => tracing::warn!("the control channel's connection closed; reconnecting"),
            Err(e) if was_up => tracing::warn!(error = %e, "the control channel's connection failed; reconnecting"),
            Err(e) => tracing::debug!(error = %e, "cannot subscribe to the control channel; retrying"),
        }
        if was_up {
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next()) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bodies_round_trip() {
        let body = super::encode("n1a2", br#"{"op":"disconnect","user":"4|2"}"#);
        assert_eq!(super::decode(&body), Some(("n1a2", &br#"{"op":"disconnect","user":"4|2"}"#[..])));
        assert_eq!(super::decode(b"c2|x|{}"), None);
        assert_eq!(super::decode(b"c1|nobar"), None);
    }
}
