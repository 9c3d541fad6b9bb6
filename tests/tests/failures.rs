//! How the host handles jobs that fail: retries with backoff, permanent failures, traps and
//! `on_failure` within a workflow (PROTOCOL section 5.4).
//!
//! Every job here runs in the `scripted_worker` test guest, which fails exactly as the job's
//! `resource_input.script` says. The jobs are written straight into the queues, as the job
//! manager would write them, so no template is involved, and a config only where the manager
//! looks at one (after a workflow ends): the worker reports to the `/state` of the job's
//! resource regardless.

use std::path::PathBuf;
use std::time::Duration;

use esi_host::keys::{Queue, Record};
use esi_host::local_etcd::LocalEtcd;
use esi_host::store::{Change, Kv};
use esi_host::{Host, HostConfig};
use esi_tests::proxy::AnswerLosingProxy;
use esi_tests::{job_record, plugin_dir_with_test_guests, TestEnv};
use serde_json::{json, Value};

const HANDLER: &str = "scripted_worker";
const RESOURCE_TYPE: &str = "ha_router";
const TIMEOUT: Duration = Duration::from_secs(30);
/// `WorkerConfig::max_attempts` by default: the runs a retryable failure gets.
const MAX_ATTEMPTS: u64 = 5;

/// A host serving the real plugins and the test guests, retrying quickly. Its plugin
/// directory (symlinks only) is its own and goes with it at [`TestHost::shutdown`].
struct TestHost {
    host: Host,
    plugin_dir: PathBuf,
}

impl TestHost {
    async fn start(env: &TestEnv) -> TestHost {
        TestHost::start_with(env, |_| {}).await
    }

    /// Starts a host whose configuration `adjust` changed further.
    async fn start_with(env: &TestEnv, adjust: impl FnOnce(&mut HostConfig)) -> TestHost {
        let mut config = env.host_config();
        config.plugin_dir = plugin_dir_with_test_guests();
        config.worker.retry_backoff = Duration::from_millis(50);
        config.worker.retry_backoff_max = Duration::from_millis(200);
        config.requeue_backoff = Duration::from_millis(50);
        config.requeue_backoff_max = Duration::from_millis(200);
        adjust(&mut config);
        let plugin_dir = config.plugin_dir.clone();
        let host = Host::start(config).await.unwrap();
        TestHost { host, plugin_dir }
    }

    async fn shutdown(self) {
        self.host.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.plugin_dir);
    }
}

fn new_resource_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The config body of a resource whose jobs follow `script` (`None`: just complete).
fn input(resource_id: &str, script: Option<Value>) -> Value {
    let mut body = json!({"id": resource_id, "name": "scripted"});
    if let Some(script) = script {
        body["script"] = script;
    }
    body
}

/// A workflow of one job, ready to claim.
fn single_job(resource_id: &str, script: Option<Value>) -> (String, Value) {
    job_record(
        HANDLER,
        "create",
        RESOURCE_TYPE,
        resource_id,
        1,
        true,
        true,
        &[],
        "fail",
        input(resource_id, script),
    )
}

fn state_key(env: &TestEnv, resource_id: &str) -> String {
    env.key(Record::State, RESOURCE_TYPE, resource_id)
}

async fn wait_failed(env: &TestEnv, resource_id: &str) -> Value {
    env.wait_for_state(RESOURCE_TYPE, resource_id, TIMEOUT, |s| {
        s["state"]["worker_state"]
            .as_str()
            .is_some_and(|w| w.ends_with("_FAILED"))
    })
    .await
    .unwrap()
}

/// The `attempts` of every `/jobs/all/<id>` record put so far, in order.
fn recorded_attempts(env: &TestEnv, recorder: &esi_tests::Recorder, id: &str) -> Vec<u64> {
    recorder
        .puts_under(&env.job_key(Queue::All, id))
        .into_iter()
        .map(|(key, record)| {
            record[2]
                .as_u64()
                .unwrap_or_else(|| panic!("{key}: no attempts in {record}"))
        })
        .collect()
}

/// The `scripted` output in a completed `/state` (a JSON string, like every job-state field).
fn scripted_output(state: &Value) -> Value {
    let text = state["state"]["scripted"]
        .as_str()
        .unwrap_or_else(|| panic!("no scripted output in {state}"));
    serde_json::from_str(text).unwrap()
}

