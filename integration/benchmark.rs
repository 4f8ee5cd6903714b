//! The comparison benchmark itself must keep working: `ctsync-compare` runs end to end on a
//! small table and reports complete replication, commit, resync, deletion, loss and latency
//! runs. No figure is asserted (speed is the benchmark's business, not a test's); what is
//! asserted is that every measurement happened and that ctsync lost nothing.

use crate::support::{exclusive, require_root};
use serde_json::Value;
use std::process::{Command, Stdio};

/// Completeness metrics every ctsync run must report, at 1.
const COMPLETE: &[&str] = &[
    "replication_completeness",
    "commit_completeness",
    "resync_completeness",
    "delete_completeness",
    "loss_replication_completeness",
    "loss_commit_completeness",
    "latency_completeness",
];

fn conntrackd_installed() -> bool {
    Command::new("conntrackd")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn compare_runs_end_to_end() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    let dumps = std::env::temp_dir().join(format!("ctsync-latency-dump-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ctsync-compare"))
        .args(["--flows", "3000", "--runs", "1", "--latency-rate", "2000"])
        .args(["--latency-secs", "1", "--timeout", "60", "--json"])
        .arg("--latency-dump")
        .arg(&dumps)
        .stdin(Stdio::null())
        .output()
        .expect("running ctsync-compare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ctsync-compare failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ctsync-compare printed no JSON ({e}): {stderr}"));
    let rows = report["results"].as_array().expect("results");
    let value = |imp: &str, metric: &str| {
        rows.iter()
            .find(|r| r["implementation"] == imp && r["metric"] == metric)
            .and_then(|r| r["median"].as_f64())
    };
    for metric in COMPLETE {
        assert_eq!(
            value("ctsync", metric),
            Some(1.0),
            "ctsync {metric}: {report}"
        );
    }
    for metric in ["replication_s", "commit_s", "resync_s", "delete_s", "cpu_s"] {
        let v = value("ctsync", metric).unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "ctsync {metric} = {v}: {report}");
    }
    assert!(value("raw", "raw_commit_s").is_some(), "{report}");
    // ctsyncd does not read back the events of its own commit, so they cannot overflow it.
    assert_eq!(value("ctsync", "commit_overruns_b"), Some(0.0), "{report}");
    // The commit's kernel floor: the same full messages, written by a raw writer.
    for metric in ["raw_commit_full_s", "floor_create_writer_cpu_s"] {
        let v = value("raw", metric).unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "raw {metric} = {v}: {report}");
    }
    if std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2) {
        // Checked against the kernel by ctsync-compare itself, for every daemon it starts.
        let placement = report["meta"]["placement"].as_str().unwrap_or_default();
        assert!(
            placement.contains("CPU 0") && placement.contains("CPU 1"),
            "each node's daemon should have a CPU of its own: {placement}"
        );
    }
    let p99 = value("ctsync", "latency_p99_ms").unwrap_or(f64::NAN);
    assert!(p99.is_finite(), "latency p99 = {p99}");
    let dump = std::fs::read_to_string(dumps.join("ctsync-1.txt"));
    let _ = std::fs::remove_dir_all(&dumps);
    check_latency_dump(dump, 2000, p99);
    if conntrackd_installed() {
        assert!(
            value("conntrackd", "replication_s").is_some(),
            "conntrackd is installed but was not measured: {report}"
        );
        let targets = report["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "no targets evaluated: {report}");
        assert!(
            targets.iter().any(|t| t["subject"] == "raw writer"),
            "the commit's kernel floor was not set against conntrackd: {report}"
        );
    } else {
        let notes = report["notes"].to_string();
        assert!(notes.contains("conntrackd is not installed"), "{notes}");
    }
}

/// `--latency-dump` wrote one line per flow (seconds since the first creation, milliseconds to
/// B's kernel), and the latencies in it are the ones the report's p99 was taken from.
fn check_latency_dump(dump: std::io::Result<String>, flows: usize, p99: f64) {
    let text = dump.unwrap_or_else(|e| panic!("no latency dump: {e}"));
    let mut lat = Vec::new();
    for line in text.lines() {
        let fields: Vec<f64> = line
            .split(' ')
            .map(|f| f.parse().unwrap_or_else(|e| panic!("{line:?}: {e}")))
            .collect();
        assert_eq!(fields.len(), 2, "{line:?}");
        assert!((0.0..5.0).contains(&fields[0]), "{line:?}");
        lat.push(fields[1]);
    }
    assert_eq!(lat.len(), flows, "one line per flow");
    assert!(lat.iter().all(|&l| l >= 0.0), "every flow arrived");
    lat.sort_by(f64::total_cmp);
    let above = lat.iter().filter(|&&l| l > p99 + 1e-3).count();
    assert!(
        above <= flows / 100 + 1,
        "{above} of {flows} flows above the reported p99 {p99}"
    );
}
