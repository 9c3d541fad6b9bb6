//! `esi-host bench --quick --json` runs end to end (its own etcd, hosts, plugins, reload) and
//! reports every figure issue #6 asks for. Values depend on the machine, so only their
//! presence and form are checked.

use std::path::PathBuf;
use std::process::Command;

use esi_tests::{plugin_dir, repo_dir};
use serde_json::Value;

/// `target/<profile>/esi-host`, built by `cargo test --workspace` for the host's own tests.
fn host_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("esi-host");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p esi-host` (scripts/test does)",
        bin.display()
    );
    bin
}

const FIGURES: &[&str] = &[
    "etcd_ceiling_txn_per_s",
    "commits_per_job",
    "txns_needed_per_job",
    "e2e_1host_jobs_per_s",
    "e2e_3hosts_jobs_per_s",
    "burst_1host_latency_p50_ms",
    "burst_1host_latency_p99_ms",
    "paced_latency_p50_ms",
    "paced_latency_p99_ms",
    "paced_latency_max_ms",
    "paced_quarter_latency_p50_ms",
    "paced_quarter_latency_p99_ms",
    "paced_cpu_ms_per_job",
    "paced_fixed_rate_jobs_per_s",
    "paced_fixed_latency_p50_ms",
    "paced_fixed_latency_p99_ms",
    "host_txns_per_job",
    "host_gets_per_job",
    "host_watch_events_per_job",
    "plugin_monitoring_us",
    "plugin_vlan_us",
    "native_vlan_us",
    "vlan_component_native_ratio",
    "reload_new_build_ms",
    "reload_new_build_optimized_ms",
    "reload_known_build_ms",
    "rss_idle_mib",
    "rss_loaded_mib",
    "rss_under_load_mib",
    "paced_slow_disk_waits",
    "paced_quarter_slow_disk_waits",
    "paced_wal_syncs_per_job",
    "burst_wal_syncs_per_job",
    "paced_stage_put_p50_ms",
    "paced_stage_manager_p50_ms",
    "paced_stage_claim_p50_ms",
    "paced_stage_run_p50_ms",
    "paced_stage_run_p99_ms",
    "plugin_vlan_instantiate_us",
    "plugin_vlan_first_call_us",
    "plugin_vlan_warm_call_us",
    "vlan_warm_native_ratio",
];

#[test]
fn quick_bench_reports_every_figure_as_json() {
    let output = Command::new(host_binary())
        .args(["bench", "--quick", "--json", "--paced-rate", "50"])
        .arg("--plugins")
        .arg(plugin_dir())
        .arg("--templates")
        .arg(repo_dir().join("templates"))
        .output()
        .expect("esi-host bench starts");
    assert!(
        output.status.success(),
        "esi-host bench --quick --json failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "bench --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(report["mode"], "quick");
    let figures = report["figures"].as_array().expect("a figures array");
    for name in FIGURES {
        let figure = figures
            .iter()
            .find(|f| f["name"] == *name)
            .unwrap_or_else(|| panic!("figure {name} is missing from {report:#}"));
        assert!(figure["value"].is_number(), "{name}: {figure}");
        assert!(
            ["pass", "fail", "info"].contains(&figure["verdict"].as_str().unwrap_or("")),
            "{name}: {figure}"
        );
    }
    for phase in ["ceiling", "runs", "plugins", "reload", "memory_bytes"] {
        assert!(
            !report["details"][phase].is_null(),
            "details.{phase} missing"
        );
    }
    // Every run followed the job queues (the first sample is taken at once) and read etcd's
    // disk histograms before and after.
    let runs = report["details"]["runs"].as_array().expect("a runs array");
    for run in runs.iter().filter(|run| !run.is_null()) {
        let label = &run["label"];
        assert!(
            run["queues"]["samples"].as_u64().unwrap_or(0) >= 1,
            "{label}: no queue samples: {run:#}"
        );
        assert!(
            run["etcd_disk"]["wal_syncs"].as_u64().unwrap_or(0) >= 1,
            "{label}: no WAL syncs counted: {run:#}"
        );
        // The queue watches start before the first PUT and miss no event, so every
        // resource's job is seen ready and claimed, and its stages add up to its latency.
        for stage in ["put", "manager", "claim", "run"] {
            assert_eq!(
                run["stages"][stage]["count"], run["jobs"],
                "{label}: stage {stage} does not cover every resource: {run:#}"
            );
        }
        for slow in run["slowest"].as_array().expect("a slowest array") {
            let stages = slow["stages_ms"]
                .as_array()
                .expect("stages of a slow resource");
            let sum: f64 = stages.iter().filter_map(Value::as_f64).sum();
            let latency = slow["latency_ms"].as_f64().unwrap_or(0.0);
            assert!(
                sum >= latency - 0.01 && stages.len() == 4,
                "{label}: stages {stages:?} do not add up to {latency} ms"
            );
        }
    }
}

#[test]
fn a_paced_rate_that_could_never_finish_is_refused_up_front() {
    for rate in ["0", "-5", "nan", "inf", "abc"] {
        let output = Command::new(host_binary())
            .args(["bench", "--only", "e2e"])
            .arg(format!("--paced-rate={rate}"))
            .output()
            .expect("esi-host bench starts");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "--paced-rate={rate} was accepted");
        assert!(
            stderr.contains("--paced-rate") && stderr.contains(rate),
            "--paced-rate={rate}: the error names neither the flag nor the value: {stderr}"
        );
    }
}
