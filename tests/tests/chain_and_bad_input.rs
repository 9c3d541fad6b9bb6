//! A whole resource chain converging in any order, and bad input that must not stop the host.

use esi_host::keys::{Queue, Record};
use esi_host::seed::{self, HA_INTERFACE_ID, PRIMARY_INTERFACE_ID};
use esi_host::store::jobs::ETCD_DEFAULT_MAX_REQUEST_BYTES;
use esi_tests::{job_record, plugin_dir_with_test_guests, seed_ha_interface_body, TestEnv};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_created_in_reverse_order_converges() {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates().await.unwrap();
    let host = env.start_host().await.unwrap();
    let chain = seed::chain().unwrap();
    // The ha_interface first, the edge routers last: every resource waits for what it needs.
    for r in chain.iter().rev() {
        env.put_config(r.resource_type, &r.id, &r.body, 1)
            .await
            .unwrap();
    }
    for r in &chain {
        let state = env.wait_completed(r.resource_type, &r.id).await.unwrap();
        assert_eq!(state["version"], 1, "{}", r.id);
        let monitoring: Value =
            serde_json::from_str(state["state"]["state_monitoring"].as_str().unwrap()).unwrap();
        let expected = match r.resource_type {
            "edge_router" => json!({"router": "ACTIVE"}),
            "er_physical_interface" => json!({"interface": "ACTIVE"}),
            _ => json!({"primary": "ACTIVE", "secondary": "ACTIVE"}),
        };
        assert_eq!(monitoring, expected, "{} {}", r.resource_type, r.id);
    }
    // Device probes became monitoring targets for the collectors.
    let target = env
        .get_json(&env.key(
            Record::MonitoringTarget,
            "er_physical_interface",
            PRIMARY_INTERFACE_ID,
        ))
        .await
        .unwrap()
        .expect("monitoring target of the primary interface");
    assert_eq!(target["interface"]["type"], "physical_port");
    assert_eq!(target["interface"]["properties"]["device_ip"], "192.0.2.11");
    assert_eq!(target["interface"]["properties"]["name"], "xe-0/0/1");
    assert_eq!(target["interface"]["tenant_id"], seed::TENANT_ID);
    let router = env
        .get_json(&env.key(
            Record::MonitoringTarget,
            "edge_router",
            seed::PRIMARY_ROUTER_ID,
        ))
        .await
        .unwrap()
        .expect("monitoring target of the primary edge router");
    assert_eq!(
        router["router"]["properties"]["community_name"],
        "EDGE_ROUTER_COMMUNITY"
    );
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}

/// The seed's ha_interface with both interfaces up, used to prove the host still works.
async fn a_good_resource_still_completes(env: &TestEnv) {
    env.put_interface_states(Some("ACTIVE"), Some("ACTIVE"))
        .await
        .unwrap();
    let seed = seed::records().unwrap();
    env.put_config_raw("ha_interface", HA_INTERFACE_ID, &seed[0].value.to_string())
        .await
        .unwrap();
    let state = env
        .wait_completed("ha_interface", HA_INTERFACE_ID)
        .await
        .unwrap();
    assert_eq!(state, seed[3].value);
}

