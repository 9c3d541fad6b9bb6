//! Hot reload under load: the scripted guest is replaced five times, by temp file + rename,
//! while 500 jobs flow (issue 5). In a file of its own so that no other test competes for the
//! two cores while the swap times are measured.

use std::time::{Duration, Instant};

use esi_host::keys::{Queue, Record};
use esi_tests::scripted::{completed_output, put_scripted_job, start_host, HANDLER, TIMEOUT};
use esi_tests::{
    component_variant, plugin_dir_with_copies, replace_file, test_plugin_dir, TestEnv,
};
use serde_json::json;

/// The manifest of build `n` of the scripted guest: its version, and its build in the config
/// every call gets (and echoes).
fn manifest_of_build(n: u32) -> String {
    let base = std::fs::read_to_string(test_plugin_dir().join(format!("{HANDLER}.toml"))).unwrap();
    let base = base.replace("[plugin]\n", &format!("[plugin]\nversion = \"1.0.{n}\"\n"));
    format!("{base}\n[config]\nbuild = {n}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_swaps_during_500_jobs_lose_and_double_nothing() {
    let env = TestEnv::new().await.unwrap();
    let dir = plugin_dir_with_copies(&[test_plugin_dir()], &[HANDLER]);
    let component_path = dir.join(format!("{HANDLER}.wasm"));
    let manifest_path = dir.join(format!("{HANDLER}.toml"));
    let original = std::fs::read(&component_path).unwrap();
    std::fs::write(&manifest_path, manifest_of_build(0)).unwrap();
    let (host, host_id) = start_host(&env, dir.clone()).await;
    env.wait_plugin_status(&host_id, HANDLER, TIMEOUT, |s| s["version"] == "1.0.0")
        .await
        .unwrap();

    // A job that is running (waiting between its two calls) across the first swap.
    let long = put_scripted_job(&env, Some(json!({"wait_once_ms": 3000}))).await;
    let working = env.keys().queue_prefix(Queue::Working);
    let deadline = Instant::now() + TIMEOUT;
    while env.store.list(&working).await.unwrap().0.is_empty() {
        assert!(Instant::now() < deadline, "the long job was never claimed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut waves: Vec<(u32, Vec<String>)> = Vec::new();
    for build in 1..=5u32 {
        let mut wave = Vec::new();
        for _ in 0..100 {
            wave.push(put_scripted_job(&env, None).await);
        }
        waves.push((build - 1, wave));
        // Swap: the new component and its manifest, each written and renamed into place.
        let swapped = Instant::now();
        replace_file(&component_path, &component_variant(&original, build));
        replace_file(&manifest_path, manifest_of_build(build).as_bytes());
        let version = format!("1.0.{build}");
        env.wait_plugin_status(&host_id, HANDLER, Duration::from_secs(2), |s| {
            s["version"] == version.as_str() && s["state"] == "active"
        })
        .await
        .unwrap_or_else(|e| panic!("swap {build} not visible within 2 s: {e}"));
        eprintln!("swap {build} visible after {:?}", swapped.elapsed());
    }

    // Every job completes exactly once, on a version at least as new as the one serving when
    // it was written, and the long job on the version it started with.
    let long_output = completed_output(&env, &long).await;
    assert_eq!(long_output["config"]["build"], 0, "{long_output}");
    let counts = env.state_put_counts().await.unwrap();
    let mut total = 0;
    for (serving_when_written, wave) in &waves {
        for resource in wave {
            let output = completed_output(&env, resource).await;
            let build = output["config"]["build"].as_u64().unwrap();
            assert!(
                build >= u64::from(*serving_when_written) && build <= 5,
                "{resource} written under build {serving_when_written} ran on {build}"
            );
            total += 1;
        }
    }
    assert_eq!(total, 500);
    let counts_now = env.state_put_counts().await.unwrap();
    for (_, wave) in &waves {
        for resource in wave {
            let key = env.key(Record::State, esi_tests::scripted::RESOURCE_TYPE, resource);
            assert_eq!(counts_now.get(&key), Some(&1), "{key}");
        }
    }
    drop(counts);
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
