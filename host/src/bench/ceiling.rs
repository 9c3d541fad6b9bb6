//! The etcd ceiling: how many completion-shaped transactions per second this etcd commits.
//!
//! Every job ends in one completion transaction (`store/jobs.rs`, `Store::complete`), and the
//! other transactions of a job (claim, workflow write, clean-up) are of similar weight, so this
//! figure divided by the transactions a job costs is the most jobs per second etcd allows on
//! this machine; the host is judged against that, not against an absolute number. The
//! transactions go through [`Store::txn`] with the worker's concurrency (64 at once) on keys
//! written beforehand, so only the commits are timed.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{bail, Context as _};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::Serialize;

use super::stats::{cpu_time, for_each_concurrent, ms, Summary};
use crate::keys::{Keys, Queue, Record};
use crate::schema::SchemaRegistry;
use crate::seed;
use crate::store::Store;

/// What the ceiling run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub transactions: usize,
    pub concurrency: usize,
    pub txn_per_s: f64,
    /// Latency of one transaction under that load.
    pub latency: Summary,
    /// The same transaction one at a time: what one commit costs on the critical path.
    pub sequential_txn: Summary,
    /// A single-key read one at a time (linearizable, as the host reads).
    pub sequential_get: Summary,
    /// etcd's CPU time per transaction of the concurrent run (user + system).
    pub etcd_cpu_ms_per_txn: Option<f64>,
}

/// One prepared job: its keys and the reservation its working key holds.
struct Prepared {
    working: String,
    reservation: String,
    job_state: String,
    state: String,
    finished: String,
}

/// Transactions and reads timed one at a time.
const SEQUENTIAL: usize = 200;

/// Runs `transactions` completion-shaped transactions, `concurrency` at once, under `root`,
/// then a few one at a time.
pub async fn measure(
    endpoint: &str,
    etcd_pid: Option<u32>,
    root: &str,
    transactions: usize,
    concurrency: usize,
) -> anyhow::Result<Ceiling> {
    let store = Store::connect(&[endpoint.to_string()], Keys::new(root))
        .await
        .context("connecting the ceiling's etcd client")?;
    let mut prepared = prepare(&store, transactions + SEQUENTIAL, concurrency).await?;
    let sequential = prepared.split_off(transactions);
    let records = seed::records()?;
    let values: Arc<(String, String)> =
        Arc::new((records[2].value.to_string(), records[3].value.to_string()));

    let latencies = Arc::new(Mutex::new(Vec::with_capacity(transactions)));
    let etcd_cpu = || etcd_pid.map(|pid| cpu_time(Some(pid))).transpose();
    let cpu_before = etcd_cpu()?;
    let started = Instant::now();
    let (s, v, l) = (store.clone(), values.clone(), latencies.clone());
    for_each_concurrent(prepared, concurrency, move |job| {
        let (store, values, latencies) = (s.clone(), v.clone(), l.clone());
        async move {
            let t = Instant::now();
            complete_like(&store, &job, &values.0, &values.1).await?;
            let took = t.elapsed();
            latencies
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(took);
            Ok(())
        }
    })
    .await?;
    let elapsed = started.elapsed();
    let etcd_cpu_ms_per_txn = match (cpu_before, etcd_cpu()?) {
        (Some(before), Some(after)) => {
            Some(ms(after.saturating_sub(before)) / transactions.max(1) as f64)
        }
        _ => None,
    };
    let latencies = std::mem::take(&mut *latencies.lock().unwrap_or_else(PoisonError::into_inner));

    let (mut txns, mut gets) = (Vec::new(), Vec::new());
    for job in &sequential {
        let t = Instant::now();
        complete_like(&store, job, &values.0, &values.1).await?;
        txns.push(t.elapsed());
        let t = Instant::now();
        store.get(&job.state).await?;
        gets.push(t.elapsed());
    }
    Ok(Ceiling {
        transactions,
        concurrency,
        txn_per_s: transactions as f64 / elapsed.as_secs_f64(),
        latency: Summary::of(latencies),
        sequential_txn: Summary::of(txns),
        sequential_get: Summary::of(gets),
        etcd_cpu_ms_per_txn,
    })
}

/// The shape of `Store::complete` for the last job of a workflow: compare the working key
/// with our reservation; put job state, put `/state`, put finished, delete working.
async fn complete_like(
    store: &Store,
    job: &Prepared,
    job_state_value: &str,
    state_value: &str,
) -> anyhow::Result<()> {
    let txn = Txn::new()
        .when([Compare::value(
            job.working.clone(),
            CompareOp::Equal,
            job.reservation.clone(),
        )])
        .and_then([
            TxnOp::put(job.job_state.clone(), job_state_value, None),
            TxnOp::put(job.state.clone(), state_value, None),
            TxnOp::put(job.finished.clone(), "", None),
            TxnOp::delete(job.working.clone(), None),
        ])
        .or_else([TxnOp::get(job.working.clone(), None)]);
    let response = store.txn(&job.working, txn).await?;
    if !response.succeeded() {
        bail!(
            "the ceiling's completion of {} found its reservation gone",
            job.working
        );
    }
    Ok(())
}

/// Writes one working key per transaction, holding its reservation.
async fn prepare(
    store: &Store,
    transactions: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Prepared>> {
    let schemas = SchemaRegistry::built_in();
    let ha = schemas
        .get("ha_interface")
        .context("the built-in schemas have no ha_interface")?;
    let keys = store.keys();
    let prepared: Vec<Prepared> = (0..transactions)
        .map(|i| {
            let resource = format!("ce111000-0000-4000-8000-{i:012}");
            let job_id = format!("create:monitoring_worker:ha_interface:{resource}:1:bench");
            Prepared {
                working: keys.job(Queue::Working, &job_id),
                reservation: uuid::Uuid::new_v4().to_string(),
                job_state: keys.record(Record::JobState, ha, &resource),
                state: keys.record(Record::State, ha, &resource),
                finished: keys.job(Queue::Finished, &job_id),
            }
        })
        .collect();
    let puts: Vec<(String, String)> = prepared
        .iter()
        .map(|p| (p.working.clone(), p.reservation.clone()))
        .collect();
    let store = store.clone();
    for_each_concurrent(puts, concurrency, move |(key, value)| {
        let store = store.clone();
        async move {
            store.put(&key, value).await?;
            Ok(())
        }
    })
    .await
    .context("preparing the ceiling's working keys")?;
    Ok(prepared)
}
