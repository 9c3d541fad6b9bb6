//! The store's round-trip savers against a real etcd: reads in one transaction, watches that
//! leave out the events nobody uses, gathering responses already delivered, a claim that
//! brings the job's record (and prefetched records) back, and claims and completions that
//! share commits.

use std::sync::Arc;
use std::time::Duration;

use esi_host::keys::{Queue, Record};
use esi_host::lease::{self, HostLease};
use esi_host::store::jobs::{
    ClaimFate, Claimed, Completion, CompletionOutcome, GuardedWrite, NewJob, Unwritten,
    UnwrittenWorkflow, ETCD_DEFAULT_MAX_REQUEST_BYTES,
};
use esi_host::store::{Change, Events, Watch};
use esi_tests::TestEnv;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_answers_every_key_in_order_including_absent_ones_past_one_transaction() {
    let env = TestEnv::new().await.unwrap();
    let key = |i: usize| env.job_key(Queue::All, &format!("many-{i:03}"));
    // 300 keys: three transactions of etcd's default 128 operations.
    let keys: Vec<String> = (0..300).map(key).collect();
    for (i, k) in keys.iter().enumerate() {
        if i % 3 != 0 {
            env.store.put(k, format!("v{i}")).await.unwrap();
        }
    }
    let gets_before = env.store.counters().snapshot().get;
    let found = env.store.get_many(&keys).await.unwrap();
    assert_eq!(env.store.counters().snapshot().get - gets_before, 3);
    assert_eq!(found.len(), keys.len());
    for (i, kv) in found.iter().enumerate() {
        match kv {
            Some(kv) => {
                assert_ne!(i % 3, 0, "{} should be absent", keys[i]);
                assert_eq!(kv.key, keys[i]);
                assert_eq!(kv.value, format!("v{i}").into_bytes());
            }
            None => assert_eq!(i % 3, 0, "{} should be there", keys[i]),
        }
    }
    assert!(env.store.get_many(&[]).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_watches_deliver_only_puts_or_only_deletes_and_try_next_never_waits() {
    let env = TestEnv::new().await.unwrap();
    let prefix = env.keys().queue_prefix(Queue::Ready);
    let mut puts = watch_from_now(&env, &prefix, Events::Puts).await;
    let mut deletes = watch_from_now(&env, &prefix, Events::Deletes).await;
    assert!(puts.try_next().is_none(), "nothing happened yet");

    let (a, b) = (
        env.job_key(Queue::Ready, "watched-a"),
        env.job_key(Queue::Ready, "watched-b"),
    );
    env.store.put(&a, "h").await.unwrap();
    env.store.delete(&a).await.unwrap();
    env.store.put(&b, "h").await.unwrap();
    env.store.delete(&b).await.unwrap();

    let mut seen_puts = Vec::new();
    while seen_puts.len() < 2 {
        let changes = tokio::time::timeout(Duration::from_secs(10), puts.next())
            .await
            .expect("the puts arrive")
            .unwrap();
        seen_puts.extend(changes);
    }
    assert!(
        seen_puts.iter().all(|c| matches!(c, Change::Put(_))),
        "{seen_puts:?}"
    );
    let mut seen_deletes = Vec::new();
    while seen_deletes.len() < 2 {
        let changes = tokio::time::timeout(Duration::from_secs(10), deletes.next())
            .await
            .expect("the deletes arrive")
            .unwrap();
        seen_deletes.extend(changes);
    }
    match seen_deletes.as_slice() {
        [Change::Delete {
            key: first,
            revision: r1,
        }, Change::Delete {
            key: second,
            revision: r2,
        }] => {
            assert_eq!((first, second), (&a, &b));
            assert!(0 < *r1 && r1 < r2, "the deletes' own revisions: {r1}, {r2}");
        }
        other => panic!("expected the two deletes, got {other:?}"),
    }
    // Nothing more was sent: the filtered events never arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(puts.try_next().is_none());
    assert!(deletes.try_next().is_none());

    // A response already delivered is taken without waiting.
    env.store.put(&a, "again").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let changes = loop {
        if let Some(changes) = puts.try_next() {
            break changes.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the put never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(matches!(changes.as_slice(), [Change::Put(kv)] if kv.key == a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_brings_the_record_back_and_only_one_claimer_wins() {
    let env = TestEnv::new().await.unwrap();
    let job = ready_job(&env, "claim-with-record").await;
    let lease = env.store.grant_lease(30).await.unwrap();
    let gets_before = env.store.counters().snapshot().get;
    match env.store.claim(&job.id, "res-1", lease, &[]).await.unwrap() {
        Claimed::Ours {
            record: Some(kv),
            prefetched,
        } => {
            assert!(prefetched.is_empty());
            assert_eq!(kv.key, env.job_key(Queue::All, &job.id));
            assert_eq!(kv.value, job.record.as_bytes());
        }
        other => panic!("expected the claim with its record, got {other:?}"),
    }
    assert_eq!(
        env.store.counters().snapshot().get,
        gets_before,
        "no extra read"
    );
    // A retry with the same reservation (its first answer lost) is still ours, bound to the
    // lease of the try that won, even if the retry was made under another; another claimer
    // is refused.
    let other = env.store.grant_lease(30).await.unwrap();
    for retry_lease in [lease, other] {
        match env
            .store
            .claim(&job.id, "res-1", retry_lease, &[])
            .await
            .unwrap()
        {
            Claimed::OursUnread { lease: bound } => assert_eq!(bound, lease),
            other => panic!("expected the claim won earlier, got {other:?}"),
        }
    }
    env.store.revoke_lease(other).await.unwrap();
    assert!(matches!(
        env.store.claim(&job.id, "res-2", lease, &[]).await.unwrap(),
        Claimed::Taken
    ));
    env.store.revoke_lease(lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_reads_prefetched_keys_at_its_revision_present_or_absent() {
    let env = TestEnv::new().await.unwrap();
    let job = ready_job(&env, "claim-with-prefetch").await;
    let (present, absent) = (
        env.job_key(Queue::All, "prefetch-present"),
        env.job_key(Queue::All, "prefetch-absent"),
    );
    env.store.put(&present, "template").await.unwrap();
    let written = env.store.get(&present).await.unwrap().unwrap().mod_revision;
    let lease = env.store.grant_lease(30).await.unwrap();
    let gets_before = env.store.counters().snapshot().get;
    let prefetch = [present.clone(), absent.clone()];
    match env
        .store
        .claim(&job.id, "res-1", lease, &prefetch)
        .await
        .unwrap()
    {
        Claimed::Ours {
            record: Some(_),
            prefetched,
        } => {
            assert_eq!(prefetched.len(), 2);
            let (key, found) = &prefetched[0];
            let found = found.as_ref().expect("the present key is found");
            assert_eq!((key, &found.value[..]), (&present, &b"template"[..]));
            assert_eq!(found.mod_revision, written);
            assert_eq!(prefetched[1], (absent, None));
        }
        other => panic!("expected the claim with its reads, got {other:?}"),
    }
    assert_eq!(env.store.counters().snapshot().get, gets_before);
    env.store.revoke_lease(lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_fate_tells_a_claim_we_ended_from_one_that_may_have_expired() {
    let env = TestEnv::new().await.unwrap();
    let (ours, expired) = (
        ready_job(&env, "fate-ours").await,
        ready_job(&env, "fate-expired").await,
    );
    let lease = env.store.grant_lease(30).await.unwrap();
    let other = env.store.grant_lease(30).await.unwrap();
    for (job, lease) in [(&ours, lease), (&expired, other)] {
        assert!(matches!(
            env.store.claim(&job.id, "res-1", lease, &[]).await.unwrap(),
            Claimed::Ours { .. }
        ));
        assert_eq!(
            env.store.claim_fate(&job.id, "res-1", lease).await.unwrap(),
            ClaimFate::Held
        );
    }

    // Our completion commits; a retry of it (its answer lost) finds the claim gone, and the
    // fate says our own transaction ended it.
    let job_state_key = env.key(Record::JobState, "ha_router", "fate-ours");
    let completion = Completion {
        job_id: &ours.id,
        reservation: "res-1",
        job_state_key: &job_state_key,
        job_state: "{}".into(),
        state: None,
        writes: &[],
    };
    assert_eq!(
        env.store.complete(&completion).await.unwrap(),
        CompletionOutcome::Completed
    );
    assert_eq!(
        env.store.complete(&completion).await.unwrap(),
        CompletionOutcome::LostClaim
    );
    assert_eq!(
        env.store
            .claim_fate(&ours.id, "res-1", lease)
            .await
            .unwrap(),
        ClaimFate::EndedByUs
    );

    // A claim whose lease ended: its working key went with the lease, so nobody can tell.
    env.store.revoke_lease(other).await.unwrap();
    assert_eq!(
        env.store
            .claim_fate(&expired.id, "res-1", other)
            .await
            .unwrap(),
        ClaimFate::Unknown
    );
    env.store.revoke_lease(lease).await.unwrap();
}

/// Workflows that together exceed etcd's request limit go in batches cut to fit it: no
/// batch is refused and sent again one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_large_workflows_is_cut_to_fit_etcds_request_limit() {
    let env = TestEnv::new().await.unwrap();
    // 20 workflows of ~100 KB: ~2 MB, over etcd's default 1.5 MiB in one request.
    let padding = "x".repeat(100_000);
    let jobs: Vec<NewJob> = (0..20)
        .map(|i| NewJob {
            id: format!("large-{i:02}"),
            handler: "monitoring_worker".into(),
            record: format!(r#"["monitoring_worker",{{"pad":"{padding}"}},0]"#),
            ready: true,
        })
        .collect();
    let planned = jobs
        .iter()
        .map(|job| env.store.workflow_txn(std::slice::from_ref(job)).unwrap())
        .collect();
    let txns_before = env.store.counters().snapshot().txn;
    let refused = env
        .store
        .batch(planned, ETCD_DEFAULT_MAX_REQUEST_BYTES)
        .await
        .unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(
        env.store.counters().snapshot().txn - txns_before,
        2,
        "two requests, none refused"
    );
    for job in &jobs {
        let found = env.store.get(&env.job_key(Queue::Ready, &job.id)).await;
        assert!(found.unwrap().is_some(), "{} is ready", job.id);
    }
}

/// A workflow written only while its resource has no `/state`, in a batch and alone: written
/// when there is none; handed back when there is one; not handed back when an earlier
/// attempt (whose answer was lost) already wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_written_unless_its_state_exists_comes_back_when_it_does() {
    let env = TestEnv::new().await.unwrap();
    let job = |name: &str| NewJob {
        id: format!("unless-{name}"),
        handler: "monitoring_worker".into(),
        record: format!(r#"["monitoring_worker",{{"id":"unless-{name}"}},0]"#),
        ready: true,
    };
    let state = |name: &str| env.key(Record::State, "ha_interface", &format!("unless-{name}"));
    let planned = |name: &str| {
        env.store
            .workflow_txn_unless_state(&[job(name)], &state(name))
            .unwrap()
    };
    for name in ["present", "retried", "alone"] {
        env.store.put(&state(name), "{}").await.unwrap();
    }
    assert!(env.store.write_workflow(&[job("retried")]).await.unwrap());

    let batch = ["absent", "present", "retried"].map(planned).into();
    let unwritten = env
        .store
        .batch(batch, ETCD_DEFAULT_MAX_REQUEST_BYTES)
        .await
        .unwrap();
    let had_state = |name: &str| UnwrittenWorkflow {
        first_job: format!("unless-{name}"),
        why: Unwritten::HadState,
        state_unread: true,
    };
    assert_eq!(unwritten, [had_state("present")]);
    let ready = |name: &str| env.job_key(Queue::Ready, &format!("unless-{name}"));
    assert!(env.store.get(&ready("absent")).await.unwrap().is_some());
    assert!(env.store.get(&ready("present")).await.unwrap().is_none());

    let unwritten = env
        .store
        .batch(vec![planned("alone")], ETCD_DEFAULT_MAX_REQUEST_BYTES)
        .await
        .unwrap();
    assert_eq!(unwritten, [had_state("alone")]);
    assert!(env.store.get(&ready("alone")).await.unwrap().is_none());

    // The job manager's store is fenced: its batch is nested once more, in the compare of
    // the election key.
    let election = env.key(Record::Config, "ha_interface", "unless-election");
    env.store.put(&election, "host-a").await.unwrap();
    let fenced = env.store.fenced_by(election, "host-a");
    env.store.put(&state("fenced"), "{}").await.unwrap();
    let batch = ["fenced", "fenced-absent"].map(planned).into();
    let unwritten = fenced
        .batch(batch, ETCD_DEFAULT_MAX_REQUEST_BYTES)
        .await
        .unwrap();
    assert_eq!(unwritten, [had_state("fenced")]);
    assert!(env
        .store
        .get(&ready("fenced-absent"))
        .await
        .unwrap()
        .is_some());
}

/// Writes a ready job `id` (a one-job workflow) and returns it.
async fn ready_job(env: &TestEnv, id: &str) -> NewJob {
    let job = NewJob {
        id: id.to_string(),
        handler: "monitoring_worker".into(),
        record: format!(r#"["monitoring_worker",{{"id":"{id}"}},0]"#),
        ready: true,
    };
    assert!(env
        .store
        .write_workflow(std::slice::from_ref(&job))
        .await
        .unwrap());
    job
}

/// Writes `n` ready jobs named `<prefix>-<i>`; returns their ids.
async fn ready_jobs(env: &TestEnv, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(ready_job(env, &format!("{prefix}-{i:02}")).await.id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_completions_sent_at_once_share_commits_and_each_gets_its_own_answer() {
    let env = TestEnv::new().await.unwrap();
    const JOBS: usize = 40;
    let ids = ready_jobs(&env, "grouped", JOBS).await;
    let grouped = env.store.grouped();
    let lease = env.store.grant_lease(30).await.unwrap();

    // Every claim at once: each is ours, with its own record, in fewer commits than claims.
    let txns_before = env.store.counters().snapshot().txn;
    let claims: Vec<_> = ids
        .iter()
        .map(|id| {
            let (store, id) = (grouped.clone(), id.clone());
            tokio::spawn(async move { store.claim(&id, &format!("res-{id}"), lease, &[]).await })
        })
        .collect();
    for (id, claim) in ids.iter().zip(claims) {
        match claim.await.unwrap().unwrap() {
            Claimed::Ours {
                record: Some(kv), ..
            } => assert!(String::from_utf8_lossy(&kv.value).contains(id.as_str())),
            other => panic!("{id}: expected our claim with its record, got {other:?}"),
        }
    }
    let claim_txns = env.store.counters().snapshot().txn - txns_before;
    assert!(
        claim_txns < JOBS as u64 / 2,
        "{claim_txns} commits for {JOBS} claims sent at once"
    );
    // A second claimer is refused, through the group too.
    assert!(matches!(
        grouped.claim(&ids[0], "rival", lease, &[]).await.unwrap(),
        Claimed::Taken
    ));

    // Completions at once, some with the wrong reservation (refused alone: LostClaim), and
    // all writing one shared key, which etcd refuses inside one transaction: the groups are
    // sent one by one and every completion still gets its own answer.
    let shared = env.job_key(Queue::All, "grouped-shared");
    let refused_before = env.store.counters().snapshot().txn;
    let completions: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (store, id, shared) = (grouped.clone(), id.clone(), shared.clone());
            let state_key = env.job_key(Queue::All, &format!("{id}-state"));
            tokio::spawn(async move {
                let reservation = if i % 5 == 0 {
                    "not-ours".to_string()
                } else {
                    format!("res-{id}")
                };
                let writes = [GuardedWrite {
                    key: shared,
                    value: Some(id.clone()),
                    expect_mod_revision: None,
                }];
                let completion = Completion {
                    job_id: &id,
                    reservation: &reservation,
                    job_state_key: &state_key,
                    job_state: "{}".into(),
                    state: None,
                    writes: &writes,
                };
                store.complete(&completion).await
            })
        })
        .collect();
    for (i, outcome) in completions.into_iter().enumerate() {
        let expected = if i % 5 == 0 {
            CompletionOutcome::LostClaim
        } else {
            CompletionOutcome::Completed
        };
        assert_eq!(outcome.await.unwrap().unwrap(), expected, "{}", ids[i]);
        let finished = env.job_key(Queue::Finished, &ids[i]);
        assert_eq!(
            env.store.get(&finished).await.unwrap().is_some(),
            expected == CompletionOutcome::Completed,
            "{finished}"
        );
    }
    // Refused groups cost a request each on top of the one per completion.
    let completion_txns = env.store.counters().snapshot().txn - refused_before;
    assert!(
        completion_txns > JOBS as u64,
        "{completion_txns} requests: no group was refused for its shared key"
    );
    env.store.revoke_lease(lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_lease_bound_record_is_deleted_and_never_published_again() {
    let env = TestEnv::new().await.unwrap();
    let lease = HostLease::new(env.store.grant_lease(30).await.unwrap());
    let (retired, kept) = (
        env.keys().plugin_status("host-a", "retired"),
        env.keys().plugin_status("host-a", "kept"),
    );
    for key in [&retired, &kept] {
        lease.publish(&env.store, key, "{}".into()).await.unwrap();
    }
    lease
        .retire(&env.store, std::slice::from_ref(&retired))
        .await
        .unwrap();
    assert!(env.store.get(&retired).await.unwrap().is_none());
    // A publish that was on its way when the drain started puts nothing back.
    lease
        .publish(&env.store, &retired, "{}".into())
        .await
        .unwrap();
    assert!(env.store.get(&retired).await.unwrap().is_none());
    let kv = env
        .store
        .get(&kept)
        .await
        .unwrap()
        .expect("the other record stays");
    assert_eq!(kv.lease, lease.id());
    env.store.revoke_lease(lease.id()).await.unwrap();
}

/// Publishes racing the republish that follows a lease loss. The republish puts back every
/// record under the new lease, from what it read when it started; a publish that overtook
/// it must not be undone. Every put the watch sees takes a record forward, never back, and
/// each record ends with the value published last, under the new lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_racing_the_republish_after_a_lease_loss_never_put_an_older_value_back() {
    const RECORDS: usize = 100;
    let env = TestEnv::new().await.unwrap();
    let host = "host-republish-race";
    // The host's status records: `plugin_status` with an empty plugin name ends in `<host>/`.
    let prefix = env.keys().plugin_status(host, "");
    let keys: Vec<String> = (0..RECORDS)
        .map(|i| env.keys().plugin_status(host, &format!("p{i:03}")))
        .collect();
    let first = env.store.grant_lease(30).await.unwrap();
    let lease = Arc::new(HostLease::new(first));
    for key in &keys {
        lease.publish(&env.store, key, "0".into()).await.unwrap();
    }
    let mut puts = watch_from_now(&env, &prefix, Events::Puts).await;
    let shutdown = CancellationToken::new();
    // A TTL of 10 s: the keeper renews every 3.3 s and finds the revoked lease within that.
    let keeper = tokio::spawn(lease::keep(
        env.store.clone(),
        lease.clone(),
        Duration::from_secs(10),
        shutdown.clone(),
    ));
    env.store.revoke_lease(first).await.unwrap();

    // Round after round of new values until well after the new lease's republish. The last
    // record goes first: the republish goes through them in key order, so the two meet.
    let mut round = 0u32;
    let mut replaced_in = None;
    let started = std::time::Instant::now();
    loop {
        round += 1;
        for key in keys.iter().rev() {
            // Refused while the revoked lease is still the current one; kept for the
            // republish all the same.
            let _ = lease.publish(&env.store, key, round.to_string()).await;
        }
        if lease.id() != first {
            replaced_in.get_or_insert(round);
        }
        if replaced_in.is_some_and(|replaced| round >= replaced + 5) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the keeper never replaced the revoked lease"
        );
    }
    let second = lease.id();

    // Every put, in order, until each record has shown the last round.
    let mut last: Vec<Option<u32>> = vec![None; RECORDS];
    while last.iter().any(|value| *value != Some(round)) {
        let changes = tokio::time::timeout(Duration::from_secs(10), puts.next())
            .await
            .unwrap_or_else(|_| panic!("records still short of round {round}: {last:?}"))
            .unwrap();
        for change in changes {
            let Change::Put(kv) = change else { continue };
            let index = keys.iter().position(|key| *key == kv.key).unwrap();
            let value: u32 = kv.value_str().parse().unwrap();
            if let Some(before) = last[index] {
                assert!(
                    before <= value,
                    "{}: put back {value} after {before}",
                    kv.key
                );
            }
            last[index] = Some(value);
        }
    }
    for key in &keys {
        let kv = env.store.get(key).await.unwrap().unwrap();
        assert_eq!(
            (kv.value_str().as_ref(), kv.lease),
            (&*round.to_string(), second)
        );
    }
    shutdown.cancel();
    keeper.await.unwrap();
    env.store.revoke_lease(second).await.unwrap();
}

/// A watch of `events` under `prefix` from the revision after a listing taken now.
async fn watch_from_now(env: &TestEnv, prefix: &str, events: Events) -> Watch {
    let (_, revision) = env.store.list(prefix).await.unwrap();
    env.store
        .watch_events(prefix, revision + 1, events)
        .await
        .unwrap()
}
