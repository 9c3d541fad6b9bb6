//! Records a handler's jobs keep reading are read with the claim (`worker::hints`): the heat
//! template and, when every resource watches the same interfaces, their `/state`s cost a job
//! no round trip of its own, and what the plugin sees is still as fresh as a read.
//!
//! Alone in its test binary: it counts the process's etcd reads.

use esi_host::store::counters::StoreCounters;
use esi_tests::{seed_ha_interface_body, TestEnv};

/// Writes ha_interface `id` and waits for its `/state`; returns its `state_monitoring` text.
async fn monitor(env: &TestEnv, id: &str) -> String {
    env.put_config("ha_interface", id, &seed_ha_interface_body(id), 1)
        .await
        .unwrap();
    let state = env.wait_completed("ha_interface", id).await.unwrap();
    state["state"]["state_monitoring"]
        .as_str()
        .unwrap_or_else(|| panic!("no state_monitoring text in {state}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_repeated_by_jobs_come_with_the_claim_and_stay_fresh() {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates().await.unwrap();
    env.put_interface_states(Some("ACTIVE"), Some("ACTIVE"))
        .await
        .unwrap();
    let host = env.start_host().await.unwrap();

    // Two jobs teach the worker what monitoring jobs read: the template and the two
    // interface states every resource below shares.
    for i in 0..2 {
        let seen = monitor(&env, &format!("00000000-0000-4000-8000-00000000a00{i}")).await;
        assert!(!seen.contains("DOWN"), "{seen}");
    }

    // The host's reads: the process's minus this test's own (its polls of `/state`).
    let totals = StoreCounters::process_totals();
    let (before, own_before) = (totals.snapshot(), env.store.counters().snapshot());
    const JOBS: u64 = 4;
    for i in 0..JOBS {
        let seen = monitor(&env, &format!("00000000-0000-4000-8000-00000000b00{i}")).await;
        assert!(!seen.contains("DOWN"), "{seen}");
    }
    let gets = totals.snapshot().since(&before).get
        - env.store.counters().snapshot().since(&own_before).get;
    // Per resource, the job manager reads its `/state` once; without the prefetch each job
    // adds the plugin's three reads (template, two interface states).
    assert!(
        gets <= JOBS,
        "the host made {gets} reads for {JOBS} jobs: the plugin's reads did not come with the claims"
    );

    // The prefetched values are read at the claim: a change made before the next resource's
    // job is claimed is what that job sees.
    env.put_interface_states(Some("DOWN"), Some("ACTIVE"))
        .await
        .unwrap();
    let seen = monitor(&env, "00000000-0000-4000-8000-00000000c000").await;
    assert!(
        seen.contains("DOWN"),
        "the job saw a stale interface state: {seen}"
    );
    host.shutdown().await;
}
