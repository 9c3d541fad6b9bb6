//! Both code tiers keep the sandbox: the same hostile scripts get the same verdicts whether
//! the scripted guest was compiled by Cranelift (optimized) or by Winch (baseline, which
//! serves a new build during a hot reload until Cranelift's code is ready).

use std::sync::Arc;
use std::time::Duration;

use esi_host::plugins::bindings::esi::worker::types as wit;
use esi_host::plugins::host_api::RecordAccess;
use esi_host::plugins::{CallError, Limits, LoadedPlugin, PluginEngine, Tier};
use esi_host::schema::SchemaRegistry;
use esi_tests::scripted::HANDLER;
use esi_tests::{test_plugin_dir, TestEnv};
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

        let done = call(&engine, &plugin, &access, json!({"output_kib": 1})).await;
        assert!(
            matches!(done, Ok(Ok(wit::Outcome::Completed(_)))),
            "{tier:?}: {done:?}"
        );
        // An infinite loop is stopped at its deadline by epoch interruption.
        let spun = call(&engine, &plugin, &access, json!({"spin": true})).await;
        assert!(
            matches!(spun, Err(CallError::Deadline { .. })),
            "{tier:?}: {spun:?}"
        );
        // The manifest caps memory at 32 MiB: a 64 MiB bomb is a permanent memory failure.
        let bomb = call(&engine, &plugin, &access, json!({"allocate_mib": 64})).await;
        assert!(
            matches!(&bomb, Err(e @ CallError::Memory { .. }) if e.is_permanent()),
            "{tier:?}: {bomb:?}"
        );
        let deep = call(&engine, &plugin, &access, json!({"recurse": 100_000_000})).await;
        assert!(
            matches!(deep, Err(CallError::StackOverflow { .. })),
            "{tier:?}: {deep:?}"
        );
        // The instance after a trap is gone; the next call gets a fresh one and completes.
        let trapped = call(&engine, &plugin, &access, json!({"trap": true})).await;
        assert!(
            matches!(trapped, Err(CallError::Trap { .. })),
            "{tier:?}: {trapped:?}"
        );
        let again = call(&engine, &plugin, &access, json!({"output_kib": 1})).await;
        assert!(
            matches!(again, Ok(Ok(wit::Outcome::Completed(_)))),
            "{tier:?}: {again:?}"
        );
    }
}
