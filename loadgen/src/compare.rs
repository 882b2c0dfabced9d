//! `loadgen compare`: one scenario against several targets, run in turn
//! (A B A B …) so that drifts of a shared machine hit every target alike,
//! and a side-by-side table of medians with ratios to the first target.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::cli::{CompareArgs, FormatArg, PublishArg, ScenarioArgs};
use crate::progress::Progress;
use crate::report::{us, FanoutReport};
use crate::sys::fd_budget;

#[derive(Debug, Clone)]
struct Target {
    name: String,
    args: ScenarioArgs,
}

fn parse_target(spec: &str, base: &ScenarioArgs) -> anyhow::Result<Target> {
    let mut args = base.clone();
    args.url.clear();
    args.server_pid.clear();
    let mut name = None;
    for kv in spec.split_whitespace() {
        let (k, v) = kv.split_once('=').with_context(|| format!("target {spec:?}: {kv:?} is not key=value"))?;
        match k {
            "name" => name = Some(v.to_string()),
            "url" => args.url.push(v.to_string()),
            "publish" => {
                args.publish = match v {
                    "http" => PublishArg::Http,
                    "ws" => PublishArg::Ws,
                    "ws-raw" => PublishArg::WsRaw,
                    "redis" => PublishArg::Redis,
                    _ => bail!("target {spec:?}: publish must be http, ws, ws-raw or redis"),
                }
            }
            "publish-url" => args.publish_url = Some(v.to_string()),
            "publish-body" => args.publish_body = Some(v.to_string()),
            "publish-content-type" => args.publish_content_type = v.to_string(),
            "publish-sign" => args.publish_sign = Some(v.to_string()),
            "subscribe-message" => args.subscribe_message = Some(v.to_string()),
            "publish-inflight" => {
                args.publish_inflight = Some(v.parse().with_context(|| format!("target {spec:?}: bad publish-inflight {v:?}"))?)
            }
            "publish-connections" => {
                args.publish_connections = v.parse().with_context(|| format!("target {spec:?}: bad publish-connections {v:?}"))?
            }
            "format" => {
                args.format = match v {
                    "herald" => FormatArg::Herald,
                    "raw" => FormatArg::Raw,
                    _ => bail!("target {spec:?}: format must be herald or raw"),
                }
            }
            "pid" => args.server_pid.push(v.parse().with_context(|| format!("target {spec:?}: bad pid {v:?}"))?),
            _ => bail!("target {spec:?}: unknown key {k:?} (name, url, publish, publish-url, publish-body, publish-content-type, publish-sign, publish-inflight, publish-connections, subscribe-message, format, pid)"),
        }
    }
    let name = name.unwrap_or_else(|| args.url.first().cloned().unwrap_or_else(|| "embedded".into()));
    Ok(Target { name, args })
}

/// Medians of one target over the rounds.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Row {
    pub name: String,
    pub runs: usize,
    pub deliveries_per_s: f64,
    pub delivery_p50_us: f64,
    pub delivery_p99_us: f64,
    pub completion_p50_us: f64,
    pub completion_p99_us: f64,
    pub lost: f64,
    pub client_cpu_us_per_delivery: f64,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub server_rss_per_connection_kib: Option<f64>,
    pub client_saturated_runs: usize,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct CompareReport {
    pub rows: Vec<Row>,
    /// The runs in the order they ran: `name#round`.
    pub sequence: Vec<String>,
    /// Every run, target by target in the rows' order (each row's `runs`
    /// of them).
    pub runs: Vec<FanoutReport>,
}

