//! Medians per level and target, the bus/raw ratio, and the table, JSON and SVG outputs.

use std::collections::BTreeMap;

use crate::targets::{RunResult, Target};

/// Medians of the repeated runs of one target at one level.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// The seed level's or the workload's name.
    pub level: String,
    pub target: Target,
    pub storage: &'static str,
    pub runs: usize,
    pub messages: usize,
    pub send_per_sec: f64,
    pub e2e_per_sec: f64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub ack_max_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_max_ms: f64,
    pub peak_rss_mb: f64,
    pub peak_tasks: usize,
    pub peak_threads: usize,
    /// Allocations per message (`alloc-count` builds only).
    pub allocs_per_message: Option<f64>,
    /// Summed over the runs; `None` for raw baselines (they do not check order).
    pub ordering_violations: Option<u64>,
    pub lost: u64,
    pub duplicates: u64,
    /// Bus e2e throughput / raw e2e throughput on the same broker, same run set.
    pub e2e_vs_raw: Option<f64>,
    /// Bus send throughput / raw send throughput.
    pub send_vs_raw: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 0 {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

pub fn summarize(results: &[RunResult]) -> Vec<Summary> {
    // Scenarios in the order they ran; targets in their declared order.
    let mut scenarios: Vec<&str> = Vec::new();
    for r in results {
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
    }
    let mut groups: BTreeMap<(usize, usize), Vec<&RunResult>> = BTreeMap::new();
    for r in results {
        let si = scenarios.iter().position(|s| *s == r.scenario).unwrap_or(0);
        groups.entry((si, r.target as usize)).or_default().push(r);
    }
    let mut out: Vec<Summary> = groups
        .values()
        .map(|runs| {
            let f = |g: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(|r| g(r)).collect());
            let first = runs[0];
            Summary {
                level: first.scenario.clone(),
                target: first.target,
                storage: first.storage,
                runs: runs.len(),
                messages: first.messages,
                send_per_sec: f(&|r| r.send_per_sec),
                e2e_per_sec: f(&|r| r.e2e_per_sec),
                ack_p50_ms: f(&|r| r.publish_ack_latency.p50_ms),
                ack_p99_ms: f(&|r| r.publish_ack_latency.p99_ms),
                ack_max_ms: f(&|r| r.publish_ack_latency.max_ms),
                e2e_p50_ms: f(&|r| r.e2e_latency.p50_ms),
                e2e_p99_ms: f(&|r| r.e2e_latency.p99_ms),
                e2e_max_ms: f(&|r| r.e2e_latency.max_ms),
                peak_rss_mb: f(&|r| r.peak_rss_mb),
                peak_tasks: runs.iter().map(|r| r.peak_tasks).max().unwrap_or(0),
                peak_threads: runs.iter().map(|r| r.peak_threads).max().unwrap_or(0),
                allocs_per_message: first
                    .allocs_per_message
                    .map(|_| f(&|r| r.allocs_per_message.unwrap_or(0.0))),
                ordering_violations: if first.target.is_raw() {
                    None
                } else {
                    Some(runs.iter().filter_map(|r| r.ordering_violations).sum())
                },
                lost: runs.iter().map(|r| r.lost).sum(),
                duplicates: runs.iter().map(|r| r.duplicates).sum(),
                e2e_vs_raw: None,
                send_vs_raw: None,
            }
        })
        .collect();
    let snapshot = out.clone();
    for s in &mut out {
        if let Some(base) = s.target.baseline() {
            if let Some(raw) = snapshot
                .iter()
                .find(|r| r.level == s.level && r.target == base)
            {
                s.e2e_vs_raw = Some(s.e2e_per_sec / raw.e2e_per_sec);
                s.send_vs_raw = Some(s.send_per_sec / raw.send_per_sec);
            }
        }
    }
    out
}

/// Writes each `(path, body)`, creating directories; says what it wrote. False if any failed.
pub fn write_files(files: &[(&std::path::Path, String)]) -> bool {
    let mut ok = true;
    for (path, body) in files {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::write(path, body) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => {
                eprintln!("error: cannot write {}: {e}", path.display());
                ok = false;
            }
        }
    }
    ok
}

/// The opening of a chart: the SVG element, a white background and the title.
pub fn svg_open(w: f64, h: f64, left: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"22\" font-size=\"15\">{title}</text>\n"
    )
}

/// Horizontal grid lines at each power of ten from `10^lo` to `10^hi`, from `x0` to `x1`,
/// labelled on the left by `label(exponent)`.
pub fn log_gridlines(
    (lo, hi): (i32, i32),
    (x0, x1): (f64, f64),
    y: impl Fn(f64) -> f64,
    label: impl Fn(i32) -> String,
) -> String {
    (lo..=hi)
        .map(|e| {
            let yy = y(10f64.powi(e));
            format!(
                "<line x1=\"{x0}\" x2=\"{x1:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                x0 - 6.0,
                yy + 4.0,
                label(e)
            )
        })
        .collect()
}

