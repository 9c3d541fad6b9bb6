//! One job, from claim to completion.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::hints::ParamKeys;
use super::Worker;
use crate::keys::{Queue, Record};
use crate::metrics;
use crate::plugins::bindings::esi::worker::types as wit;
use crate::plugins::engine::CallError;
use crate::plugins::host_api::{key_of, relative_key, versioned, writable, RecordAccess};
use crate::plugins::LoadedPlugin;
use crate::protocol::{Job, JobId, JobRecord, OnFailure, StateRecord};
use crate::retry::backoff;
use crate::store::jobs::{ClaimFate, Claimed, Completion, CompletionOutcome, GuardedWrite};
use crate::store::{Kv, StoreError};

/// Writes one completion may propose. etcd takes at most `--max-txn-ops` (default 128)
/// operations per transaction and the completion adds four of its own; half the default leaves
/// room for a cluster run with a lower limit.
pub const MAX_PROPOSED_WRITES: usize = 64;

/// How long [`Worker::ended_by_us`] waits for etcd.
const FATE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs of one attempt whose proposed writes conflicted, in a row, before the attempt counts
/// as failed (retried later, with backoff, like any failed attempt). Contention on one record
/// makes a few conflicts normal; a plugin that always proposes a stale revision must not spin
/// on the claim forever.
pub const MAX_CONFLICT_RERUNS: u32 = 100;

/// Bytes of an error message kept in `/state`, the finished marker and the dead-job record: a
/// plugin's message is its own text and may be of any size, and one etcd would refuse to
/// store would leave the job claimed for good.
const MAX_ERROR_BYTES: usize = 4096;

/// How a run of the plugin ended, from the workflow's point of view.
enum Verdict {
    Done {
        output: Map<String, Value>,
        writes: Vec<GuardedWrite>,
    },
    Retry(String),
    Fail(String),
}

