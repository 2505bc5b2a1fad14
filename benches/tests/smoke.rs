//! Runs the comparison tool on the memory backend at `low` and checks its JSON report.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs the tool on the memory backend at `low`, once, with `extra` arguments, writing its
/// report into a fresh directory; checks it succeeded. Returns (stdout, report, directory).
fn run_memory_low(name: &str, extra: &[&str]) -> (String, serde_json::Value, PathBuf) {
    let dir = std::env::temp_dir().join(format!("eventbus-bench-{name}-{}", std::process::id()));
    let json = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_eventbus-bench"))
        .args(["--targets", "memory", "--levels", "low", "--repeats", "1"])
        .args(extra)
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(dir.join("chart.svg"))
        .output()
        .expect("run eventbus-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (stdout, read_json(&json), dir)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("report written")).expect("valid JSON")
}

#[test]
fn memory_low_writes_a_complete_report() {
    let (stdout, report, dir) = run_memory_low("smoke", &[]);
    assert!(stdout.contains("memory"), "table printed: {stdout}");

    let s = &report["summaries"][0];
    assert_eq!(s["target"], "memory");
    assert_eq!(s["level"], "low");
    assert_eq!(s["messages"], 500);
    assert_eq!(s["runs"], 1);
    assert_eq!(s["lost"], 0);
    assert_eq!(s["duplicates"], 0);
    assert_eq!(s["ordering_violations"], 0);
    for field in [
        "send_per_sec",
        "e2e_per_sec",
        "ack_p50_ms",
        "ack_p99_ms",
        "e2e_p50_ms",
        "e2e_p99_ms",
        "e2e_max_ms",
        "peak_rss_mb",
    ] {
        assert!(
            s[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {}",
            s[field]
        );
    }
    assert!(s["peak_tasks"].as_u64().is_some_and(|t| t > 0));
    assert!(s["peak_threads"].as_u64().is_some_and(|t| t > 0));
    let run = &report["runs"][0];
    assert_eq!(run["storage"], "in-process memory");
    assert!(run["publish_ack_latency"]["p99_ms"].is_number());
    assert_eq!(report["knobs"]["window"], 10_000);
    let chart = std::fs::read_to_string(dir.join("chart.svg")).expect("chart written");
    assert!(chart.starts_with("<svg") && chart.contains("memory"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreachable_broker_is_reported_and_fails() {
    let out = Command::new(env!("CARGO_BIN_EXE_eventbus-bench"))
        .args(["--targets", "nats", "--levels", "low", "--repeats", "1"])
        .args(["--nats-url", "nats://127.0.0.1:1"])
        .output()
        .expect("run eventbus-bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
}

/// The open loop: 500 messages at 1,000 msg/s take about half a second, whatever the backend
/// could do; the report carries the rate and the fine percentiles.
#[test]
fn open_loop_rate_paces_the_publishers() {
    let (_, report, dir) = run_memory_low("open", &["--rate", "1000"]);
    assert_eq!(report["knobs"]["rate"], 1000.0);
    let run = &report["runs"][0];
    assert_eq!(run["lost"], 0);
    // Paced: 500 messages at 1,000 msg/s cannot be sent faster than the schedule allows
    // (the memory backend alone does ~70,000 msg/s here).
    let send = run["send_per_sec"].as_f64().expect("send rate");
    assert!(send <= 1_050.0, "publishing was not paced: {send} msg/s");
    for field in [
        "p50_ms", "p75_ms", "p95_ms", "p99_ms", "p999_ms", "p9999_ms", "max_ms",
    ] {
        assert!(
            run["e2e_latency"][field].as_f64().is_some(),
            "e2e {field}: {}",
            run["e2e_latency"][field]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sweep stops at the first rate whose p99 is over the bound and records every rate tried.
#[test]
fn sweep_stops_at_the_first_rate_over_the_bound() {
    // No delivery takes under a nanosecond: the first rate is over the bound.
    let (stdout, report, dir) =
        run_memory_low("sweep", &["--rate", "5000", "--sweep-p99-ms", "0.000001"]);
    assert!(stdout.contains("highest rate with e2e p99"), "{stdout}");
    let points = report["sweep"].as_array().expect("sweep points");
    assert_eq!(points.len(), 1, "{points:?}");
    assert_eq!(points[0]["rate"], 5000.0);
    assert_eq!(points[0]["passed"], false);
    assert!(points[0]["e2e_p99_ms"].as_f64().is_some_and(|p| p > 0.0));
    let _ = std::fs::remove_dir_all(&dir);
}
