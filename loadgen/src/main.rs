//! `loadgen`: measures fan-out latency, throughput and loss of Herald or
//! any other WebSocket/SSE server.
//!
//! ```text
//! loadgen fanout                       # an embedded Herald, 1,000 subscribers
//! loadgen fanout --url 'ws://127.0.0.1:8080/ws?channel={channel}' --json out.json
//! loadgen connect --url 'ws://127.0.0.1:8080/ws?channel=c' --connections 10000
//! loadgen compare --target 'name=a url=ws://…' --target 'name=b url=ws://…'
//! ```
//!
//! # Layout
//!
//! - `cli`: clap's types and their translation into a scenario.
//! - `scenario`: what a run is: connections (target, subscribers,
//!   channels, connect rate) and, for a fan-out, the load published.
//! - `connect`: opening subscribers at a rate; the `connect` command.
//! - `fanout`: one fan-out run, from connecting to the report.
//! - `compare`: a scenario against several targets, interleaved.
//! - `publish`: the publisher (open loop, or a bounded number of publishes
//!   awaiting replies); `publish/{http,ws,redis}` the ways it sends.
//! - `sub`: subscriber worker threads and their receive paths.
//! - `ws`, `http1`, `net`: WebSocket frames, the HTTP/1.1 client side,
//!   addresses and connecting.
//! - `payload`, `stats`, `clock`, `sys`: stamped payloads, counters and
//!   histograms, the clock, process CPU/RSS and fd limits.
//! - `report`, `html`, `progress`: the JSON/text report, its HTML page,
//!   progress output.

mod cli;
mod clock;
mod compare;
mod connect;
mod fanout;
mod html;
mod http1;
mod net;
mod payload;
mod progress;
mod publish;
mod report;
mod scenario;
mod stats;
mod sub;
mod sys;
mod ws;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Cmd, FanoutArgs};
use progress::Progress;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    clock::init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start: {e}");
            std::process::exit(2);
        }
    };
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Fanout(a) => cmd_fanout(a).await,
            Cmd::Connect(a) => connect::run(a).await.map(|()| 0),
            Cmd::Compare(a) => compare::run(a).await.map(|()| 0),
            Cmd::Report(a) => report_again(&a).map(|()| 0),
        }
    });
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            let failed_run = e.downcast_ref::<fanout::NoSubscriber>().is_some();
            std::process::exit(if failed_run { EXIT_FAILED_RUN } else { 1 });
        }
    }
}

/// `loadgen report`: a saved fan-out or compare report, rendered again.
fn report_again(a: &cli::ReportArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.json).with_context(|| format!("cannot read {}", a.json.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", a.json.display()))?;
    let page = if value.get("rows").is_some() && value.get("runs").is_some() {
        let c: compare::CompareReport =
            serde_json::from_value(value).with_context(|| format!("{} is not a loadgen compare report", a.json.display()))?;
        print!("{}", compare::table(&c.rows));
        html::render_compare(&c.rows, &c.runs_by_target(), &c.sequence)
    } else if value.get("delivery_latency_us").is_some() {
        let r: report::FanoutReport =
            serde_json::from_value(value).with_context(|| format!("{} is not a loadgen fanout report", a.json.display()))?;
        print!("{}", r.summary());
        html::render(&r)
    } else {
        anyhow::bail!("{}: not a report of loadgen fanout or compare (loadgen connect's has no page)", a.json.display());
    };
    if let Some(path) = &a.html {
        std::fs::write(path, page).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Exit status of a run whose threshold was crossed.
const EXIT_THRESHOLD: i32 = 3;
/// Exit status of a run that measured nothing: no subscriber connected,
/// or every delivery was lost.
const EXIT_FAILED_RUN: i32 = 4;

/// Runs a fan-out; its exit status: 0, [`EXIT_THRESHOLD`] or
/// [`EXIT_FAILED_RUN`].
async fn cmd_fanout(a: FanoutArgs) -> anyhow::Result<i32> {
    let progress = Progress::new(a.quiet);
    sys::fd_budget(a.scenario.subscribers, &progress);
    let (sc, herald) = a.scenario.build(None)?;
    let r = fanout::run(&sc, &progress).await;
    progress.finish();
    if let Some(h) = herald {
        h.shutdown(Duration::from_secs(2)).await;
    }
    let report = r?;
    print!("{}", report.summary());
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &a.html {
        std::fs::write(path, html::render(&report)).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if report.connected == 0 {
        eprintln!("loadgen: FAILED: no subscriber connected");
        return Ok(EXIT_FAILED_RUN);
    }
    if report.expected > 0 && report.deliveries == 0 {
        eprintln!("loadgen: FAILED: every delivery was lost ({} expected)", report.expected);
        return Ok(EXIT_FAILED_RUN);
    }
    let crossed = a.thresholds.crossed(&report);
    for c in &crossed {
        eprintln!("loadgen: THRESHOLD CROSSED: {c}");
    }
    Ok(if crossed.is_empty() { 0 } else { EXIT_THRESHOLD })
}
