//! Several hosts on one etcd: one job manager at a time, and no job lost when a worker dies.

use std::collections::HashMap;
use std::time::Duration;

use esi_host::keys::{Queue, Record};
use esi_host::seed;
use esi_host::store::Change;
use esi_tests::{seed_ha_interface_body, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_manager_plans_each_workflow_once_and_a_standby_takes_over() {
    let env = TestEnv::new().await.unwrap();
    env.load_seed_world().await.unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let mut a = env.host_config();
    a.host_id = "host-a".into();
    let mut b = env.host_config();
    b.host_id = "host-b".into();
    let host_a = esi_host::Host::start(a).await.unwrap();
    let host_b = esi_host::Host::start(b).await.unwrap();

    let ids: Vec<String> = (0..20)
        .map(|i| format!("00000000-0000-4000-8000-{i:012}"))
        .collect();
    for id in &ids {
        env.put_config("ha_interface", id, &seed_ha_interface_body(id), 1)
            .await
            .unwrap();
    }
    for id in &ids {
        env.wait_completed("ha_interface", id).await.unwrap();
    }
    let last_state = env.key(Record::State, "ha_interface", ids.last().unwrap());
    recorder
        .until_put(&last_state, Duration::from_secs(10))
        .await
        .unwrap();
    let mut workflows: HashMap<String, usize> = HashMap::new();
    for (_, job) in recorder.puts_under(&env.job_key(Queue::All, "")) {
        *workflows
            .entry(job[1]["resource_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(workflows.len(), 20);
    assert!(
        workflows.values().all(|&n| n == 1),
        "a workflow was planned twice: {workflows:?}"
    );

    // Stop whichever host leads; the other takes the role over and goes on.
    let election = env.keys().job_manager_election();
    let leader = String::from_utf8(env.store.get(&election).await.unwrap().unwrap().value).unwrap();
    let survivor = if leader == "host-a" {
        host_a.shutdown().await;
        host_b
    } else {
        host_b.shutdown().await;
        host_a
    };
    let late = "00000000-0000-4000-8000-999999999999";
    env.put_config("ha_interface", late, &seed_ha_interface_body(late), 1)
        .await
        .unwrap();
    env.wait_completed("ha_interface", late).await.unwrap();
    let new_leader =
        String::from_utf8(env.store.get(&election).await.unwrap().unwrap().value).unwrap();
    assert_ne!(new_leader, leader);
    survivor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_died_is_requeued_and_the_dead_worker_cannot_publish() {
    let env = TestEnv::new().await.unwrap();
    env.put_ha_interface_template_retrying_every("0.2")
        .await
        .unwrap();
    env.put_interface_states(Some("ACTIVE"), None)
        .await
        .unwrap();
    let mut recorder = env.record_changes().await.unwrap();

    // A manager with no plugins of its own, and a first worker.
    let manager = env.start_manager_only().await.unwrap();
    let first = esi_host::Host::start(env.worker_only_config())
        .await
        .unwrap();

    let id = seed::HA_INTERFACE_ID;
    env.put_config("ha_interface", id, &seed_ha_interface_body(id), 1)
        .await
        .unwrap();
    recorder
        .until_claimed(env.keys(), Duration::from_secs(20))
        .await
        .unwrap();

    // The first worker dies holding the claim (its lease goes); a second one starts. The dead
    // worker's job task keeps running, like a frozen process that resumes.
    first.abandon().await;
    let second = esi_host::Host::start(env.worker_only_config())
        .await
        .unwrap();
    env.put_interface_states(None, Some("ACTIVE"))
        .await
        .unwrap();
    let state = env.wait_completed("ha_interface", id).await.unwrap();
    assert_eq!(state, seed::records().unwrap()[3].value);

    let state_key = env.key(Record::State, "ha_interface", id);
    recorder
        .until_put(&state_key, Duration::from_secs(10))
        .await
        .unwrap();
    let records = recorder.puts_under(&env.job_key(Queue::All, ""));
    let attempts: Vec<u64> = records
        .iter()
        .map(|(_, r)| r[2].as_u64().unwrap())
        .collect();
    assert_eq!(
        attempts,
        [0, 1],
        "written once, re-queued once with one more attempt"
    );
    // Give the dead worker's orphaned task time to try to complete: exactly one /state put.
    tokio::time::sleep(Duration::from_secs(1)).await;
    recorder
        .until(Duration::from_millis(200), |_| false)
        .await
        .ok();
    assert_eq!(
        recorder.puts_under(&state_key).len(),
        1,
        "only one worker published"
    );
    env.wait_jobs_drained().await.unwrap();
    second.shutdown().await;
    manager.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_host_hands_unfinished_jobs_back_at_once() {
    let env = TestEnv::new().await.unwrap();
    env.put_ha_interface_template_retrying_every("0.2")
        .await
        .unwrap();
    env.put_interface_states(Some("ACTIVE"), None)
        .await
        .unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let manager = env.start_manager_only().await.unwrap();
    let mut draining = env.worker_only_config();
    draining.lease_ttl = Duration::from_secs(30);
    draining.drain_timeout = Duration::from_millis(500);
    let draining = esi_host::Host::start(draining).await.unwrap();

    let id = seed::HA_INTERFACE_ID;
    env.put_config("ha_interface", id, &seed_ha_interface_body(id), 1)
        .await
        .unwrap();
    recorder
        .until_claimed(env.keys(), Duration::from_secs(20))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    draining.shutdown().await;
    // Handed back well before the 30 s lease could have expired.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        started.elapsed()
    );
    let ready = env
        .store
        .list(&env.job_key(Queue::Ready, ""))
        .await
        .unwrap()
        .0;
    assert_eq!(ready.len(), 1, "the unfinished job is ready again");
    // Its plugin status records went first, before the hand-back (and so before the lease
    // was revoked): other hosts stopped deferring new jobs to it at once.
    let (ready_key, handed_back_at) = (&ready[0].key, ready[0].mod_revision);
    let status_prefix = env.keys().plugin_status_prefix();
    let seen = recorder
        .until(Duration::from_secs(10), |change| {
            matches!(change, Change::Put(kv)
                if &kv.key == ready_key && kv.mod_revision == handed_back_at)
        })
        .await
        .unwrap();
    // Every status record the drained host had: its last change before the hand-back is a
    // delete (the manager-only host publishes none).
    let mut last_change: HashMap<&str, (i64, bool)> = HashMap::new();
    for change in seen {
        match change {
            Change::Put(kv)
                if kv.key.starts_with(&status_prefix) && kv.mod_revision < handed_back_at =>
            {
                last_change.insert(&kv.key, (kv.mod_revision, false));
            }
            Change::Delete { key, revision }
                if key.starts_with(&status_prefix) && *revision < handed_back_at =>
            {
                last_change.insert(key, (*revision, true));
            }
            _ => {}
        }
    }
    assert!(
        !last_change.is_empty() && last_change.values().all(|&(_, deleted)| deleted),
        "status records before the hand-back at {handed_back_at}: {last_change:?}"
    );

    let next = esi_host::Host::start(env.worker_only_config())
        .await
        .unwrap();
    env.put_interface_states(None, Some("ACTIVE"))
        .await
        .unwrap();
    env.wait_completed("ha_interface", id).await.unwrap();
    let state_key = env.key(Record::State, "ha_interface", id);
    recorder
        .until_put(&state_key, Duration::from_secs(10))
        .await
        .unwrap();
    let attempts: Vec<u64> = recorder
        .puts_under(&env.job_key(Queue::All, ""))
        .iter()
        .map(|(_, r)| r[2].as_u64().unwrap())
        .collect();
    assert_eq!(
        attempts.last(),
        Some(&0),
        "a drain is not a failed attempt: {attempts:?}"
    );
    next.shutdown().await;
    manager.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_manager_store_writes_nothing_once_the_election_key_is_not_its_own() {
    let env = TestEnv::new().await.unwrap();
    let election = env.keys().job_manager_election();
    let manager = env.store.fenced_by(election.clone(), "host-a");
    let job = esi_host::store::jobs::NewJob {
        id: "fence-test-1".into(),
        handler: "monitoring_worker".into(),
        record: "[]".into(),
        ready: true,
    };
    let state = env.key(Record::State, "ha_interface", "fenced");

    env.store.put(&election, "host-a").await.unwrap();
    manager.put(&state, "while leader").await.unwrap();
    assert!(manager
        .write_workflow(std::slice::from_ref(&job))
        .await
        .unwrap());

    // Another host won the role: every kind of write is refused, and nothing changes.
    env.store.put(&election, "host-b").await.unwrap();
    let refused = manager.put(&state, "after losing").await.unwrap_err();
    assert!(refused.is_fenced(), "{refused}");
    assert!(refused.to_string().contains(&election), "{refused}");
    let next = esi_host::store::jobs::NewJob {
        id: "fence-test-2".into(),
        ..job
    };
    let refused = manager
        .write_workflow(std::slice::from_ref(&next))
        .await
        .unwrap_err();
    assert!(refused.is_fenced(), "{refused}");
    assert!(manager.delete(&state).await.unwrap_err().is_fenced());
    assert_eq!(
        env.store.get(&state).await.unwrap().unwrap().value,
        b"while leader"
    );
    assert!(env
        .store
        .get(&env.job_key(Queue::All, "fence-test-2"))
        .await
        .unwrap()
        .is_none());

    // The role gone altogether: still refused.
    env.store.delete(&election).await.unwrap();
    assert!(manager
        .put(&state, "no leader")
        .await
        .unwrap_err()
        .is_fenced());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_configs_seen_in_one_watch_response_is_planned_in_one_etcd_commit() {
    use etcd_client::{Txn, TxnOp};
    let env = TestEnv::new().await.unwrap();
    env.put_ha_interface_template_retrying_every("0.5")
        .await
        .unwrap();
    let manager = env.start_manager_only().await.unwrap();

    // 40 configs in one transaction reach the manager in one watch response.
    let ids: Vec<String> = (0..40)
        .map(|i| format!("b0057000-0000-4000-8000-{i:012}"))
        .collect();
    let puts: Vec<TxnOp> = ids
        .iter()
        .map(|id| {
            TxnOp::put(
                env.key(Record::Config, "ha_interface", id),
                esi_host::seed::gohan_envelope(&seed_ha_interface_body(id), 1),
                None,
            )
        })
        .collect();
    env.store
        .txn("burst", Txn::new().and_then(puts))
        .await
        .unwrap();

    let all = env.keys().queue_prefix(Queue::All);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let jobs = loop {
        let (jobs, _) = env.store.list(&all).await.unwrap();
        if jobs.len() >= ids.len() {
            break jobs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {} workflows planned",
            jobs.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let commits: std::collections::BTreeSet<i64> =
        jobs.iter().map(|kv| kv.create_revision).collect();
    assert_eq!(jobs.len(), ids.len(), "one job per resource");
    assert_eq!(
        commits.len(),
        1,
        "workflows written at revisions {commits:?}"
    );
    manager.shutdown().await;
}
