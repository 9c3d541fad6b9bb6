//! The sandbox: hostile guests fail only their own job, grants are enforced, and plugins are
//! replaced, rejected and removed while the host runs (issue 5).
//!
//! The guests are real components: `scripted_worker` (whose every run follows the script in
//! the job's `resource_input`) under its test manifest (32 MiB, 64 KiB of output, reads of
//! `/state/`, writes to `/esi-worker/monitoring_targets/`), `broken_describe_worker` (whose
//! `describe()` traps), and the example third-party handler `example_echo_worker`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use esi_host::keys::Record;
use esi_tests::scripted::{
    completed_output, put_scripted_job, start_host, wait_failed, HANDLER, RESOURCE_TYPE, TIMEOUT,
};
use esi_tests::{
    example_plugin_dir, plugin_dir, plugin_dir_with_copies, plugin_dir_with_test_guests,
    replace_file, test_plugin_dir, TestEnv,
};
use serde_json::{json, Value};

/// The SDK's job arena (1 MiB, `esi_plugin_sdk::ARENA_BYTES`) serves a job that fits in it
/// without growing the linear memory, and a job that allocates past it goes on in the system
/// allocator: one block bigger than the arena, a buffer that leaves the arena as its last
/// block, and one that leaves it while blocks allocated after it stay, all come back intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_arena_serves_small_jobs_and_a_job_that_outgrows_it_runs_on() {
    let env = TestEnv::new().await.unwrap();
    let (host, _) = start_host(&env, plugin_dir_with_test_guests()).await;

    let small = put_scripted_job(&env, Some(json!({"small_blocks_kib": 100}))).await;
    assert_eq!(
        completed_output(&env, &small).await,
        json!({"small_blocks_kib": {"pages_grown": 0}})
    );

    let big = put_scripted_job(&env, Some(json!({"allocate_mib": 4}))).await;
    assert_eq!(completed_output(&env, &big).await, json!({"attempts": 0}));

    let kib: u64 = 3 * 1024;
    let bytes = kib * 1024;
    let sum: u64 = (0..bytes).map(|i| i % 251).sum();
    let grown = put_scripted_job(&env, Some(json!({"grow_kib": kib}))).await;
    assert_eq!(
        completed_output(&env, &grown).await,
        json!({"grow_kib": {"bytes": bytes, "sum": sum}})
    );
    host.shutdown().await;
}

