//! Benches and measurement tools for Herald. `probe` is a quick fan-out
//! and idle-connection measurement against a running server.
