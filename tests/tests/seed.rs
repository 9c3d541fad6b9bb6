//! "Create Ha Interface" end to end: the seed's records appear exactly, on a real etcd, with the
//! real monitoring component.

use std::time::Duration;

use esi_host::keys::{Queue, Record};
use esi_host::seed::{self, HA_INTERFACE_ID};
use esi_tests::TestEnv;
use serde_json::{json, Value};

/// Seed record (1) with its body as an object (as the seed shows it) or as a JSON string (as
/// gohan stores it).
fn seed_config(body_as_string: bool) -> String {
    let mut record = seed::records().unwrap()[0].value.clone();
    if body_as_string {
        record["body"] = Value::String(record["body"].to_string());
    }
    record.to_string()
}

/// Replaces the 5-character random suffix of a job id, in the key and in the record.
fn without_suffix(id: &str) -> String {
    let (head, suffix) = id.rsplit_once(':').expect("job id has a suffix");
    assert_eq!(suffix.len(), 5, "suffix of {id}");
    assert!(
        suffix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "suffix of {id}"
    );
    format!("{head}:<suffix>")
}

async fn seed_flow_matches_the_seed(body_as_string: bool) {
    let env = TestEnv::new().await.unwrap();
    env.load_seed_world().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let host = env.start_host().await.unwrap();

    env.put_config_raw(
        "ha_interface",
        HA_INTERFACE_ID,
        &seed_config(body_as_string),
    )
    .await
    .unwrap();
    let state = env
        .wait_completed("ha_interface", HA_INTERFACE_ID)
        .await
        .unwrap();
    env.wait_jobs_drained().await.unwrap();

    // Everything up to the /state put is in the recorder's history.
    let state_key = env.key(Record::State, "ha_interface", HA_INTERFACE_ID);
    recorder
        .until_put(&state_key, Duration::from_secs(10))
        .await
        .unwrap();
    let seed = seed::records().unwrap();
    // (2) the job, equal to the seed's but for the random suffix.
    let jobs = recorder.puts_under(&env.job_key(Queue::All, ""));
    assert_eq!(jobs.len(), 1, "exactly one job record written: {jobs:?}");
    let (job_key, mut job) = jobs[0].clone();
    let mut expected_job = seed[1].value.clone();
    let seed_key = seed[1].key.clone();
    assert_eq!(
        without_suffix(&job_key),
        without_suffix(&env.job_key(Queue::All, seed_key.trim_start_matches("/jobs/all/")))
    );
    for j in [&mut job, &mut expected_job] {
        let id = j[1]["id"].as_str().unwrap().to_string();
        j[1]["id"] = Value::String(without_suffix(&id));
    }
    assert_eq!(job, expected_job);

    // (3) the job state while the workflow ran, captured by the watch.
    let job_state_key = env.key(Record::JobState, "ha_interface", HA_INTERFACE_ID);
    let job_states = recorder.puts_under(&job_state_key);
    assert_eq!(
        job_states.last().map(|(_, v)| v.clone()),
        Some(seed[2].value.clone())
    );

    // (4) the state.
    assert_eq!(state, seed[3].value);

    // Nothing left behind.
    assert!(env.job_keys().await.unwrap().is_empty());
    assert_eq!(env.get_json(&job_state_key).await.unwrap(), None);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_records_appear_exactly_with_body_as_object() {
    seed_flow_matches_the_seed(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_records_appear_exactly_with_body_as_json_string() {
    seed_flow_matches_the_seed(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_secondary_interface_is_reported_down() {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates().await.unwrap();
    env.put_interface_states(Some("ACTIVE"), Some("DOWN"))
        .await
        .unwrap();
    let host = env.start_host().await.unwrap();
    env.put_config_raw("ha_interface", HA_INTERFACE_ID, &seed_config(true))
        .await
        .unwrap();
    let state = env
        .wait_completed("ha_interface", HA_INTERFACE_ID)
        .await
        .unwrap();
    assert_eq!(
        state["state"]["state_monitoring"],
        json!("{\"primary\": \"ACTIVE\", \"secondary\": \"DOWN\"}")
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interface_state_that_appears_later_is_waited_for() {
    let env = TestEnv::new().await.unwrap();
    // The shipped template with a 1 s re-check interval taken from the template props.
    env.put_ha_interface_template_retrying_every("1")
        .await
        .unwrap();
    env.put_interface_states(Some("ACTIVE"), None)
        .await
        .unwrap();
    let host = env.start_host().await.unwrap();
    env.put_config_raw("ha_interface", HA_INTERFACE_ID, &seed_config(true))
        .await
        .unwrap();

    tokio::time::sleep(Duration::from_secs(3)).await;
    let state_key = env.key(Record::State, "ha_interface", HA_INTERFACE_ID);
    assert_eq!(
        env.get_json(&state_key).await.unwrap(),
        None,
        "still waiting for the secondary"
    );
    env.put_interface_states(None, Some("ACTIVE"))
        .await
        .unwrap();
    let state = env
        .wait_completed("ha_interface", HA_INTERFACE_ID)
        .await
        .unwrap();
    assert_eq!(state, seed::records().unwrap()[3].value);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_written_while_no_host_ran_is_picked_up_on_start() {
    let env = TestEnv::new().await.unwrap();
    env.load_seed_world().await.unwrap();
    env.put_config_raw("ha_interface", HA_INTERFACE_ID, &seed_config(false))
        .await
        .unwrap();
    let host = env.start_host().await.unwrap();
    let state = env
        .wait_completed("ha_interface", HA_INTERFACE_ID)
        .await
        .unwrap();
    assert_eq!(state, seed::records().unwrap()[3].value);
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}
