//! The protocol's transactions. Each one is a safety boundary: what it guarantees comes from
//! the compares inside it, never from timing or from which process we think is running.

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};

use super::{Kv, Result, Store};
use crate::keys::Queue;
use crate::protocol::JobId;

/// A job to write as part of a workflow.
pub struct NewJob {
    pub id: String,
    pub handler: String,
    /// The `/jobs/all` record text.
    pub record: String,
    /// `true`: goes to `/jobs/ready`, `false`: to `/jobs/waiting`.
    pub ready: bool,
}

/// A write proposed by a plugin, already mapped to its key.
pub struct GuardedWrite {
    pub key: String,
    /// `Some(value)` puts, `None` deletes.
    pub value: Option<String>,
    /// Only write if the key's mod revision equals this (0: the key must not exist).
    pub expect_mod_revision: Option<i64>,
}

/// Everything the completion transaction writes.
pub struct Completion<'a> {
    pub job_id: &'a str,
    pub reservation: &'a str,
    pub job_state_key: &'a str,
    pub job_state: String,
    /// `/state` key and value, for the last job of a workflow.
    pub state: Option<(String, String)>,
    pub writes: &'a [GuardedWrite],
}

/// How a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionOutcome {
    Completed,
    /// Our reservation is gone: another worker owns the job now. Nothing was written.
    LostClaim,
    /// A plugin write's revision compare failed; the job still belongs to us. Nothing was
    /// written; run the job again.
    Conflict,
}

/// What a claim came to, asked by a worker whose fenced transaction went unanswered
/// ([`Store::claim_fate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimFate {
    /// The working key still holds our reservation: nothing of ours that ends a claim
    /// committed.
    Held,
    /// The working key is gone while our lease lives: one of our own fenced transactions
    /// removed it (nothing else removes a working key before its lease ends).
    EndedByUs,
    /// The working key is gone and so is our lease: it may have expired first.
    Unknown,
}

/// The value `/jobs/finished/<id>` holds for a job that failed with `on_failure: fail`.
/// (A successful job's finished value is `""`, as in the original protocol.)
pub fn failed_marker(error: &str) -> String {
    serde_json::json!({ "failed": error }).to_string()
}

/// Operations in one cancellation transaction: below etcd's default `--max-txn-ops` (128).
const CANCEL_OPS: usize = 120;

/// A transaction built but not sent: run it with [`Store::batch`]. `what` names it in errors.
pub struct PlannedTxn {
    /// The job it writes (a workflow's first), cleans up or releases, by id.
    what: String,
    txn: Txn,
    /// For a workflow's transaction, its first job's id.
    workflow: Option<String>,
    /// For a workflow written only while its resource has no `/state`
    /// ([`Store::workflow_txn_unless_state`]): that key.
    unless_state: Option<String>,
    /// About what it adds to a request, in bytes: its keys and values, and a little per
    /// operation.
    bytes: usize,
}

/// What each operation adds to a request beyond its key and value (field tags, lengths,
/// options), rounded up.
const OP_OVERHEAD_BYTES: usize = 16;

/// etcd's own default `--max-request-bytes`.
pub const ETCD_DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;

/// Of etcd's request limit, the share the keys and values of one request are planned to
/// take; the rest is room for what an estimate leaves out.
pub fn request_budget(max_request_bytes: usize) -> usize {
    max_request_bytes / 100 * 89
}

/// A workflow transaction of a [`Store::batch`] that wrote nothing: the workflow's first job
/// and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnwrittenWorkflow {
    pub first_job: String,
    pub why: Unwritten,
    /// Planned without reading its resource's `/state`
    /// ([`Store::workflow_txn_unless_state`]): what it says is not known.
    pub state_unread: bool,
}

/// Why a workflow of a [`Store::batch`] was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unwritten {
    /// etcd refused the transaction on its own (its limits on one request are below what the
    /// workflow needs), with etcd's answer. etcd checks those limits before any compare.
    Refused(String),
    /// To be written only while its resource had no `/state`, and not written: its compares
    /// failed and no earlier attempt's write is there (the `/state` exists, in practice).
    HadState,
}

/// Transactions per outer transaction of a [`Store::batch`]: below etcd's default
/// `--max-txn-ops` (128).
const BATCH_TXNS: usize = 64;

