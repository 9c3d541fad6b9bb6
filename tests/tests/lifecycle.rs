//! A resource's whole life: create, modify (version bump), logical delete, deletion.

use std::time::Duration;

use esi_host::keys::{Queue, Record};
use esi_host::seed::{self, PRIMARY_INTERFACE_ID, PRIMARY_ROUTER_ID};
use esi_host::store::Change;
use esi_tests::{seed_ha_interface_body, TestEnv};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_modify_logical_delete_and_delete_each_reach_state() {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates().await.unwrap();
    let chain = seed::chain().unwrap();
    let router = chain.iter().find(|r| r.id == PRIMARY_ROUTER_ID).unwrap();
    let interface = chain.iter().find(|r| r.id == PRIMARY_INTERFACE_ID).unwrap();
    env.put_config(router.resource_type, &router.id, &router.body, 1)
        .await
        .unwrap();
    let host = env.start_host().await.unwrap();
    let kind = "er_physical_interface";
    let target_key = env.key(Record::MonitoringTarget, kind, PRIMARY_INTERFACE_ID);

    env.put_config(kind, PRIMARY_INTERFACE_ID, &interface.body, 1)
        .await
        .unwrap();
    let created = env
        .wait_completed(kind, PRIMARY_INTERFACE_ID)
        .await
        .unwrap();
    assert_eq!(created["state"]["worker_state"], "CREATE_COMPLETED");
    let target = env
        .get_json(&target_key)
        .await
        .unwrap()
        .expect("target after create");
    assert_eq!(target["interface"]["properties"]["name"], "xe-0/0/1");
    env.wait_jobs_drained().await.unwrap();

    // Modify: the monitoring is torn down (on_failure ignore) and set up again.
    let mut recorder = env.record_changes().await.unwrap();
    let mut renamed = interface.body.clone();
    renamed["name"] = json!("xe-0/0/9");
    env.put_config(kind, PRIMARY_INTERFACE_ID, &renamed, 2)
        .await
        .unwrap();
    let modified = env
        .wait_for_state(kind, PRIMARY_INTERFACE_ID, Duration::from_secs(60), |s| {
            s["version"] == 2
        })
        .await
        .unwrap();
    assert_eq!(modified["state"]["worker_state"], "MODIFY_COMPLETED");
    assert_eq!(modified["error"], "");
    let state_key = env.key(Record::State, kind, PRIMARY_INTERFACE_ID);
    recorder
        .until_put(&state_key, Duration::from_secs(10))
        .await
        .unwrap();
    let jobs: Vec<Value> = recorder
        .puts_under(&env.job_key(Queue::All, ""))
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let actions: Vec<(&str, &str)> = jobs
        .iter()
        .map(|j| {
            (
                j[1]["action"].as_str().unwrap(),
                j[1]["on_failure"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(actions, [("delete", "ignore"), ("create", "fail")]);
    assert_eq!(jobs[1][1]["dependency"], json!([jobs[0][1]["id"]]));
    let target = env
        .get_json(&target_key)
        .await
        .unwrap()
        .expect("target after modify");
    assert_eq!(target["interface"]["properties"]["name"], "xe-0/0/9");
    env.wait_jobs_drained().await.unwrap();

    // Logical delete: gohan marks the resource and bumps its version.
    let marked = json!({"body": renamed.to_string(), "version": 3, "marked_for_deletion": true});
    env.put_config_raw(kind, PRIMARY_INTERFACE_ID, &marked.to_string())
        .await
        .unwrap();
    let deleted = env
        .wait_for_state(kind, PRIMARY_INTERFACE_ID, Duration::from_secs(60), |s| {
            s["version"] == 3
        })
        .await
        .unwrap();
    assert_eq!(deleted["state"]["worker_state"], "LOGICAL_DELETE_COMPLETED");
    assert_eq!(
        env.get_json(&target_key).await.unwrap(),
        None,
        "monitoring target removed"
    );
    env.wait_jobs_drained().await.unwrap();

    // gohan deletes the config: the worker's records for it go too.
    env.store
        .delete(&env.key(Record::Config, kind, PRIMARY_INTERFACE_ID))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while env.get_json(&state_key).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "state of a deleted config was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    host.shutdown().await;
}

/// A config whose key is new is planned as a create without reading the resource's
/// `/state` first, in a transaction that writes it only while there is none. A resource that
/// has a `/state` all the same (its config was deleted and written again, or the `/state` was
/// restored) is planned from it: a config at the `/state`'s version needs nothing, a newer
/// one a modify. No create job is ever written for either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_config_key_of_a_resource_with_a_state_is_planned_from_the_state() {
    let env = TestEnv::new().await.unwrap();
    env.load_seed_world().await.unwrap();
    let host = env.start_host().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let kind = "ha_interface";
    let (current, behind) = (
        "00000000-0000-4000-8000-0000000aa001",
        "00000000-0000-4000-8000-0000000aa002",
    );
    let up = json!({"primary": "ACTIVE", "secondary": "ACTIVE"});
    for id in [current, behind] {
        env.put_monitoring_state(kind, id, &up).await.unwrap();
    }
    let current_state = env.key(Record::State, kind, current);
    let before = env.get_json(&current_state).await.unwrap().unwrap();
    // Written in this order, and the job manager plans configs in the order they come: by
    // the time `behind` is done, `current` had its chance to be (wrongly) created.
    env.put_config(kind, current, &seed_ha_interface_body(current), 1)
        .await
        .unwrap();
    env.put_config(kind, behind, &seed_ha_interface_body(behind), 2)
        .await
        .unwrap();
    let modified = env
        .wait_for_state(kind, behind, Duration::from_secs(60), |s| s["version"] == 2)
        .await
        .unwrap();
    assert_eq!(modified["state"]["worker_state"], "MODIFY_COMPLETED");
    env.wait_jobs_drained().await.unwrap();
    let jobs: Vec<(String, String)> = recorder
        .for_a_while(Duration::from_millis(300))
        .await
        .iter()
        .filter_map(|change| match change {
            esi_host::store::Change::Put(kv) => Some(kv),
            _ => None,
        })
        .filter(|kv| kv.key.starts_with(&env.job_key(Queue::All, "")))
        .map(|kv| {
            let job: Value = serde_json::from_slice(&kv.value).unwrap();
            let field = |name: &str| job[1][name].as_str().unwrap().to_string();
            (field("resource_id"), field("action"))
        })
        .collect();
    let expected = [(behind, "delete"), (behind, "create")]
        .map(|(id, action)| (id.to_string(), action.to_string()));
    assert_eq!(jobs, expected, "jobs written");
    let after = env.get_json(&current_state).await.unwrap().unwrap();
    assert_eq!(
        after, before,
        "the /state of a resource with nothing to do changed"
    );
    host.shutdown().await;
}

/// gohan deletes a resource and creates it again under the same id while the first life's
/// create job still waits for a worker. Once that workflow ends, the first life's records go,
/// as after any delete, and the second life gets a create of its own. (Before, the manager
/// planned the new config from the old `/state`, whose version was the new config's, and did
/// nothing: the resource created again never ran.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_deleted_and_created_again_while_its_workflow_runs_gets_its_own_create() {
    let env = TestEnv::new().await.unwrap();
    env.load_seed_world().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    // A manager without plugins: the create job waits in ready until a worker starts.
    let manager = env.start_manager_only().await.unwrap();
    let (kind, id) = ("ha_interface", "00000000-0000-4000-8000-0000000ab001");
    let config = env.key(Record::Config, kind, id);
    env.put_config(kind, id, &seed_ha_interface_body(id), 1)
        .await
        .unwrap();
    let ready = env.job_key(Queue::Ready, "");
    recorder
        .until(
            Duration::from_secs(20),
            |c| matches!(c, Change::Put(kv) if kv.key.starts_with(&ready)),
        )
        .await
        .unwrap();
    env.store.delete(&config).await.unwrap();
    env.put_config(kind, id, &seed_ha_interface_body(id), 1)
        .await
        .unwrap();
    // Both config events reach the manager while the job waits. It plans nothing for them;
    // a config of another resource, written after them, shows when it has: the manager
    // handles its watch in order, so once that one's job is ready, it has seen both.
    let marker = "00000000-0000-4000-8000-0000000ab002";
    env.put_config(kind, marker, &seed_ha_interface_body(marker), 1)
        .await
        .unwrap();
    recorder
        .until(Duration::from_secs(20), |c| {
            matches!(c, Change::Put(kv) if kv.key.starts_with(&ready) && kv.key.contains(marker))
        })
        .await
        .unwrap();

    let worker = esi_host::Host::start(env.worker_only_config())
        .await
        .unwrap();
    let state = env.key(Record::State, kind, id);
    let puts = |recorder: &esi_tests::Recorder| {
        recorder
            .puts_under(&state)
            .into_iter()
            .filter(|(key, _)| *key == state)
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while puts(&recorder) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the resource created again never got its create: {} /state puts",
            puts(&recorder)
        );
        recorder.for_a_while(Duration::from_millis(100)).await;
    }
    // First life completed, its /state deleted, second life completed.
    let lives: Vec<&str> = recorder
        .for_a_while(Duration::from_millis(100))
        .await
        .iter()
        .filter_map(|change| match change {
            Change::Put(kv) if kv.key == state => Some("put"),
            Change::Delete { key, .. } if *key == state => Some("delete"),
            _ => None,
        })
        .collect();
    assert_eq!(lives, ["put", "delete", "put"]);
    let last = env.wait_completed(kind, id).await.unwrap();
    assert_eq!(last["state"]["worker_state"], "CREATE_COMPLETED", "{last}");
    worker.shutdown().await;
    manager.shutdown().await;
}