/// Width of the first column: the longest scenario name.
pub fn name_width(summaries: &[Summary]) -> usize {
    summaries
        .iter()
        .map(|s| s.level.len())
        .max()
        .unwrap_or(0)
        .max(11)
}

pub fn header(width: usize) -> String {
    format!(
        "{:<width$} {:<13} {:>4} {:>10} {:>10} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7} {:>5} {:>4} {:>4} {:>6} {:>4} {:>7} {:>6}",
        "level", "target", "runs", "send/s", "e2e/s", "vs raw", "(send)", "ack p50", "ack p99",
        "e2e p50", "e2e p99", "rss MB", "tasks", "thr", "ordr", "lost", "dup", "max ms", "al/msg"
    )
}

pub fn row(s: &Summary, width: usize) -> String {
    let ratio = |r: Option<f64>| r.map_or("-".to_string(), |v| format!("{v:.2}"));
    format!(
        "{:<width$} {:<13} {:>4} {:>10.0} {:>10.0} {:>6} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7.1} {:>5} {:>4} {:>4} {:>6} {:>4} {:>7.1} {:>6}",
        s.level,
        s.target.name(),
        s.runs,
        s.send_per_sec,
        s.e2e_per_sec,
        ratio(s.e2e_vs_raw),
        ratio(s.send_vs_raw),
        s.ack_p50_ms,
        s.ack_p99_ms,
        s.e2e_p50_ms,
        s.e2e_p99_ms,
        s.peak_rss_mb,
        s.peak_tasks,
        s.peak_threads,
        s.ordering_violations.map_or("-".to_string(), |v| v.to_string()),
        s.lost,
        s.duplicates,
        s.e2e_max_ms,
        s.allocs_per_message
            .map_or("-".to_string(), |a| format!("{a:.1}")),
    )
}

/// A grouped bar chart of median end-to-end throughput (log scale), one group per level.
pub fn svg(summaries: &[Summary]) -> String {
    let mut levels: Vec<&str> = Vec::new();
    for s in summaries {
        if !levels.contains(&s.level.as_str()) {
            levels.push(&s.level);
        }
    }
    let mut targets: Vec<Target> = Vec::new();
    for s in summaries {
        if !targets.contains(&s.target) {
            targets.push(s.target);
        }
    }
    targets.sort_by_key(|t| *t as usize);
    let colors = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
    ];
    let (w, h, left, top, bottom) = (960.0, 460.0, 70.0, 40.0, 60.0);
    let plot_h = h - top - bottom;
    let max = summaries
        .iter()
        .map(|s| s.e2e_per_sec)
        .fold(10.0f64, f64::max);
    let (lo, hi) = (2.0f64, max.log10().ceil().max(3.0));
    let y = |v: f64| top + plot_h * (1.0 - ((v.max(1.0).log10() - lo).max(0.0) / (hi - lo)));
    let group_w = (w - left - 20.0) / levels.len().max(1) as f64;
    let bar_w = (group_w - 20.0) / targets.len().max(1) as f64;
    let mut out = svg_open(
        w,
        h,
        left,
        "eventbus: median end-to-end throughput (msg/s, log scale) per level and target",
    );
    out += &log_gridlines((lo as i32, hi as i32), (left, w - 20.0), y, |e| {
        format!("1e{e}")
    });
    for (li, level) in levels.iter().enumerate() {
        let gx = left + li as f64 * group_w + 10.0;
        for (ti, target) in targets.iter().enumerate() {
            if let Some(s) = summaries
                .iter()
                .find(|s| s.level == *level && s.target == *target)
            {
                let x = gx + ti as f64 * bar_w;
                let yy = y(s.e2e_per_sec);
                out += &format!(
                    "<rect x=\"{x:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {}: {:.0} msg/s</title></rect>\n",
                    (bar_w - 2.0).max(1.0),
                    (top + plot_h - yy).max(0.0),
                    colors[ti % colors.len()],
                    level,
                    target.name(),
                    s.e2e_per_sec
                );
            }
        }
        out += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            gx + (group_w - 20.0) / 2.0,
            top + plot_h + 18.0,
            level
        );
    }
    for (ti, target) in targets.iter().enumerate() {
        let x = left + ti as f64 * 125.0;
        out += &format!(
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            h - 24.0,
            colors[ti % colors.len()],
            x + 16.0,
            h - 14.0,
            target.name()
        );
    }
    out + "</svg>\n"
}