async fn wait_failed(env: &TestEnv, resource_type: &str, id: &str) -> Value {
    env.wait_for_state(resource_type, id, std::time::Duration::from_secs(30), |s| {
        s["state"]["worker_state"]
            .as_str()
            .is_some_and(|w| w.ends_with("_FAILED"))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_whose_body_is_not_json_fails_with_key_and_field_named() {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates().await.unwrap();
    let host = env.start_host().await.unwrap();
    let bad_id = "0f0f0f0f-0000-4000-8000-000000000001";
    env.put_config_raw(
        "ha_interface",
        bad_id,
        r#"{"body": "{this is not json", "version": 4}"#,
    )
    .await
    .unwrap();
    let state = wait_failed(&env, "ha_interface", bad_id).await;
    let error = state["error"].as_str().unwrap();
    assert!(
        error.contains(&env.key(Record::Config, "ha_interface", bad_id)),
        "{error}"
    );
    assert!(error.contains("\"body\""), "{error}");
    assert_eq!(state["state"]["worker_state"], "CREATE_FAILED");
    assert_eq!(state["version"], 4);
    a_good_resource_still_completes(&env).await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_whose_yaml_does_not_parse_fails_the_resource() {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates().await.unwrap();
    env.put_template(
        "ha_router_monitoring",
        "monitoring_worker",
        "primary: [unclosed\n  type: etcd_reader\n",
        json!({}),
    )
    .await
    .unwrap();
    let host = env.start_host().await.unwrap();
    let router = seed::chain()
        .unwrap()
        .into_iter()
        .find(|r| r.resource_type == "ha_router")
        .unwrap();
    env.put_config(router.resource_type, &router.id, &router.body, 1)
        .await
        .unwrap();
    let state = wait_failed(&env, "ha_router", &router.id).await;
    let error = state["error"].as_str().unwrap();
    assert!(error.contains("ha_router_monitoring"), "{error}");
    assert!(error.contains("YAML"), "{error}");
    env.wait_jobs_drained().await.unwrap();
    a_good_resource_still_completes(&env).await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_record_with_a_missing_field_fails_its_resource() {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates().await.unwrap();
    let host = env.start_host().await.unwrap();
    let resource = "0f0f0f0f-0000-4000-8000-000000000002";
    let id = format!("create:monitoring_worker:ha_interface:{resource}:1:abcde");
    // A job array whose job object lacks `resource_id` (and more).
    let record = json!(["monitoring_worker", {"id": id, "handler": "monitoring_worker", "action": "create"}, 0]);
    env.store
        .put(&env.job_key(Queue::All, &id), record.to_string())
        .await
        .unwrap();
    env.store
        .put(&env.job_key(Queue::Ready, &id), "monitoring_worker")
        .await
        .unwrap();
    let state = wait_failed(&env, "ha_interface", resource).await;
    let error = state["error"].as_str().unwrap();
    assert!(error.contains(&env.job_key(Queue::All, &id)), "{error}");
    assert!(error.contains("missing field"), "{error}");
    assert_eq!(state["state"]["worker_state"], "CREATE_FAILED");
    env.wait_jobs_drained().await.unwrap();
    a_good_resource_still_completes(&env).await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_naming_an_unknown_handler_fails_the_resource() {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates().await.unwrap();
    env.put_template(
        "ha_router_monitoring",
        "nobody_serves_this",
        "x:\n  type: router\n",
        json!({}),
    )
    .await
    .unwrap();
    let host = env.start_host().await.unwrap();
    let router = seed::chain()
        .unwrap()
        .into_iter()
        .find(|r| r.resource_type == "ha_router")
        .unwrap();
    env.put_config(router.resource_type, &router.id, &router.body, 1)
        .await
        .unwrap();
    let state = wait_failed(&env, "ha_router", &router.id).await;
    let error = state["error"].as_str().unwrap();
    assert!(error.contains("nobody_serves_this"), "{error}");
    assert!(error.contains("ha_router_monitoring"), "{error}");
    assert!(
        env.job_keys().await.unwrap().is_empty(),
        "no job nobody would claim"
    );
    a_good_resource_still_completes(&env).await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_without_any_template_is_read_complete() {
    let env = TestEnv::new().await.unwrap();
    let host = env.start_host().await.unwrap();
    env.put_config(
        "location",
        "loc-1",
        &json!({"id": "loc-1", "name": "dc1"}),
        3,
    )
    .await
    .unwrap();
    let state = env
        .wait_for_state(
            "location",
            "loc-1",
            std::time::Duration::from_secs(30),
            |_| true,
        )
        .await
        .unwrap();
    assert_eq!(
        state,
        json!({"state": {"worker_state": "READ_COMPLETE"}, "version": 3, "error": ""})
    );
    host.shutdown().await;
}

/// A config so big that its workflow would not fit one etcd transaction (each of its two
/// job records carries the body) fails with its key and size named, instead of being refused
/// by etcd on every try, which stopped every workflow planned after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_too_big_for_its_workflow_fails_and_the_resources_after_it_go_on() {
    let env = TestEnv::new().await.unwrap();
    // 800 KB: the config fits etcd's 1.5 MiB request limit, two job records do not.
    let error = big_then_small_ha_interface(&env, 800_000, ETCD_DEFAULT_MAX_REQUEST_BYTES).await;
    assert!(
        error.contains("2 job records")
            && error.contains("over the 1399792 bytes")
            && error.contains("etcd_max_request_bytes, 1572864"),
        "{error}"
    );
}

/// Puts an ha_interface whose body carries `padding` more bytes, then a normal one, on a
/// [`host_with_two_job_workflows`]. The first must fail naming its config key, the second
/// complete; returns the first's error.
async fn big_then_small_ha_interface(
    env: &TestEnv,
    padding: usize,
    max_request_bytes: usize,
) -> String {
    let host = host_with_two_job_workflows(env, max_request_bytes).await;

    let big_id = "0f0f0f0f-0000-4000-8000-000000000009";
    let mut body = seed_ha_interface_body(big_id);
    body["description"] = json!("x".repeat(padding));
    env.put_config("ha_interface", big_id, &body, 1)
        .await
        .unwrap();
    let small_id = "0f0f0f0f-0000-4000-8000-00000000000a";
    env.put_config(
        "ha_interface",
        small_id,
        &seed_ha_interface_body(small_id),
        1,
    )
    .await
    .unwrap();

    let state = wait_failed(env, "ha_interface", big_id).await;
    assert_eq!(state["state"]["worker_state"], "CREATE_FAILED");
    let error = state["error"].as_str().unwrap().to_string();
    assert!(
        error.contains(&env.key(Record::Config, "ha_interface", big_id)),
        "{error}"
    );
    let state = env.wait_completed("ha_interface", small_id).await.unwrap();
    assert_eq!(state["state"]["worker_state"], "CREATE_COMPLETED");
    host.shutdown().await;
    error
}

/// A host (told etcd's request limit is `max_request_bytes`) where each ha_interface's
/// workflow has two jobs (monitoring, then the scripted guest), with the seed's interfaces
/// up.
async fn host_with_two_job_workflows(env: &TestEnv, max_request_bytes: usize) -> esi_host::Host {
    env.load_seed_world().await.unwrap();
    env.put_template(
        "ha_interface_scripted_worker",
        "scripted_worker",
        "",
        json!({}),
    )
    .await
    .unwrap();
    let mut config = env.host_config();
    config.plugin_dir = plugin_dir_with_test_guests();
    config.etcd_max_request_bytes = max_request_bytes;
    esi_host::Host::start(config).await.unwrap()
}

/// A heat template that does not parse fails the resources that need it, naming the
/// template's key and field, instead of reading as "no template" (READ_COMPLETE); fixed, it
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_does_not_parse_fails_the_resources_needing_it() {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates().await.unwrap();
    let host = env.start_host().await.unwrap();
    let broken = json!({"id": "ha_interface_monitoring", "watch": [], "template_file": ""});
    env.put_config("heat_template", "ha_interface_monitoring", &broken, 2)
        .await
        .unwrap();
    let id = "0f0f0f0f-0000-4000-8000-00000000000b";
    // The manager follows templates and resources with one watch: in the order written.
    env.put_config("ha_interface", id, &seed_ha_interface_body(id), 1)
        .await
        .unwrap();
    let state = wait_failed(&env, "ha_interface", id).await;
    let error = state["error"].as_str().unwrap();
    assert!(
        error.contains(&env.key(Record::Config, "ha_interface", id))
            && error.contains(&env.key(Record::Config, "heat_template", "ha_interface_monitoring"))
            && error.contains("body.handler"),
        "{error}"
    );
    env.load_shipped_templates_named(&["ha_interface_monitoring"])
        .await
        .unwrap();
    a_good_resource_still_completes(&env).await;
    host.shutdown().await;
}

/// A resource whose template walks to a related resource whose config does not parse fails
/// naming that config's key and field, instead of waiting for it without a `/state`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_related_config_that_does_not_parse_fails_the_resource_walking_to_it() {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates().await.unwrap();
    let host = env.start_host().await.unwrap();
    let router = "0f0f0f0f-0000-4000-8000-00000000000c";
    env.put_config_raw(
        "edge_router",
        router,
        r#"{"body": "{this is not json", "version": 1}"#,
    )
    .await
    .unwrap();
    let interface = "0f0f0f0f-0000-4000-8000-00000000000d";
    let body = json!({"id": interface, "name": "xe-0/0/9", "device_id": router,
                      "tenant_id": seed::TENANT_ID, "status": "PENDING_CREATE"});
    env.put_config("er_physical_interface", interface, &body, 1)
        .await
        .unwrap();
    let state = wait_failed(&env, "er_physical_interface", interface).await;
    let error = state["error"].as_str().unwrap();
    assert!(
        error.contains(&env.key(Record::Config, "er_physical_interface", interface))
            && error.contains(&env.key(Record::Config, "edge_router", router))
            && error.contains("\"body\""),
        "{error}"
    );
    a_good_resource_still_completes(&env).await;
    host.shutdown().await;
}

/// A job manager that starts with a failed workflow to clean up, whose resource's config
/// changed meanwhile, plans the config's new version with the heat templates, as any other
/// time: not as a resource without templates (READ_COMPLETE, no monitoring).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_whose_failed_workflow_is_cleaned_at_start_is_planned_with_its_templates() {
    let env = TestEnv::new().await.unwrap();
    env.load_seed_world().await.unwrap();
    let id = "0f0f0f0f-0000-4000-8000-00000000000e";
    let body = seed_ha_interface_body(id);
    // What the previous manager left: version 1's workflow, its first job failed (its /state
    // says so) and its second still waiting; and the config at version 2 by now.
    let (first, record) = job_record(
        "monitoring_worker",
        "create",
        "ha_interface",
        id,
        1,
        true,
        false,
        &[],
        "fail",
        body.clone(),
    );
    env.put_job(&first, &record, false).await.unwrap();
    env.store
        .delete(&env.job_key(Queue::Waiting, &first))
        .await
        .unwrap();
    env.store
        .put(
            &env.job_key(Queue::Finished, &first),
            r#"{"failed": "scripted failure"}"#,
        )
        .await
        .unwrap();
    let (second, record) = job_record(
        "monitoring_worker",
        "create",
        "ha_interface",
        id,
        1,
        false,
        true,
        std::slice::from_ref(&first),
        "fail",
        body.clone(),
    );
    env.put_job(&second, &record, false).await.unwrap();
    let failed = json!({"state": {"worker_state": "CREATE_FAILED"}, "version": 1,
                        "error": "scripted failure"});
    env.store
        .put(
            &env.key(Record::State, "ha_interface", id),
            failed.to_string(),
        )
        .await
        .unwrap();
    env.put_config("ha_interface", id, &body, 2).await.unwrap();

    let host = env.start_host().await.unwrap();
    let state = env
        .wait_for_state(
            "ha_interface",
            id,
            std::time::Duration::from_secs(30),
            |s| s["version"] == 2,
        )
        .await
        .unwrap();
    assert_eq!(
        state["state"]["worker_state"], "MODIFY_COMPLETED",
        "{state}"
    );
    assert!(state["state"]["state_monitoring"].is_string(), "{state}");
    host.shutdown().await;
}

/// A private etcd started with `--max-request-bytes=300000`, and a test environment on it.
async fn etcd_taking_300_kb_requests() -> (esi_host::local_etcd::LocalEtcd, TestEnv) {
    let etcd = esi_host::local_etcd::LocalEtcd::start_with_args(&["--max-request-bytes=300000"])
        .await
        .unwrap();
    let env = TestEnv::on_cluster(&[etcd.endpoint().to_string()])
        .await
        .unwrap();
    (etcd, env)
}

/// On an etcd whose request limit is below what a workflow needs (`--max-request-bytes`
/// lowered), the workflow etcd refuses fails its resource with etcd's answer, and the
/// resources after it are planned and run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_etcd_refuses_fails_its_resource_and_the_others_go_on() {
    let (etcd, env) = etcd_taking_300_kb_requests().await;
    // 200 KB: under the manager's own limit (the host is not told of etcd's), and the
    // config fits etcd's 300 KB; its two job records do not.
    let error = big_then_small_ha_interface(&env, 200_000, ETCD_DEFAULT_MAX_REQUEST_BYTES).await;
    assert!(
        error.contains("etcd refused the transaction writing its workflow")
            && error.contains("request is too large"),
        "{error}"
    );
    etcd.stop().await;
}

/// A host told etcd's lowered request limit (`etcd_max_request_bytes`) fails the workflow
/// that would not fit before sending it, naming the size and the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_told_etcds_request_limit_fails_a_workflow_over_it_before_sending_it() {
    let (etcd, env) = etcd_taking_300_kb_requests().await;
    let error = big_then_small_ha_interface(&env, 200_000, 300_000).await;
    assert!(
        error.contains("2 job records")
            && error.contains("over the 267000 bytes")
            && error.contains("etcd_max_request_bytes, 300000"),
        "{error}"
    );
    etcd.stop().await;
}

/// A config whose key is new is planned as a create without reading its `/state`. When etcd
/// refuses that workflow, the refusal says nothing about the `/state`: the resource is
/// planned again from it, and a `/state` already at the config's version is left as it is
/// (failing the create would overwrite a completed resource with `CREATE_FAILED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_create_planned_without_the_state_leaves_a_current_state_alone() {
    let (etcd, env) = etcd_taking_300_kb_requests().await;
    let host = host_with_two_job_workflows(&env, ETCD_DEFAULT_MAX_REQUEST_BYTES).await;

    // Its config written again under a new key (deleted and restored), at the version its
    // `/state` already has; 200 KB, so its two job records are over etcd's 300 KB.
    let done_id = "0f0f0f0f-0000-4000-8000-00000000000b";
    let up = json!({"primary": "ACTIVE", "secondary": "ACTIVE"});
    env.put_monitoring_state("ha_interface", done_id, &up)
        .await
        .unwrap();
    let state_key = env.key(Record::State, "ha_interface", done_id);
    let before = env.get_json(&state_key).await.unwrap().unwrap();
    let mut body = seed_ha_interface_body(done_id);
    body["description"] = json!("x".repeat(200_000));
    env.put_config("ha_interface", done_id, &body, 1)
        .await
        .unwrap();
    // One after it completes: by then the refused workflow came back and was planned again.
    let next_id = "0f0f0f0f-0000-4000-8000-00000000000c";
    env.put_config("ha_interface", next_id, &seed_ha_interface_body(next_id), 1)
        .await
        .unwrap();
    env.wait_completed("ha_interface", next_id).await.unwrap();
    env.wait_jobs_drained().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let after = env.get_json(&state_key).await.unwrap().unwrap();
    assert_eq!(
        after, before,
        "the /state of a resource with nothing to do changed"
    );
    host.shutdown().await;
    etcd.stop().await;
}