impl CompareReport {
    /// The runs of each row's target, in the rows' order.
    pub fn runs_by_target(&self) -> Vec<Vec<FanoutReport>> {
        let mut rest = self.runs.as_slice();
        self.rows
            .iter()
            .map(|r| {
                let (mine, after) = rest.split_at(r.runs.min(rest.len()));
                rest = after;
                mine.to_vec()
            })
            .collect()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn median_opt(v: Vec<Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.into_iter().collect::<Option<_>>()?;
    Some(median(v))
}

pub async fn run(a: CompareArgs) -> anyhow::Result<()> {
    let targets = a.target.iter().map(|t| parse_target(t, &a.scenario)).collect::<anyhow::Result<Vec<_>>>()?;
    let progress = Progress::new(a.quiet);
    fd_budget(a.scenario.subscribers, &progress);
    let mut runs: Vec<Vec<FanoutReport>> = targets.iter().map(|_| Vec::new()).collect();
    let mut sequence = Vec::new();
    for round in 0..a.rounds.max(1) {
        for (i, t) in targets.iter().enumerate() {
            progress.label(&format!("round {}/{} {}", round + 1, a.rounds.max(1), t.name));
            let (sc, herald) = t.args.build(Some(&t.name))?;
            let r = crate::fanout::run(&sc, &progress).await;
            if let Some(h) = herald {
                h.shutdown(Duration::from_secs(2)).await;
            }
            let r = r.with_context(|| format!("target {}", t.name))?;
            runs[i].push(r);
            sequence.push(format!("{}#{}", t.name, round + 1));
            // Let sockets in TIME_WAIT and the targets settle.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    progress.finish();
    let rows: Vec<Row> = targets
        .iter()
        .zip(&runs)
        .map(|(t, rs)| Row {
            name: t.name.clone(),
            runs: rs.len(),
            deliveries_per_s: median(rs.iter().map(|r| r.deliveries_per_s).collect()),
            delivery_p50_us: median(rs.iter().map(|r| r.delivery_latency_us.p50).collect()),
            delivery_p99_us: median(rs.iter().map(|r| r.delivery_latency_us.p99).collect()),
            completion_p50_us: median(rs.iter().map(|r| r.completion_latency_us.p50).collect()),
            completion_p99_us: median(rs.iter().map(|r| r.completion_latency_us.p99).collect()),
            lost: median(rs.iter().map(|r| r.lost as f64).collect()),
            client_cpu_us_per_delivery: median(rs.iter().map(|r| r.client_cpu_us_per_delivery).collect()),
            server_cpu_us_per_delivery: median_opt(rs.iter().map(|r| r.server_cpu_us_per_delivery).collect()),
            server_rss_per_connection_kib: median_opt(rs.iter().map(|r| r.server_rss_per_connection_kib).collect()),
            client_saturated_runs: rs.iter().filter(|r| r.client_saturated).count(),
        })
        .collect();
    print!("{}", table(&rows));
    if let Some(path) = &a.html {
        let page = crate::html::render_compare(&rows, &runs, &sequence);
        std::fs::write(path, page).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &a.json {
        let report = CompareReport { rows, sequence, runs: runs.into_iter().flatten().collect() };
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

pub(crate) fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<20}{:>14}{:>12}{:>12}{:>14}{:>14}{:>8}{:>14}{:>14}",
        "median of runs", "deliveries/s", "deliv p50", "deliv p99", "complete p50", "complete p99", "lost", "client CPU/d", "server CPU/d"
    );
    let base = rows.first();
    for r in rows {
        let server = r.server_cpu_us_per_delivery.map_or("-".to_string(), |v| format!("{v:.2} µs"));
        let _ = writeln!(
            s,
            "{:<20}{:>14.0}{:>12}{:>12}{:>14}{:>14}{:>8.0}{:>14}{:>14}{}",
            r.name,
            r.deliveries_per_s,
            us(r.delivery_p50_us),
            us(r.delivery_p99_us),
            us(r.completion_p50_us),
            us(r.completion_p99_us),
            r.lost,
            format!("{:.2} µs", r.client_cpu_us_per_delivery),
            server,
            if r.client_saturated_runs > 0 { format!("  ({} runs client-saturated)", r.client_saturated_runs) } else { String::new() }
        );
    }
    if let (Some(b), true) = (base, rows.len() > 1) {
        let _ = writeln!(s, "ratio to {} (>1: more than it)", b.name);
        let ratio = |x: f64, y: f64| if y > 0.0 { format!("{:.2}x", x / y) } else { "-".into() };
        for r in &rows[1..] {
            let server = match (r.server_cpu_us_per_delivery, b.server_cpu_us_per_delivery) {
                (Some(x), Some(y)) => ratio(x, y),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "{:<20}{:>14}{:>12}{:>12}{:>14}{:>14}{:>8}{:>14}{:>14}",
                r.name,
                ratio(r.deliveries_per_s, b.deliveries_per_s),
                ratio(r.delivery_p50_us, b.delivery_p50_us),
                ratio(r.delivery_p99_us, b.delivery_p99_us),
                ratio(r.completion_p50_us, b.completion_p50_us),
                ratio(r.completion_p99_us, b.completion_p99_us),
                "",
                ratio(r.client_cpu_us_per_delivery, b.client_cpu_us_per_delivery),
                server
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median_opt(vec![Some(1.0), None]), None);
    }
}
