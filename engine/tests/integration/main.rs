//! Integration tests over real sockets: Herald on port 0, independent
//! clients (tokio-tungstenite, raw TCP, Python `websockets`).

mod api;
mod auth;
mod broker;
mod browser;
mod churn;
mod cli;
mod clients;
mod common;
mod compression;
mod config_table;
mod embed;
mod embed_shutdown;
mod errors;
mod fanout;
mod fuzz_corpus;
mod history;
mod hooks;
mod hostile;
mod interop;
mod limits;
mod namespaces;
mod origins;
mod presence;
mod redis_history;
mod shutdown;
mod slow;
mod tls;
