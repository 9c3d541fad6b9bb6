//! Helpers for tests that run jobs in the `scripted_worker` test guest: a host with short
//! deadlines and backoffs, one-job workflows following a script, and reading their outcome.

use std::path::PathBuf;
use std::time::Duration;

use esi_host::{Host, HostConfig};
use serde_json::{json, Value};

use crate::{job_record, TestEnv};

pub const HANDLER: &str = "scripted_worker";
pub const RESOURCE_TYPE: &str = "ha_router";
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a host serving the plugins in `plugin_dir` with a 300 ms call deadline, quick
/// retries and no compile cache; returns it and its host id.
pub async fn start_host(env: &TestEnv, plugin_dir: PathBuf) -> (Host, String) {
    let mut config: HostConfig = env.host_config();
    config.plugin_dir = plugin_dir;
    config.limits.call_deadline = Duration::from_millis(300);
    config.worker.retry_backoff = Duration::from_millis(20);
    config.worker.retry_backoff_max = Duration::from_millis(50);
    config.compile_cache = None;
    let host_id = config.host_id.clone();
    (Host::start(config).await.unwrap(), host_id)
}

/// Writes a one-job workflow following `script` (`None`: just complete); returns its resource.
pub async fn put_scripted_job(env: &TestEnv, script: Option<Value>) -> String {
    let resource = uuid::Uuid::new_v4().to_string();
    let mut input = json!({"id": resource, "name": "sandboxed"});
    if let Some(script) = script {
        input["script"] = script;
    }
    let (id, record) = job_record(
        HANDLER,
        "create",
        RESOURCE_TYPE,
        &resource,
        1,
        true,
        true,
        &[],
        "fail",
        input,
    );
    env.put_job(&id, &record, true).await.unwrap();
    resource
}

/// Waits for `resource` to fail; returns its error.
pub async fn wait_failed(env: &TestEnv, resource: &str) -> String {
    let state = env
        .wait_for_state(RESOURCE_TYPE, resource, TIMEOUT, |s| {
            s["state"]["worker_state"] == "CREATE_FAILED"
        })
        .await
        .unwrap();
    state["error"].as_str().unwrap_or_default().to_string()
}

/// The `scripted` output of a completed job (a JSON string in `/state`, like every job-state
/// field).
pub async fn completed_output(env: &TestEnv, resource: &str) -> Value {
    let state = env.wait_completed(RESOURCE_TYPE, resource).await.unwrap();
    let text = state["state"]["scripted"]
        .as_str()
        .unwrap_or_else(|| panic!("no scripted output in {state}"));
    serde_json::from_str(text).unwrap()
}