/// `txns` in order, cut into batches of at most [`BATCH_TXNS`] whose bytes stay within
/// `budget` (a transaction over it on its own goes alone).
fn batches(txns: Vec<PlannedTxn>, budget: usize) -> Vec<Vec<PlannedTxn>> {
    let mut batches: Vec<Vec<PlannedTxn>> = Vec::new();
    let mut bytes = 0;
    for txn in txns {
        match batches.last_mut() {
            Some(last) if last.len() < BATCH_TXNS && bytes + txn.bytes <= budget => {
                bytes += txn.bytes;
                last.push(txn);
            }
            _ => {
                bytes = txn.bytes;
                batches.push(vec![txn]);
            }
        }
    }
    batches
}

impl Store {
    /// Writes a whole workflow at once. The compare on the first job's `/jobs/all` key makes a
    /// repeated write (a retry after a lost response) a no-op instead of a duplicate.
    pub async fn write_workflow(&self, jobs: &[NewJob]) -> Result<bool> {
        let Some(PlannedTxn { what, txn, .. }) = self.workflow_txn(jobs) else {
            return Ok(true);
        };
        Ok(self.txn(&what, txn).await?.succeeded())
    }

    /// The transaction of [`Store::write_workflow`], to run alone or in a [`Store::batch`].
    pub fn workflow_txn(&self, jobs: &[NewJob]) -> Option<PlannedTxn> {
        self.guarded_workflow_txn(jobs, None)
    }

    /// As [`Store::workflow_txn`], but written only while `state_key` (the resource's
    /// `/state`) does not exist: a workflow planned as a create without reading the `/state`
    /// first. When it exists the workflow comes back from [`Store::batch`] as
    /// [`Unwritten::HadState`], to be planned again from what the `/state` says.
    pub fn workflow_txn_unless_state(
        &self,
        jobs: &[NewJob],
        state_key: &str,
    ) -> Option<PlannedTxn> {
        self.guarded_workflow_txn(jobs, Some(state_key))
    }

    fn guarded_workflow_txn(&self, jobs: &[NewJob], state_key: Option<&str>) -> Option<PlannedTxn> {
        let first = jobs.first()?;
        let k = self.keys();
        let mut ops = Vec::with_capacity(jobs.len() * 2);
        for job in jobs {
            let queue = if job.ready {
                Queue::Ready
            } else {
                Queue::Waiting
            };
            ops.push(TxnOp::put(
                k.job(Queue::All, &job.id),
                job.record.clone(),
                None,
            ));
            ops.push(TxnOp::put(k.job(queue, &job.id), job.handler.clone(), None));
        }
        let first_key = k.job(Queue::All, &first.id);
        let mut compares = vec![Compare::version(first_key.clone(), CompareOp::Equal, 0)];
        let mut bytes = self.workflow_bytes(jobs);
        if let Some(state_key) = state_key {
            compares.push(Compare::version(state_key, CompareOp::Equal, 0));
            bytes += 2 * state_key.len() + first_key.len() + 3 * OP_OVERHEAD_BYTES;
        }
        let mut txn = Txn::new().when(compares).and_then(ops);
        if let Some(state_key) = state_key {
            // Which compare failed: the `/state` exists, or the workflow is already written
            // (an earlier attempt whose answer was lost).
            let exists = || Some(GetOptions::new().with_keys_only());
            txn = txn.or_else([
                TxnOp::get(state_key, exists()),
                TxnOp::get(first_key, exists()),
            ]);
        }
        Some(PlannedTxn {
            what: first.id.clone(),
            txn,
            workflow: Some(first.id.clone()),
            unless_state: state_key.map(str::to_string),
            bytes,
        })
    }

    /// About what the transaction writing `jobs` adds to a request, in bytes: each job's
    /// record, handler and two keys, the compare, and a little per operation.
    pub fn workflow_bytes(&self, jobs: &[NewJob]) -> usize {
        let k = self.keys();
        let job_bytes = |job: &NewJob| {
            let keys = k.job(Queue::All, &job.id).len() + k.job(Queue::Waiting, &job.id).len();
            keys + job.record.len() + job.handler.len() + 2 * OP_OVERHEAD_BYTES
        };
        let compare = jobs.first().map_or(0, |first| {
            k.job(Queue::All, &first.id).len() + OP_OVERHEAD_BYTES
        });
        compare + jobs.iter().map(job_bytes).sum::<usize>()
    }

