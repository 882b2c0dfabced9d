//! `careful`: the careful hand-written baseline server (see
//! `herald_bench::careful`): envelope encoded once per message, batched
//! writes, lagging subscribers closed. For `loadgen` and the peer
//! comparison.
//!
//! ```text
//! careful --listen 127.0.0.1:18091
//! ```

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The careful fan-out baseline: axum + tungstenite + tokio broadcast,
/// encoding each message once.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (loopback: this is a bench server).
    #[arg(long, default_value = "127.0.0.1:18091")]
    listen: std::net::SocketAddr,
    /// Runtime worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.listen.ip().is_loopback(), "careful serves loopback only, not {}", args.listen);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    rt.enable_all().build()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        eprintln!("careful baseline listening on {}", listener.local_addr()?);
        herald_bench::careful::Careful::default().serve(listener).await?;
        anyhow::Ok(())
    })
}
