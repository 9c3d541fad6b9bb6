//! What a job costs in etcd round trips, where the host saves them:
//!
//! - records a handler's jobs keep reading are read with the claim (`worker::hints`): the heat
//!   template and, when every resource watches the same interfaces, their `/state`s cost a job
//!   no round trip of its own, and what the plugin sees is still as fresh as a read; nor do
//!   the `/state`s of interfaces each resource has for itself, named by its job's params,
//!   when the job manager that planned the job runs in the worker's process;
//! - clean-ups of finished jobs ride with the job manager's next batch instead of costing a
//!   commit each;
//! - a job manager taking over reads the `/state`s of the resources it checks 128 at a time;
//! - a new resource costs the job manager no read: it plans a create without reading the
//!   `/state`, in a transaction that writes it only while there is none.
//!
//! The first test counts the process's etcd reads, so the tests of this binary take turns.

use esi_host::store::counters::StoreCounters;
use std::collections::BTreeSet;
use std::time::Duration;

use esi_host::keys::Record;
use esi_host::protocol::StateRecord;
use esi_host::store::Change;
use esi_tests::{seed_ha_interface_body, TestEnv};
use tokio::sync::Mutex;

/// Held by each test: the read counts are process-wide.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// A host with the shipped templates, and the seed's two interfaces up.
async fn monitoring_host() -> (TestEnv, esi_host::Host) {
    let env = TestEnv::new().await.unwrap();
    env.load_seed_world().await.unwrap();
    let host = env.start_host().await.unwrap();
    (env, host)
}

/// Writes ha_interface `id` and waits for its `/state`; returns its `state_monitoring` text.
async fn monitor(env: &TestEnv, id: &str) -> String {
    monitor_body(env, id, seed_ha_interface_body(id)).await
}

/// Writes ha_interface `id` with `body` and waits for its `/state`; returns its
/// `state_monitoring` text.
async fn monitor_body(env: &TestEnv, id: &str, body: serde_json::Value) -> String {
    env.put_config("ha_interface", id, &body, 1).await.unwrap();
    let state = env.wait_completed("ha_interface", id).await.unwrap();
    state["state"]["state_monitoring"]
        .as_str()
        .unwrap_or_else(|| panic!("no state_monitoring text in {state}"))
        .to_string()
}

/// Runs `jobs` and returns the etcd reads the host made meanwhile: the process's minus this
/// test's own (its polls of `/state`).
async fn host_reads_during(env: &TestEnv, jobs: impl AsyncFnOnce()) -> u64 {
    let totals = StoreCounters::process_totals();
    let (before, own_before) = (totals.snapshot(), env.store.counters().snapshot());
    jobs().await;
    totals.snapshot().since(&before).get - env.store.counters().snapshot().since(&own_before).get
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_repeated_by_jobs_come_with_the_claim_and_stay_fresh() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (env, host) = monitoring_host().await;
    shared_reads_come_with_the_claim(&env).await;
    host.shutdown().await;
}

/// As above, with the worker in another process than the job manager: it does not know the
/// jobs' params before claiming them, and still reads what every job reads with the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_job_manager_still_reads_shared_records_with_the_claim() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new().await.unwrap();
    env.load_seed_world().await.unwrap();
    let manager = env.start_manager_only().await.unwrap();
    let worker = esi_host::Host::start(env.worker_only_config())
        .await
        .unwrap();
    shared_reads_come_with_the_claim(&env).await;
    worker.shutdown().await;
    manager.shutdown().await;
}

/// Teaches the worker with two resources watching the seed's interfaces, then checks that
/// four more cost no read of their own beyond the job manager's, and that a prefetched
/// value is as fresh as a read.
async fn shared_reads_come_with_the_claim(env: &TestEnv) {
    // Two jobs teach the worker what monitoring jobs read: the template and the two
    // interface states every resource below shares.
    for i in 0..2 {
        let seen = monitor(env, &format!("00000000-0000-4000-8000-00000000a00{i}")).await;
        assert!(!seen.contains("DOWN"), "{seen}");
    }

    const JOBS: u64 = 4;
    let gets = host_reads_during(env, async || {
        for i in 0..JOBS {
            let seen = monitor(env, &format!("00000000-0000-4000-8000-00000000b00{i}")).await;
            assert!(!seen.contains("DOWN"), "{seen}");
        }
    })
    .await;
    // The job manager reads no `/state` of a new resource, so the bound leaves room for a
    // stray read (a vanished claim looked at); without the prefetch each job adds the
    // plugin's three reads (template, two interface states).
    assert!(
        gets <= JOBS,
        "the host made {gets} reads for {JOBS} jobs: the plugin's reads did not come with the claims"
    );

    // The prefetched values are read at the claim: a change made before the next resource's
    // job is claimed is what that job sees.
    env.put_interface_states(Some("DOWN"), Some("ACTIVE"))
        .await
        .unwrap();
    let seen = monitor(env, "00000000-0000-4000-8000-00000000c000").await;
    assert!(
        seen.contains("DOWN"),
        "the job saw a stale interface state: {seen}"
    );
}

