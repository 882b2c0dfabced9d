//! A reconnect storm against a Herald: `clients` WebSocket clients
//! subscribe, all leave, `missed` messages are published to each channel,
//! then all come back at once. With recovery each resubscribes with its
//! position and must get exactly the messages it missed (`recovered: true`,
//! offsets contiguous); without, each subscribes plainly. Rounds alternate
//! the two. Reports the time until every client is live again and the
//! server's CPU during the storm.
//!
//! ```text
//! storm --addr 127.0.0.1:8080 --clients 1000 --channels 10 --missed 100 --server-pid $(pgrep -x herald)
//! # Through Redis: publish on another node, sample redis-server too.
//! storm --addr 127.0.0.1:8081 --publish-addr 127.0.0.1:8082 --server-pid … --redis-pid …
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// The Herald to storm.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    channels: usize,
    /// Messages published to each channel while the clients are away.
    #[arg(long, default_value_t = 100)]
    missed: u64,
    /// Rounds; each runs a storm with recovery, then one without.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Sample this process's CPU during each storm.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Publish the missed messages through this node instead (another
    /// node on the same Redis): the clients recover what another node
    /// published.
    #[arg(long)]
    publish_addr: Option<SocketAddr>,
    /// Sample this process's CPU during each storm too (redis-server).
    #[arg(long)]
    redis_pid: Option<u32>,
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Ws> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp).await?;
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await.context("no frame within 30 s")? {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t)?),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => bail!("expected a text frame, got {other:?}"),
        }
    }
}

/// Subscribes (with `since` when given) and returns the `subscribed` reply.
async fn subscribe(ws: &mut Ws, channel: &str, since: Option<&str>) -> anyhow::Result<Value> {
    let mut cmd = json!({"op":"subscribe","channel":channel});
    if let Some(s) = since {
        cmd["since"] = json!(s);
    }
    ws.send(Message::text(cmd.to_string())).await?;
    let reply = next_json(ws).await?;
    if reply["op"] != "subscribed" {
        bail!("subscribe answered {reply}");
    }
    Ok(reply)
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn storm(a: &Args, round: usize, recover: bool) -> anyhow::Result<()> {
    let names: Vec<String> = (0..a.channels).map(|c| format!("storm-{round}-{}-{c}", u8::from(recover))).collect();
    // 1. Everyone subscribes and notes its position.
    let gate = Arc::new(Semaphore::new(256));
    let mut joins = Vec::new();
    for i in 0..a.clients {
        let (addr, name, gate) = (a.addr, names[i % a.channels].clone(), Arc::clone(&gate));
        joins.push(tokio::spawn(async move {
            let _p = gate.acquire().await;
            let mut ws = connect(addr).await?;
            let r = subscribe(&mut ws, &name, None).await?;
            let pos = format!("{}:{}", r["epoch"].as_str().unwrap_or(""), r["offset"].as_u64().unwrap_or(0));
            ws.close(None).await?;
            anyhow::Ok((name, pos))
        }));
    }
    let mut positions = Vec::new();
    for j in joins {
        positions.push(j.await??);
    }
    // 2. While they are away, `missed` messages per channel.
    let mut publisher = connect(a.publish_addr.unwrap_or(a.addr)).await?;
    // At most 200 in flight: a Redis-brokered node takes 256 per connection.
    let all: Vec<(String, u64)> = names.iter().flat_map(|n| (0..a.missed).map(move |k| (n.clone(), k))).collect();
    for chunk in all.chunks(200) {
        for (name, k) in chunk {
            publisher.send(Message::text(json!({"op":"publish","channel":name,"data":{"k":k}}).to_string())).await?;
        }
        for _ in chunk {
            let r = next_json(&mut publisher).await?;
            if r["op"] != "published" {
                bail!("publish answered {r}");
            }
        }
    }
    // 3. All come back at once.
    let cpu0 = a.server_pid.and_then(cpu_ticks);
    let redis0 = a.redis_pid.and_then(cpu_ticks);
    let t0 = Instant::now();
    let mut joins = Vec::new();
    for (name, pos) in positions {
        let (addr, missed) = (a.addr, a.missed);
        joins.push(tokio::spawn(async move {
            let mut ws = connect(addr).await?;
            let since = recover.then_some(pos.as_str());
            let r = subscribe(&mut ws, &name, since).await?;
            if recover {
                if r["recovered"] != true {
                    bail!("not recovered: {r}");
                }
                let from = pos.rsplit(':').next().and_then(|o| o.parse::<u64>().ok()).unwrap_or(0);
                for k in 1..=missed {
                    let m = next_json(&mut ws).await?;
                    if m["offset"].as_u64() != Some(from + k) {
                        bail!("expected offset {}, got {m}", from + k);
                    }
                }
            }
            let live = t0.elapsed();
            anyhow::Ok((ws, live))
        }));
    }
    let mut times = Vec::new();
    let mut conns = Vec::new();
    for j in joins {
        let (ws, t) = j.await??;
        times.push(t.as_secs_f64() * 1000.0);
        conns.push(ws);
    }
    let total = t0.elapsed();
    let seconds = |before: Option<u64>, pid: Option<u32>| match (before, pid.and_then(cpu_ticks)) {
        (Some(x), Some(y)) => format!("{:.2} s", (y - x) as f64 / 100.0),
        _ => "-".into(),
    };
    let cpu = seconds(cpu0, a.server_pid);
    let redis = match a.redis_pid {
        Some(_) => format!(", Redis CPU {}", seconds(redis0, a.redis_pid)),
        None => String::new(),
    };
    times.sort_by(f64::total_cmp);
    println!(
        "round {round} {:<13} {} clients, {} missed each: all live in {:.0} ms (per client p50 {:.0} / p99 {:.0} ms), server CPU {cpu}{redis}",
        if recover { "recovery" } else { "no recovery" },
        a.clients,
        if recover { a.missed } else { 0 },
        total.as_secs_f64() * 1000.0,
        percentile(&times, 0.5),
        percentile(&times, 0.99),
    );
    for mut ws in conns {
        let _ = ws.close(None).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    for round in 1..=a.rounds {
        storm(&a, round, true).await?;
        storm(&a, round, false).await?;
    }
    Ok(())
}
