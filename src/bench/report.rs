//! The bench's output: a Markdown table with ratios against direct stdio and
//! against peers, a hand-written SVG chart (throughput and p99 against
//! concurrency, one line per scenario), and the raw rows as JSON.

use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt::Write;

/// One measured (scenario, concurrency) step.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub concurrency: usize,
    pub requests: u64,
    pub errors: u64,
    pub crossed: u64,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Mean lease wait from the broker's histogram (in-process scenarios).
    pub lease_wait_ms: Option<f64>,
    /// Broker+proxy (or peer gateway) CPU, percent of one core.
    pub gateway_cpu: Option<f64>,
    /// The user-space part of `gateway_cpu`.
    pub gateway_user_cpu: Option<f64>,
    /// Broker+proxy (whole bench process) or peer gateway peak RSS, MiB.
    pub gateway_rss_mib: Option<f64>,
    /// Server processes' CPU, percent of one core.
    pub servers_cpu: Option<f64>,
    /// Server processes' peak total RSS, MiB.
    pub servers_rss_mib: Option<f64>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{:.digits$}", x + 0.0))
        .unwrap_or_else(|| "–".into())
}

/// The Markdown report.
pub fn markdown(rows: &[Row], header: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{header}\n");
    s.push_str("| scenario | conc. | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms | lease wait ms | gateway CPU % | gateway CPU µs/req (user) | gateway RSS MiB | servers CPU % | servers RSS MiB |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {}{} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.concurrency,
            r.requests,
            r.errors,
            if r.crossed > 0 { format!(" ({} crossed)", r.crossed) } else { String::new() },
            r.throughput,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms,
            opt(r.lease_wait_ms, 3),
            opt(r.gateway_cpu, 0),
            per_request(r),
            opt(r.gateway_rss_mib, 1),
            opt(r.servers_cpu, 0),
            opt(r.servers_rss_mib, 1),
        );
    }
    s.push_str(&ratios(rows));
    s
}

/// Gateway CPU per request in µs, with its user-space part: "58 (31)".
fn per_request(r: &Row) -> String {
    let us = |pct: f64| pct / 100.0 / r.throughput * 1e6;
    match (r.gateway_cpu, r.gateway_user_cpu) {
        (Some(all), user) if r.throughput > 0.0 => match user {
            Some(u) => format!("{:.0} ({:.0})", us(all), us(u)),
            None => format!("{:.0}", us(all)),
        },
        _ => "–".into(),
    }
}

/// Gateway CPU per request in µs and its user part, when both were measured.
fn cpu_us(r: &Row) -> Option<(f64, f64)> {
    let us = |pct: f64| pct / 100.0 / r.throughput * 1e6;
    match (r.gateway_cpu, r.gateway_user_cpu) {
        (Some(all), Some(user)) if r.throughput > 0.0 => Some((us(all), us(user))),
        _ => None,
    }
}

fn is_broker(name: &str) -> bool {
    name.starts_with("pool-") || name.starts_with("sidecar-") || name.starts_with("exclusive")
}

fn is_peer(name: &str) -> bool {
    name.starts_with("peer:")
}

