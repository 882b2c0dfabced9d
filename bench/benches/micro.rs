//! Micro benches of the per-message work: WebSocket frame, SSE event and
//! envelope encoding, command parsing, and a shard's fan-out of one message
//! to 10,000 in-memory subscriber queues.
//!
//! `cargo bench -p herald-bench --bench micro`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use herald::proto::{command, frame, json, sse};
use herald::Payload;

const SIZES: [usize; 5] = [16, 256, 4096, 16 * 1024, 64 * 1024];

fn encoders(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for n in SIZES {
        let text = "a".repeat(n);
        let multiline = "line\n".repeat(n / 5 + 1);
        let payload = Payload::text(text.clone());
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::new("ws_frame", n), &text, |b, t| {
            b.iter(|| frame::encode_frame(frame::OpCode::Text, black_box(t.as_bytes())))
        });
        g.bench_with_input(BenchmarkId::new("sse_event", n), &multiline, |b, t| b.iter(|| sse::encode_event(black_box(t.as_bytes()))));
        g.bench_with_input(BenchmarkId::new("ws_envelope", n), &payload, |b, p| {
            b.iter(|| json::ws_json(black_box("news"), 17, black_box(p)))
        });
        g.bench_with_input(BenchmarkId::new("sse_envelope", n), &payload, |b, p| {
            b.iter(|| json::sse_json(black_box("news"), 17, black_box(p)))
        });
    }
    g.finish();
}

fn commands(c: &mut Criterion) {
    let mut g = c.benchmark_group("command");
    let subscribe = r#"{"op":"subscribe","channel":"news","id":1}"#;
    let publish = format!(r#"{{"op":"publish","channel":"news","data":{{"price":42,"text":"{}"}},"id":2}}"#, "x".repeat(200));
    g.bench_function("parse_subscribe", |b| b.iter(|| command::parse(black_box(subscribe), 65536).command.is_ok()));
    g.bench_function("parse_publish_256B", |b| b.iter(|| command::parse(black_box(&publish), 65536).command.is_ok()));
    g.finish();
}

fn shard_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("shard_fanout");
    let n = 10_000;
    let queues = herald::FanoutBench::new(n);
    let channel: Arc<str> = "news".into();
    let payload = Payload::text("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    g.throughput(Throughput::Elements(n as u64));
    let mut offset = 0;
    g.bench_function("one_message_to_10k_queues", |b| {
        b.iter(|| {
            offset += 1;
            queues.run(&channel, offset, &payload)
        })
    });
    g.finish();
}

criterion_group!(benches, encoders, commands, shard_fanout);
criterion_main!(benches);
