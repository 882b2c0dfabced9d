//! `floor`: the no-engine server (see `herald_bench::floor`) for `loadgen`:
//! every WebSocket subscriber gets every message published with
//! `POST /publish/{anything}`, as the raw payload.
//!
//! ```text
//! floor --listen 127.0.0.1:18404 --threads 2
//! ```

use clap::Parser;

/// Pre-encoded frames written to every socket: the floor of fan-out cost.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18404")]
    listen: std::net::SocketAddr,
    /// Writer threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let floor = herald_bench::floor::Floor::start_on(std::net::TcpListener::bind(args.listen)?, args.threads)?;
    eprintln!("floor listening on {}", floor.addr());
    loop {
        std::thread::park();
    }
}