impl Worker {
    /// Claims `job_id` and sees it through. Returns an error only for etcd trouble before the
    /// claim; after the claim, etcd calls are retried until they succeed or the claim is lost.
    /// Retries must pass the same `reservation`, so that a claim which committed but whose
    /// answer was lost is recognised as ours.
    pub(crate) async fn run_job(
        &self,
        job_id: &str,
        handler: &str,
        reservation: &str,
    ) -> anyhow::Result<()> {
        if self.stop_claiming.is_cancelled() {
            return Ok(()); // draining: leave it for another host
        }
        let reservation = reservation.to_string();
        let term = self.lease.term();
        let params = match self.planned.get(job_id) {
            Some(resources) => self.param_keys(&resources),
            None => ParamKeys::default(),
        };
        let prefetch = self.read_hints.keys_for(handler, &params);
        // Kept until the claim is answered: a claim that fails in transit is tried again.
        let claimed = self
            .store
            .claim(job_id, &reservation, term.id, &prefetch)
            .await?;
        self.planned.forget(job_id);
        let (found, prefetched) =
            match claimed {
                Claimed::Taken => {
                    tracing::debug!("claimed by another worker");
                    crate::metrics::global()
                        .claims_lost
                        .get_or_create(&crate::metrics::labels([("handler", handler)]))
                        .inc();
                    return Ok(());
                }
                Claimed::Ours { record, prefetched } => (Some(record), prefetched),
                Claimed::OursUnread { lease } if lease != term.id => {
                    // Won by a try made before the host replaced its lease: the claim ends with
                    // that lease, and the job manager re-queues the job.
                    tracing::warn!(claim_lease = lease, lease = term.id,
                    "claimed under a lease this host no longer holds; leaving the job to expire");
                    return Ok(());
                }
                Claimed::OursUnread { .. } => (None, Vec::new()),
            };
        let claim = Claim {
            job_id,
            reservation: &reservation,
            lease: term.id,
            lease_lost: term.lost().clone(),
            claimed_at: Instant::now(),
        };
        let all_key = self.store.keys().job(Queue::All, job_id);
        let found = match found {
            Some(found) => found,
            None => match self.persist(&claim, || self.store.get(&all_key)).await {
                Some(found) => found,
                None => anyhow::bail!(
                    "etcd unavailable while reading {all_key}; the claim expires with the lease"
                ),
            },
        };
        let Some(kv) = found else {
            tracing::info!("job record is gone (cancelled); dropping the claim");
            self.persist(&claim, || self.store.drop_claim(job_id, &reservation))
                .await;
            return Ok(());
        };
        match JobRecord::parse(&all_key, &kv.value) {
            Ok(record) => self.run_record(&claim, record, prefetched).await,
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "unreadable job record");
                self.fail_unreadable(&claim, &message).await;
            }
        }
        Ok(())
    }

    /// Runs the job's plugin until the job completes, fails or is handed back. `prefetched`
    /// records (read with the claim) answer the plugin's reads in its first call only.
    async fn run_record(
        &self,
        claim: &Claim<'_>,
        record: JobRecord,
        prefetched: Vec<(String, Option<Kv>)>,
    ) {
        let job = &record.job;
        tracing::Span::current().record(
            "resource",
            tracing::field::display(format_args!("{}/{}", job.resource_type, job.resource_id)),
        );
        tracing::info!(action = %job.action, attempt = record.attempts, "running job");
        metrics::global()
            .jobs_claimed
            .get_or_create(&metrics::labels([("handler", &record.handler)]))
            .inc();
        let Some(plugin) = self.plugins.get(&record.handler) else {
            // Its plugin was removed while we claimed the job: a host (this one, once the
            // plugin is back) that serves the handler takes it from the ready queue.
            return self.hand_back(claim, &record, Stopped::PluginGone).await;
        };
        if record.attempts >= self.config.max_attempts {
            // Re-queued by the job manager after its workers died this often: stop trying.
            let message = format!(
                "gave up after {} attempts: the workers running it stopped",
                record.attempts
            );
            return self.finish_failed(claim, &record, &message).await;
        }
        let job_state = self.job_state_so_far(claim, job).await;
        let access = RecordAccess::new(self.store.clone(), self.schemas.clone());
        let mut first_call = RecordAccess {
            preloaded: Arc::new(
                prefetched
                    .into_iter()
                    .map(|(key, found)| (key, found.map(versioned)))
                    .collect(),
            ),
            ..access.clone()
        };
        let wit_job = to_wit_job(job, &job_state);
        // Which of the plugin's reads its params named, for the claims of later jobs.
        let params = self.param_keys(&job.param_resources());
        let started = Instant::now();
        let mut reruns = 0;
        let mut conflicts = 0;
        loop {
            let context = wit::RunContext {
                attempts: record.attempts,
                reruns,
                elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                config: plugin.config_json().to_string(),
            };
            let call_access = if !first_call.preloaded.is_empty() {
                std::mem::replace(&mut first_call, access.clone())
            } else {
                access.clone()
            };
            let call =
                self.engine
                    .handle(&plugin, call_access, &wit_job, &context, &claim.lease_lost);
            let answer = match self.unless_stopped(claim, call).await {
                Ok(answer) => answer,
                Err(stop) => return self.hand_back(claim, &record, stop).await,
            };
            self.read_hints
                .record(&record.handler, access.take_reads(), &params);
            let verdict = match answer {
                Ok(Ok(wit::Outcome::Wait(millis))) => {
                    tracing::debug!(millis, "plugin asked to run again later");
                    let pause = tokio::time::sleep(Duration::from_millis(u64::from(millis.max(1))));
                    if let Err(stop) = self.unless_stopped(claim, pause).await {
                        return self.hand_back(claim, &record, stop).await;
                    }
                    reruns += 1;
                    continue;
                }
                Ok(Ok(wit::Outcome::Completed(c))) => {
                    self.verdict_of_completion(c, &access, &plugin)
                }
                Ok(Err(wit::JobError::Retryable(m))) => Verdict::Retry(m),
                Ok(Err(wit::JobError::Permanent(m))) => Verdict::Fail(m),
                Err(CallError::Interrupted { .. }) => {
                    return self.hand_back(claim, &record, Stopped::LeaseLost).await
                }
                Err(call) => {
                    tracing::warn!(error = %call, kind = call.kind(), "plugin call failed");
                    self.plugins.count_failure(&plugin.name, call.kind());
                    if call.is_permanent() {
                        Verdict::Fail(call.to_string())
                    } else {
                        Verdict::Retry(call.to_string())
                    }
                }
            };
            let rerun = match verdict {
                Verdict::Done { output, writes } => match self
                    .finish_done(claim, job, job_state.clone(), output, &writes)
                    .await
                {
                    Published::Done => false,
                    Published::Conflict => true,
                    Published::Refused(why) => {
                        self.plugins.count_failure(&plugin.name, "refused");
                        let message = format!(
                            "etcd refused the transaction recording the job's result: {why}"
                        );
                        self.finish_failed(claim, &record, &message).await;
                        false
                    }
                },
                Verdict::Retry(message) => {
                    self.retry_or_fail(claim, &record, &message).await;
                    false
                }
                Verdict::Fail(message) => {
                    self.finish_failed(claim, &record, &message).await;
                    false
                }
            };
            if !rerun {
                return;
            }
            conflicts += 1;
            if conflicts >= MAX_CONFLICT_RERUNS {
                self.plugins.count_failure(&plugin.name, "conflict");
                let message = format!(
                    "the job's proposed writes conflicted {conflicts} times in a row (an \
                     expect-mod-revision was stale each time)"
                );
                return self.retry_or_fail(claim, &record, &message).await;
            }
            tracing::info!(
                conflicts,
                "a proposed write conflicted; running the job again"
            );
        }
    }

    /// The workflow's job state before this job: `{}` for a first job.
    async fn job_state_so_far(&self, claim: &Claim<'_>, job: &Job) -> Map<String, Value> {
        if job.is_first {
            return Map::new();
        }
        let Some(schema) = self.schemas.get(&job.resource_type) else {
            return Map::new();
        };
        let key = self
            .store
            .keys()
            .record(Record::JobState, schema, &job.resource_id);
        match self.persist(claim, || self.store.get(&key)).await.flatten() {
            Some(kv) => serde_json::from_slice(&kv.value).unwrap_or_else(|e| {
                tracing::warn!(%key, error = %e, "job state is not a JSON object; starting from {{}}");
                Map::new()
            }),
            None => Map::new(),
        }
    }

    fn verdict_of_completion(
        &self,
        c: wit::Completion,
        access: &RecordAccess,
        plugin: &LoadedPlugin,
    ) -> Verdict {
        let size = c.output.len()
            + c.writes
                .iter()
                .map(|w| match &w.op {
                    wit::WriteOp::Put(v) => v.len(),
                    wit::WriteOp::Delete => 0,
                })
                .sum::<usize>();
        if size > plugin.max_output_bytes() {
            self.plugins.count_failure(&plugin.name, "output");
            return Verdict::Fail(format!(
                "plugin {} returned {size} bytes of output and writes, over its limit of {} \
                 (limits.max_output_kib in its manifest)",
                plugin.name,
                plugin.max_output_bytes()
            ));
        }
        let output = match serde_json::from_str::<Value>(&c.output) {
            Ok(Value::Object(o)) => o,
            Ok(_) | Err(_) => {
                return Verdict::Fail(format!(
                    "plugin output is not a JSON object: {:.200}",
                    c.output
                ))
            }
        };
        if c.writes.len() > MAX_PROPOSED_WRITES {
            self.plugins.count_failure(&plugin.name, "output");
            return Verdict::Fail(format!(
                "plugin {} proposed {} writes; a completion may carry at most {MAX_PROPOSED_WRITES}",
                plugin.name,
                c.writes.len()
            ));
        }
        let mut writes: Vec<GuardedWrite> = Vec::with_capacity(c.writes.len());
        for w in c.writes {
            if !writable(w.target.kind) {
                return Verdict::Fail(format!("plugin may not write {:?} records", w.target.kind));
            }
            let key = match key_of(&access.store, &access.schemas, &w.target) {
                Ok(k) => k,
                Err(e) => {
                    return Verdict::Fail(format!("plugin proposed a write to a bad record: {e:?}"))
                }
            };
            let relative = relative_key(&access.store, &key);
            if !plugin.manifest.may_write(relative) {
                tracing::warn!(plugin = %plugin.name, key = %relative, "proposed write refused: not granted");
                self.plugins.count_failure(&plugin.name, "write-denied");
                return Verdict::Fail(format!(
                    "plugin {} proposed a write to {relative}, which its manifest does not grant \
                     (capabilities.write: {:?})",
                    plugin.name, plugin.manifest.write
                ));
            }
            if writes.iter().any(|earlier| earlier.key == key) {
                self.plugins.count_failure(&plugin.name, "output");
                return Verdict::Fail(format!(
                    "plugin {} proposed two writes to {relative}; a completion writes each record \
                     at most once",
                    plugin.name
                ));
            }
            writes.push(GuardedWrite {
                key,
                value: match w.op {
                    wit::WriteOp::Put(v) => Some(v),
                    wit::WriteOp::Delete => None,
                },
                expect_mod_revision: w.expect_mod_revision,
            });
        }
        Verdict::Done { output, writes }
    }

    /// Publishes a finished job.
    async fn finish_done(
        &self,
        claim: &Claim<'_>,
        job: &Job,
        mut job_state: Map<String, Value>,
        output: Map<String, Value>,
        writes: &[GuardedWrite],
    ) -> Published {
        job_state.extend(output);
        let Some(schema) = self.schemas.get(&job.resource_type) else {
            let message = format!(
                "job {}: unknown resource type {:?}",
                job.id, job.resource_type
            );
            tracing::error!(error = %message, "no /state to report to");
            self.end_without_state(claim, &message).await;
            return Published::Done;
        };
        let keys = self.store.keys();
        let job_state_key = keys.record(Record::JobState, schema, &job.resource_id);
        let state = job.is_last.then(|| {
            let state = StateRecord::completed(
                &job_state,
                job.workflow_action().completed_state(),
                job.version,
            );
            (
                keys.record(Record::State, schema, &job.resource_id),
                state.to_json(),
            )
        });
        let completion = Completion {
            job_id: claim.job_id,
            reservation: claim.reservation,
            job_state_key: &job_state_key,
            job_state: Value::Object(job_state.clone()).to_string(),
            state,
            writes,
        };
        let persisted = self
            .persist_or_refused(claim, || self.store.complete(&completion))
            .await;
        let persisted = match persisted {
            Persisted::Done(CompletionOutcome::LostClaim) | Persisted::GaveUp
                if self.ended_by_us(claim).await =>
            {
                tracing::info!(
                    "an earlier try of the completion committed; etcd's answer to it was lost"
                );
                Persisted::Done(CompletionOutcome::Completed)
            }
            persisted => persisted,
        };
        match persisted {
            Persisted::Done(CompletionOutcome::Completed) => {
                tracing::info!("job completed");
                // A failed job whose workflow goes on (`ignore`) carries its dead-job record
                // and was counted as failed already.
                let dead = self.store.keys().dead_job(claim.job_id);
                if writes.iter().all(|w| w.key != dead) {
                    count_end(claim, job, true);
                }
                Published::Done
            }
            Persisted::Done(CompletionOutcome::Conflict) => Published::Conflict,
            Persisted::Done(CompletionOutcome::LostClaim) | Persisted::GaveUp => {
                tracing::warn!("lost the claim before completing; the result is dropped");
                Published::Done
            }
            Persisted::Refused(why) => {
                let written = |w: &GuardedWrite| w.value.as_ref().map_or(0, String::len);
                Published::Refused(format!(
                    "{why} (the transaction held the job state, {} bytes{}, and {} proposed \
                     writes, {} bytes)",
                    completion.job_state.len(),
                    completion
                        .state
                        .as_ref()
                        .map_or(String::new(), |(_, s)| format!(
                            ", the resource's /state, {} bytes",
                            s.len()
                        )),
                    writes.len(),
                    writes.iter().map(written).sum::<usize>()
                ))
            }
        }
    }

    async fn retry_or_fail(&self, claim: &Claim<'_>, record: &JobRecord, message: &str) {
        let attempts = record.attempts + 1;
        if attempts >= self.config.max_attempts {
            let message = format!("{message} (gave up after {attempts} attempts)");
            return self.finish_failed(claim, record, &message).await;
        }
        let delay = backoff(
            self.config.retry_backoff,
            self.config.retry_backoff_max,
            record.attempts,
        );
        tracing::warn!(error = %message, attempts, retry_in = ?delay, "job failed, will retry");
        // Stopped during the backoff: re-queue at once rather than keep the claim.
        let _ = self.unless_stopped(claim, tokio::time::sleep(delay)).await;
        let next = JobRecord {
            attempts,
            ..record.clone()
        };
        match self.requeue(claim, &next).await {
            Requeue::Done => {
                metrics::global()
                    .jobs_retried
                    .get_or_create(&metrics::labels([("handler", &record.handler)]))
                    .inc();
            }
            Requeue::RecordGone => tracing::info!("{RECORD_GONE}"),
            Requeue::ClaimLost => tracing::warn!("lost the claim before re-queueing"),
        }
    }

    /// Puts a claimed job back to ready with `record`, fenced by our reservation. A job whose
    /// record is gone (its workflow ended meanwhile) is not re-queued; its claim is dropped.
    async fn requeue(&self, claim: &Claim<'_>, record: &JobRecord) -> Requeue {
        let text = record.to_json();
        let done = self
            .persist_or_refused(claim, || {
                self.store.requeue(
                    claim.job_id,
                    claim.reservation,
                    &record.handler,
                    text.clone(),
                )
            })
            .await;
        let done = match done {
            Persisted::Done(done) => Some(done),
            Persisted::Refused(_) | Persisted::GaveUp => None,
        };
        match done {
            Some(true) => Requeue::Done,
            Some(false) | None if self.ended_by_us(claim).await => {
                tracing::info!(
                    "an earlier try of the re-queue committed; etcd's answer to it was lost"
                );
                Requeue::Done
            }
            // Refused: the claim is not ours any more (then this is a no-op), or the record
            // is gone and the claim would stay until our lease ends.
            Some(false) => {
                let dropped = self
                    .persist(claim, || {
                        self.store.drop_claim(claim.job_id, claim.reservation)
                    })
                    .await;
                if dropped == Some(true) {
                    Requeue::RecordGone
                } else {
                    Requeue::ClaimLost
                }
            }
            None => Requeue::ClaimLost,
        }
    }

    /// Runs `work` unless the drain's hard stop or the loss of the claim's lease comes first.
    /// Dropping a plugin call stops it at its next epoch tick.
    async fn unless_stopped<T>(
        &self,
        claim: &Claim<'_>,
        work: impl Future<Output = T>,
    ) -> Result<T, Stopped> {
        tokio::select! {
            out = work => Ok(out),
            _ = self.hard_stop.cancelled() => Err(Stopped::Drain),
            _ = claim.lease_lost.cancelled() => Err(Stopped::LeaseLost),
        }
    }

    /// Gives a job we are stopping back to the ready queue as it was (not an attempt). After a
    /// lease loss the claim is usually gone already and the fence refuses the hand-back; the
    /// job manager re-queues the job instead.
    async fn hand_back(&self, claim: &Claim<'_>, record: &JobRecord, why: Stopped) {
        let outcome = match self.requeue(claim, record).await {
            Requeue::Done => "job handed back",
            Requeue::RecordGone => RECORD_GONE,
            // After a lease loss the claim is usually gone already; the job manager re-queues.
            Requeue::ClaimLost => {
                "lost the claim before handing the job back (the fence refused it)"
            }
        };
        match why {
            Stopped::Drain => tracing::info!("job stopped by the drain: {outcome}"),
            Stopped::PluginGone => tracing::warn!(
                handler = %record.handler,
                "the handler's plugin was removed as the job was claimed: {outcome}"
            ),
            Stopped::LeaseLost => tracing::warn!("lease lost, plugin call stopped: {outcome}"),
        }
    }

    /// A job that failed for good: `on_failure: ignore` lets the workflow go on as if it had
    /// finished; `fail` ends the workflow with `<ACTION>_FAILED` and the message. Either way
    /// the job is kept under `/esi-worker/dead_jobs/` for inspection.
    async fn finish_failed(&self, claim: &Claim<'_>, record: &JobRecord, message: &str) {
        let message = &*bounded(message);
        let job = &record.job;
        tracing::error!(error = %message, on_failure = job.on_failure.as_str(), "job failed");
        count_end(claim, job, false);
        let dead = dead_job_write(self.store.keys().dead_job(claim.job_id), record, message);
        if job.on_failure == OnFailure::Ignore {
            let state = self.job_state_so_far(claim, job).await;
            let writes = std::slice::from_ref(&dead);
            if let Published::Refused(why) = self
                .finish_done(claim, job, state, Map::new(), writes)
                .await
            {
                let message = format!("{message}; then etcd refused to record the failure: {why}");
                self.end_without_state(claim, &message).await;
            }
            return;
        }
        let target = JobId {
            action: job.action,
            handler: job.handler.clone(),
            resource_type: job.resource_type.clone(),
            resource_id: job.resource_id.clone(),
            version: job.version,
            suffix: String::new(),
        };
        self.fail_resource(
            claim,
            &target,
            job.workflow_action().failed_state(),
            message,
            Some(dead),
        )
        .await;
    }

    /// A job whose record cannot be parsed: the resource is taken from the job id, so the
    /// error still reaches the resource's `/state`.
    async fn fail_unreadable(&self, claim: &Claim<'_>, message: &str) {
        let message = &*bounded(message);
        match claim.job_id.parse::<JobId>() {
            Ok(id) => {
                let worker_state = id.action.failed_state();
                self.fail_resource(claim, &id, worker_state, message, None)
                    .await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot tell which resource the job is for; dropping it");
                self.end_without_state(claim, message).await;
            }
        }
    }

    async fn fail_resource(
        &self,
        claim: &Claim<'_>,
        id: &JobId,
        worker_state: String,
        message: &str,
        dead: Option<GuardedWrite>,
    ) {
        let Some(schema) = self.schemas.get(&id.resource_type) else {
            tracing::error!(resource_type = %id.resource_type, "unknown resource type; no /state to report to");
            self.end_without_state(claim, message).await;
            return;
        };
        let keys = self.store.keys();
        let state_key = keys.record(Record::State, schema, &id.resource_id);
        let job_state_key = keys.record(Record::JobState, schema, &id.resource_id);
        let state = StateRecord::bare(&worker_state, id.version, message.to_string()).to_json();
        let done = self
            .persist_or_refused(claim, || {
                self.store.fail_workflow(
                    claim.job_id,
                    claim.reservation,
                    &job_state_key,
                    (state_key.clone(), state.clone()),
                    message,
                    dead.as_ref(),
                )
            })
            .await;
        match done {
            Persisted::Done(true) => {}
            Persisted::Done(false) | Persisted::GaveUp if self.ended_by_us(claim).await => {
                tracing::info!(
                    "an earlier try of recording the failure committed; etcd's answer to it \
                     was lost"
                );
            }
            Persisted::Refused(why) => {
                let message = format!("{message}; then etcd refused to record the failure: {why}");
                self.end_without_state(claim, &message).await;
            }
            Persisted::Done(false) | Persisted::GaveUp => {
                tracing::warn!("lost the claim before recording the failure")
            }
        }
    }

    /// The last resort for a job that cannot report to its resource: marks it finished with
    /// the error (bounded, so etcd takes it), and the job manager ends its workflow.
    async fn end_without_state(&self, claim: &Claim<'_>, message: &str) {
        let message = bounded(message);
        let done = self
            .persist(claim, || {
                self.store
                    .fail_workflow_without_state(claim.job_id, claim.reservation, &message)
            })
            .await;
        if done != Some(true) {
            tracing::warn!("lost the claim before marking the job failed");
        }
    }

    /// Retries an etcd call made for `claim` through transient errors, for as long as the
    /// claim can still be ours. `None` when etcd refuses the request itself, or once the
    /// claim's lease is lost (the job manager gives the job to someone else) or the drain's
    /// hard stop came (the lease goes with the host).
    async fn persist<T, F, Fut>(&self, claim: &Claim<'_>, call: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        match self.persist_or_refused(claim, call).await {
            Persisted::Done(v) => Some(v),
            Persisted::Refused(_) | Persisted::GaveUp => None,
        }
    }

    /// [`Worker::persist`], telling a request etcd refuses (which no retry can fix, so the
    /// caller must send a smaller one) from one that kept failing.
    ///
    /// There is no deadline while the lease lives: etcd refusing writes for a while (a
    /// `NOSPACE` alarm until an operator compacts) must not leave the claim held with the
    /// result dropped. Unreachable etcd ends the lease, and with it the retries.
    async fn persist_or_refused<T, F, Fut>(&self, claim: &Claim<'_>, mut call: F) -> Persisted<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(50);
        loop {
            match call().await {
                Ok(v) => return Persisted::Done(v),
                Err(e) if e.is_refused() => {
                    let why = format!("{e:#}");
                    tracing::error!(error = %why, "etcd refused the request");
                    return Persisted::Refused(why);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "etcd call failed; retrying");
                    let pause = tokio::time::sleep(delay);
                    if let Err(stop) = self.unless_stopped(claim, pause).await {
                        tracing::error!(error = %format!("{e:#}"), ?stop,
                            "etcd call failed and the claim can no longer be ours; giving up on this job");
                        return Persisted::GaveUp;
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// The keys of the records of `resources` (a job's param resources) a plugin may read;
    /// resources of unknown types have none.
    fn param_keys(&self, resources: &[(String, String)]) -> ParamKeys {
        let keys = self.store.keys();
        ParamKeys::new(|family| {
            resources
                .iter()
                .filter(|(_, id)| !id.is_empty() && !id.contains('/'))
                .filter_map(|(resource_type, id)| {
                    let schema = self.schemas.get(resource_type)?;
                    Some(keys.record(family, schema, id))
                })
                .collect()
        })
    }

    /// For a transaction ending the claim that found it gone: whether one of our own
    /// transactions ended it, one whose answer was lost (in transit, or with a group commit
    /// sent again one by one): [`Store::claim_fate`](crate::store::Store::claim_fate).
    /// `false` when etcd cannot tell, or cannot be asked within [`FATE_TIMEOUT`] (a
    /// draining host must not wait on an unreachable etcd). Only a log line and a counter
    /// follow from the answer.
    async fn ended_by_us(&self, claim: &Claim<'_>) -> bool {
        let fate = self
            .store
            .claim_fate(claim.job_id, claim.reservation, claim.lease);
        match tokio::time::timeout(FATE_TIMEOUT, fate).await {
            Ok(Ok(fate)) => fate == ClaimFate::EndedByUs,
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"),
                    "could not ask etcd whether an unanswered try committed");
                false
            }
            Err(_) => {
                tracing::warn!(timeout = ?FATE_TIMEOUT,
                    "etcd did not say in time whether an unanswered try committed");
                false
            }
        }
    }
}

/// The `/esi-worker/dead_jobs/<id>` record of a job that failed for good.
fn dead_job_write(key: String, record: &JobRecord, message: &str) -> GuardedWrite {
    let failed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let value = serde_json::json!({
        "job": serde_json::from_str::<Value>(&record.to_json()).unwrap_or(Value::Null),
        "error": message,
        "attempts": record.attempts,
        "failed_at_unix": failed_at,
    });
    GuardedWrite {
        key,
        value: Some(value.to_string()),
        expect_mod_revision: None,
    }
}

/// What became of an etcd call the worker saw through ([`Worker::persist_or_refused`]).
enum Persisted<T> {
    Done(T),
    /// etcd refused the request itself; why, as etcd put it.
    Refused(String),
    /// The call failed and the claim's lease was lost or the drain's hard stop came.
    GaveUp,
}

/// Said of a re-queue refused because the job's record was gone.
const RECORD_GONE: &str = "the job's record is gone (its workflow ended); claim dropped";

/// What became of a re-queue ([`Worker::requeue`]).
enum Requeue {
    Done,
    /// The job's record was gone, so its claim was dropped instead.
    RecordGone,
    /// The claim was not ours any more (or etcd could not be reached while it was).
    ClaimLost,
}

/// How publishing a finished job went.
enum Published {
    /// Completed, or there is nothing more to do (the claim was lost).
    Done,
    /// A proposed write's compare failed: the job must run again.
    Conflict,
    /// etcd refused the completion transaction; why, as etcd put it.
    Refused(String),
}

/// `message`, cut to [`MAX_ERROR_BYTES`] at a character boundary with a note of the cut.
fn bounded(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= MAX_ERROR_BYTES {
        return message.into();
    }
    let mut end = MAX_ERROR_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}... ({} more bytes cut)",
        &message[..end],
        message.len() - end
    )
    .into()
}

