//! The inspection CLI (`esi-host jobs list|show|retry`, `esi-host resource show`), run as the
//! real binary against a real etcd.
//!
//! No host runs here: the records are written straight into etcd as the job manager, the
//! worker and a registered host would write them, so each test controls exactly what the
//! commands see. A claim's owner is a fake host record put on the same lease as the claim,
//! which is how a running host registers itself.

use std::process::{Command, Output};

use esi_host::keys::{Queue, Record};
use esi_host::protocol::JobRecord;
use esi_tests::{host_binary, job_record, TestEnv};
use serde_json::{json, Value};

const HANDLER: &str = "monitoring_worker";

/// Runs `esi-host <args> --etcd <env's etcd> --key-root <env's root>`.
fn esi_host(env: &TestEnv, args: &[&str]) -> Output {
    Command::new(host_binary())
        .args(args)
        .args(["--etcd", &env.endpoint, "--key-root", env.keys().root()])
        .env_remove("ESI_ETCD")
        .env_remove("ESI_KEY_ROOT")
        .env("RUST_LOG", "warn")
        .output()
        .expect("esi-host runs")
}

/// Runs a command that must succeed and returns its stdout.
fn stdout_of(env: &TestEnv, args: &[&str]) -> String {
    let out = esi_host(env, args);
    assert!(
        out.status.success(),
        "esi-host {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Runs a `--json` command that must succeed and parses its output.
fn json_of(env: &TestEnv, args: &[&str]) -> Value {
    let text = stdout_of(env, args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {text}"))
}

/// Runs a command that must fail and returns its stderr.
fn refusal_of(env: &TestEnv, args: &[&str]) -> String {
    let out = esi_host(env, args);
    assert!(
        !out.status.success(),
        "esi-host {args:?} should have failed; it printed {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn monitoring_job(resource_id: &str) -> (String, Value) {
    job_record(
        HANDLER,
        "create",
        "ha_interface",
        resource_id,
        1,
        true,
        true,
        &[],
        "fail",
        json!({"id": resource_id}),
    )
}

/// A job claimed by host `host_id`: its record, a host record and a working key bound to one
/// lease, as a running host leaves them. Returns the job id and the claim's reservation.
async fn put_claimed_job(env: &TestEnv, resource_id: &str, host_id: &str) -> (String, String) {
    let (id, mut record) = monitoring_job(resource_id);
    record[2] = json!(2);
    env.store
        .put(&env.job_key(Queue::All, &id), record.to_string())
        .await
        .unwrap();
    let lease = env.store.grant_lease(60).await.unwrap();
    let host = json!({"host_id": host_id, "version": "test", "pid": 1, "started_at_unix": 0,
                      "handlers": [HANDLER]});
    env.store
        .put_with_lease(&env.keys().host(host_id), host.to_string(), lease)
        .await
        .unwrap();
    let reservation = "9f1c2b7e-reservation".to_string();
    env.store
        .put_with_lease(
            &env.job_key(Queue::Working, &id),
            reservation.clone(),
            lease,
        )
        .await
        .unwrap();
    (id, reservation)
}

/// A job that failed for good after `attempts` attempts and whose record the job manager has
/// cleaned: only its dead-job record is left, as the worker writes it.
async fn put_dead_job(env: &TestEnv, resource_id: &str, attempts: u32) -> String {
    let (id, mut record) = monitoring_job(resource_id);
    record[2] = json!(attempts);
    let failed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 90;
    let dead = json!({"job": record, "error": "permanent: pool exhausted",
                      "attempts": attempts, "failed_at_unix": failed_at});
    env.store
        .put(&env.keys().dead_job(&id), dead.to_string())
        .await
        .unwrap();
    id
}

fn row<'v>(list: &'v Value, id: &str, queue: &str) -> &'v Value {
    list["jobs"]
        .as_array()
        .expect("a jobs array")
        .iter()
        .find(|r| r["id"] == id && r["queue"] == queue)
        .unwrap_or_else(|| panic!("no {queue} row for {id} in {list:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_shows_every_queue_and_the_host_owning_each_claim() {
    let env = TestEnv::new().await.unwrap();
    let (ready, record) = monitoring_job("res-ready");
    env.put_job(&ready, &record, true).await.unwrap();
    let (waiting, record) = monitoring_job("res-waiting");
    env.put_job(&waiting, &record, false).await.unwrap();
    let (working, _) = put_claimed_job(&env, "res-working", "host-a").await;
    let dead = put_dead_job(&env, "res-dead", 5).await;

    let all = json_of(&env, &["jobs", "list", "--json"]);
    assert_eq!(all["jobs"].as_array().unwrap().len(), 4, "{all:#}");
    let r = row(&all, &ready, "ready");
    assert_eq!(r["handler"], HANDLER);
    assert_eq!(r["resource_type"], "ha_interface");
    assert_eq!(r["resource_id"], "res-ready");
    assert_eq!(r["attempts"], 0);
    assert_eq!(r["owner_host"], Value::Null);
    assert!(r["age_revisions"].as_i64().unwrap() >= 0, "{r}");
    row(&all, &waiting, "waiting");
    let w = row(&all, &working, "working");
    assert_eq!(w["owner_host"], "host-a");
    assert_eq!(w["attempts"], 2);
    let d = row(&all, &dead, "dead");
    assert_eq!(d["attempts"], 5);
    assert_eq!(d["error"], "permanent: pool exhausted");
    assert!(d["age_seconds"].as_u64().unwrap() >= 90, "{d}");

    let only_working = json_of(&env, &["jobs", "list", "--state", "working", "--json"]);
    let ids: Vec<&Value> = only_working["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["id"])
        .collect();
    assert_eq!(ids, [&json!(working)]);
    let only_dead = json_of(&env, &["jobs", "list", "--state", "dead", "--json"]);
    assert_eq!(only_dead["jobs"][0]["id"], dead.as_str());
    assert_eq!(only_dead["jobs"].as_array().unwrap().len(), 1);

    let table = stdout_of(&env, &["jobs", "list"]);
    let header = table.lines().next().unwrap();
    for column in [
        "ID", "QUEUE", "HANDLER", "RESOURCE", "ATTEMPTS", "AGE", "OWNER",
    ] {
        assert!(header.contains(column), "{table}");
    }
    let working_line = table.lines().find(|l| l.starts_with(&working)).unwrap();
    assert!(working_line.contains("host-a"), "{table}");
    assert!(working_line.contains("ha_interface/res-working"), "{table}");
    let filtered = stdout_of(&env, &["jobs", "list", "--state", "ready"]);
    assert!(!filtered.contains("QUEUE"), "{filtered}");
    assert_eq!(filtered.lines().count(), 2, "{filtered}");
    assert!(filtered.contains(&ready), "{filtered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_show_reports_record_queues_claim_owner_and_dead_record() {
    let env = TestEnv::new().await.unwrap();
    let (working, reservation) = put_claimed_job(&env, "res-1", "host-b").await;
    let shown = json_of(&env, &["jobs", "show", "--json", &working]);
    assert_eq!(shown["queues"], json!(["working"]));
    assert_eq!(shown["handler"], HANDLER);
    assert_eq!(shown["resource_id"], "res-1");
    assert_eq!(shown["record"]["attempts"], 2);
    assert_eq!(shown["record"]["key"], env.job_key(Queue::All, &working));
    assert_eq!(shown["record"]["value"][1]["id"], working.as_str());
    assert_eq!(shown["claim"]["reservation"], reservation.as_str());
    assert_eq!(shown["claim"]["owner_host"], "host-b");
    assert!(shown["claim"]["lease"].as_i64().unwrap() != 0);
    assert_eq!(shown["finished"], Value::Null);
    assert_eq!(shown["dead"], Value::Null);
    let text = stdout_of(&env, &["jobs", "show", &working]);
    assert!(text.contains("owner host-b"), "{text}");

    let dead = put_dead_job(&env, "res-2", 5).await;
    let shown = json_of(&env, &["jobs", "show", "--json", &dead]);
    assert_eq!(shown["queues"], json!(["dead"]));
    assert_eq!(shown["record"], Value::Null);
    assert_eq!(shown["resource_id"], "res-2");
    assert_eq!(shown["dead"]["error"], "permanent: pool exhausted");
    assert_eq!(shown["dead"]["attempts"], 5);
    assert_eq!(shown["dead"]["key"], env.keys().dead_job(&dead));

    let (unknown, _) = monitoring_job("res-3");
    let error = refusal_of(&env, &["jobs", "show", &unknown]);
    assert!(error.contains("no job"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_retry_moves_a_dead_job_back_to_ready_with_attempts_reset() {
    let env = TestEnv::new().await.unwrap();
    let dead = put_dead_job(&env, "res-1", 5).await;

    let said = stdout_of(&env, &["jobs", "retry", &dead]);
    assert!(said.contains("re-queued"), "{said}");
    let all_key = env.job_key(Queue::All, &dead);
    let kv = env
        .store
        .get(&all_key)
        .await
        .unwrap()
        .expect("record written");
    let record = JobRecord::parse(&all_key, &kv.value).unwrap();
    assert_eq!(record.attempts, 0);
    assert_eq!(record.job.id, dead);
    let ready = env
        .store
        .get(&env.job_key(Queue::Ready, &dead))
        .await
        .unwrap()
        .expect("ready key written");
    assert_eq!(ready.value_str(), HANDLER);
    assert!(env
        .store
        .get(&env.keys().dead_job(&dead))
        .await
        .unwrap()
        .is_none());
    // The ready key and the record were written in one transaction.
    assert_eq!(kv.mod_revision, ready.mod_revision);

    // Once retried, the job is live, no longer dead: a second retry is refused.
    let error = refusal_of(&env, &["jobs", "retry", &dead]);
    assert!(error.contains("not dead"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_retry_refuses_a_job_that_is_not_dead_or_still_exists() {
    let env = TestEnv::new().await.unwrap();
    let (live, record) = monitoring_job("res-1");
    env.put_job(&live, &record, true).await.unwrap();
    let error = refusal_of(&env, &["jobs", "retry", &live]);
    assert!(error.contains("not dead"), "{error}");

    // A job dead with on_failure "ignore" whose record the job manager has not cleaned yet:
    // retrying it would run it twice.
    let both = put_dead_job(&env, "res-2", 1).await;
    let (_, record) = monitoring_job("res-2");
    env.store
        .put(&env.job_key(Queue::All, &both), record.to_string())
        .await
        .unwrap();
    env.store
        .put(&env.job_key(Queue::Finished, &both), "")
        .await
        .unwrap();
    let before = env.job_keys().await.unwrap();
    let error = refusal_of(&env, &["jobs", "retry", &both]);
    assert!(error.contains("still exists"), "{error}");
    assert!(error.contains("finished"), "{error}");
    assert_eq!(env.job_keys().await.unwrap(), before);
    assert!(env
        .store
        .get(&env.keys().dead_job(&both))
        .await
        .unwrap()
        .is_some());

    let (never, _) = monitoring_job("res-3");
    let error = refusal_of(&env, &["jobs", "retry", &never]);
    assert!(error.contains("not dead"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_show_gathers_every_record_and_job_of_one_resource_by_either_name() {
    let env = TestEnv::new().await.unwrap();
    let id = "372ed357-e622-41fb-a613-076d332838e2";
    env.put_config(
        "ha_interface",
        id,
        &json!({"id": id, "restricted_vlans": "0-1024"}),
        3,
    )
    .await
    .unwrap();
    let state = json!({"state": {"worker_state": "CREATE_COMPLETED",
                                 "state_monitoring": "{\"primary\": \"ACTIVE\"}"},
                       "version": 3, "error": ""});
    env.store
        .put(
            &env.key(Record::State, "ha_interface", id),
            state.to_string(),
        )
        .await
        .unwrap();
    env.store
        .put(
            &env.key(Record::Monitoring, "ha_interface", id),
            r#"{"interface": "UP", "version": 1}"#,
        )
        .await
        .unwrap();
    let targets = json!({"primary": {"type": "router", "properties": {}, "tenant_id": "t",
                                     "version": 3, "action": "create"}});
    env.store
        .put(
            &env.key(Record::MonitoringTarget, "ha_interface", id),
            targets.to_string(),
        )
        .await
        .unwrap();
    let (job, record) = monitoring_job(id);
    env.put_job(&job, &record, false).await.unwrap();
    let dead = put_dead_job(&env, id, 5).await;
    let (other, record) = monitoring_job("another-interface");
    env.put_job(&other, &record, true).await.unwrap();

    let by_plural = json_of(&env, &["resource", "show", "--json", "ha_interfaces", id]);
    let by_singular = json_of(&env, &["resource", "show", "--json", "ha_interface", id]);
    // Ages move between the two calls: a dead job's in wall-clock seconds, a live job's in
    // etcd revisions (other tests share this etcd and write meanwhile).
    let without_ages = |mut view: Value| {
        for job in view["jobs"].as_array_mut().into_iter().flatten() {
            job["age_seconds"] = Value::Null;
            job["age_revisions"] = Value::Null;
        }
        view
    };
    assert_eq!(without_ages(by_plural.clone()), without_ages(by_singular));
    let view = by_plural;
    assert_eq!(view["resource_type"], "ha_interface");
    assert_eq!(view["plural"], "ha_interfaces");
    assert_eq!(view["config"]["version"], 3);
    assert_eq!(view["config"]["body"]["restricted_vlans"], "0-1024");
    assert_eq!(view["config"]["marked_for_deletion"], false);
    assert_eq!(
        view["state"]["value"]["state"]["worker_state"],
        "CREATE_COMPLETED"
    );
    assert_eq!(
        view["state"]["key"],
        env.key(Record::State, "ha_interface", id)
    );
    assert_eq!(view["job_state"], Value::Null);
    assert_eq!(view["monitoring"]["value"]["interface"], "UP");
    assert_eq!(view["monitoring_targets"]["value"], targets);
    let jobs: Vec<(&Value, &Value)> = view["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (&r["id"], &r["queue"]))
        .collect();
    assert_eq!(
        jobs,
        [
            (&json!(job), &json!("waiting")),
            (&json!(dead), &json!("dead"))
        ]
    );

    let text = stdout_of(&env, &["resource", "show", "ha_interfaces", id]);
    assert!(text.contains("(version 3)"), "{text}");
    assert!(text.contains("(CREATE_COMPLETED, version 3)"), "{text}");
    assert!(text.contains("job state  none"), "{text}");
    assert!(text.contains(&job) && !text.contains(&other), "{text}");

    let error = refusal_of(&env, &["resource", "show", "ha_interfacez", id]);
    assert!(error.contains("unknown resource type"), "{error}");
    let error = refusal_of(&env, &["resource", "show", "ha_interface", "no-such-id"]);
    assert!(error.contains("nothing is stored"), "{error}");
}
