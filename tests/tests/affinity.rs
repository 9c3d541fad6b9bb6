//! Claim affinity: hosts serving one handler take turns per job instead of all racing for
//! it, a job ranked to a host that never claims it still runs, and a peer's arrival after a
//! compaction costs no worker a restart.
//!
//! The tests read process-wide counters (`claims_lost`, `claims_deferred`, `worker_restarts`),
//! so they run one at a time, in a test binary of their own.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use esi_host::keys::{Queue, Record};
use esi_host::local_etcd::LocalEtcd;
use esi_host::metrics;
use esi_host::store::Change;
use esi_host::worker::affinity::Peers;
use esi_tests::{seed_ha_interface_body, TestEnv};
use serde_json::json;

const HANDLER: &str = "monitoring_worker";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn claims_lost() -> u64 {
    let labels = metrics::labels([("handler", HANDLER)]);
    metrics::global().claims_lost.get_or_create(&labels).get()
}

fn claims_deferred() -> u64 {
    let labels = metrics::labels([("handler", HANDLER)]);
    metrics::global()
        .claims_deferred
        .get_or_create(&labels)
        .get()
}

fn resource_ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("00000000-0000-4000-8000-{prefix}{i:08}"))
        .collect()
}

/// Puts a config per id, waits for all of them, and returns the claims seen meanwhile.
async fn run_resources(env: &TestEnv, ids: &[String]) -> Vec<Change> {
    let mut recorder = env.record_changes().await.unwrap();
    for id in ids {
        env.put_config("ha_interface", id, &seed_ha_interface_body(id), 1)
            .await
            .unwrap();
    }
    for id in ids {
        env.wait_completed("ha_interface", id).await.unwrap();
    }
    for id in ids {
        let state = env.key(Record::State, "ha_interface", id);
        recorder
            .until_put(&state, Duration::from_secs(10))
            .await
            .unwrap();
    }
    let working = env.keys().queue_prefix(Queue::Working);
    recorder
        .until(Duration::from_secs(10), |_| true)
        .await
        .unwrap()
        .iter()
        .filter(|change| matches!(change, Change::Put(kv) if kv.key.starts_with(&working)))
        .cloned()
        .collect()
}

/// The job ids claimed in `changes`, with the lease of each claim.
fn claims(env: &TestEnv, changes: &[Change]) -> Vec<(String, i64)> {
    let working = env.keys().queue_prefix(Queue::Working);
    changes
        .iter()
        .filter_map(|change| match change {
            Change::Put(kv) => kv
                .key
                .strip_prefix(working.as_str())
                .map(|id| (id.to_string(), kv.lease)),
            _ => None,
        })
        .collect()
}

async fn host_lease(env: &TestEnv, host_id: &str) -> i64 {
    let key = env.keys().host(host_id);
    env.store.get(&key).await.unwrap().unwrap().lease
}

/// A namespace with the shipped templates and both interfaces of the seed ACTIVE.
async fn env_with_templates_and_states() -> TestEnv {
    let env = TestEnv::new().await.unwrap();
    env.load_seed_world().await.unwrap();
    env
}

