//! One message published to N WebSocket subscribers over loopback, timed
//! until all N have it, for four servers with the same client side
//! (`herald_bench::client`):
//!
//! - `herald`: Herald, 2 shards, its in-process `publish`;
//! - `careful`: axum + tungstenite + `tokio::sync::broadcast`, encoding
//!   once per message, batched writes, on a 2-worker multi-thread runtime
//!   (`herald_bench::careful`): the baseline to compare with;
//! - `naive`: the same stack encoding per subscriber (per-subscriber
//!   JSON), kept for reference (`herald_bench::naive`);
//! - `floor`: pre-encoded bytes written to every socket from 2 threads
//!   (`herald_bench::floor`).
//!
//! `cargo bench -p herald-bench --bench fanout`; criterion reports the time
//! per fan-out and, as throughput, deliveries per second.

use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use herald_bench::careful::{Careful, Data};
use herald_bench::client::Subscribers;
use herald_bench::floor::Floor;
use herald_bench::naive::Naive;

const SIZES: [usize; 4] = [1, 100, 1000, 5000];
const PAYLOAD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const TIMEOUT: Duration = Duration::from_secs(10);

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Times `iters` fan-outs of what `publish` sends to the `n` subscribers.
fn bench<F, Fut>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    n: usize,
    subs: &Subscribers,
    publish: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
        b.to_async(rt).iter_custom(|iters| {
            let publish = &publish;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let took = subs.fanout(publish(), TIMEOUT).await;
                    total += took.unwrap_or_else(|| panic!("{name}: not every subscriber got the message"));
                }
                total
            }
        })
    });
}

fn fanout(c: &mut Criterion) {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = client_runtime();
    let mut group = c.benchmark_group("fanout");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));

    for n in SIZES {
        group.throughput(Throughput::Elements(n as u64));

        // Herald.
        let mut cfg = herald::Config::default();
        cfg.shards(2).max_connections(100_000);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let herald = herald::Herald::start_on(listener, cfg).expect("herald");
        let addr = herald.local_addr().expect("addr");
        let subs = rt.block_on(Subscribers::connect(addr, "/ws?channel=bench", n)).expect("connect to herald");
        std::thread::sleep(Duration::from_millis(200));
        bench(&mut group, &rt, "herald", n, &subs, || async {
            herald.publish("bench", herald::Payload::text(PAYLOAD)).await.expect("publish");
        });
        drop(subs);
        rt.block_on(herald.shutdown(Duration::from_secs(1)));

        // The careful baseline, on its own runtime.
        let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let careful = Careful::default();
        let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        server_rt.spawn(careful.clone().serve(listener));
        let subs = rt.block_on(Subscribers::connect(addr, "/ws?channel=bench", n)).expect("connect to careful");
        std::thread::sleep(Duration::from_millis(200));
        // The payload is escaped per publish, as Herald's is built per publish.
        bench(&mut group, &rt, "careful", n, &subs, || async {
            careful.publish("bench", &Data::text(PAYLOAD)).expect("publish");
        });
        drop(subs);
        server_rt.shutdown_timeout(Duration::from_secs(1));

        // The naive baseline (per-subscriber JSON), on its own runtime.
        let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let naive = Naive::default();
        let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        server_rt.spawn(naive.clone().serve(listener));
        let subs = rt.block_on(Subscribers::connect(addr, "/ws?channel=bench", n)).expect("connect to naive");
        std::thread::sleep(Duration::from_millis(200));
        bench(&mut group, &rt, "naive", n, &subs, || async {
            naive.publish("bench", PAYLOAD);
        });
        drop(subs);
        server_rt.shutdown_timeout(Duration::from_secs(1));

        // The floor.
        let floor = Floor::start(2).expect("floor");
        let subs = rt.block_on(Subscribers::connect(floor.addr(), "/", n)).expect("connect to floor");
        std::thread::sleep(Duration::from_millis(200));
        let frame: Arc<[u8]> = herald::proto::frame::encode_frame(herald::proto::frame::OpCode::Text, PAYLOAD.as_bytes()).to_vec().into();
        bench(&mut group, &rt, "floor", n, &subs, || async {
            floor.publish(Arc::clone(&frame));
        });
        drop(subs);
        floor.stop();
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
