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
    assert!(points[0]["e2e_p50_ms"].as_f64().is_some_and(|p| p > 0.0));
    let chart = std::fs::read_to_string(dir.join("chart.svg")).expect("latency chart written");
    assert!(
        chart.starts_with("<svg") && chart.contains("polyline") && chart.contains("memory (low)"),
        "{chart}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An OpenMessaging workload file for two seconds on the memory backend: the OMB result JSON
/// carries OMB's fields, one value per period, and the bus's own accounting beside them.
#[test]
fn omb_workload_file_writes_omb_result_json() {
    let dir = std::env::temp_dir().join(format!("eventbus-bench-omb-{}", std::process::id()));
    let workload = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/seed-low.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_eventbus-bench"))
        .args(["--targets", "memory", "--repeats", "1"])
        .arg("--workload")
        .arg(&workload)
        .args(["--duration-secs", "2", "--period-secs", "0.5"])
        .arg("--omb-dir")
        .arg(&dir)
        .arg("--json")
        .arg(dir.join("report.json"))
        .arg("--svg")
        .arg(dir.join("chart.svg"))
        .output()
        .expect("run eventbus-bench");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result = read_json(&dir.join("seed-low-4-topics-16-partitions-256b-keyed-memory-1.json"));
    assert_eq!(
        result["workload"],
        "seed low / 4 topics / 16 partitions / 256b / keyed"
    );
    assert_eq!(result["driver"], "eventbus-memory");
    assert_eq!(result["messageSize"], 256);
    assert_eq!(result["topics"], 4);
    assert_eq!(result["partitions"], 16);
    assert_eq!(result["producersPerTopic"], 2);
    assert_eq!(result["consumersPerTopic"], 1);
    // 500 msg/s for 2 s, in periods of 0.5 s: several samples, each list as long as the others.
    let periods = result["publishRate"].as_array().expect("publishRate").len();
    assert!(periods >= 3, "{periods} periods");
    for list in [
        "publishRate",
        "publishErrorRate",
        "consumeRate",
        "backlog",
        "publishLatencyAvg",
        "publishLatency50pct",
        "publishLatency99pct",
        "publishLatency9999pct",
        "publishLatencyMax",
        "endToEndLatency50pct",
        "endToEndLatency999pct",
        "endToEndLatencyMax",
    ] {
        assert_eq!(
            result[list].as_array().map(Vec::len),
            Some(periods),
            "{list}: {}",
            result[list]
        );
    }
    // Paced: no period publishes faster than the schedule allows (slower is the machine's
    // business, not something this test judges).
    for rate in result["publishRate"].as_array().expect("rates") {
        let rate = rate.as_f64().expect("rate");
        assert!((0.0..750.0).contains(&rate), "paced at 500 msg/s: {rate}");
    }
    for field in [
        "aggregatedPublishLatency50pct",
        "aggregatedPublishLatency99pct",
        "aggregatedPublishLatencyMax",
        "aggregatedEndToEndLatencyAvg",
        "aggregatedEndToEndLatency50pct",
        "aggregatedEndToEndLatency9999pct",
        "aggregatedEndToEndLatencyMax",
    ] {
        assert!(
            result[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {}",
            result[field]
        );
    }
    assert!(result["aggregatedEndToEndLatencyQuantiles"]["99"].is_number());
    assert_eq!(result["eventbus"]["messages"], 1000);
    assert_eq!(result["eventbus"]["lost"], 0);
    assert_eq!(result["eventbus"]["orderingViolations"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_workload_file_is_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("eventbus-bench-badomb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bad.yaml");
    std::fs::write(&path, "name: x\ntopics: 1\nproducerRat: 10\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_eventbus-bench"))
        .args(["--targets", "memory", "--workload"])
        .arg(&path)
        .output()
        .expect("run eventbus-bench");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("producerRat"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
