//! `esi-host demo` prints the seed's four records and exits 0.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn demo_prints_the_four_seed_records_and_exits_zero() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let plugins = std::env::var_os("ESI_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target/plugins"));
    assert!(
        plugins.join("monitoring_worker.wasm").exists(),
        "build the plugins first: cargo xtask build-plugins"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_esi-host"))
        .arg("demo")
        .arg("--plugins")
        .arg(&plugins)
        .arg("--templates")
        .arg(repo.join("templates"))
        .output()
        .expect("esi-host runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for needle in [
        "### (1) config\n/config/v2.0/ha_interfaces/372ed357-e622-41fb-a613-076d332838e2",
        "### (2) job for monitoring_worker\n/jobs/all/create:monitoring_worker:ha_interface:372ed357-e622-41fb-a613-076d332838e2:1:",
        "### (3) job state\n/esi-worker/job_state/v2.0/ha_interfaces/372ed357-e622-41fb-a613-076d332838e2",
        "### (4) state\n/state/v2.0/ha_interfaces/372ed357-e622-41fb-a613-076d332838e2",
        "\"worker_state\": \"CREATE_COMPLETED\"",
        "\"primary\": \"ACTIVE\"",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}\nstderr:\n{stderr}");
    }
}
