//! `--sweep-p99-ms`: the highest rate each target sustains under a p99 bound, and the
//! latency-versus-rate chart (OMB-style) of every rate tried.

use std::path::Path;
use std::process::ExitCode;

use crate::targets::{self, Knobs, RunResult, Target};
use crate::workload::{Level, Shape};

/// One rate tried by the sweep.
#[derive(serde::Serialize)]
pub struct SweepPoint {
    pub target: &'static str,
    pub level: &'static str,
    pub rate: f64,
    pub e2e_per_sec: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_p999_ms: f64,
    pub passed: bool,
}

/// `--sweep-p99-ms`: the highest rate each target sustains with e2e p99 under `bound`.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    targets: &[Target],
    levels: &[Level],
    knobs: &Knobs,
    repeats: usize,
    bound: f64,
    (json, svg): (&Path, &Path),
) -> ExitCode {
    const MAX_STEPS: usize = 12;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let mut points = Vec::new();
    let mut failed = false;
    for level in levels {
        for target in targets {
            let mut rate = knobs.rate.unwrap_or(1_000.0);
            let mut best = None;
            for _ in 0..MAX_STEPS {
                let k = Knobs {
                    rate: Some(rate),
                    ..knobs.clone()
                };
                let runs: Vec<RunResult> = (1..=repeats)
                    .filter_map(|r| {
                        match runtime.block_on(targets::run(*target, &Shape::level(*level), r, &k))
                        {
                            Ok(r) => Some(r),
                            Err(e) => {
                                eprintln!("{} at {rate} msg/s failed: {e}", target.name());
                                None
                            }
                        }
                    })
                    .collect();
                if runs.len() < repeats {
                    failed = true;
                    break;
                }
                let p99 = median(runs.iter().map(|r| r.e2e_latency.p99_ms).collect());
                let p50 = median(runs.iter().map(|r| r.e2e_latency.p50_ms).collect());
                let p999 = median(runs.iter().map(|r| r.e2e_latency.p999_ms).collect());
                let e2e = median(runs.iter().map(|r| r.e2e_per_sec).collect());
                let passed = p99 <= bound && e2e >= 0.95 * rate;
                eprintln!(
                    "sweep {:<10} {:<12} {rate:>9.0} msg/s: e2e {e2e:>9.0} msg/s, p99 {p99:>8.2} ms {}",
                    level.name(),
                    target.name(),
                    if passed { "ok" } else { "over" }
                );
                points.push(SweepPoint {
                    target: target.name(),
                    level: level.name(),
                    rate,
                    e2e_per_sec: e2e,
                    e2e_p50_ms: p50,
                    e2e_p99_ms: p99,
                    e2e_p999_ms: p999,
                    passed,
                });
                if !passed {
                    break;
                }
                best = Some(rate);
                rate *= 2.0;
            }
            println!(
                "{:<10} {:<12} highest rate with e2e p99 <= {bound} ms: {}",
                level.name(),
                target.name(),
                best.map_or("none".into(), |r| format!("{r:.0} msg/s"))
            );
        }
    }
    let report = serde_json::json!({
        "tool": "eventbus-bench",
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "knobs": knobs,
        "sweep_p99_bound_ms": bound,
        "repeats": repeats,
        "sweep": points,
    });
    let report = serde_json::to_string_pretty(&report).unwrap_or_default();
    if !crate::report::write_files(&[(json, report), (svg, latency_svg(&points, bound))]) {
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// End-to-end latency (p50 dashed, p99 solid; log scale) against the offered rate (log scale),
/// one colour per target and level, bus and raw side by side: the OMB way of reading a
/// broker. The bound is drawn as a horizontal line.
pub fn latency_svg(points: &[SweepPoint], bound: f64) -> String {
    let mut series: Vec<(&str, &str)> = Vec::new();
    for p in points {
        if !series.contains(&(p.target, p.level)) {
            series.push((p.target, p.level));
        }
    }
    let colors = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
    ];
    let (w, h, left, top, bottom, right) = (960.0, 480.0, 70.0, 40.0, 90.0, 20.0);
    let (plot_w, plot_h) = (w - left - right, h - top - bottom);
    let log = |v: f64| v.max(1e-3).log10();
    let (r_lo, r_hi) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(log(p.rate)), b.max(log(p.rate)))
    });
    let (r_lo, r_hi) = if r_lo <= r_hi {
        (r_lo.floor(), r_hi.ceil().max(r_lo.floor() + 1.0))
    } else {
        (2.0, 5.0)
    };
    let l_hi = points
        .iter()
        .map(|p| log(p.e2e_p99_ms))
        .fold(log(bound), f64::max)
        .ceil()
        .max(1.0);
    let l_lo = -1.0;
    let x = |rate: f64| left + plot_w * (log(rate) - r_lo) / (r_hi - r_lo);
    let y = |ms: f64| top + plot_h * (1.0 - (log(ms).clamp(l_lo, l_hi) - l_lo) / (l_hi - l_lo));
    let mut out = crate::report::svg_open(
        w,
        h,
        left,
        "end-to-end latency (ms, log) vs offered rate (msg/s, log): p99 solid, p50 dashed",
    );
    out += &crate::report::log_gridlines((l_lo as i32, l_hi as i32), (left, w - right), y, |e| {
        format!("{}", 10f64.powi(e))
    });
    let mut e = r_lo as i32;
    while f64::from(e) <= r_hi {
        let v = 10f64.powi(e);
        let xx = x(v);
        out += &format!("<line x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#eee\"/><text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v}</text>\n", top + plot_h, top + plot_h + 16.0);
        e += 1;
    }
    let yb = y(bound);
    out += &format!("<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{yb:.1}\" y2=\"{yb:.1}\" stroke=\"#999\" stroke-dasharray=\"2,4\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#666\">bound {bound} ms</text>\n", w - right, w - right, yb - 4.0);
    for (i, (target, level)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let mine: Vec<&SweepPoint> = points
            .iter()
            .filter(|p| p.target == *target && p.level == *level)
            .collect();
        for (dash, pick) in [
            (
                "",
                (|p: &SweepPoint| p.e2e_p99_ms) as fn(&SweepPoint) -> f64,
            ),
            (" stroke-dasharray=\"6,4\"", |p| p.e2e_p50_ms),
        ] {
            let path: Vec<String> = mine
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.rate), y(pick(p))))
                .collect();
            out += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
                path.join(" ")
            );
        }
        for p in &mine {
            out += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{} {}: {:.0} msg/s offered, {:.0} handled, p50 {:.2} ms, p99 {:.2} ms</title></circle>\n",
                x(p.rate),
                y(p.e2e_p99_ms),
                p.target,
                p.level,
                p.rate,
                p.e2e_per_sec,
                p.e2e_p50_ms,
                p.e2e_p99_ms
            );
        }
        let lx = left + (i % 4) as f64 * 220.0;
        let ly = h - 40.0 + (i / 4) as f64 * 18.0;
        out += &format!(
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{ly:.1}\">{target} ({level})</text>\n",
            ly - 10.0,
            lx + 16.0
        );
    }
    out += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">offered rate, msg/s</text>\n",
        left + plot_w / 2.0,
        top + plot_h + 34.0
    );
    out + "</svg>\n"
}
