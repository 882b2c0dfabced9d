//! Micro benches of the per-message work: WebSocket frame, SSE event and
//! envelope encoding, command parsing, and a shard's fan-out of one message
//! to 10,000 in-memory subscriber queues; permessage-deflate of 1 KiB of
//! JSON with zlib-rs (Herald's codec, through flate2) at several levels
//! against miniz_oxide, inflate, and a fan-out to 1,000 compressing
//! subscribers with the message deflated once against once per subscriber.
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

/// About 1 KiB of JSON: a change set of records, as loadgen's
/// `--payload-json` makes them (each record differs).
fn change_set(seed: u64) -> Vec<u8> {
    const WORDS: [&str; 8] = ["milk", "report", "invoice", "review", "deploy", "garden", "ticket", "draft"];
    let mut x = seed | 1;
    let mut s = String::from("{\"items\":[");
    while s.len() < 900 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!(
            r#"{{"id":{},"title":"{} {} {}","done":{},"owner":"user-{}","updated":"2026-12-01T{:02}:{:02}:00Z"}},"#,
            x % 100_000,
            WORDS[(x >> 20) as usize % 8],
            WORDS[(x >> 24) as usize % 8],
            (x >> 28) % 1000,
            x & 1 == 1,
            (x >> 40) % 50,
            (x >> 44) % 24,
            (x >> 50) % 60
        ));
    }
    s.pop();
    s.push_str("]}");
    s.into_bytes()
}

fn deflate(c: &mut Criterion) {
    use flate2::{Compress, Compression, FlushCompress};
    let mut g = c.benchmark_group("deflate");
    let payload = change_set(7);
    g.throughput(Throughput::Bytes(payload.len() as u64));
    let mut out = Vec::with_capacity(4096);
    for level in [1u32, 2, 4, 6, 9] {
        let mut z = Compress::new(Compression::new(level), false);
        let mut size = 0;
        g.bench_function(BenchmarkId::new("zlib_rs", level), |b| {
            b.iter(|| {
                out.clear();
                z.reset();
                z.compress_vec(black_box(&payload), &mut out, FlushCompress::Sync).unwrap();
                size = out.len();
            })
        });
        println!("deflate/zlib_rs/{level}: {} -> {} bytes ({:.2}x)", payload.len(), size, payload.len() as f64 / size as f64);
    }
    for level in [1u8, 6] {
        use miniz_oxide::deflate::core::{compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush};
        let mut z = CompressorOxide::new(create_comp_flags_from_zip_params(i32::from(level), -15, 0));
        let mut buf = vec![0u8; 4096];
        let mut size = 0;
        g.bench_function(BenchmarkId::new("miniz_oxide", level), |b| {
            b.iter(|| {
                z.reset();
                size = compress(&mut z, black_box(&payload), &mut buf, TDEFLFlush::Sync).2;
            })
        });
        println!("deflate/miniz_oxide/{level}: {} -> {} bytes ({:.2}x)", payload.len(), size, payload.len() as f64 / size as f64);
    }
    let mut z = Vec::new();
    herald::proto::deflate::deflate_into(&payload, 1, &mut z);
    g.bench_function("inflate_zlib_rs", |b| b.iter(|| herald::proto::deflate::inflate(black_box(&z), None, 1 << 20).unwrap()));
    g.finish();
}

fn shard_fanout_deflate(c: &mut Criterion) {
    let mut g = c.benchmark_group("shard_fanout_deflate");
    let n = 1_000;
    let channel: Arc<str> = "news".into();
    g.throughput(Throughput::Elements(n as u64));
    for (name, queues) in [
        ("plain", herald::FanoutBench::new(n)),
        ("shared", herald::FanoutBench::deflating(n, false)),
        ("per_connection", herald::FanoutBench::deflating(n, true)),
    ] {
        let mut offset = 0;
        g.bench_function(BenchmarkId::new("one_1KiB_json_message_to_1k_queues", name), |b| {
            b.iter(|| {
                offset += 1;
                let payload = Payload::json(change_set(offset)).unwrap();
                queues.run(&channel, offset, &payload)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, encoders, commands, shard_fanout, deflate, shard_fanout_deflate);
criterion_main!(benches);