/// Waits until `host_id` publishes that it serves the handler, then a moment more for the
/// other hosts' workers to see it.
async fn wait_serving(env: &TestEnv, host_id: &str) {
    env.wait_plugin_status(host_id, HANDLER, Duration::from_secs(10), |s| {
        s["version"].as_str().is_some_and(|v| !v.is_empty())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_serving_one_handler_take_turns_instead_of_racing_for_each_job() {
    let _one_at_a_time = SERIAL.lock().await;
    let env = env_with_templates_and_states().await;
    let mut hosts = Vec::new();
    for host_id in ["host-a", "host-b"] {
        let mut config = env.host_config();
        config.host_id = host_id.into();
        // Ten times the default: a loaded CI machine must not make the first-ranked host so
        // late that its peer claims too.
        config.worker.claim_affinity_delay = Duration::from_millis(500);
        hosts.push(esi_host::Host::start(config).await.unwrap());
    }
    wait_serving(&env, "host-a").await;
    wait_serving(&env, "host-b").await;

    let (lost_before, deferred_before) = (claims_lost(), claims_deferred());
    let ids = resource_ids("a", 40);
    let changes = run_resources(&env, &ids).await;
    let lost = claims_lost() - lost_before;
    let deferred = claims_deferred() - deferred_before;

    let claims = claims(&env, &changes);
    let jobs: HashSet<&str> = claims.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(claims.len(), 40, "one claim per job: {claims:?}");
    assert_eq!(jobs.len(), 40);
    let lease_a = host_lease(&env, "host-a").await;
    let lease_b = host_lease(&env, "host-b").await;
    let mut by_host: HashMap<i64, usize> = HashMap::new();
    for (_, lease) in &claims {
        *by_host.entry(*lease).or_default() += 1;
    }
    let (a, b) = (by_host.get(&lease_a), by_host.get(&lease_b));
    assert!(
        a.is_some_and(|&n| n >= 5) && b.is_some_and(|&n| n >= 5),
        "both hosts run a share: a {a:?}, b {b:?} of 40"
    );
    // Without affinity both hosts claim every job and one of each pair is refused: ~40.
    // A host may still try a job its peer ranks first when the peer is over 500 ms late.
    assert!(
        lost <= 10 && deferred <= 10,
        "{lost} claims refused, {deferred} taken after the delay, for 40 jobs"
    );
    for host in hosts {
        host.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_ranked_first_to_a_host_that_never_claims_it_still_runs() {
    let _one_at_a_time = SERIAL.lock().await;
    let env = env_with_templates_and_states().await;
    // A host that says it serves the handler but runs no worker: as one that hangs or has
    // just died would, until its lease expires.
    let ghost = json!({"plugin": HANDLER, "version": "1.0.0", "handlers": [HANDLER],
                       "state": "active"});
    let ghost_key = env.keys().plugin_status("ghost", HANDLER);
    env.store.put(&ghost_key, ghost.to_string()).await.unwrap();
    let mut config = env.host_config();
    config.host_id = "host-a".into();
    let host = esi_host::Host::start(config).await.unwrap();
    wait_serving(&env, "host-a").await;

    let deferred_before = claims_deferred();
    let ids = resource_ids("b", 20);
    let changes = run_resources(&env, &ids).await;
    let taken_late = claims_deferred() - deferred_before;

    let mut peers = Peers::default();
    peers.put("ghost", HANDLER, ghost.to_string().as_bytes());
    let claims = claims(&env, &changes);
    assert_eq!(claims.len(), 20, "{claims:?}");
    let deferred = claims
        .iter()
        .filter(|(id, _)| peers.rank("host-a", HANDLER, id) == 1)
        .count();
    // Each job is ranked to the ghost with probability 1/2: none of 20 is a 1-in-a-million.
    assert!(deferred > 0, "no job was ranked to the ghost: {claims:?}");
    assert_eq!(
        taken_late as usize, deferred,
        "host-a took exactly the jobs ranked to the ghost after the delay"
    );
    let lease_a = host_lease(&env, "host-a").await;
    assert!(claims.iter().all(|(_, lease)| *lease == lease_a));
    host.shutdown().await;
}

/// A host alone follows only the ready queue's puts. When a peer comes to serve its handlers
/// it also follows the deletes, from the revision after the last ready job it saw, which etcd
/// may have compacted if the queue was quiet for long. The worker then lists the queue again
/// instead of failing as if etcd were down and starting over. On an etcd of its own: it
/// compacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_arriving_after_etcd_compacted_past_a_quiet_ready_queue_restarts_no_worker() {
    let _one_at_a_time = SERIAL.lock().await;
    let etcd = LocalEtcd::start().await.unwrap();
    let env = TestEnv::on_cluster(&[etcd.endpoint().to_string()])
        .await
        .unwrap();
    env.load_seed_world().await.unwrap();
    let mut config = env.host_config();
    config.host_id = "host-a".into();
    let host_a = esi_host::Host::start(config).await.unwrap();
    wait_serving(&env, "host-a").await;

    // Writes elsewhere move etcd on, and it compacts past what host-a last saw of the queue.
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let mut revision = 0;
    for round in 0..5 {
        let put = client.put("filler", round.to_string(), None).await;
        revision = put.unwrap().header().expect("a response header").revision();
    }
    client.compact(revision, None).await.unwrap();

    let relists = || {
        let labels = metrics::labels([("reason", "compacted")]);
        metrics::global()
            .worker_relists
            .get_or_create(&labels)
            .get()
    };
    let (restarts_before, relists_before) = (metrics::global().worker_restarts.get(), relists());
    let mut config = env.host_config();
    config.host_id = "host-b".into();
    let host_b = esi_host::Host::start(config).await.unwrap();
    wait_serving(&env, "host-b").await;
    let ids = resource_ids("c", 10);
    let claims = claims(&env, &run_resources(&env, &ids).await);
    assert_eq!(claims.len(), 10, "one claim per job: {claims:?}");
    assert_eq!(
        relists() - relists_before,
        1,
        "host-a's deletes watch met the compaction and listed the queue again"
    );
    assert_eq!(
        metrics::global().worker_restarts.get() - restarts_before,
        0,
        "a worker started over: its deletes watch met the compaction"
    );
    host_b.shutdown().await;
    host_a.shutdown().await;
}
