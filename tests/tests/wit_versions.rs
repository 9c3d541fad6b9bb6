//! The WIT contract across versions: `read-many` (0.1.1) answers each target as `read`
//! would, and a component built against 0.1.0 still runs on this host.
//!
//! `tests/fixtures/wit-0.1.0/scripted_worker.wasm` is the `scripted_worker` test guest as it
//! was built against `esi:worker@0.1.0`, before `read-many` existed, kept as it was.

use esi_host::keys::Record;
use esi_tests::scripted::{completed_output, put_scripted_job, start_host};
use esi_tests::{plugin_dir_with_copies, plugin_dir_with_test_guests, repo_dir, TestEnv};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_many_answers_each_target_in_order_and_refuses_what_is_not_granted_or_over_its_limit()
{
    let env = TestEnv::new().await.unwrap();
    let (host, _) = start_host(&env, plugin_dir_with_test_guests()).await;
    let present = env.key(Record::State, "ha_interface", "present");
    env.store.put(&present, "{\"up\": true}").await.unwrap();

    let script = json!({"read_many": [
        "state ha_interface present",
        "config ha_interface secret",
        "state ha_interface absent",
        "state no_such_type x",
        "state ha_interface present",
    ]});
    let resource = put_scripted_job(&env, Some(script)).await;
    let output = completed_output(&env, &resource).await;
    let answers = output["read_many"]
        .as_array()
        .unwrap_or_else(|| panic!("no read_many answers in {output}"));
    assert_eq!(answers.len(), 5, "{output}");
    assert_eq!(answers[0], json!("{\"up\": true}"));
    let denied = answers[1]["refused"].as_str().unwrap_or_default();
    assert!(
        denied.contains("Denied") && denied.contains("is not granted"),
        "{output}"
    );
    assert_eq!(answers[2], json!(null));
    let unknown = answers[3]["refused"].as_str().unwrap_or_default();
    assert!(unknown.contains("UnknownType"), "{output}");
    assert_eq!(answers[4], answers[0]);

    // One call reads at most 128 records: the 129th and later are refused, the rest answered.
    let many: Vec<String> = (0..130)
        .map(|i| format!("state ha_interface many-{i}"))
        .collect();
    let resource = put_scripted_job(&env, Some(json!({ "read_many": many }))).await;
    let output = completed_output(&env, &resource).await;
    let answers = output["read_many"].as_array().expect("answers");
    assert_eq!(answers.len(), 130, "{output}");
    assert!(answers[..128].iter().all(|a| a.is_null()), "{output}");
    for refused in &answers[128..] {
        let message = refused["refused"].as_str().unwrap_or_default();
        assert!(message.contains("at most 128 records per call"), "{output}");
    }
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_built_against_wit_0_1_0_still_runs() {
    let fixture = repo_dir().join("tests/fixtures/wit-0.1.0");
    let bytes = std::fs::read(fixture.join("scripted_worker.wasm")).unwrap();
    let imports = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        imports("esi:worker/host@0.1.0") && !imports("esi:worker/host@0.1.1"),
        "the fixture is not a 0.1.0 build"
    );

    let env = TestEnv::new().await.unwrap();
    let dir = plugin_dir_with_copies(&[fixture], &["scripted_worker"]);
    let (host, _) = start_host(&env, dir).await;
    let plain = put_scripted_job(&env, None).await;
    assert_eq!(completed_output(&env, &plain).await, json!({"attempts": 0}));
    // Its host import resolves to this host's 0.1.1 interface: reads work.
    let interface = env.key(Record::State, "ha_interface", "old-guest");
    env.store.put(&interface, "{\"up\": false}").await.unwrap();
    let reader =
        put_scripted_job(&env, Some(json!({"read": "state ha_interface old-guest"}))).await;
    assert_eq!(
        completed_output(&env, &reader).await,
        json!({"read": "{\"up\": false}"})
    );
    host.shutdown().await;
}
