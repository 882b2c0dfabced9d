//! Benches and the servers they compare Herald with.
//!
//! - [`naive`]: the fan-out server a Rust user would write by hand: axum,
//!   its WebSocket (tungstenite) and `tokio::sync::broadcast`, each
//!   subscriber's task encoding the envelope for itself on the
//!   multi-thread runtime. Binary `naive` serves it for `loadgen`.
//! - [`floor`]: no engine at all: pre-encoded frame bytes written to every
//!   socket, one `write` each, from one thread per core. What the kernel
//!   costs; nothing can fan out for less.
//! - [`client`]: the subscriber side shared by the `fanout` bench: raw TCP,
//!   WebSocket frame headers parsed and counted, nothing else.

pub mod client;
pub mod floor;
pub mod naive;
