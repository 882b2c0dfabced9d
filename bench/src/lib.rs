//! Benches and the servers they compare Herald with.
//!
//! - [`careful`]: the baseline Herald is measured against: the same stack
//!   (axum, tungstenite, `tokio::sync::broadcast`) written with care —
//!   envelope encoded once per message and shared by refcount, writes
//!   batched, buffers bounded, lagging subscribers closed and counted.
//!   Binary `careful` serves it for `loadgen`.
//! - [`naive`]: the naive baseline, kept for reference: the same stack
//!   with each subscriber's task JSON-encoding the envelope for itself
//!   and lagging subscribers silently skipping messages. Binary `naive`.
//! - [`floor`]: no engine at all: pre-encoded frame bytes written to every
//!   socket, one `write` each, from one thread per core. What the kernel
//!   costs; nothing can fan out for less.
//! - [`client`]: the subscriber side shared by the `fanout` bench: raw TCP,
//!   WebSocket frame headers parsed and counted, nothing else.

pub mod careful;
pub mod client;
pub mod floor;
pub mod naive;