/// Writes ha_interface `id` watching interfaces of its own (both up) and waits for its
/// `/state`; returns its `state_monitoring` text.
async fn monitor_own_interfaces(env: &TestEnv, id: &str, n: usize) -> String {
    let (primary, secondary) = (
        format!("00000000-0000-4000-8000-0000000f1{n:03}"),
        format!("00000000-0000-4000-8000-0000000f2{n:03}"),
    );
    for interface in [&primary, &secondary] {
        let up = serde_json::json!({"interface": "ACTIVE"});
        env.put_monitoring_state("er_physical_interface", interface, &up)
            .await
            .unwrap();
    }
    let mut body = seed_ha_interface_body(id);
    body["primary_interface_id"] = primary.into();
    body["secondary_interface_id"] = secondary.into();
    monitor_body(env, id, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_jobs_params_name_come_with_the_claim() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (env, host) = monitoring_host().await;
    // Two jobs teach the worker that monitoring jobs read the states of the interfaces their
    // params name; here no two resources share one.
    for i in 0..2 {
        let id = format!("00000000-0000-4000-8000-00000000f00{i}");
        let seen = monitor_own_interfaces(&env, &id, i).await;
        assert!(!seen.contains("DOWN"), "{seen}");
    }

    const JOBS: u64 = 4;
    let gets = host_reads_during(&env, async || {
        for i in 0..JOBS as usize {
            let id = format!("00000000-0000-4000-8000-00000000f10{i}");
            let seen = monitor_own_interfaces(&env, &id, 10 + i).await;
            assert!(!seen.contains("DOWN"), "{seen}");
        }
    })
    .await;
    // The job manager reads no `/state` of a new resource, so the bound leaves room for a
    // stray read (a vanished claim looked at); without the params' records in the claim,
    // each job adds the plugin's read of its two interface states.
    assert!(
        gets <= JOBS,
        "the host made {gets} reads for {JOBS} jobs: the interface states did not come with \
         the claims"
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_ups_ride_with_the_next_workflow_write() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (env, host) = monitoring_host().await;
    monitor(&env, "00000000-0000-4000-8000-00000000d000").await;
    env.wait_jobs_drained().await.unwrap();

    // Resources one after another, each written as soon as the previous one's `/state`
    // appears: the previous job's clean-up is still waiting for a ride when the next
    // workflow is written.
    let mut recorder = env.record_changes().await.unwrap();
    const RESOURCES: usize = 10;
    for i in 0..RESOURCES {
        let id = format!("00000000-0000-4000-8000-00000000e00{i}");
        env.put_config("ha_interface", &id, &seed_ha_interface_body(&id), 1)
            .await
            .unwrap();
        let state = env.key(Record::State, "ha_interface", &id);
        recorder
            .until_put(&state, Duration::from_secs(30))
            .await
            .unwrap();
    }
    env.wait_jobs_drained().await.unwrap();
    let changes = recorder.for_a_while(Duration::from_millis(300)).await;
    let commits: BTreeSet<i64> = changes
        .iter()
        .map(|change| match change {
            Change::Put(kv) => kv.mod_revision,
            Change::Delete { revision, .. } => *revision,
        })
        .collect();
    // Per resource: the config put, the workflow write, the claim and the completion; a
    // clean-up of its own would be a fifth. At least half of them must have ridden along
    // (in practice all but the last do).
    let per_resource = commits.len() as f64 / RESOURCES as f64;
    assert!(
        per_resource <= 4.5,
        "{} commits for {RESOURCES} resources ({per_resource} each)",
        commits.len()
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_manager_taking_over_reads_the_states_it_checks_together() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new().await.unwrap();
    env.load_seed_world().await.unwrap();
    // Resources already done: each `/state` is at its config's version.
    const DONE: usize = 300;
    let done = StateRecord::bare("CREATE_COMPLETED", 1, String::new()).to_json();
    for i in 0..DONE {
        let id = format!("00000000-0000-4000-8000-0000000f{i:04}");
        env.put_config("ha_interface", &id, &seed_ha_interface_body(&id), 1)
            .await
            .unwrap();
        let state = env.key(Record::State, "ha_interface", &id);
        env.store.put(&state, done.clone()).await.unwrap();
    }
    // One more to do, whose key lists after theirs: the manager's rebuild checks resources
    // in the listing's order, so its `/state` appearing means every check was made.
    let last = "00000000-0000-4000-8000-ffffffffffff";
    env.put_config("ha_interface", last, &seed_ha_interface_body(last), 1)
        .await
        .unwrap();
    let reads = host_reads_during(&env, async || {
        let host = env.start_host().await.unwrap();
        env.wait_completed("ha_interface", last).await.unwrap();
        host.shutdown().await;
    })
    .await;
    // One read each would be over 300; 128 at a time, 3 for the states and a few for the
    // job's own reads and the host's start.
    assert!(
        reads <= 20,
        "{reads} reads to take over {DONE} finished resources"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_resource_costs_the_job_manager_no_read() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (env, host) = monitoring_host().await;
    // Two jobs teach the worker what monitoring jobs read, so that the jobs below read
    // nothing of their own either.
    for i in 0..2 {
        monitor(&env, &format!("00000000-0000-4000-8000-00000000d10{i}")).await;
    }
    const RESOURCES: u64 = 6;
    let reads = host_reads_during(&env, async || {
        for i in 0..RESOURCES {
            monitor(&env, &format!("00000000-0000-4000-8000-00000000d20{i}")).await;
        }
    })
    .await;
    // None in practice; a read of the `/state` of each would make 6. The slack is for a
    // stray read the manager makes when a finished job's watch event comes late (a vanished
    // claim looked at), which a busy machine can cause.
    assert!(
        reads <= 2,
        "the host made {reads} reads for {RESOURCES} new resources, one after the other"
    );
    host.shutdown().await;
}

/// Batches the job manager sent in `lane` ("in_order" or "beside") so far in this process.
fn manager_batches(lane: &str) -> u64 {
    esi_host::metrics::global()
        .manager_batches
        .get_or_create(&esi_host::metrics::labels([("lane", lane)]))
        .get()
}

/// New resources that arrive while a batch of the job manager's writes commits go in a
/// batch beside it instead of waiting for it (their creates are written only while their
/// `/state` is absent, and no job of the batch in flight is theirs); each still completes
/// once. Configs are written from several tasks at once, so that some arrive mid-commit;
/// rounds repeat until one did (the first, in practice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_resources_commit_beside_the_batch_in_flight_and_each_completes_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (env, host) = monitoring_host().await;
    let env = std::sync::Arc::new(env);
    let before = manager_batches("beside");
    let mut round = 0;
    while manager_batches("beside") == before {
        round += 1;
        assert!(
            round <= 5,
            "no batch went beside another in {} rounds",
            round - 1
        );
        let ids: Vec<String> = (0..64)
            .map(|i| format!("00000000-0000-4000-8000-0000000e{round}{i:03}"))
            .collect();
        let mut writers = tokio::task::JoinSet::new();
        for chunk in ids.chunks(8) {
            let (env, chunk) = (env.clone(), chunk.to_vec());
            writers.spawn(async move {
                for id in chunk {
                    let body = seed_ha_interface_body(&id);
                    env.put_config("ha_interface", &id, &body, 1).await.unwrap();
                }
            });
        }
        writers.join_all().await;
        for id in &ids {
            let state = env.wait_completed("ha_interface", id).await.unwrap();
            assert_eq!(
                state["state"]["worker_state"], "CREATE_COMPLETED",
                "{id}: {state}"
            );
            assert_eq!(state["version"], 1, "{id}: {state}");
        }
    }
    // Each resource's one job ran once: one `/state` put each, and nothing left queued.
    env.wait_jobs_drained().await.unwrap();
    let twice: Vec<_> = env
        .state_put_counts()
        .await
        .unwrap()
        .into_iter()
        .filter(|(key, puts)| key.contains("0000000e") && *puts != 1)
        .collect();
    assert!(twice.is_empty(), "/state put other than once: {twice:?}");
    host.shutdown().await;
}
