//! Both code tiers keep the sandbox: the same hostile scripts get the same verdicts whether
//! the scripted guest was compiled by Cranelift (optimized) or by Winch (baseline, which
//! serves a new build during a hot reload until Cranelift's code is ready).

use std::sync::Arc;
use std::time::Duration;

use esi_host::plugins::bindings::esi::worker::types as wit;
use esi_host::plugins::compiler::ChildCompiler;
use esi_host::plugins::host_api::RecordAccess;
use esi_host::plugins::{CallError, Limits, LoadedPlugin, PluginEngine, PluginRegistry, Tier};
use esi_host::schema::SchemaRegistry;
use esi_tests::scripted::{HANDLER, TIMEOUT};
use esi_tests::{
    component_variant, host_binary, plugin_compiles, plugin_dir_with_copies, replace_file,
    test_plugin_dir, TestEnv,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn job(script: Value) -> wit::Job {
    wit::Job {
        id: "tier-test".into(),
        job_name: "tier-test".into(),
        handler: HANDLER.into(),
        action: "create".into(),
        resource_type: "ha_interface".into(),
        resource_id: "tier-test".into(),
        version: 1,
        is_first: true,
        is_last: true,
        dependency: vec![],
        on_failure: "fail".into(),
        params: vec![],
        resource_input: json!({"name": "tiers", "script": script}).to_string(),
        job_state: "{}".into(),
    }
}

async fn call(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
    access: &RecordAccess,
    script: Value,
) -> Result<Result<wit::Outcome, wit::JobError>, CallError> {
    let context = wit::RunContext {
        attempts: 0,
        reruns: 0,
        elapsed_ms: 0,
        config: "{}".into(),
    };
    engine
        .handle(
            plugin,
            access.clone(),
            &job(script),
            &context,
            &CancellationToken::new(),
        )
        .await
}

/// The verdicts every tier's code must get: a job completes, an infinite loop is stopped at
/// its deadline, a memory bomb and a deep recursion fail for good, and a trap leaves the next
/// call a fresh instance.
async fn the_sandbox_holds(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
    access: &RecordAccess,
    tier: Tier,
) {
    let done = call(engine, plugin, access, json!({"output_kib": 1})).await;
    assert!(
        matches!(done, Ok(Ok(wit::Outcome::Completed(_)))),
        "{tier:?}: {done:?}"
    );
    // An infinite loop is stopped at its deadline by epoch interruption.
    let spun = call(engine, plugin, access, json!({"spin": true})).await;
    assert!(
        matches!(spun, Err(CallError::Deadline { .. })),
        "{tier:?}: {spun:?}"
    );
    // The manifest caps memory at 32 MiB: a 64 MiB bomb is a permanent memory failure.
    let bomb = call(engine, plugin, access, json!({"allocate_mib": 64})).await;
    assert!(
        matches!(&bomb, Err(e @ CallError::Memory { .. }) if e.is_permanent()),
        "{tier:?}: {bomb:?}"
    );
    let deep = call(engine, plugin, access, json!({"recurse": 100_000_000})).await;
    assert!(
        matches!(deep, Err(CallError::StackOverflow { .. })),
        "{tier:?}: {deep:?}"
    );
    // The instance after a trap is gone; the next call gets a fresh one and completes.
    let trapped = call(engine, plugin, access, json!({"trap": true})).await;
    assert!(
        matches!(trapped, Err(CallError::Trap { .. })),
        "{tier:?}: {trapped:?}"
    );
    let again = call(engine, plugin, access, json!({"output_kib": 1})).await;
    assert!(
        matches!(again, Ok(Ok(wit::Outcome::Completed(_)))),
        "{tier:?}: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_and_optimized_code_get_the_same_verdicts() {
    let env = TestEnv::new().await.unwrap();
    let limits = Limits {
        call_deadline: Duration::from_millis(300),
        max_memory_bytes: 128 << 20,
        max_instances: 8,
    };
    let engine = PluginEngine::new(limits, None).unwrap();
    let access = RecordAccess::new(env.store.clone(), Arc::new(SchemaRegistry::built_in()));
    let path = test_plugin_dir().join(format!("{HANDLER}.wasm"));
    for tier in [Tier::Baseline, Tier::Optimized] {
        let plugin = engine.load_tier(&path, tier).await.unwrap();
        assert_eq!(plugin.tier, tier);

        the_sandbox_holds(&engine, &plugin, &access, tier).await;
    }
}

/// A new build serves from baseline code while Cranelift compiles it. If its manifest is
/// replaced meanwhile (a swap renames the component, then the manifest), the optimised code
/// of the first load must not bring the old manifest back once it is ready: the build must
/// end up optimised under the manifest on disk. (A hot-reload test in CI once ended on the
/// old version this way.) The fix is a compare under the reload lock, so the test passes
/// whatever the timing; it catches the bug when Cranelift finishes after the second reload,
/// which its compile time makes the usual case (it failed on the first run before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_replaced_while_its_build_compiles_is_not_undone_by_the_optimised_code() {
    let dir = plugin_dir_with_copies(&[test_plugin_dir()], &[HANDLER]);
    let component = dir.join(format!("{HANDLER}.wasm"));
    let manifest = dir.join(format!("{HANDLER}.toml"));
    let original = std::fs::read(&component).unwrap();
    let base = std::fs::read_to_string(&manifest).unwrap();
    let with_version =
        |n: u32| base.replace("[plugin]\n", &format!("[plugin]\nversion = \"2.0.{n}\"\n"));
    let engine = Arc::new(PluginEngine::new(Limits::default(), None).unwrap());
    let registry = Arc::new(PluginRegistry::load_dir(engine, &dir).await.unwrap());
    let shutdown = CancellationToken::new();
    for build in 1..=3u32 {
        // The new build, under the previous manifest: baseline code, its optimisation starts.
        replace_file(&component, &component_variant(&original, build));
        registry.reload_fast(HANDLER, &shutdown).await;
        // The new manifest, before that optimisation is ready.
        replace_file(&manifest, with_version(build).as_bytes());
        registry.reload_fast(HANDLER, &shutdown).await;
        let version = format!("2.0.{build}");
        assert_eq!(registry.get(HANDLER).unwrap().version, version);
        let deadline = std::time::Instant::now() + TIMEOUT;
        let optimized = loop {
            let serving = registry.get(HANDLER).unwrap();
            let recorded = registry
                .status(HANDLER)
                .is_some_and(|s| s.tier == "optimized");
            if serving.tier == Tier::Optimized && recorded {
                break serving;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "build {build} never got optimised code"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(
            optimized.version, version,
            "build {build}: the old manifest came back"
        );
        let status = registry.status(HANDLER).unwrap();
        assert_eq!(
            (status.version.as_str(), status.tier.as_str()),
            (version.as_str(), "optimized")
        );
    }
    shutdown.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `esi-host run` compiles new builds in child processes of its own executable: the code
/// they write must be code this engine runs, under the same limits, with limits other than
/// the defaults (the pool's sizes are part of the engine's configuration). The optimised code
/// becomes a compile cache entry, with no partial file left beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_compiled_in_a_child_process_runs_under_the_same_sandbox() {
    let env = TestEnv::new().await.unwrap();
    let limits = Limits {
        call_deadline: Duration::from_millis(300),
        max_memory_bytes: 96 << 20,
        max_instances: 6,
    };
    let cache = tempfile::tempdir().unwrap();
    let engine = PluginEngine::new(limits, Some(cache.path()))
        .unwrap()
        .with_child_compiler(ChildCompiler::new(host_binary()));
    let access = RecordAccess::new(env.store.clone(), Arc::new(SchemaRegistry::built_in()));
    let path = test_plugin_dir().join(format!("{HANDLER}.wasm"));
    for tier in [Tier::Baseline, Tier::Optimized] {
        let before = plugin_compiles(tier, "child");
        let plugin = engine.load_tier(&path, tier).await.unwrap();
        assert_eq!(plugin.tier, tier);
        assert_eq!(plugin_compiles(tier, "child"), before + 1, "{tier:?}");
        the_sandbox_holds(&engine, &plugin, &access, tier).await;
    }
    let files: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with(".cwasm"), "{files:?}");

    // From the cache: no compile at all.
    let before = plugin_compiles(Tier::Optimized, "child");
    let cached = engine.load_tier(&path, Tier::Optimized).await.unwrap();
    assert_eq!(plugin_compiles(Tier::Optimized, "child"), before);
    let done = call(&engine, &cached, &access, json!({"output_kib": 1})).await;
    assert!(
        matches!(done, Ok(Ok(wit::Outcome::Completed(_)))),
        "{done:?}"
    );
}