    /// Runs independent transactions in as few round trips as possible: each becomes a
    /// nested transaction of one outer transaction (etcd >= 3.3), so each still succeeds or
    /// fails on its own compares while the batch costs one commit. Transactions in one batch
    /// must not touch the same key. If a batch is refused as a whole (etcd's limits on one
    /// request), its transactions run one by one. One that etcd refuses on its own is
    /// logged and skipped: sending it again cannot help, and failing the batch would stop
    /// the job manager on it for good. The workflows not written come back (refused, or
    /// [`Unwritten::HadState`]), so that their resources can fail or be planned again.
    /// Batches are cut to fit `max_request_bytes` (etcd's `--max-request-bytes`), so that
    /// large workflows do not cost a refused request first.
    pub async fn batch(
        &self,
        txns: Vec<PlannedTxn>,
        max_request_bytes: usize,
    ) -> Result<Vec<UnwrittenWorkflow>> {
        let mut unwritten = Vec::new();
        for chunk in batches(txns, request_budget(max_request_bytes)) {
            if let [only] = chunk.as_slice() {
                self.txn_unless_refused(only, &mut unwritten).await?;
                continue;
            }
            let what = format!("batch of {} starting with {}", chunk.len(), chunk[0].what);
            self.count_shared(chunk.len());
            let outer = nested(chunk.iter().map(|p| p.txn.clone()));
            match self.txn(&what, outer).await {
                Ok(response) => {
                    for (planned, answer) in chunk.iter().zip(response.op_responses()) {
                        if let TxnOpResponse::Txn(answer) = answer {
                            planned.note_state_found(&answer, &mut unwritten);
                        }
                    }
                }
                Err(e) if e.is_fenced() => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "batch refused; running its transactions one by one");
                    for planned in &chunk {
                        self.txn_unless_refused(planned, &mut unwritten).await?;
                    }
                }
            }
        }
        Ok(unwritten)
    }

    /// Sends `planned`; a refusal by etcd is logged, with what the transaction was for, and
    /// skipped (a workflow's is added to `unwritten`).
    async fn txn_unless_refused(
        &self,
        planned: &PlannedTxn,
        unwritten: &mut Vec<UnwrittenWorkflow>,
    ) -> Result<()> {
        match self.txn(&planned.what, planned.txn.clone()).await {
            Ok(answer) => {
                planned.note_state_found(&answer, unwritten);
                Ok(())
            }
            Err(e) if e.is_refused() => {
                let error = format!("{e:#}");
                tracing::error!(%error, txn = %planned.what,
                    "etcd refuses this transaction as it is; it is skipped");
                if let Some(first_job) = &planned.workflow {
                    unwritten.push(UnwrittenWorkflow {
                        first_job: first_job.clone(),
                        why: Unwritten::Refused(error),
                        state_unread: planned.unless_state.is_some(),
                    });
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Claims a ready job: succeeds for exactly one claimer, because the working key must not
    /// exist and the ready key must still exist in the same transaction that creates one and
    /// deletes the other. The working key is bound to `lease`, so it vanishes with its owner.
    /// Retrying with the same `reservation` is safe: it answers `true` if our earlier attempt
    /// is the one that won.
    ///
    /// `prefetch` keys are read in the same transaction, at the claim's revision, and come
    /// back with a won claim: records the job's plugin is expected to read (see
    /// `worker::hints`), which then cost no round trip of their own.
    pub async fn claim(
        &self,
        job_id: &str,
        reservation: &str,
        lease: i64,
        prefetch: &[String],
    ) -> Result<Claimed> {
        let k = self.keys();
        let working = k.job(Queue::Working, job_id);
        let ready = k.job(Queue::Ready, job_id);
        let compares = [
            Compare::version(working.clone(), CompareOp::Equal, 0),
            Compare::version(ready.clone(), CompareOp::Greater, 0),
        ];
        let mut ops = vec![
            TxnOp::put(
                working.clone(),
                reservation,
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::delete(ready, None),
            // The job's record comes back with the claim: no second round trip.
            TxnOp::get(k.job(Queue::All, job_id), None),
        ];
        ops.extend(prefetch.iter().map(|key| TxnOp::get(key.as_str(), None)));
        let txn = Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else([TxnOp::get(working, None)]);
        let resp = self.group_txn(job_id, txn).await?;
        let responses = resp.op_responses();
        if resp.succeeded() {
            let mut reads = responses.iter().skip(2).map(|op| match op {
                TxnOpResponse::Get(get) => Some(get.kvs().first().map(Kv::from_etcd)),
                _ => None,
            });
            let Some(Some(record)) = reads.next() else {
                return Ok(Claimed::OursUnread { lease });
            };
            let prefetched = prefetch
                .iter()
                .zip(reads)
                .filter_map(|(key, found)| Some((key.clone(), found?)))
                .collect();
            return Ok(Claimed::Ours { record, prefetched });
        }
        // A retry of a claim that committed but whose answer was lost finds its own
        // reservation in the working key: the job is ours.
        Ok(match still_ours_under(&responses, reservation) {
            Some(lease) => Claimed::OursUnread { lease },
            None => Claimed::Taken,
        })
    }

    /// Completes a job in one transaction fenced by our reservation: if another worker took
    /// the job over (our lease expired), the compare fails and nothing is written.
    pub async fn complete(&self, c: &Completion<'_>) -> Result<CompletionOutcome> {
        let k = self.keys();
        let working = k.job(Queue::Working, c.job_id);
        let mut compares = vec![Compare::value(
            working.clone(),
            CompareOp::Equal,
            c.reservation,
        )];
        let mut ops = vec![TxnOp::put(c.job_state_key, c.job_state.clone(), None)];
        if let Some((key, value)) = &c.state {
            ops.push(TxnOp::put(key.clone(), value.clone(), None));
        }
        for w in c.writes {
            if let Some(rev) = w.expect_mod_revision {
                compares.push(Compare::mod_revision(w.key.clone(), CompareOp::Equal, rev));
            }
            ops.push(match &w.value {
                Some(v) => TxnOp::put(w.key.clone(), v.clone(), None),
                None => TxnOp::delete(w.key.clone(), None),
            });
        }
        ops.push(TxnOp::put(k.job(Queue::Finished, c.job_id), "", None));
        ops.push(TxnOp::delete(working.clone(), None));
        let txn = Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else([TxnOp::get(working, None)]);
        let resp = self.group_txn(c.job_id, txn).await?;
        if resp.succeeded() {
            return Ok(CompletionOutcome::Completed);
        }
        Ok(
            if still_ours_under(&resp.op_responses(), c.reservation).is_some() {
                CompletionOutcome::Conflict
            } else {
                CompletionOutcome::LostClaim
            },
        )
    }

    /// What became of our claim on `job_id`. For a worker whose completion (or failure)
    /// transaction failed in transit, so that a retry found the claim gone: did the earlier
    /// attempt commit? The working key is read before the lease is asked about: a lease alive
    /// after the key was seen gone was alive when it went, so the key did not expire with it.
    pub async fn claim_fate(
        &self,
        job_id: &str,
        reservation: &str,
        lease: i64,
    ) -> Result<ClaimFate> {
        let working = self.get(&self.keys().job(Queue::Working, job_id)).await?;
        if working.is_some_and(|kv| kv.value == reservation.as_bytes()) {
            return Ok(ClaimFate::Held);
        }
        Ok(if self.lease_ttl(lease).await? > 0 {
            ClaimFate::EndedByUs
        } else {
            ClaimFate::Unknown
        })
    }

    /// Ends a workflow as failed, fenced by our reservation like [`Store::complete`]: writes
    /// the failed `/state`, drops the workflow's job state, keeps the job's dead-job record and
    /// marks the job finished with the error, so the job manager cancels the jobs that depend
    /// on it.
    pub async fn fail_workflow(
        &self,
        job_id: &str,
        reservation: &str,
        job_state_key: &str,
        state: (String, String),
        error: &str,
        dead_job: Option<&GuardedWrite>,
    ) -> Result<bool> {
        let k = self.keys();
        let working = k.job(Queue::Working, job_id);
        let mut ops = vec![
            TxnOp::put(state.0, state.1, None),
            TxnOp::delete(job_state_key, None),
            TxnOp::put(k.job(Queue::Finished, job_id), failed_marker(error), None),
            TxnOp::delete(working.clone(), None),
        ];
        if let Some(GuardedWrite {
            key,
            value: Some(value),
            ..
        }) = dead_job
        {
            ops.push(TxnOp::put(key.clone(), value.clone(), None));
        }
        let txn = Txn::new()
            .when([Compare::value(working, CompareOp::Equal, reservation)])
            .and_then(ops);
        Ok(self.txn(job_id, txn).await?.succeeded())
    }

    /// Ends a job whose resource cannot be told (its id and record are unreadable): marks it
    /// finished with the error so the job manager cleans it and cancels its dependants.
    pub async fn fail_workflow_without_state(
        &self,
        job_id: &str,
        reservation: &str,
        error: &str,
    ) -> Result<bool> {
        let k = self.keys();
        let working = k.job(Queue::Working, job_id);
        let txn = Txn::new()
            .when([Compare::value(
                working.clone(),
                CompareOp::Equal,
                reservation,
            )])
            .and_then([
                TxnOp::put(k.job(Queue::Finished, job_id), failed_marker(error), None),
                TxnOp::delete(working, None),
            ]);
        Ok(self.txn(job_id, txn).await?.succeeded())
    }

    /// Gives a claimed job back to the ready queue with a new record (attempts counted),
    /// fenced by our reservation.
    pub async fn requeue(
        &self,
        job_id: &str,
        reservation: &str,
        handler: &str,
        record: String,
    ) -> Result<bool> {
        let k = self.keys();
        let working = k.job(Queue::Working, job_id);
        let txn = Txn::new()
            .when([
                Compare::value(working.clone(), CompareOp::Equal, reservation),
                Compare::version(k.job(Queue::All, job_id), CompareOp::Greater, 0),
            ])
            .and_then([
                TxnOp::put(k.job(Queue::All, job_id), record, None),
                TxnOp::put(k.job(Queue::Ready, job_id), handler, None),
                TxnOp::delete(working, None),
            ]);
        Ok(self.txn(job_id, txn).await?.succeeded())
    }

    /// Puts a job whose claim vanished (its worker's lease ended) back to ready with the given
    /// record (attempts counted). Only if nothing else accounted for the job: no working,
    /// finished or ready key, and the record unchanged since it was read. A completion, a
    /// re-queue by the worker or a cancellation each leave one of those behind atomically.
    pub async fn requeue_orphan(
        &self,
        job_id: &str,
        handler: &str,
        record: String,
        record_revision: i64,
    ) -> Result<bool> {
        let k = self.keys();
        let all = k.job(Queue::All, job_id);
        let txn = Txn::new()
            .when([
                Compare::version(k.job(Queue::Working, job_id), CompareOp::Equal, 0),
                Compare::version(k.job(Queue::Finished, job_id), CompareOp::Equal, 0),
                Compare::version(k.job(Queue::Ready, job_id), CompareOp::Equal, 0),
                Compare::version(k.job(Queue::Waiting, job_id), CompareOp::Equal, 0),
                Compare::mod_revision(all.clone(), CompareOp::Equal, record_revision),
            ])
            .and_then([
                TxnOp::put(all, record, None),
                TxnOp::put(k.job(Queue::Ready, job_id), handler, None),
            ]);
        Ok(self.txn(job_id, txn).await?.succeeded())
    }

    /// Drops a claimed job whose record is gone or unreadable, fenced by our reservation.
    pub async fn drop_claim(&self, job_id: &str, reservation: &str) -> Result<bool> {
        let working = self.keys().job(Queue::Working, job_id);
        let txn = Txn::new()
            .when([Compare::value(
                working.clone(),
                CompareOp::Equal,
                reservation,
            )])
            .and_then([TxnOp::delete(working, None)]);
        Ok(self.txn(job_id, txn).await?.succeeded())
    }

    /// Removes a finished job. For the last job of a workflow it also removes the workflow's
    /// job state, but only if that state is still the one this job wrote (its mod revision
    /// equals the finished key's create revision, both written by the completion
    /// transaction); a newer workflow's job state is left alone.
    pub async fn clean_finished(&self, job_id: &str, job_state: Option<(&str, i64)>) -> Result<()> {
        let PlannedTxn { what, txn, .. } = self.clean_finished_txn(job_id, job_state);
        self.txn(&what, txn).await?;
        Ok(())
    }

    /// The transaction of [`Store::clean_finished`].
    pub fn clean_finished_txn(&self, job_id: &str, job_state: Option<(&str, i64)>) -> PlannedTxn {
        let k = self.keys();
        let base = [
            TxnOp::delete(k.job(Queue::Finished, job_id), None),
            TxnOp::delete(k.job(Queue::All, job_id), None),
        ];
        let txn = match job_state {
            Some((key, revision)) => {
                let mut with_state = base.to_vec();
                with_state.push(TxnOp::delete(key, None));
                Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
                    .and_then(with_state)
                    .or_else(base)
            }
            None => Txn::new().and_then(base),
        };
        PlannedTxn {
            what: job_id.to_string(),
            txn,
            workflow: None,
            unless_state: None,
            bytes: small_txn_bytes(k, job_id, job_state.map_or(0, |(key, _)| 2 * key.len())),
        }
    }

    /// Moves a waiting job to ready, once: the waiting key must still exist.
    pub async fn release(&self, job_id: &str, handler: &str) -> Result<bool> {
        let PlannedTxn { what, txn, .. } = self.release_txn(job_id, handler);
        Ok(self.txn(&what, txn).await?.succeeded())
    }

    /// The transaction of [`Store::release`].
    pub fn release_txn(&self, job_id: &str, handler: &str) -> PlannedTxn {
        let k = self.keys();
        let waiting = k.job(Queue::Waiting, job_id);
        let txn = Txn::new()
            .when([Compare::version(waiting.clone(), CompareOp::Greater, 0)])
            .and_then([
                TxnOp::put(k.job(Queue::Ready, job_id), handler, None),
                TxnOp::delete(waiting, None),
            ]);
        PlannedTxn {
            what: job_id.to_string(),
            txn,
            workflow: None,
            unless_state: None,
            bytes: small_txn_bytes(k, job_id, handler.len()),
        }
    }

    /// Cancels jobs that have not started (every dependant of a failed job): removes their
    /// records and queue entries and puts the given failed `/state` records, in one
    /// transaction. All at once matters: a rebuild takes a waiting job whose dependency is
    /// gone for one whose dependency finished, so a dependant left behind by a partial
    /// cancellation would run. Only more than `CANCEL_OPS` operations (some forty jobs)
    /// take several transactions, in order: callers list dependants before what they depend
    /// on, and the `/state` puts come last. `states` must name each key once.
    pub async fn cancel_all(&self, job_ids: &[String], states: &[(String, String)]) -> Result<()> {
        let k = self.keys();
        let mut ops: Vec<TxnOp> = job_ids
            .iter()
            .flat_map(|id| {
                [Queue::All, Queue::Waiting, Queue::Ready]
                    .map(|q| TxnOp::delete(k.job(q, id), None))
            })
            .collect();
        ops.extend(
            states
                .iter()
                .map(|(key, value)| TxnOp::put(key.as_str(), value.as_str(), None)),
        );
        let what = job_ids.first().map_or("cancellation", String::as_str);
        for chunk in ops.chunks(CANCEL_OPS) {
            self.txn(what, Txn::new().and_then(chunk.to_vec())).await?;
        }
        Ok(())
    }
}

/// The bytes of a clean-up or release of `job_id`: at most four operations on its job keys,
/// plus `extra` (the job state key, twice, or the handler).
fn small_txn_bytes(keys: &crate::keys::Keys, job_id: &str, extra: usize) -> usize {
    4 * (keys.job(Queue::Waiting, job_id).len() + OP_OVERHEAD_BYTES) + extra
}

/// One transaction carrying `txns`, each nested one deciding on its own compares (etcd >= 3.3):
/// one commit for all of them. etcd refuses it if two of them write the same key.
pub(super) fn nested(txns: impl IntoIterator<Item = Txn>) -> Txn {
    Txn::new().and_then(txns.into_iter().map(TxnOp::txn).collect::<Vec<_>>())
}

impl PlannedTxn {
    /// The resource of the job it writes, cleans up or releases.
    pub fn resource(&self) -> Option<(String, String)> {
        let job = self.what.parse::<JobId>().ok()?;
        Some((job.resource_type, job.resource_id))
    }

    /// Whether it writes a create workflow only while its resource has no `/state`
    /// ([`Store::workflow_txn_unless_state`]).
    pub fn is_guarded_create(&self) -> bool {
        self.unless_state.is_some()
    }

    /// Adds this workflow to `unwritten` if it was to be written only while its resource had
    /// no `/state` and `answer` says it was not written: its compares failed and its first
    /// record is not there (one that is was written by an earlier attempt whose answer was
    /// lost). Whatever made the compares fail, planning the resource again from its
    /// `/state` is safe.
    fn note_state_found(&self, answer: &TxnResponse, unwritten: &mut Vec<UnwrittenWorkflow>) {
        let (Some(_), Some(first_job)) = (&self.unless_state, &self.workflow) else {
            return;
        };
        if answer.succeeded() {
            return;
        }
        let found: Vec<bool> = answer
            .op_responses()
            .iter()
            .map(|op| matches!(op, TxnOpResponse::Get(get) if !get.kvs().is_empty()))
            .collect();
        if let [_, false] = found.as_slice() {
            unwritten.push(UnwrittenWorkflow {
                first_job: first_job.clone(),
                why: Unwritten::HadState,
                state_unread: true,
            });
        }
    }
}

/// What [`Store::claim`] got.
#[derive(Debug)]
pub enum Claimed {
    /// Another worker holds the job, or it left the ready queue.
    Taken,
    /// Ours, with the job's record as it was at the claim (`None`: the record is gone, the
    /// job was cancelled), and each prefetched key's record at the same revision (`None`:
    /// absent).
    Ours {
        record: Option<Kv>,
        prefetched: Vec<(String, Option<Kv>)>,
    },
    /// Ours (an earlier attempt whose answer was lost committed), record not read; the
    /// working key is bound to `lease`, which may be an earlier lease of the host's than
    /// the one this attempt was made with.
    OursUnread { lease: i64 },
}

/// The lease of the working key in `responses` (a claim's `or_else` read), if the key holds
/// `reservation`.
fn still_ours_under(responses: &[TxnOpResponse], reservation: &str) -> Option<i64> {
    responses.iter().find_map(|r| match r {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .filter(|kv| kv.value() == reservation.as_bytes())
            .map(|kv| kv.lease()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planned_transaction_names_the_resource_of_its_job() {
        let job = "create:monitoring:ha_interface:5f1c3e5e-0000-4000-8000-000000000001:1:ab12";
        let mut txn = planned(job, 0);
        assert_eq!(
            txn.resource(),
            Some((
                "ha_interface".to_string(),
                "5f1c3e5e-0000-4000-8000-000000000001".to_string()
            ))
        );
        assert!(!txn.is_guarded_create());
        txn.unless_state = Some("/state/v2.0/ha_interfaces/5f1c3e5e".into());
        assert!(txn.is_guarded_create());
        assert_eq!(planned("not a job id", 0).resource(), None);
    }

    fn planned(what: &str, bytes: usize) -> PlannedTxn {
        PlannedTxn {
            what: what.to_string(),
            txn: Txn::new(),
            workflow: None,
            unless_state: None,
            bytes,
        }
    }

    fn cut(sizes: &[usize], budget: usize) -> Vec<Vec<String>> {
        let txns = sizes
            .iter()
            .enumerate()
            .map(|(i, &bytes)| planned(&i.to_string(), bytes))
            .collect();
        batches(txns, budget)
            .into_iter()
            .map(|b| b.into_iter().map(|t| t.what).collect())
            .collect()
    }

    #[test]
    fn batches_keep_order_and_stay_within_the_byte_budget() {
        assert_eq!(
            cut(&[400, 400, 400, 100, 900], 1000),
            [vec!["0", "1"], vec!["2", "3"], vec!["4"]]
        );
        // One over the budget on its own goes alone; the next starts a new batch.
        assert_eq!(
            cut(&[10, 5000, 10], 1000),
            [vec!["0"], vec!["1"], vec!["2"]]
        );
        assert!(cut(&[], 1000).is_empty());
    }

    #[test]
    fn batches_hold_at_most_batch_txns_transactions() {
        let sizes = vec![1; BATCH_TXNS * 2 + 1];
        let lengths: Vec<usize> = cut(&sizes, usize::MAX).iter().map(Vec::len).collect();
        assert_eq!(lengths, [BATCH_TXNS, BATCH_TXNS, 1]);
    }

    #[test]
    fn the_request_budget_leaves_room_below_etcds_limit() {
        assert_eq!(request_budget(ETCD_DEFAULT_MAX_REQUEST_BYTES), 1_399_792);
    }
}