struct Claim<'a> {
    job_id: &'a str,
    reservation: &'a str,
    /// The lease the claim is bound to.
    lease: i64,
    /// Cancelled when the lease the claim is bound to is lost.
    lease_lost: tokio_util::sync::CancellationToken,
    claimed_at: Instant,
}

/// Counts a job that ended (`outcome`: completed or failed) and how long it held its claim.
fn count_end(claim: &Claim<'_>, job: &Job, completed: bool) {
    let m = metrics::global();
    let family = if completed {
        &m.jobs_completed
    } else {
        &m.jobs_failed
    };
    family
        .get_or_create(&metrics::labels([
            ("handler", &job.handler),
            ("action", job.action.as_str()),
        ]))
        .inc();
    m.job_duration
        .get_or_create(&metrics::labels([("handler", &job.handler)]))
        .observe(claim.claimed_at.elapsed().as_secs_f64());
}

/// Why a job stopped before it finished.
#[derive(Debug, Clone, Copy)]
enum Stopped {
    /// The drain ran out of time.
    Drain,
    /// The lease the claim is bound to was lost.
    LeaseLost,
    /// No plugin here serves the job's handler any more.
    PluginGone,
}

/// The job as a component receives it, with the workflow's job state so far.
pub(crate) fn to_wit_job(job: &Job, job_state: &Map<String, Value>) -> wit::Job {
    wit::Job {
        id: job.id.clone(),
        job_name: job.job_name.clone(),
        handler: job.handler.clone(),
        action: job.action.as_str().to_string(),
        resource_type: job.resource_type.clone(),
        resource_id: job.resource_id.clone(),
        version: job.version,
        is_first: job.is_first,
        is_last: job.is_last,
        dependency: job.dependency.clone(),
        on_failure: job.on_failure.as_str().to_string(),
        params: job
            .params
            .iter()
            .map(|p| wit::Param {
                param: p.param.clone(),
                kind: p.kind.clone(),
                value: p.value.to_string(),
                resources: p
                    .resources
                    .iter()
                    .map(|r| wit::ResourceRef {
                        resource_type: r.resource_type.clone(),
                        resource_id: r.resource_id.clone(),
                    })
                    .collect(),
            })
            .collect(),
        resource_input: Value::Object(job.resource_input.clone()).to_string(),
        job_state: Value::Object(job_state.clone()).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{bounded, MAX_ERROR_BYTES};

    #[test]
    fn a_short_message_is_kept_whole() {
        assert_eq!(bounded("plugin trapped"), "plugin trapped");
    }

    #[test]
    fn a_long_message_is_cut_at_a_character_boundary_with_a_note() {
        // 'é' is two bytes: the cut falls inside one and must move back to its start.
        let message = format!("x{}", "é".repeat(MAX_ERROR_BYTES));
        let cut = bounded(&message);
        assert!(cut.len() < MAX_ERROR_BYTES + 40, "{}", cut.len());
        assert!(cut.starts_with("xéé"));
        assert!(cut.ends_with(&format!(
            "... ({} more bytes cut)",
            message.len() - (MAX_ERROR_BYTES - 1)
        )));
    }
}