/// Ratios measured side by side: against direct stdio and against peers.
fn ratios(rows: &[Row]) -> String {
    let mut s = String::new();
    let find = |name: &str, c: usize| {
        rows.iter()
            .find(|r| r.scenario == name && r.concurrency == c)
    };
    let direct: Vec<&Row> = rows.iter().filter(|r| r.scenario == "direct").collect();
    if !direct.is_empty() {
        s.push_str("\n**Against direct stdio** (same concurrency):\n\n| scenario | conc. | req/s ÷ direct | p50 − direct (µs) |\n|---|---:|---:|---:|\n");
        for r in rows
            .iter()
            .filter(|r| r.scenario != "direct" && !r.scenario.starts_with("ceiling"))
        {
            if let Some(d) = find("direct", r.concurrency) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2} | {:+.0} |",
                    r.scenario,
                    r.concurrency,
                    r.throughput / d.throughput.max(1e-9),
                    (r.p50_ms - d.p50_ms) * 1000.0
                );
            }
        }
    }
    if rows.iter().any(|r| r.scenario == "relay") {
        s.push_str("\n**Against the relay** (what the broker and proxy cost beyond a bare relay to one process):\n\n| scenario | conc. | p50 − relay (µs) | CPU µs/req − relay (user) |\n|---|---:|---:|---:|\n");
        for r in rows
            .iter()
            .filter(|r| r.scenario == "pool-1" || r.scenario == "sidecar-1")
        {
            if let Some(f) = find("relay", r.concurrency) {
                let cpu = match (cpu_us(r), cpu_us(f)) {
                    (Some((a, au)), Some((b, bu))) => format!("{:+.0} ({:+.0})", a - b, au - bu),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {:+.0} | {cpu} |",
                    r.scenario,
                    r.concurrency,
                    (r.p50_ms - f.p50_ms) * 1000.0
                );
            }
        }
    }
    let peers: Vec<&Row> = rows.iter().filter(|r| is_peer(&r.scenario)).collect();
    if !peers.is_empty() {
        s.push_str("\n**Against peers** (best broker scenario at the same concurrency):\n\n| peer | conc. | broker scenario | req/s ratio | p99 ratio (broker ÷ peer) |\n|---|---:|---|---:|---:|\n");
        for p in peers {
            let best = rows
                .iter()
                .filter(|r| {
                    is_broker(&r.scenario) && r.concurrency == p.concurrency && r.errors == 0
                })
                .max_by(|a, b| a.throughput.total_cmp(&b.throughput));
            if let Some(b) = best {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.1}× | {:.2} |",
                    p.scenario,
                    p.concurrency,
                    b.scenario,
                    b.throughput / p.throughput.max(1e-9),
                    b.p99_ms / p.p99_ms.max(1e-9)
                );
            }
        }
    }
    s
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One panel: a line per scenario of `value` against concurrency.
#[allow(clippy::too_many_arguments)]
fn panel(
    s: &mut String,
    x0: f64,
    title: &str,
    rows: &[Row],
    names: &[String],
    levels: &[usize],
    value: impl Fn(&Row) -> f64,
    log: bool,
) {
    let (w, h, top, left) = (400.0, 300.0, 40.0, x0 + 60.0);
    let vals: Vec<f64> = rows.iter().map(&value).filter(|v| *v > 0.0).collect();
    let max = vals.iter().cloned().fold(0.0, f64::max).max(1e-6);
    let min = vals.iter().cloned().fold(f64::INFINITY, f64::min).min(max);
    let (lo, hi) = if log {
        (
            min.log10().floor(),
            max.log10().ceil().max(min.log10().floor() + 1.0),
        )
    } else {
        (0.0, max * 1.1)
    };
    let y = |v: f64| {
        let f = if log {
            (v.max(1e-9).log10() - lo) / (hi - lo)
        } else {
            v / hi
        };
        top + h - f.clamp(0.0, 1.0) * h
    };
    let x = |c: usize| {
        let i = levels.iter().position(|l| *l == c).unwrap_or(0) as f64;
        left + (i + 0.5) * w / levels.len().max(1) as f64
    };
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="14" font-weight="bold">{}</text>"#,
        left,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#444"/>"##
    );
    for k in 0..=4 {
        let v = if log {
            10f64.powf(lo + (hi - lo) * k as f64 / 4.0)
        } else {
            hi * k as f64 / 4.0
        };
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            left + w,
            left - 4.0,
            yy + 3.0,
            fmt_num(v)
        );
    }
    for &c in levels {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" font-size="10" text-anchor="middle">{c}</text>"#,
            x(c),
            top + h + 14.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">concurrency</text>"#,
        left + w / 2.0,
        top + h + 30.0
    );
    for (i, name) in names.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| &r.scenario == name && value(r) > 0.0)
            .map(|r| (x(r.concurrency), y(value(r))))
            .collect();
        let line: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            line.join(" ")
        );
        for (a, b) in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{a:.1}" cy="{b:.1}" r="3" fill="{color}"/>"#
            );
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The SVG chart: throughput (linear) and p99 (log) against concurrency.
pub fn svg(rows: &[Row]) -> String {
    let rows: Vec<Row> = rows
        .iter()
        .filter(|r| !r.scenario.starts_with("ceiling"))
        .cloned()
        .collect();
    let mut names: Vec<String> = Vec::new();
    for r in &rows {
        if !names.contains(&r.scenario) {
            names.push(r.scenario.clone());
        }
    }
    let levels: Vec<usize> = rows
        .iter()
        .map(|r| r.concurrency)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let legend_h = 18.0 * names.len().div_ceil(4) as f64;
    let height = 400.0 + legend_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="960" height="{height}" font-family="sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="960" height="{height}" fill="white"/>"#);
    panel(
        &mut s,
        0.0,
        "throughput (req/s)",
        &rows,
        &names,
        &levels,
        |r| r.throughput,
        false,
    );
    panel(
        &mut s,
        480.0,
        "p99 latency (ms, log scale)",
        &rows,
        &names,
        &levels,
        |r| r.p99_ms,
        true,
    );
    for (i, name) in names.iter().enumerate() {
        let (col, line) = (i % 4, i / 4);
        let (lx, ly) = (60.0 + col as f64 * 220.0, 395.0 + line as f64 * 18.0);
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="14" height="4" fill="{color}"/><text x="{}" y="{ly}" font-size="12">{}</text>"#,
            ly - 5.0,
            lx + 20.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, c: usize, tp: f64, p99: f64) -> Row {
        Row {
            scenario: name.into(),
            concurrency: c,
            requests: 10,
            errors: 0,
            crossed: 0,
            throughput: tp,
            p50_ms: p99 / 2.0,
            p90_ms: p99,
            p99_ms: p99,
            max_ms: p99,
            lease_wait_ms: None,
            gateway_cpu: None,
            gateway_user_cpu: None,
            gateway_rss_mib: None,
            servers_cpu: None,
            servers_rss_mib: None,
        }
    }

    #[test]
    fn renders_tables_and_chart() {
        let rows = vec![
            row("direct", 1, 1000.0, 1.0),
            row("pool-1", 1, 800.0, 1.2),
            row("peer:x", 1, 100.0, 10.0),
        ];
        let md = markdown(&rows, "## t");
        assert!(md.contains("| pool-1 | 1 | 0.80 | +100 |"), "{md}");
        assert!(md.contains("| peer:x | 1 | pool-1 | 8.0× | 0.12 |"), "{md}");
        let svg = svg(&rows);
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn relay_section_subtracts_the_floor() {
        let cpu = |mut r: Row, all: f64, user: f64| {
            // Percent of a core at r.throughput req/s for `all` / `user` µs per request.
            r.gateway_cpu = Some(all * r.throughput / 1e4);
            r.gateway_user_cpu = Some(user * r.throughput / 1e4);
            r
        };
        let rows = vec![
            cpu(row("relay", 16, 10_000.0, 2.0), 40.0, 15.0),
            cpu(row("pool-1", 16, 12_000.0, 2.4), 56.0, 33.0),
            row("sidecar-1", 4, 9_000.0, 1.0),
        ];
        let md = markdown(&rows, "## t");
        let (_, section) = md.split_once("**Against the relay**").expect("section");
        assert!(
            section.contains("| pool-1 | 16 | +200 | +16 (+18) |"),
            "{md}"
        );
        assert!(
            !section.contains("| sidecar-1 | 4 | "),
            "no relay at c=4: {md}"
        );
    }
}