/// Waits until job `id` is claimed; returns the claim (its lease is the claiming host's).
async fn claim_of(env: &TestEnv, recorder: &mut esi_tests::Recorder, id: &str) -> Kv {
    let working = env.job_key(Queue::Working, id);
    recorder
        .until_put(&working, TIMEOUT)
        .await
        .unwrap()
        .iter()
        .find_map(|c| match c {
            Change::Put(kv) if kv.key == working => Some(kv.clone()),
            _ => None,
        })
        .expect("the claim is recorded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_retryably_twice_completes_at_its_third_attempt() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let host = TestHost::start(&env).await;
    let resource = new_resource_id();
    let (id, record) = single_job(&resource, Some(json!({"fail_retryable_until_attempt": 2})));
    env.put_job(&id, &record, true).await.unwrap();

    let state = env.wait_completed(RESOURCE_TYPE, &resource).await.unwrap();
    assert_eq!(state["state"]["worker_state"], "CREATE_COMPLETED");
    assert_eq!(state["version"], 1);
    assert_eq!(state["error"], "");
    assert_eq!(scripted_output(&state), json!({"attempts": 2}));
    recorder
        .until_put(&state_key(&env, &resource), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(recorded_attempts(&env, &recorder, &id), [0, 1, 2]);
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_retryably_every_time_fails_its_resource_after_the_maximum_attempts() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let host = TestHost::start(&env).await;
    let resource = new_resource_id();
    let (id, record) = single_job(&resource, Some(json!({"always": "retryable"})));
    env.put_job(&id, &record, true).await.unwrap();

    let state = wait_failed(&env, &resource).await;
    assert_eq!(state["state"]["worker_state"], "CREATE_FAILED");
    assert_eq!(state["version"], 1);
    let error = state["error"].as_str().unwrap();
    assert!(error.contains("scripted retryable failure"), "{error}");
    recorder
        .until_put(&state_key(&env, &resource), TIMEOUT)
        .await
        .unwrap();
    let attempts: Vec<u64> = (0..MAX_ATTEMPTS).collect();
    assert_eq!(recorded_attempts(&env, &recorder, &id), attempts);
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_fails_its_resource_at_the_first_attempt() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let host = TestHost::start(&env).await;
    let resource = new_resource_id();
    let (id, record) = single_job(&resource, Some(json!({"always": "permanent"})));
    env.put_job(&id, &record, true).await.unwrap();

    let state = wait_failed(&env, &resource).await;
    assert_eq!(state["state"]["worker_state"], "CREATE_FAILED");
    let error = state["error"].as_str().unwrap();
    assert!(error.contains("scripted permanent failure"), "{error}");
    recorder
        .until_put(&state_key(&env, &resource), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        recorded_attempts(&env, &recorder, &id),
        [0],
        "never retried"
    );
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_guest_is_retried_then_fails_its_resource_and_the_host_keeps_serving() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let host = TestHost::start(&env).await;
    let resource = new_resource_id();
    let (id, record) = single_job(&resource, Some(json!({"trap": true})));
    env.put_job(&id, &record, true).await.unwrap();

    let state = wait_failed(&env, &resource).await;
    assert_eq!(state["state"]["worker_state"], "CREATE_FAILED");
    let error = state["error"].as_str().unwrap();
    assert!(error.contains("trap"), "{error}");
    recorder
        .until_put(&state_key(&env, &resource), TIMEOUT)
        .await
        .unwrap();
    let attempts: Vec<u64> = (0..MAX_ATTEMPTS).collect();
    assert_eq!(recorded_attempts(&env, &recorder, &id), attempts);
    env.wait_jobs_drained().await.unwrap();

    let good = new_resource_id();
    let (id, record) = single_job(&good, None);
    env.put_job(&id, &record, true).await.unwrap();
    let state = env.wait_completed(RESOURCE_TYPE, &good).await.unwrap();
    assert_eq!(scripted_output(&state), json!({"attempts": 0}));
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_returns_is_stopped_at_its_deadline_and_retried() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let host = TestHost::start_with(&env, |config| {
        config.limits.call_deadline = Duration::from_millis(200);
    })
    .await;
    let resource = new_resource_id();
    let (id, record) = single_job(&resource, Some(json!({"spin": true})));
    env.put_job(&id, &record, true).await.unwrap();

    let state = wait_failed(&env, &resource).await;
    let error = state["error"].as_str().unwrap();
    assert!(error.contains("deadline"), "{error}");
    recorder
        .until_put(&state_key(&env, &resource), TIMEOUT)
        .await
        .unwrap();
    let attempts: Vec<u64> = (0..MAX_ATTEMPTS).collect();
    assert_eq!(recorded_attempts(&env, &recorder, &id), attempts);
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_call_running_when_the_lease_is_lost_is_stopped_and_its_job_runs_again() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    // A deadline far beyond the test's timeout: only losing the lease can stop the call.
    let host = TestHost::start_with(&env, |config| {
        config.limits.call_deadline = Duration::from_secs(600);
    })
    .await;
    let resource = new_resource_id();
    let (id, record) = single_job(&resource, Some(json!({"spin_until_attempt": 1})));
    env.put_job(&id, &record, true).await.unwrap();
    let claim = claim_of(&env, &mut recorder, &id).await;

    // etcd expires the lease under the running call, as after a partition longer than its TTL.
    env.store.revoke_lease(claim.lease).await.unwrap();

    let state = env.wait_completed(RESOURCE_TYPE, &resource).await.unwrap();
    assert_eq!(scripted_output(&state), json!({"attempts": 1}));
    recorder
        .until_put(&state_key(&env, &resource), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(recorded_attempts(&env, &recorder, &id), [0, 1]);
    assert_eq!(
        env.state_put_counts()
            .await
            .unwrap()
            .get(&state_key(&env, &resource)),
        Some(&1)
    );
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}

/// etcd out of space (its `NOSPACE` alarm) refuses the completion while the claim's lease
/// lives: the worker keeps the result and the claim and tries again, and the result lands
/// once an operator has freed space. One `/state` put, one attempt, nothing run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_etcd_has_no_space_for_is_kept_and_written_once_space_is_back() {
    use etcd_client::{AlarmAction, AlarmOptions, AlarmType, CompactionOptions, DeleteOptions};

    let etcd = LocalEtcd::start_with_args(&["--quota-backend-bytes=16777216"])
        .await
        .unwrap();
    let env = TestEnv::on_cluster(&[etcd.endpoint().to_string()])
        .await
        .unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let host = TestHost::start(&env).await;
    let resource = new_resource_id();
    // The first run asks to run again in 4 s and the worker holds the claim meanwhile.
    let wait = Duration::from_secs(4);
    let (id, record) = single_job(&resource, Some(json!({"wait_once_ms": wait.as_millis()})));
    env.put_job(&id, &record, true).await.unwrap();
    recorder.until_claimed(env.keys(), TIMEOUT).await.unwrap();
    let claimed = std::time::Instant::now();

    // Fill etcd past its quota: it raises the alarm and refuses every write after that. The
    // filler lies outside the recorded keys (no leading `/`).
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let filler = vec![b'x'; 1 << 20];
    let mut written = 0;
    let full = loop {
        match client
            .put(format!("filler/{written}"), filler.clone(), None)
            .await
        {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 64, "etcd stored 64 MiB under a 16 MiB quota");
    };
    assert!(
        full.to_string().contains("database space exceeded"),
        "{full}"
    );

    assert!(
        claimed.elapsed() < wait,
        "filling etcd took {:?}, longer than the job's {wait:?} wait: this machine is too slow \
         for the test to be meaningful",
        claimed.elapsed()
    );
    // The plugin's second run completes when the wait ends; etcd refuses its result for
    // ~3 s more.
    tokio::time::sleep_until((claimed + wait + Duration::from_secs(3)).into()).await;
    let state = env.get_json(&state_key(&env, &resource)).await.unwrap();
    assert!(
        state
            .as_ref()
            .is_none_or(|s| s["state"]["worker_state"] != "CREATE_COMPLETED"),
        "completed while etcd had no space: {state:?}"
    );
    let working = env.job_key(Queue::Working, &id);
    assert!(
        env.store.get(&working).await.unwrap().is_some(),
        "the claim was given up while its lease lived"
    );

    // What an operator does: delete, compact, defragment, disarm.
    let deleted = client
        .delete("filler/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let revision = deleted.header().expect("a response header").revision();
    client
        .compact(revision, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    client.defragment().await.unwrap();
    let alarms = client
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .unwrap();
    for alarm in alarms.alarms() {
        let mut member = AlarmOptions::new();
        member.with_member(alarm.member_id());
        client
            .alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(member))
            .await
            .unwrap();
    }

    let state = env.wait_completed(RESOURCE_TYPE, &resource).await.unwrap();
    assert_eq!(scripted_output(&state), json!({"attempts": 0}));
    recorder
        .until_put(&state_key(&env, &resource), TIMEOUT)
        .await
        .unwrap();
    env.wait_jobs_drained().await.unwrap();
    recorder.for_a_while(Duration::from_millis(300)).await;
    let state_puts = recorder.puts_under(&state_key(&env, &resource));
    assert_eq!(state_puts.len(), 1, "{state_puts:?}");
    assert_eq!(recorded_attempts(&env, &recorder, &id), [0]);
    host.shutdown().await;
    etcd.stop().await;
}

/// etcd drops the host's lease (as after a partition longer than its TTL): the host takes a
/// new lease, puts its host record and plugin status records back under it, and claims the
/// next job with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_lease_expired_publishes_its_records_again_and_claims_under_the_new_one() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let mut host_id = String::new();
    let host = TestHost::start_with(&env, |config| host_id = config.host_id.clone()).await;
    let records = [
        env.keys().host(&host_id),
        env.keys().plugin_status(&host_id, HANDLER),
    ];
    let first = records_lease(&env, &records, |_| true).await;
    env.store.revoke_lease(first).await.unwrap();
    let second = records_lease(&env, &records, |lease| lease != first).await;

    let resource = new_resource_id();
    let (id, record) = single_job(&resource, None);
    env.put_job(&id, &record, true).await.unwrap();
    assert_eq!(claim_of(&env, &mut recorder, &id).await.lease, second);
    let state = env.wait_completed(RESOURCE_TYPE, &resource).await.unwrap();
    assert_eq!(scripted_output(&state), json!({"attempts": 0}));
    host.shutdown().await;
}

/// Waits until every one of `keys` exists, all bound to one lease that `accept`s; returns it.
async fn records_lease(env: &TestEnv, keys: &[String], accept: impl Fn(i64) -> bool) -> i64 {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let mut leases = Vec::new();
        for key in keys {
            leases.push(env.store.get(key).await.unwrap().map(|kv| kv.lease));
        }
        if let Some(Some(lease)) = leases.first().copied() {
            if lease != 0 && accept(lease) && leases.iter().all(|l| *l == Some(lease)) {
                return lease;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{keys:?}: leases still {leases:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The job manager's re-queue of a job whose claim vanished is lost on its way to etcd (the
/// connection breaks as it is sent): the manager sends it again, and the job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_requeue_lost_on_its_way_to_etcd_is_sent_again() {
    let env = TestEnv::new().await.unwrap();
    let resource = new_resource_id();
    // A config at the job's version, so that the manager plans nothing of its own.
    env.put_config(RESOURCE_TYPE, &resource, &input(&resource, None), 1)
        .await
        .unwrap();
    let (id, record) = single_job(&resource, Some(json!({"spin_until_attempt": 1})));
    // Written before the manager starts: it learns of jobs it did not write from etcd.
    env.put_job(&id, &record, true).await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();

    // The manager (no plugins) reaches etcd through the proxy; its re-queue waits 1-2 s.
    let proxy = AnswerLosingProxy::start(&env.endpoint).await.unwrap();
    let mut config = env.host_config();
    config.etcd_endpoints = vec![proxy.endpoint()];
    config.plugin_dir = std::env::temp_dir().join(format!("esi-no-plugins-{resource}"));
    std::fs::create_dir_all(&config.plugin_dir).unwrap();
    config.external_handlers = vec![HANDLER.into()];
    config.lease_ttl = Duration::from_secs(60);
    config.requeue_backoff = Duration::from_secs(2);
    let manager = Host::start(config).await.unwrap();
    let worker = TestHost::start_with(&env, |config| {
        config.run_manager = false;
        config.limits.call_deadline = Duration::from_secs(600);
    })
    .await;

    let lease = claim_of(&env, &mut recorder, &id).await.lease;
    // The claim vanishes with its lease; the manager reads the job's record 250 ms later,
    // then waits at least a second before re-queueing it: the request lost is the re-queue.
    env.store.revoke_lease(lease).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.arm_to_lose_request();
    proxy.wait_cut(TIMEOUT).await;
    let ready = env.job_key(Queue::Ready, &id);
    assert!(
        env.store.get(&ready).await.unwrap().is_none(),
        "the lost re-queue did not reach etcd"
    );

    let state = env.wait_completed(RESOURCE_TYPE, &resource).await.unwrap();
    assert_eq!(scripted_output(&state), json!({"attempts": 1}));
    worker.shutdown().await;
    manager.shutdown().await;
}

/// The plugin of a job's handler is removed while the worker's claim of the job is on its
/// way back: etcd applied the claim, its answer is lost, and the plugin is gone by the time
/// the worker's retry learns the claim is its own. The worker hands the job back to the ready
/// queue as it was (not an attempt), and the job runs once the plugin is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_plugin_is_removed_as_it_is_claimed_is_handed_back_and_runs_later() {
    let env = TestEnv::new().await.unwrap();
    let resource = new_resource_id();
    let (id, record) = single_job(&resource, None);
    let mut recorder = env.record_changes().await.unwrap();
    let proxy = AnswerLosingProxy::start(&env.endpoint).await.unwrap();
    let worker = TestHost::start_with(&env, |config| {
        config.run_manager = false;
        config.etcd_endpoints = vec![proxy.endpoint()];
        // No lease renewal falls in the test, and a long hold cannot expire the claim.
        config.lease_ttl = Duration::from_secs(60);
    })
    .await;
    let wasm = worker.plugin_dir.join(format!("{HANDLER}.wasm"));
    let component = std::fs::read(&wasm).unwrap();

    // The claim is the first request the worker sends that names the job: etcd applies it,
    // the answer is lost, and the worker cannot reach etcd again until the plugin is gone.
    proxy.hold_after_cut();
    proxy.arm_for(&id);
    env.put_job(&id, &record, true).await.unwrap();
    let claim = claim_of(&env, &mut recorder, &id).await;
    std::fs::remove_file(&wasm).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while worker.host.plugins().serves(HANDLER) {
        assert!(
            std::time::Instant::now() < deadline,
            "the plugin was never removed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.wait_cut(TIMEOUT).await;
    proxy.release();

    let ready = env.job_key(Queue::Ready, &id);
    recorder
        .until(TIMEOUT, |c| {
            matches!(c, Change::Put(kv) if kv.key == ready && kv.mod_revision > claim.mod_revision)
        })
        .await
        .unwrap();
    let working = env.job_key(Queue::Working, &id);
    assert!(
        env.store.get(&working).await.unwrap().is_none(),
        "the claim was dropped"
    );
    assert!(env
        .store
        .get(&state_key(&env, &resource))
        .await
        .unwrap()
        .is_none());
    // The record goes back as it was: no attempt counted.
    assert_eq!(recorded_attempts(&env, &recorder, &id), vec![0, 0]);

    esi_tests::replace_file(&wasm, &component);
    let state = env.wait_completed(RESOURCE_TYPE, &resource).await.unwrap();
    assert_eq!(scripted_output(&state), json!({"attempts": 0}));
    worker.shutdown().await;
}

/// Two jobs of one resource: the first follows `first_script` with `on_failure`, the second
/// depends on it and just completes. Written before the host starts, because the job manager
/// learns of jobs it did not write only when it builds its index from etcd.
///
/// The resource gets a config too (at the version its jobs realise, so the manager plans
/// nothing of its own): once a workflow ends, the manager looks at the resource's config again,
/// and a resource without one counts as deleted, its `/state` with it.
async fn put_two_job_workflow(
    env: &TestEnv,
    resource: &str,
    first_script: Value,
    on_failure: &str,
) -> (String, String) {
    env.put_config(RESOURCE_TYPE, resource, &input(resource, None), 1)
        .await
        .unwrap();
    let (first, record) = job_record(
        HANDLER,
        "create",
        RESOURCE_TYPE,
        resource,
        1,
        true,
        false,
        &[],
        on_failure,
        input(resource, Some(first_script)),
    );
    env.put_job(&first, &record, true).await.unwrap();
    let (second, record) = job_record(
        HANDLER,
        "create",
        RESOURCE_TYPE,
        resource,
        1,
        false,
        true,
        std::slice::from_ref(&first),
        "fail",
        input(resource, None),
    );
    env.put_job(&second, &record, false).await.unwrap();
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_with_on_failure_ignore_lets_its_workflow_complete() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let resource = new_resource_id();
    let (first, second) =
        put_two_job_workflow(&env, &resource, json!({"always": "permanent"}), "ignore").await;
    let host = TestHost::start(&env).await;

    let state = env.wait_completed(RESOURCE_TYPE, &resource).await.unwrap();
    assert_eq!(state["state"]["worker_state"], "CREATE_COMPLETED");
    assert_eq!(state["error"], "");
    assert_eq!(scripted_output(&state), json!({"attempts": 0}));
    recorder
        .until_put(&state_key(&env, &resource), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        recorded_attempts(&env, &recorder, &first),
        [0],
        "a permanent failure is not retried"
    );
    let released = recorder.puts_under(&env.job_key(Queue::Ready, &second));
    assert_eq!(released.len(), 1, "the second job was released once");
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_with_on_failure_fail_cancels_the_rest_of_its_workflow() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let resource = new_resource_id();
    let (_, second) =
        put_two_job_workflow(&env, &resource, json!({"always": "permanent"}), "fail").await;
    let host = TestHost::start(&env).await;

    let state = wait_failed(&env, &resource).await;
    assert_eq!(state["state"]["worker_state"], "CREATE_FAILED");
    let error = state["error"].as_str().unwrap();
    assert!(error.contains("scripted permanent failure"), "{error}");
    for queue in [Queue::All, Queue::Waiting] {
        let key = env.job_key(queue, &second);
        recorder
            .until(
                TIMEOUT,
                |c| matches!(c, Change::Delete { key: k, .. } if *k == key),
            )
            .await
            .unwrap_or_else(|e| panic!("{key} was not deleted: {e}"));
    }
    env.wait_jobs_drained().await.unwrap();
    assert!(
        recorder
            .puts_under(&env.job_key(Queue::Ready, &second))
            .is_empty(),
        "the cancelled job was never released"
    );
    let state = env
        .get_json(&state_key(&env, &resource))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state["state"]["worker_state"], "CREATE_FAILED", "{state}");
    host.shutdown().await;
}

/// Two resources with configs: `upstream`, whose one job fails for good, and `downstream`,
/// whose workflow of `jobs` chained jobs waits on it. Returns the resources, the failing job
/// and the downstream jobs in order.
async fn put_failing_upstream_and_downstream(
    env: &TestEnv,
    jobs: usize,
) -> (String, String, String, Vec<String>) {
    let (upstream, downstream) = (new_resource_id(), new_resource_id());
    for resource in [&upstream, &downstream] {
        env.put_config(RESOURCE_TYPE, resource, &input(resource, None), 1)
            .await
            .unwrap();
    }
    let (first, record) = job_record(
        HANDLER,
        "create",
        RESOURCE_TYPE,
        &upstream,
        1,
        true,
        true,
        &[],
        "fail",
        input(&upstream, Some(json!({"always": "permanent"}))),
    );
    env.put_job(&first, &record, true).await.unwrap();
    let mut chain: Vec<String> = Vec::new();
    for n in 0..jobs {
        let previous = chain.last().unwrap_or(&first).clone();
        let (id, record) = job_record(
            HANDLER,
            "create",
            RESOURCE_TYPE,
            &downstream,
            1,
            n == 0,
            n + 1 == jobs,
            std::slice::from_ref(&previous),
            "fail",
            input(&downstream, None),
        );
        env.put_job(&id, &record, false).await.unwrap();
        chain.push(id);
    }
    (upstream, downstream, first, chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dependency_fails_a_dependant_of_another_resource_with_a_clear_error() {
    let env = TestEnv::new().await.unwrap();
    let (upstream, downstream, first, chain) = put_failing_upstream_and_downstream(&env, 1).await;
    let second = &chain[0];
    let host = TestHost::start(&env).await;

    wait_failed(&env, &upstream).await;
    let state = wait_failed(&env, &downstream).await;
    let error = state["error"].as_str().unwrap();
    assert!(
        error.contains(second.as_str())
            && error.contains(&first)
            && error.contains("scripted permanent failure"),
        "{error}"
    );
    // The failed job is kept for inspection.
    let dead = env
        .get_json(&env.keys().dead_job(&first))
        .await
        .unwrap()
        .expect("dead-job record");
    assert_eq!(dead["job"][1]["id"], first.as_str());
    assert_eq!(dead["attempts"], 0);
    assert!(
        dead["error"]
            .as_str()
            .unwrap()
            .contains("scripted permanent failure"),
        "{dead}"
    );
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}

/// A job whose record is removed while it waits to be retried (its workflow ended some other
/// way) cannot go back to ready; its claim is dropped rather than held until the host stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_job_record_went_during_its_retry_backoff_is_dropped() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let host = TestHost::start_with(&env, |c| {
        c.worker.retry_backoff = Duration::from_secs(2);
        c.worker.retry_backoff_max = Duration::from_secs(2);
    })
    .await;
    let resource = new_resource_id();
    let (id, record) = single_job(&resource, Some(json!({"always": "retryable"})));
    env.put_job(&id, &record, true).await.unwrap();
    recorder.until_claimed(env.keys(), TIMEOUT).await.unwrap();
    // The first attempt failed at once; the claim is held through the two-second backoff.
    env.store
        .delete(&env.job_key(Queue::All, &id))
        .await
        .unwrap();
    let working = env.job_key(Queue::Working, &id);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while env.store.get(&working).await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the claim was kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        env.store
            .get(&env.job_key(Queue::Ready, &id))
            .await
            .unwrap(),
        None
    );
    host.shutdown().await;
}

/// A failed job's dependants are cancelled all at once, and before the failed job is
/// cleaned up: a job manager that stops in between and rebuilds its view would otherwise find
/// a dependant waiting on a job that is gone (which reads as finished) and release it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_jobs_dependants_are_cancelled_in_one_commit_before_it_is_cleaned() {
    let env = TestEnv::new().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let resource = new_resource_id();
    let (first, second) =
        put_two_job_workflow(&env, &resource, json!({"always": "permanent"}), "fail").await;
    // A third job, after the second.
    let (third, record) = job_record(
        HANDLER,
        "create",
        RESOURCE_TYPE,
        &resource,
        1,
        false,
        true,
        std::slice::from_ref(&second),
        "fail",
        input(&resource, None),
    );
    env.put_job(&third, &record, false).await.unwrap();
    let host = TestHost::start(&env).await;

    wait_failed(&env, &resource).await;
    env.wait_jobs_drained().await.unwrap();
    let first_record = env.job_key(Queue::All, &first);
    // Every key is gone by now: take every event the watch has for them.
    let seen = recorder.for_a_while(Duration::from_millis(500)).await;
    let deleted_at = |key: &str| {
        seen.iter()
            .find_map(|c| match c {
                Change::Delete {
                    key: k, revision, ..
                } if k == key => Some(*revision),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{key} was never deleted"))
    };
    let cancelled: Vec<i64> = [&second, &third]
        .into_iter()
        .flat_map(|id| [Queue::All, Queue::Waiting].map(|q| deleted_at(&env.job_key(q, id))))
        .collect();
    assert!(
        cancelled.iter().all(|r| *r == cancelled[0]),
        "the dependants were cancelled in several commits: {cancelled:?}"
    );
    assert!(
        cancelled[0] < deleted_at(&first_record),
        "the failed job was cleaned before its dependants were cancelled"
    );
    host.shutdown().await;
}

/// A failed job with two dependants of another resource (a workflow of two jobs waiting on
/// it) fails that resource once: one `/state`, in the same commit as the cancellation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dependency_with_two_dependants_of_another_resource_fails_it_once() {
    let env = TestEnv::new().await.unwrap();
    let (upstream, downstream, first, _) = put_failing_upstream_and_downstream(&env, 2).await;
    let host = TestHost::start(&env).await;

    wait_failed(&env, &upstream).await;
    let state = wait_failed(&env, &downstream).await;
    let error = state["error"].as_str().unwrap();
    assert!(error.contains(&first), "{error}");
    env.wait_jobs_drained().await.unwrap();
    host.shutdown().await;
}
