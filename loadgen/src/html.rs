//! The HTML report of one `loadgen fanout` run: a self-contained page (inline
//! CSS and SVG; no scripts, fonts or network) with the scenario, the headline
//! figures, the latency table, the percentile curve and the timeline.

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};

use crate::report::{FanoutReport, Percentiles, Sample};

const CSS: &str = r#"body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222}
body{max-width:980px;margin:2em auto;padding:0 1em}
h1{font-size:1.45em;margin:0 0 .4em}h2{font-size:1.15em;margin:1.6em 0 .5em}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.95em}
dl.scenario{display:grid;grid-template-columns:repeat(2,max-content 1fr);gap:.15em 1em;margin:.5em 0}
dl.scenario dt{color:#666}dl.scenario dd{margin:0}
table{border-collapse:collapse;margin:.5em 0}
th,td{padding:.25em .8em;border-bottom:1px solid #e3e3e3;text-align:left;font-weight:normal}
thead th{font-weight:600;text-align:right}td{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{color:#b00020;font-weight:600}tbody th{white-space:nowrap}
.banner{background:#b00020;color:#fff;padding:.7em 1em;border-radius:4px;margin:1em 0}
.warnings{background:#fff4e5;border:1px solid #f0a030;border-left-width:6px;padding:.4em 1em;border-radius:4px;margin:1em 0}
.warnings h2{margin:.3em 0;font-size:1.05em}
svg{width:100%;height:auto;max-width:760px;display:block}
svg text{font-size:11px;fill:#444}svg .grid{stroke:#e4e4e4}svg .frame{fill:none;stroke:#999}
footer{margin-top:2em;color:#666;font-size:.9em;border-top:1px solid #ddd;padding-top:.6em}"#;

/// The plots' viewBox and the margins around their data area.
const W: f64 = 760.0;
const H: f64 = 340.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 70.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 44.0;
const PLOT_W: f64 = W - LEFT - RIGHT;
const PLOT_H: f64 = H - TOP - BOTTOM;

const BLUE: &str = "#1f77b4";
const ORANGE: &str = "#e6731a";
const GREEN: &str = "#2ca02c";

/// The page's head, up to the opening of its body.
fn page_open(out: &mut String, title: &str) {
    let _ = writeln!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>",
        esc(title)
    );
}

fn page_close(out: &mut String, command: &str) {
    let _ = write!(
        out,
        "<footer>Produced by <code>{command}</code>. \
         For the same figures as JSON, run it with <code>--json FILE</code>; \
         <code>loadgen report FILE --html PAGE</code> renders a saved report again.</footer>\n</body>\n</html>\n"
    );
}

/// The whole page for one run.
pub fn render(r: &FanoutReport) -> String {
    let mut out = String::with_capacity(32 * 1024);
    page_open(&mut out, &format!("loadgen fanout: {}", r.target));
    header(&mut out, r);
    alerts(&mut out, r);
    figures(&mut out, r);
    latency_table(&mut out, r);
    out.push_str("<h2>Latency by percentile</h2>\n");
    percentile_plot(
        &mut out,
        &[
            ("delivery", &r.delivery_latency_us, BLUE),
            ("fan-out completion", &r.completion_latency_us, ORANGE),
            ("publish round trip", &r.publish_rtt_us, GREEN),
        ],
    );
    let phases = phases(r);
    out.push_str("<h2>Delivery latency over time</h2>\n");
    latency_time_plot(&mut out, &[("delivery p99", &r.timeline, BLUE)], &phases);
    out.push_str("<h2>Throughput over time</h2>\n");
    timeline_plot(&mut out, &r.timeline, &phases);
    page_close(&mut out, "loadgen fanout");
    out
}

/// The page of a `loadgen compare`: the medians with their ratios to the
/// first target, and each target's curves (from its median run).
pub fn render_compare(rows: &[crate::compare::Row], runs: &[Vec<FanoutReport>], sequence: &[String]) -> String {
    const COLORS: [&str; 6] = [BLUE, ORANGE, GREEN, "#9467bd", "#8c564b", "#d62728"];
    let mut out = String::with_capacity(64 * 1024);
    page_open(&mut out, "loadgen compare");
    let first = runs.iter().flatten().next().cloned().unwrap_or_default();
    let _ = writeln!(out, "<header>\n<h1>Compare: {} targets</h1>\n<dl class=\"scenario\">", rows.len());
    let items = [
        ("subscribers", int(first.subscribers)),
        ("channels", int(first.channels)),
        ("transport", esc(&first.transport)),
        ("rate", format!("{} msg/s", num(first.rate))),
        ("duration", format!("{} s", num(first.duration_s))),
        ("warm-up", format!("{} s", num(first.warmup_s))),
        ("payload", format!("{} B", int(first.payload_bytes))),
        ("runs", esc(&sequence.join(" "))),
    ];
    for (key, value) in items {
        let _ = writeln!(out, "<dt>{key}</dt><dd>{value}</dd>");
    }
    out.push_str("</dl>\n</header>\n");
    if rows.iter().any(|r| r.client_saturated_runs > 0) {
        out.push_str(
            "<div class=\"banner\"><strong>Client saturated</strong> in some runs (see the table): those figures may measure the \
             load generator or the machine rather than the target.</div>\n",
        );
    }
    out.push_str("<h2>Medians of the runs</h2>\n<table>\n<thead><tr><th>target</th>");
    let cols = [
        "deliveries/s",
        "delivery p50",
        "delivery p99",
        "completion p50",
        "completion p99",
        "lost",
        "client CPU / delivery",
        "server CPU / delivery",
        "client-saturated runs",
    ];
    for c in cols {
        let _ = write!(out, "<th>{c}</th>");
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    let base = rows.first();
    for r in rows {
        let cells = [
            num(r.deliveries_per_s),
            crate::report::us(r.delivery_p50_us),
            crate::report::us(r.delivery_p99_us),
            crate::report::us(r.completion_p50_us),
            crate::report::us(r.completion_p99_us),
            num(r.lost),
            format!("{} µs", num(r.client_cpu_us_per_delivery)),
            r.server_cpu_us_per_delivery.map_or("–".into(), |v| format!("{} µs", num(v))),
            format!("{} of {}", r.client_saturated_runs, r.runs),
        ];
        let class = if r.lost > 0.0 { " class=\"bad\"" } else { "" };
        let _ = write!(out, "<tr{class}><th>{}</th>", esc(&r.name));
        for c in cells {
            let _ = write!(out, "<td>{c}</td>");
        }
        out.push_str("</tr>\n");
    }
    if let (Some(b), true) = (base, rows.len() > 1) {
        let ratio = |x: f64, y: f64| if y > 0.0 { format!("{:.2}×", x / y) } else { "–".into() };
        for r in &rows[1..] {
            let server = match (r.server_cpu_us_per_delivery, b.server_cpu_us_per_delivery) {
                (Some(x), Some(y)) => ratio(x, y),
                _ => "–".into(),
            };
            let cells = [
                ratio(r.deliveries_per_s, b.deliveries_per_s),
                ratio(r.delivery_p50_us, b.delivery_p50_us),
                ratio(r.delivery_p99_us, b.delivery_p99_us),
                ratio(r.completion_p50_us, b.completion_p50_us),
                ratio(r.completion_p99_us, b.completion_p99_us),
                String::new(),
                ratio(r.client_cpu_us_per_delivery, b.client_cpu_us_per_delivery),
                server,
                String::new(),
            ];
            let _ = write!(out, "<tr><th>{} ÷ {}</th>", esc(&r.name), esc(&b.name));
            for c in cells {
                let _ = write!(out, "<td>{c}</td>");
            }
            out.push_str("</tr>\n");
        }
    }
    out.push_str("</tbody>\n</table>\n");
    // Each target's run whose delivery p99 is its median.
    let median_runs: Vec<Option<&FanoutReport>> = runs
        .iter()
        .map(|rs| {
            let mut by_p99: Vec<&FanoutReport> = rs.iter().collect();
            by_p99.sort_by(|a, b| a.delivery_latency_us.p99.total_cmp(&b.delivery_latency_us.p99));
            by_p99.get(by_p99.len().saturating_sub(1) / 2).copied()
        })
        .collect();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    let series: Vec<(&str, &Percentiles, &str)> = median_runs
        .iter()
        .zip(&names)
        .zip(COLORS.iter().cycle())
        .filter_map(|((r, name), color)| r.map(|r| (*name, &r.delivery_latency_us, *color)))
        .collect();
    out.push_str("<h2>Delivery latency by percentile (each target's median run)</h2>\n");
    percentile_plot(&mut out, &series);
    let timelines: Vec<(&str, &[Sample], &str)> = median_runs
        .iter()
        .zip(&names)
        .zip(COLORS.iter().cycle())
        .filter_map(|((r, name), color)| r.map(|r| (*name, r.timeline.as_slice(), *color)))
        .collect();
    out.push_str("<h2>Delivery p99 over time (each target's median run)</h2>\n");
    latency_time_plot(&mut out, &timelines, &phases(&first));
    page_close(&mut out, "loadgen compare");
    out
}

/// The run's phases on the timeline's clock (seconds since the first
/// publish): connecting before 0, then warm-up, measurement and drain.
fn phases(r: &FanoutReport) -> [(&'static str, f64, f64); 4] {
    let (w, m) = (r.warmup_s, r.warmup_s + r.duration_s);
    [("connect", f64::NEG_INFINITY, 0.0), ("warmup", 0.0, w), ("measure", w, m), ("drain", m, f64::INFINITY)]
}

/// Shades each phase where it lies on the frame, named if there is room.
fn phase_bands(out: &mut String, f: Frame, phases: &[(&str, f64, f64)]) {
    for &(phase, from, to) in phases {
        let (from, to) = (from.max(f.x0), to.min(f.x1));
        if to <= from {
            continue;
        }
        let (x, width) = (f.x(from), f.x(to) - f.x(from));
        let _ = writeln!(out, "<rect x=\"{x:.1}\" y=\"{TOP}\" width=\"{width:.1}\" height=\"{PLOT_H}\" fill=\"{}\"/>", phase_fill(phase));
        if width >= 7.0 * phase.len() as f64 + 6.0 {
            let _ = writeln!(out, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>", x + width / 2.0, TOP + 14.0, esc(phase));
        }
    }
}

/// The time axis of the timeline plots: the samples' span, half a second
/// beyond each end.
fn time_frame<'a>(timelines: impl Iterator<Item = &'a [Sample]>, y_max: f64) -> Frame {
    let (lo, hi) = timelines
        .flat_map(|t| t.iter().map(|s| s.t))
        .filter(|t| t.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 0.0) };
    Frame::new(lo - 0.5, hi + 0.5, y_max)
}

fn time_ticks(out: &mut String, f: Frame) {
    let step = nice_step(f.x1 - f.x0, 8.0);
    for k in (f.x0 / step).ceil() as i64..=(f.x1 / step).floor() as i64 {
        let t = k as f64 * step;
        x_tick(out, f.x(t), &tick_label(t, step));
    }
    centred(out, H - 6.0, "seconds since the first publish");
}

/// Each second's p99 delivery latency (ms), one line per timeline.
fn latency_time_plot(out: &mut String, series: &[(&str, &[Sample], &str)], phases: &[(&str, f64, f64)]) {
    let with_latency =
        |t: &'_ [Sample]| t.iter().filter(|s| s.p99_us > 0.0 && s.p99_us.is_finite()).map(|s| (s.t, s.p99_us / 1000.0)).collect::<Vec<_>>();
    let max = series.iter().flat_map(|(_, t, _)| with_latency(t)).map(|(_, v)| v).fold(0.0, f64::max);
    let (y_end, y_step) = nice_axis(max);
    let f = time_frame(series.iter().map(|(_, t, _)| *t), y_end);
    svg_open(out, "Delivery latency p99 per second");
    phase_bands(out, f, phases);
    y_axis(out, f, y_step, false, "p99 of the second (ms)", "#444");
    time_ticks(out, f);
    let mut legend = Vec::new();
    for &(name, t, color) in series {
        polyline(out, with_latency(t).into_iter().map(|(x, y)| (f.x(x), f.y(y))), color, false);
        legend.push((name.to_string(), color, false));
    }
    if max == 0.0 {
        centred(out, TOP + PLOT_H / 2.0, "no deliveries timed");
    }
    finish_svg(out, &legend);
}

fn header(out: &mut String, r: &FanoutReport) {
    let _ = writeln!(out, "<header>\n<h1>Fan-out run against <code>{}</code></h1>\n<dl class=\"scenario\">", esc(&r.target));
    let items = [
        ("subscribers", int(r.subscribers)),
        ("connected", int(r.connected)),
        ("channels", int(r.channels)),
        ("transport", esc(&r.transport)),
        ("format", esc(&r.format)),
        ("publish method", esc(&r.publish)),
        ("publish loop", esc(&r.inflight_label())),
        ("rate", format!("{} msg/s", num(r.rate))),
        ("duration", format!("{} s", num(r.duration_s))),
        ("warm-up", format!("{} s", num(r.warmup_s))),
        ("payload", format!("{} B", int(r.payload_bytes))),
        ("finished", utc(r.finished_unix_s)),
    ];
    for (key, value) in items {
        let _ = writeln!(out, "<dt>{key}</dt><dd>{value}</dd>");
    }
    out.push_str("</dl>\n</header>\n");
}

fn alerts(out: &mut String, r: &FanoutReport) {
    if r.client_saturated {
        let _ = writeln!(
            out,
            "<div class=\"banner\"><strong>Client saturated.</strong> The figures may measure the load generator or the machine \
             rather than the target: {}.</div>",
            esc(&r.saturation.join("; "))
        );
    }
    if !r.warnings.is_empty() {
        out.push_str("<div class=\"warnings\"><h2>Warnings</h2>\n<ul>\n");
        for w in &r.warnings {
            let _ = writeln!(out, "<li>{}</li>", esc(w));
        }
        out.push_str("</ul></div>\n");
    }
}

fn figures(out: &mut String, r: &FanoutReport) {
    out.push_str("<h2>Headline figures</h2>\n<table>\n");
    row(out, "messages sent", &int(r.sent), false);
    row(out, "expected deliveries", &int(r.expected), false);
    let share =
        if r.expected > 0 { format!(" ({:.3}% of expected)", r.deliveries as f64 * 100.0 / r.expected as f64) } else { String::new() };
    row(out, "deliveries", &format!("{}{share}", int(r.deliveries)), false);
    row(out, "lost", &int(r.lost), r.lost > 0);
    row(out, "duplicates", &int(r.duplicates), r.duplicates > 0);
    row(out, "out of order", &int(r.out_of_order), r.out_of_order > 0);
    row(out, "deliveries per second", &num(r.deliveries_per_s), false);
    row(out, "messages per second", &num(r.messages_per_s), false);
    row(out, "incomplete messages", &int(r.incomplete_messages), r.incomplete_messages > 0);
    row(out, "connect errors", &int(r.connect_errors), r.connect_errors > 0);
    map_row(out, "connect errors by kind", &r.connect_errors_by_kind);
    map_row(out, "disconnects by kind", &r.disconnects_by_kind);
    map_row(out, "publish errors", &r.publish_errors);
    row(out, "client CPU", &format!("{} s", num(r.client_cpu_s)), false);
    row(out, "client CPU per delivery", &format!("{} µs", num(r.client_cpu_us_per_delivery)), false);
    row(out, "busiest client thread", &format!("{}% of a core", num(r.client_busiest_thread * 100.0)), r.client_saturated);
    row(out, "client threads", &int(r.client_threads), false);
    let server = [
        ("server CPU", r.server_cpu_s.map(|v| format!("{} s", num(v)))),
        ("server CPU per delivery", r.server_cpu_us_per_delivery.map(|v| format!("{} µs", num(v)))),
        ("server RSS", r.server_rss_kib.map(|v| format!("{} KiB", int(v)))),
        ("server RSS before connecting", r.server_rss_before_kib.map(|v| format!("{} KiB", int(v)))),
        ("server RSS per connection", r.server_rss_per_connection_kib.map(|v| format!("{} KiB", num(v)))),
    ];
    for (label, value) in server {
        if let Some(value) = value {
            row(out, label, &value, false);
        }
    }
    out.push_str("</table>\n");
}

/// One table row; `value` is HTML already escaped.
fn row(out: &mut String, label: &str, value: &str, bad: bool) {
    let class = if bad { " class=\"bad\"" } else { "" };
    let _ = writeln!(out, "<tr{class}><th>{label}</th><td>{value}</td></tr>");
}

/// A row listing `kind count` pairs, or nothing when the map is empty.
fn map_row(out: &mut String, label: &str, map: &BTreeMap<String, u64>) {
    if !map.is_empty() {
        let items: Vec<String> = map.iter().map(|(kind, n)| format!("<code>{}</code>&nbsp;{}", esc(kind), int(n))).collect();
        row(out, label, &items.join(", "), true);
    }
}

fn latency_table(out: &mut String, r: &FanoutReport) {
    out.push_str("<h2>Latency</h2>\n<table>\n<thead><tr><th></th>");
    for col in ["p50", "p90", "p99", "p99.9", "max", "count"] {
        let _ = write!(out, "<th>{col}</th>");
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for (name, p) in [
        ("delivery", &r.delivery_latency_us),
        ("fan-out completion", &r.completion_latency_us),
        ("publisher lag", &r.publisher_lag_us),
        ("publish round trip", &r.publish_rtt_us),
        ("machine hiccup", &r.machine_hiccup_us),
        ("connect", &r.connect_latency_us),
    ] {
        let _ = write!(out, "<tr><th>{name}</th>");
        for v in [p.p50, p.p90, p.p99, p.p999, p.max] {
            let _ = write!(out, "<td>{}</td>", if p.count == 0 { "–".to_string() } else { crate::report::us(v) });
        }
        let _ = writeln!(out, "<td>{}</td></tr>", int(p.count));
    }
    out.push_str("</tbody>\n</table>\n");
}

/// Latency (ms, linear) against percentile, on the usual HdrHistogram axis:
/// log10(1 / (1 − p)), so that 90 %, 99 %, 99.9 % … are evenly spaced.
/// Each curve ends where its samples do: its maximum is one sample in
/// `count`, at log10(count).
fn percentile_plot(out: &mut String, series: &[(&str, &Percentiles, &str)]) {
    let end = |p: &Percentiles| (p.count.max(2) as f64).log10();
    let lx = |p: &Percentiles, pc: f64| if pc < 100.0 { (-(1.0 - pc / 100.0).log10()).min(end(p)) } else { end(p) };
    let all = || series.iter().flat_map(|(_, p, _)| points(p));
    let widest = series.iter().filter(|(_, p, _)| points(p).next().is_some()).map(|(_, p, _)| end(p)).fold(0.0, f64::max);
    // Whole decades up to the longest curve's end.
    let decades = widest.ceil().clamp(2.0, 9.0);
    let (y_end, y_step) = nice_axis(all().map(|(_, v)| v / 1000.0).fold(0.0, f64::max));
    let f = Frame::new(0.0, decades, y_end);
    svg_open(out, "Latency by percentile");
    y_axis(out, f, y_step, false, "latency (ms)", "#444");
    x_tick(out, f.x(2f64.log10()), "50%");
    for d in 1..=decades as u32 {
        x_tick(out, f.x(f64::from(d)), &nines(d));
    }
    centred(out, H - 6.0, "percentile (a curve ends at its maximum, one sample in n)");
    let mut legend = Vec::new();
    for &(name, p, color) in series {
        polyline(out, points(p).map(|(pc, v)| (f.x(lx(p, pc)), f.y(v / 1000.0))), color, false);
        let n = if p.spectrum.is_empty() { "no samples".to_string() } else { format!("n = {}", int(p.count)) };
        legend.push((format!("{name} ({n})"), color, false));
    }
    if all().next().is_none() {
        centred(out, TOP + PLOT_H / 2.0, "no latency samples");
    }
    finish_svg(out, &legend);
}

/// The spectrum's usable `(percentile, µs)` points.
fn points(p: &Percentiles) -> impl Iterator<Item = (f64, f64)> + '_ {
    p.spectrum.iter().map(|&[pc, v]| (pc, v)).filter(|&(pc, v)| (0.0..=100.0).contains(&pc) && v.is_finite())
}

/// "90%", "99%", "99.9%", … for decade `d` of the percentile axis.
fn nines(d: u32) -> String {
    match d {
        0 | 1 => "90%".to_string(),
        2 => "99%".to_string(),
        _ => format!("99.{}%", "9".repeat(d as usize - 2)),
    }
}

/// Deliveries (left axis) and messages sent (right axis) per second, over
/// the phases shaded at their true times.
fn timeline_plot(out: &mut String, timeline: &[Sample], phases: &[(&str, f64, f64)]) {
    let (d_end, d_step) = nice_axis(timeline.iter().map(|s| s.deliveries as f64).fold(0.0, f64::max));
    let (s_end, s_step) = nice_axis(timeline.iter().map(|s| s.sent as f64).fold(0.0, f64::max));
    let f = time_frame(std::iter::once(timeline), d_end);
    let sent = Frame { y_max: s_end, ..f };
    svg_open(out, "Deliveries and messages sent per second");
    phase_bands(out, f, phases);
    y_axis(out, f, d_step, false, "deliveries / s", BLUE);
    y_axis(out, sent, s_step, true, "sent / s", ORANGE);
    time_ticks(out, f);
    polyline(out, timeline.iter().map(|s| (f.x(s.t), f.y(s.deliveries as f64))), BLUE, false);
    polyline(out, timeline.iter().map(|s| (sent.x(s.t), sent.y(s.sent as f64))), ORANGE, true);
    if timeline.is_empty() {
        centred(out, TOP + PLOT_H / 2.0, "no timeline");
    }
    finish_svg(out, &[("deliveries per second (left)".to_string(), BLUE, false), ("sent per second (right)".to_string(), ORANGE, true)]);
}

fn phase_fill(phase: &str) -> &'static str {
    match phase {
        "connect" => "#eeeeee",
        "warmup" => "#fff3d6",
        "measure" => "#e3f2e3",
        "drain" => "#e4ecf7",
        _ => "#f2eef7",
    }
}

/// A plot's data area: `x0..x1` across, `0..y_max` up, mapped onto the
/// viewBox inside the margins. Coordinates are always finite and in the area.
#[derive(Debug, Clone, Copy)]
struct Frame {
    x0: f64,
    x1: f64,
    y_max: f64,
}

impl Frame {
    fn new(x0: f64, x1: f64, y_max: f64) -> Frame {
        let x0 = if x0.is_finite() { x0 } else { 0.0 };
        let x1 = if x1.is_finite() && x1 > x0 { x1 } else { x0 + 1.0 };
        Frame { x0, x1, y_max: if y_max.is_finite() && y_max > 0.0 { y_max } else { 1.0 } }
    }

    fn x(self, v: f64) -> f64 {
        px(LEFT + (v - self.x0) / (self.x1 - self.x0) * PLOT_W, LEFT, W - RIGHT)
    }

    fn y(self, v: f64) -> f64 {
        px(H - BOTTOM - v / self.y_max * PLOT_H, TOP, H - BOTTOM)
    }
}

fn px(v: f64, lo: f64, hi: f64) -> f64 {
    if v.is_finite() {
        v.clamp(lo, hi)
    } else {
        lo
    }
}

fn svg_open(out: &mut String, label: &str) {
    let _ = writeln!(out, "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{label}\">");
}

/// Legend along the top, frame around the data area, and the closing tag.
fn finish_svg(out: &mut String, legend: &[(String, &str, bool)]) {
    let mut x = LEFT;
    for (label, color, dashed) in legend {
        let dash = if *dashed { " stroke-dasharray=\"6 4\"" } else { "" };
        let (x2, y) = (x + 22.0, TOP - 14.0);
        let _ = writeln!(out, "<line x1=\"{x}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>");
        let _ = writeln!(out, "<text x=\"{}\" y=\"{}\">{}</text>", x + 28.0, TOP - 10.0, esc(label));
        x += 44.0 + 6.0 * label.chars().count() as f64;
    }
    let _ = writeln!(out, "<rect class=\"frame\" x=\"{LEFT}\" y=\"{TOP}\" width=\"{PLOT_W}\" height=\"{PLOT_H}\"/>\n</svg>");
}

/// Tick labels (and, on the left, grid lines) every `step` from 0 to the top.
fn y_axis(out: &mut String, f: Frame, step: f64, right: bool, title: &str, color: &str) {
    let (x, anchor, title_x) = if right { (W - RIGHT + 6.0, "start", W - 14.0) } else { (LEFT - 6.0, "end", 16.0) };
    for i in 0..=(f.y_max / step).round().min(50.0) as u32 {
        let v = f64::from(i) * step;
        let y = f.y(v);
        if !right {
            let _ = writeln!(out, "<line class=\"grid\" x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\"/>", W - RIGHT);
        }
        let _ = writeln!(
            out,
            "<text x=\"{x}\" y=\"{:.1}\" text-anchor=\"{anchor}\" style=\"fill:{color}\">{}</text>",
            y + 4.0,
            tick_label(v, step)
        );
    }
    let mid = TOP + PLOT_H / 2.0;
    let _ = writeln!(
        out,
        "<text x=\"{title_x}\" y=\"{mid}\" text-anchor=\"middle\" transform=\"rotate(-90 {title_x} {mid})\" \
         style=\"fill:{color}\">{title}</text>"
    );
}

fn x_tick(out: &mut String, x: f64, label: &str) {
    let bottom = H - BOTTOM;
    let _ = writeln!(out, "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{bottom}\"/>");
    let _ = writeln!(out, "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>", bottom + 16.0);
}

/// `text` centred across the data area at height `y`.
fn centred(out: &mut String, y: f64, text: &str) {
    let _ = writeln!(out, "<text x=\"{}\" y=\"{y}\" text-anchor=\"middle\">{text}</text>", LEFT + PLOT_W / 2.0);
}

/// A line through `pts` (already in viewBox coordinates); nothing if empty.
fn polyline(out: &mut String, pts: impl Iterator<Item = (f64, f64)>, color: &str, dashed: bool) {
    let mut coords = String::new();
    for (x, y) in pts {
        let _ = write!(coords, "{x:.1},{y:.1} ");
    }
    if !coords.is_empty() {
        let dash = if dashed { " stroke-dasharray=\"6 4\"" } else { "" };
        let _ = writeln!(out, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>", coords.trim_end());
    }
}

/// A round step (1, 2 or 5 × 10ⁿ) giving about `ticks` intervals over `span`.
fn nice_step(span: f64, ticks: f64) -> f64 {
    let raw = span / ticks;
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0].into_iter().map(|m| m * mag).find(|&s| s >= raw * (1.0 - 1e-9)).unwrap_or(10.0 * mag)
}

/// `(top, step)` of a linear axis from 0 that holds `max`.
fn nice_axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.2);
    }
    let step = nice_step(max, 5.0);
    ((max / step - 1e-9).ceil().max(1.0) * step, step)
}

/// An axis label for `v` with as many decimals as `step` needs, in
/// thousands ("k") or millions ("M") when the step is that coarse.
fn tick_label(v: f64, step: f64) -> String {
    let (div, suffix) = if step >= 1e5 {
        (1e6, "M")
    } else if step >= 1e3 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    if v == 0.0 {
        return "0".to_string();
    }
    let decimals = (-((step / div).log10() + 1e-9).floor()).clamp(0.0, 9.0) as usize;
    format!("{:.*}{suffix}", decimals, v / div)
}

/// An integer with thousands separators.
fn int(n: impl Display) -> String {
    group(&n.to_string())
}

/// A measurement with about three significant digits.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_string();
    }
    // Rounded to the decimals shown first, so that 99.9999… and 100 (a
    // value and its rounded JSON) print alike.
    let shown = |v: f64| match v.abs() {
        a if v.fract() == 0.0 || a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        a if a >= 1.0 => 2,
        _ => 3,
    };
    let v: f64 = format!("{v:.*}", shown(v)).parse().unwrap_or(v);
    let decimals = match v.abs() {
        a if v.fract() == 0.0 || a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        a if a >= 1.0 => 2,
        _ => 3,
    };
    group(&format!("{v:.decimals$}"))
}

/// Commas between thousands in the integer part of a formatted number.
fn group(s: &str) -> String {
    let (sign, digits) = s.strip_prefix('-').map_or(("", s), |rest| ("-", rest));
    let int_len = digits.find('.').unwrap_or(digits.len());
    let mut out = String::from(sign);
    for (i, c) in digits.char_indices() {
        if i > 0 && i < int_len && (int_len - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds since the Unix epoch as `YYYY-MM-DD hh:mm:ss UTC`.
fn utc(secs: u64) -> String {
    if secs == 0 {
        return "unknown".to_string();
    }
    // Howard Hinnant's civil_from_days.
    let z = (secs / 86_400) as i64 + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rem = secs % 86_400;
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `s` safe in HTML text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_alike_whatever_their_last_bits() {
        assert_eq!(num(99.999_999_999_9), "100");
        assert_eq!(num(100.0), "100");
        assert_eq!(num(7.354), "7.35");
        assert_eq!(num(0.012_34), "0.012");
        assert_eq!(num(124_997.0), "124,997");
    }

    #[test]
    fn empty_report_renders_without_nan() {
        let page = render(&FanoutReport::default());
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("<svg"));
        assert!(!page.contains("NaN"));
        assert!(page.contains("--json FILE"));
    }

    /// The `<rect>` of phase `name`: its x and width.
    fn band(page: &str, fill: &str) -> (f64, f64) {
        let at = page.find(&format!("fill=\"{fill}\"")).expect("the band");
        let rect = &page[page[..at].rfind("<rect").unwrap()..at];
        let attr = |k: &str| rect.split(&format!("{k}=\"")).nth(1).unwrap().split('"').next().unwrap().parse::<f64>().unwrap();
        (attr("x"), attr("width"))
    }

    #[test]
    fn phases_are_shaded_at_their_true_times_and_curves_end_with_their_samples() {
        // Samples every second from 0 to 10 s; a 2 s warm-up, 8 s measured.
        let timeline =
            (0..=10).map(|t| Sample { t: f64::from(t), phase: "x".into(), deliveries: 10, p99_us: 1000.0, ..Sample::default() }).collect();
        let r = FanoutReport { warmup_s: 2.0, duration_s: 8.0, timeline, ..FanoutReport::default() };
        let page = render(&r);
        // The frame spans -0.5 … 10.5 s.
        let sec = PLOT_W / 11.0;
        let (x, w) = band(&page, phase_fill("warmup"));
        assert!((x - (LEFT + 0.5 * sec)).abs() < 0.2 && (w - 2.0 * sec).abs() < 0.2, "warm-up at {x}, {w} wide");
        let (x, w) = band(&page, phase_fill("measure"));
        assert!((x - (LEFT + 2.5 * sec)).abs() < 0.2 && (w - 8.0 * sec).abs() < 0.2, "measure at {x}, {w} wide");
        assert!(page.contains("Delivery latency over time"));
        // 1,000 samples beside 100,000: the first curve ends at 99.9 %, three
        // decades in, not at the right edge (five decades).
        let spectrum = vec![[0.0, 100.0], [50.0, 200.0], [90.0, 300.0], [99.0, 400.0], [99.9, 500.0], [100.0, 600.0]];
        let few = Percentiles { count: 1000, spectrum: spectrum.clone(), ..Percentiles::default() };
        let many = Percentiles { count: 100_000, spectrum, ..Percentiles::default() };
        let mut out = String::new();
        percentile_plot(&mut out, &[("few", &few, BLUE), ("many", &many, ORANGE)]);
        let f = Frame::new(0.0, 5.0, 1.0);
        let last_x = |i: usize| -> f64 {
            let pts = out.split("points=\"").nth(i).unwrap().split('"').next().unwrap();
            pts.split(' ').next_back().unwrap().split(',').next().unwrap().parse().unwrap()
        };
        assert!((last_x(1) - f.x(3.0)).abs() < 0.2, "the 1,000-sample curve ends at {}", last_x(1));
        assert!((last_x(2) - f.x(5.0)).abs() < 0.2, "the 100,000-sample curve ends at {}", last_x(2));
        assert!(out.contains(">99.999%<") && !out.contains(">99.9999%<"), "five decades: {out}");
    }

    #[test]
    fn filled_report_escapes_strings() {
        let spectrum = vec![[0.0, 80.0], [50.0, 200.0], [90.0, 450.0], [99.0, 900.0], [99.5, 1100.0], [99.9, 2400.0], [100.0, 5200.0]];
        let latency =
            Percentiles { count: 5000, p50: 200.0, p90: 450.0, p99: 900.0, p999: 2400.0, max: 5200.0, spectrum, ..Percentiles::default() };
        let phases = ["connect", "connect", "warmup", "measure", "measure", "measure", "drain"];
        let timeline = phases
            .iter()
            .zip(-2_i32..)
            .map(|(&phase, t)| Sample {
                t: f64::from(t),
                phase: phase.into(),
                connections: 100,
                sent: 1000,
                deliveries: 100_000,
                p99_us: 900.0,
            })
            .collect();
        let r = FanoutReport {
            target: "ws://host/<script>alert('x')</script>".to_string(),
            warnings: vec!["a <b>bold</b> warning".to_string()],
            disconnects_by_kind: BTreeMap::from([("reset \"by peer\"".to_string(), 3)]),
            delivery_latency_us: latency.clone(),
            completion_latency_us: latency.clone(),
            publish_rtt_us: latency,
            publish_inflight: Some(1),
            client_saturated: true,
            server_rss_kib: Some(123_456),
            timeline,
            finished_unix_s: 1_700_000_000,
            ..FanoutReport::default()
        };
        let page = render(&r);
        assert!(!page.contains("<script>"));
        assert!(page.contains("ws://host/&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(page.contains("a &lt;b&gt;bold&lt;/b&gt; warning"));
        assert!(page.contains("reset &quot;by peer&quot;"));
        assert!(page.contains("Client saturated"));
        assert!(page.contains("123,456 KiB"));
        assert!(page.contains("2023-11-14 22:13:20 UTC"));
        assert!(page.contains("publish round trip (n = 5,000)") && page.contains("closed loop"));
        assert_eq!(page.matches("<polyline").count(), 6);
        assert!(!page.contains("NaN"));
    }
}