/// A plugin whose module needs more memory to start than its manifest allows
/// (`limits.memory_mib`; an SDK plugin starts with ~2.1 MiB: stack, data and job arena) is
/// rejected when it loads, naming the limit, instead of failing every job it is given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_cannot_start_within_its_memory_limit_is_rejected_at_load() {
    let env = TestEnv::new().await.unwrap();
    let dir = plugin_dir_with_copies(&[test_plugin_dir()], &[HANDLER]);
    let manifest = dir.join(format!("{HANDLER}.toml"));
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("memory_mib = 32"), "{text}");
    std::fs::write(&manifest, text.replace("memory_mib = 32", "memory_mib = 1")).unwrap();
    let (host, host_id) = start_host(&env, dir.clone()).await;
    // The initial load ends inside `Host::start`: the first status record is its verdict.
    let status = env
        .wait_plugin_status(&host_id, HANDLER, TIMEOUT, |_| true)
        .await
        .unwrap();
    let state = status["state"].as_str().unwrap_or_default();
    assert!(
        state.starts_with("rejected: ")
            && state.contains("memory limit of 1 MiB (limits.memory_mib)")
            && state.contains("initial memory"),
        "{status}"
    );
    host.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_fail_only_their_own_job_and_the_host_keeps_serving() {
    let env = TestEnv::new().await.unwrap();
    let (host, host_id) = start_host(&env, plugin_dir_with_test_guests()).await;

    let cases = [
        (json!({"spin": true}), "deadline"),
        (json!({"allocate_mib": 64}), "memory limit of 32 MiB"),
        (json!({"recurse": 100_000_000}), "overflowed its stack"),
        (
            json!({"read": "config ha_interface secret"}),
            "reading /config/v2.0/ha_interfaces/secret is not granted",
        ),
        (
            json!({"write": "vlan-pool ha_interface p1"}),
            "which its manifest does not grant",
        ),
        (json!({"output_kib": 128}), "over its limit of 65536"),
    ];
    for (script, expected) in cases {
        let resource = put_scripted_job(&env, Some(script.clone())).await;
        eprintln!("hostile script {script}: resource {resource}");
        let error = wait_failed(&env, &resource).await;
        assert!(error.contains(expected), "{script}: {error}");
        // The host is still up and serves the next job.
        let next = put_scripted_job(&env, None).await;
        assert_eq!(completed_output(&env, &next).await, json!({"attempts": 0}));
    }

    // A granted read and a granted write go through.
    let interface = env.key(Record::State, "ha_interface", "granted");
    env.store.put(&interface, "{\"up\": true}").await.unwrap();
    let reader = put_scripted_job(&env, Some(json!({"read": "state ha_interface granted"}))).await;
    assert_eq!(
        completed_output(&env, &reader).await,
        json!({"read": "{\"up\": true}"})
    );
    let writer = put_scripted_job(
        &env,
        Some(json!({"write": "monitoring-target ha_interface granted"})),
    )
    .await;
    completed_output(&env, &writer).await;
    let target = env.key(Record::MonitoringTarget, "ha_interface", "granted");
    assert_eq!(env.store.get(&target).await.unwrap().unwrap().value, b"{}");

    // Every failure was counted for the plugin, by kind, in its fleet status.
    let status = env
        .wait_plugin_status(&host_id, HANDLER, TIMEOUT, |s| s["state"] == "active")
        .await
        .unwrap();
    let failures = &status["failures"];
    assert_eq!(failures["deadline"], 5, "{status}");
    assert_eq!(failures["memory"], 1, "{status}");
    assert_eq!(failures["stack"], 1, "{status}");
    assert_eq!(failures["write-denied"], 1, "{status}");
    assert_eq!(failures["output"], 1, "{status}");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_versions_are_rejected_while_the_previous_one_serves_and_removal_pauses_claims() {
    let env = TestEnv::new().await.unwrap();
    let dir = plugin_dir_with_copies(&[test_plugin_dir()], &[HANDLER]);
    let (host, host_id) = start_host(&env, dir.clone()).await;
    let active = env
        .wait_plugin_status(&host_id, HANDLER, TIMEOUT, |s| s["state"] == "active")
        .await
        .unwrap();
    let serving_sha = active["sha256"].clone();

    let empty_component = b"\0asm\x0d\0\x01\0".to_vec();
    let broken_describe =
        std::fs::read(test_plugin_dir().join("broken_describe_worker.wasm")).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "corrupt",
            b"not a component at all".to_vec(),
            "not a valid WebAssembly component",
        ),
        (
            "wrong world",
            empty_component,
            "does not export the esi:worker handler world",
        ),
        ("trapping describe()", broken_describe, "describe() failed"),
    ];
    for (what, bytes, reason) in cases {
        replace_file(&dir.join(format!("{HANDLER}.wasm")), &bytes);
        let status = env
            .wait_plugin_status(&host_id, HANDLER, TIMEOUT, |s| {
                s["state"]
                    .as_str()
                    .is_some_and(|st| st.starts_with("rejected:") && st.contains(reason))
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            status["sha256"], serving_sha,
            "{what}: the old version still serves"
        );
        let resource = put_scripted_job(&env, None).await;
        assert_eq!(
            completed_output(&env, &resource).await,
            json!({"attempts": 0}),
            "{what}"
        );
    }

    // Removed: the status record goes, and a new job for its handler is left in ready.
    std::fs::remove_file(dir.join(format!("{HANDLER}.wasm"))).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while env
        .plugin_status(&host_id, HANDLER)
        .await
        .unwrap()
        .is_some()
    {
        assert!(Instant::now() < deadline, "the status record stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let orphan = put_scripted_job(&env, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.store
            .get(&env.key(Record::State, RESOURCE_TYPE, &orphan))
            .await
            .unwrap(),
        None,
        "no plugin serves the handler any more"
    );
    // Put back, the plugin takes the job that waited in ready.
    let component = std::fs::read(test_plugin_dir().join(format!("{HANDLER}.wasm"))).unwrap();
    replace_file(&dir.join(format!("{HANDLER}.wasm")), &component);
    assert_eq!(
        completed_output(&env, &orphan).await,
        json!({"attempts": 0})
    );
    host.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_third_party_handler_runs_end_to_end_from_its_template() {
    let env = TestEnv::new().await.unwrap();
    let dir = plugin_dir_with_copies(
        &[plugin_dir(), example_plugin_dir()],
        &["monitoring_worker", "example_echo_worker"],
    );
    let templates_dir = esi_tests::repo_dir().join("plugins/examples/echo/templates");
    let templates = esi_host::templates::read_dir(&templates_dir).unwrap();
    esi_host::templates::load(&env.store, &env.schemas, &templates)
        .await
        .unwrap();
    let (host, _) = start_host(&env, dir.clone()).await;

    let id = uuid::Uuid::new_v4().to_string();
    env.put_config(RESOURCE_TYPE, &id, &json!({"id": id, "name": "r1"}), 1)
        .await
        .unwrap();
    let state = env.wait_completed(RESOURCE_TYPE, &id).await.unwrap();
    let echo: Value = serde_json::from_str(state["state"]["echo"].as_str().unwrap()).unwrap();
    assert_eq!(
        echo,
        json!({
            "params": {"router_name": "r1", "router_id": id},
            "config": {"greeting": "hello from the manifest"}
        })
    );
    host.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_list_shows_the_fleet_and_plugins_check_validates_offline() {
    let env = TestEnv::new().await.unwrap();
    let (host, host_id) = start_host(&env, plugin_dir_with_test_guests()).await;
    env.wait_plugin_status(&host_id, HANDLER, TIMEOUT, |s| s["state"] == "active")
        .await
        .unwrap();

    let endpoint = env.endpoints.join(",");
    let out = std::process::Command::new(esi_tests::host_binary())
        .args(["plugins", "list", "--json", "--etcd", &endpoint])
        .args(["--key-root", env.keys().root()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fleet: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ours: Vec<&Value> = fleet
        .iter()
        .filter(|e| e["host"] == host_id.as_str())
        .collect();
    let names: Vec<&str> = ours.iter().filter_map(|e| e["plugin"].as_str()).collect();
    assert!(
        names.contains(&HANDLER) && names.contains(&"monitoring_worker"),
        "{fleet:?}"
    );
    assert!(ours.iter().all(|e| e["state"] == "active"), "{fleet:?}");

    let check = |path: &std::path::Path| {
        std::process::Command::new(esi_tests::host_binary())
            .args(["plugins", "check", "--json"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = check(&test_plugin_dir().join(format!("{HANDLER}.wasm")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["handlers"], json!([HANDLER]));
    assert_eq!(report["read"], json!(["/state/"]));
    assert_eq!(report["memory_mib"], 32);

    let dir = plugin_dir_with_copies(&[test_plugin_dir()], &[HANDLER]);
    let broken = dir.join(format!("{HANDLER}.wasm"));
    replace_file(&broken, b"garbage");
    let out = check(&broken);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not a valid WebAssembly component"),
        "{stderr}"
    );
    host.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A host on a private copy of the scripted guest, once it serves and its directory watch
/// has caught up (the initial load and the watch's catch-up each look at the file once); and
/// the copy's directory.
async fn start_on_a_scripted_copy(env: &TestEnv) -> (esi_host::host::Host, String, PathBuf) {
    let dir = plugin_dir_with_copies(&[test_plugin_dir()], &[HANDLER]);
    let (host, host_id) = start_host(env, dir.clone()).await;
    env.wait_plugin_status(&host_id, HANDLER, TIMEOUT, |s| s["state"] == "active")
        .await
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while host.plugins().checks() < 2 {
        assert!(
            Instant::now() < deadline,
            "the directory watch never caught up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (host, host_id, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_plugin_directory_is_not_read_again_and_only_a_change_is_looked_at() {
    let env = TestEnv::new().await.unwrap();
    let (host, _, dir) = start_on_a_scripted_copy(&env).await;
    let component = dir.join(format!("{HANDLER}.wasm"));
    // The catch-up when the watch starts is the last look while nothing changes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = host.plugins().checks();
    // Reading the files (as the registry itself does for every check) is not a change.
    for _ in 0..3 {
        std::fs::read(&component).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        host.plugins().checks(),
        settled,
        "the registry kept looking at an unchanged directory"
    );
    // A rename over the component is looked at (once per burst of its events).
    replace_file(&component, &std::fs::read(&component).unwrap());
    let deadline = Instant::now() + TIMEOUT;
    while host.plugins().checks() == settled {
        assert!(Instant::now() < deadline, "the rename was never looked at");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = host.plugins().checks();
    assert!(
        after - settled <= 2,
        "{} checks for one rename",
        after - settled
    );
    host.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_build_serves_from_baseline_code_first_then_from_optimized_code() {
    let env = TestEnv::new().await.unwrap();
    let (host, host_id, dir) = start_on_a_scripted_copy(&env).await;
    let component = dir.join(format!("{HANDLER}.wasm"));
    // Loaded at start: optimised code, as every build the host compiles before serving.
    let status_key = env.keys().plugin_status(&host_id, HANDLER);
    let at_start = env.get_json(&status_key).await.unwrap().unwrap();
    assert_eq!(at_start["tier"], "optimized", "{at_start}");

    let mut recorder = env.record_changes().await.unwrap();
    let new_build = esi_tests::component_variant(&std::fs::read(&component).unwrap(), 1);
    replace_file(&component, &new_build);
    let sha256 = esi_host::plugins::cache::CompileCache::digest(&new_build);
    recorder
        .until(TIMEOUT, |c| {
            matches!(c, esi_host::store::Change::Put(kv) if kv.key == status_key
                && serde_json::from_slice::<Value>(&kv.value).is_ok_and(|v|
                    v["sha256"] == sha256.as_str() && v["tier"] == "optimized"))
        })
        .await
        .unwrap();
    let tiers: Vec<String> = recorder
        .puts_under(&status_key)
        .into_iter()
        .filter(|(_, v)| v["sha256"] == sha256.as_str())
        .map(|(_, v)| v["tier"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(tiers, ["baseline", "optimized"]);
    // Jobs run on whichever code serves.
    let resource = put_scripted_job(&env, None).await;
    completed_output(&env, &resource).await;
    host.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_rejected_while_the_previous_one_compiles_leaves_that_one_optimized() {
    let env = TestEnv::new().await.unwrap();
    let (host, host_id, dir) = start_on_a_scripted_copy(&env).await;
    let component = dir.join(format!("{HANDLER}.wasm"));
    let good = esi_tests::component_variant(&std::fs::read(&component).unwrap(), 2);
    let sha256 = esi_host::plugins::cache::CompileCache::digest(&good);
    let checks = host.plugins().checks();
    replace_file(&component, &good);
    // Once the registry has read the good build, and while it is being loaded, the file on
    // disk becomes broken: by the time the good build serves and its optimised compile starts,
    // the file holds the broken one. The good build must still get its optimised code, and the
    // rejection must stay on record.
    let deadline = Instant::now() + TIMEOUT;
    while host.plugins().checks() == checks {
        assert!(
            Instant::now() < deadline,
            "the good build was never looked at"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    replace_file(&component, b"not a component");
    let status = env
        .wait_plugin_status(&host_id, HANDLER, TIMEOUT, |s| {
            s["tier"] == "optimized"
                && s["state"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("rejected"))
        })
        .await
        .unwrap();
    assert_eq!(status["sha256"], sha256.as_str(), "{status}");
    let resource = put_scripted_job(&env, None).await;
    completed_output(&env, &resource).await;
    host.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A completion etcd would refuse (two writes to one record, more operations than a
/// transaction takes, a request over etcd's size limit) fails its job with a clear error and
/// frees the claim, instead of being retried until the job is stuck for good; the host
/// serves on. The scripted guest's copy here may put 4 MiB of output, so only etcd's own
/// limit stops the biggest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_etcd_would_refuse_fails_its_job_and_frees_the_claim() {
    let env = TestEnv::new().await.unwrap();
    let dir = plugin_dir_with_copies(&[test_plugin_dir()], &[HANDLER]);
    std::fs::write(
        dir.join(format!("{HANDLER}.toml")),
        "[plugin]\nhandlers = [\"scripted_worker\"]\n\n[capabilities]\nread = [\"/state/\"]\n\
         write = [\"/esi-worker/monitoring_targets/\"]\n\n[limits]\nmemory_mib = 64\n\
         max_output_kib = 4096\n",
    )
    .unwrap();
    let (host, host_id) = start_host(&env, dir).await;

    let target = |id: usize| format!("monitoring-target ha_interface t{id}");
    let cases = [
        (
            json!({"write": [target(1), target(2), target(1)]}),
            "proposed two writes to /esi-worker/monitoring_targets/",
        ),
        (
            json!({"write": (0..65).map(target).collect::<Vec<_>>()}),
            "proposed 65 writes; a completion may carry at most 64",
        ),
        (json!({"output_kib": 1536}), "etcd refused the transaction"),
    ];
    for (script, expected) in cases {
        let resource = put_scripted_job(&env, Some(script)).await;
        let error = wait_failed(&env, &resource).await;
        assert!(error.contains(expected), "{error}");
        // The failure freed the claim and ended the workflow: the job manager cleans it up.
        env.wait_jobs_drained().await.unwrap();
        let next = put_scripted_job(&env, None).await;
        assert_eq!(completed_output(&env, &next).await, json!({"attempts": 0}));
    }
    // None of the refused writes happened.
    for id in 0..65 {
        let key = env.key(Record::MonitoringTarget, "ha_interface", &format!("t{id}"));
        assert_eq!(env.store.get(&key).await.unwrap(), None, "{key}");
    }
    let status = env
        .wait_plugin_status(&host_id, HANDLER, TIMEOUT, |s| s["state"] == "active")
        .await
        .unwrap();
    assert_eq!(status["failures"]["output"], 2, "{status}");
    assert_eq!(status["failures"]["refused"], 1, "{status}");
    host.shutdown().await;
}

/// A plugin whose proposed write always conflicts (it expects a revision that never comes)
/// does not spin on its claim: each attempt ends after 100 conflicts in a row and counts as
/// failed, and the job fails for good after its attempts, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_proposed_write_always_conflicts_fails_after_its_attempts() {
    let env = TestEnv::new().await.unwrap();
    let (host, host_id) = start_host(&env, plugin_dir_with_test_guests()).await;
    let script = json!({"write_stale": "monitoring-target ha_interface stale"});
    let resource = put_scripted_job(&env, Some(script)).await;
    let error = wait_failed(&env, &resource).await;
    assert!(
        error.contains("conflicted 100 times in a row") && error.contains("gave up after 5"),
        "{error}"
    );
    let key = env.key(Record::MonitoringTarget, "ha_interface", "stale");
    assert_eq!(env.store.get(&key).await.unwrap(), None);
    let status = env
        .wait_plugin_status(&host_id, HANDLER, TIMEOUT, |s| {
            s["failures"]["conflict"] == 5
        })
        .await;
    assert!(status.is_ok(), "{status:?}");
    host.shutdown().await;
}
