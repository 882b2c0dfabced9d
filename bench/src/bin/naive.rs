//! `naive`: the naive hand-written baseline server, per-subscriber JSON
//! encoding (see `herald_bench::naive`), kept for reference; `careful` is
//! the baseline to compare with.
//!
//! ```text
//! naive --listen 127.0.0.1:18090
//! ```

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The naive fan-out baseline (per-subscriber JSON), kept for reference.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18090")]
    listen: std::net::SocketAddr,
    /// Runtime worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    rt.enable_all().build()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        eprintln!("naive baseline listening on {}", listener.local_addr()?);
        herald_bench::naive::Naive::default().serve(listener).await?;
        anyhow::Ok(())
    })
}
