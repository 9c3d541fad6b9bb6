//! The job manager role (PROTOCOL section 4): config changes become workflows of jobs;
//! finished jobs are cleaned and release the jobs waiting on them.
//!
//! The manager keeps an index of the jobs it wrote so it can release dependants without
//! re-reading the queues, but the index is only a cache: on start (and after any lost watch)
//! it is rebuilt from etcd by listing `/jobs/` and `/config/v2.0/`, then both prefixes are
//! watched from the revisions of those listings. Work that appeared while the manager was down
//! is therefore picked up, and nothing is done twice: a workflow is only planned for a
//! resource with no job in the index, and releases and clean-ups are idempotent transactions.

pub mod election;
mod index;
pub mod mappings;
pub mod workflow;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use self::index::{JobIndex, ResourceKey};
use self::mappings::{resolve_params, ConfigLookup, Lookup, ResolveError};
use self::workflow::{decide, handler_order, plan, template_id, Step};
use crate::keys::{Queue, Record};
use crate::protocol::{Action, ConfigEnvelope, HeatTemplate, JobId, JobRecord, StateRecord};
use crate::schema::{Schema, SchemaRegistry, HEAT_TEMPLATE};
use crate::store::jobs::NewJob;
use crate::store::jobs::{request_budget, PlannedTxn, Unwritten, UnwrittenWorkflow};
use crate::store::{Change, Events, Kv, Store, StoreError, Watch, WatchError};
use crate::worker::hints::PlannedParams;

/// Queued transactions that make the manager send a batch before reading further.
const MAX_PENDING: usize = 64;

/// Watch changes gathered into one burst at most (from responses etcd already delivered).
const MAX_BURST: usize = 512;

/// Resources whose `/state`s a rebuild reads ahead at a time (in round trips of 128 keys).
const REBUILD_CHUNK: usize = 1024;

/// How long clean-ups of finished jobs may wait for other writes to ride with. Nothing
/// waits on a clean-up, so under load they join the next batch of workflow writes or
/// releases instead of costing a commit of their own; when nothing else comes, they go
/// after this long.
const CLEANUP_LINGER: Duration = Duration::from_millis(100);

/// How long a vanished claim waits before the manager checks whether its job is accounted
/// for. A completion deletes the claim and writes the finished key in one transaction, but
/// the two arrive on different watches; without the grace, most completions would cost a
/// read and a refused re-queue.
const CLAIM_GRACE: Duration = Duration::from_millis(250);

/// What a resource's config asks for ([`JobManager::verdict`]).
enum Verdict {
    /// Nothing: its `/state` is current, or it waits for a related config.
    Nothing,
    /// The config does not parse: the resource fails with this message.
    Reject(String),
    /// The resource fails: its `/state` says `action` failed, with this message.
    Fail {
        action: Action,
        version: u64,
        message: String,
    },
    /// No template for any handler: `READ_COMPLETE` at this version.
    ReadComplete(u64),
    /// A workflow to write.
    Write {
        action: Action,
        jobs: Vec<JobRecord>,
        new: Vec<NewJob>,
    },
}

/// The handlers some worker serves: this host's plugins (live, so a plugin added by hot
/// reload counts at once) and handlers served outside this host.
#[derive(Debug, Clone, Default)]
pub struct ServedHandlers {
    pub external: HashSet<String>,
    pub plugins: Option<Arc<crate::plugins::PluginRegistry>>,
}

impl ServedHandlers {
    /// A fixed set, for hosts and tests without local plugins.
    pub fn fixed(handlers: impl IntoIterator<Item = String>) -> Self {
        ServedHandlers {
            external: handlers.into_iter().collect(),
            plugins: None,
        }
    }

    /// Every handler served now.
    pub fn all(&self) -> Vec<String> {
        let mut all: Vec<String> = self.external.iter().cloned().collect();
        if let Some(plugins) = &self.plugins {
            all.extend(plugins.handlers());
        }
        all
    }

    pub fn contains(&self, handler: &str) -> bool {
        self.external.contains(handler) || self.plugins.as_ref().is_some_and(|p| p.serves(handler))
    }
}

/// Job manager settings.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Handlers some worker serves. A template naming any other handler fails the resource
    /// with a clear error instead of leaving a job nobody will ever claim.
    pub handlers: ServedHandlers,
    /// First delay before a job whose worker died goes back to ready; doubles per attempt.
    pub requeue_backoff: Duration,
    pub requeue_backoff_max: Duration,
    /// etcd's `--max-request-bytes`. A workflow whose job records take more than
    /// [`request_budget`] of it fails its resource with a clear error instead of being
    /// refused by etcd on every try; batches of writes are cut to fit it.
    pub max_request_bytes: usize,
    /// Where the worker of this process learns the params of the jobs planned here for
    /// handlers its plugins serve, so that its claim can read the records they name (`None`:
    /// no worker here).
    pub planned: Option<Arc<PlannedParams>>,
}

/// The job manager. Run it with [`JobManager::run`].
pub struct JobManager {
    store: Store,
    schemas: Arc<SchemaRegistry>,
    config: ManagerConfig,
    templates: HashMap<String, HeatTemplate>,
    /// Heat templates that do not parse, by id (the key's), with why: a resource that
    /// needs one fails naming it, instead of reading as having no template.
    broken_templates: HashMap<String, String>,
    index: JobIndex,
    /// Resources waiting for a related config: missing (type, id) -> config keys to retry.
    deferred: HashMap<ResourceKey, HashSet<String>>,
    /// Resources whose config changed while a workflow of theirs was running.
    dirty: HashSet<ResourceKey>,
    /// Resources whose config key was deleted while a workflow of theirs was running: once
    /// it ends, what the manager kept for them goes, as after any delete, even when a config
    /// of the same id exists by then (a resource created again: a new life, planned from no
    /// `/state`).
    deleted_while_busy: HashSet<ResourceKey>,
    /// Workflow writes, clean-ups and releases not sent yet: one batch per burst of watch
    /// responses, so a burst of configs or finished jobs costs one etcd commit, not one each.
    pending: Vec<PlannedTxn>,
    /// Clean-ups of finished jobs waiting for the next batch, and the latest they may wait
    /// until ([`CLEANUP_LINGER`]).
    cleanups: Vec<PlannedTxn>,
    cleanups_due: Option<Instant>,
    /// The batch being committed while the manager plans the next one. Batches commit one
    /// after the other, and any other write waits for it ([`JobManager::settle`]), so etcd
    /// still sees the manager's writes in the order it made them; the one exception is
    /// `beside`.
    in_flight: Option<Batch>,
    /// The resources of the jobs in `in_flight`; `None` when one of them has a job id that
    /// names none (a job written by something else), and nothing may go beside.
    in_flight_resources: Option<HashSet<ResourceKey>>,
    /// A batch committing beside `in_flight`, whose order against it cannot matter
    /// ([`JobManager::send_beside`]); the next batch in order waits for both.
    beside: Option<Batch>,
    /// `/state` records read for a burst of configs in one round trip, by key; consumed by
    /// the first evaluation of each, dropped when the manager writes that key or the burst
    /// is done.
    prefetched: HashMap<String, Option<Kv>>,
    /// Claims that disappeared, and when: looked at after [`CLAIM_GRACE`], by which time the
    /// finished key written in the same transaction as the delete has usually been seen.
    vanished: VecDeque<(Instant, String)>,
    /// Resources whose workflow was planned as a create without reading their `/state`
    /// (their config key was new) and not written (they had one, or etcd refused the
    /// write): planned again from it once the loop is between steps.
    replan: Vec<ResourceKey>,
}

impl JobManager {
    pub fn new(store: Store, schemas: Arc<SchemaRegistry>, config: ManagerConfig) -> Self {
        JobManager {
            store,
            schemas,
            config,
            templates: HashMap::new(),
            broken_templates: HashMap::new(),
            index: JobIndex::default(),
            deferred: HashMap::new(),
            dirty: HashSet::new(),
            deleted_while_busy: HashSet::new(),
            pending: Vec::new(),
            cleanups: Vec::new(),
            cleanups_due: None,
            in_flight: None,
            in_flight_resources: None,
            beside: None,
            prefetched: HashMap::new(),
            vanished: VecDeque::new(),
            replan: Vec::new(),
        }
    }

    /// Runs until `shutdown`. etcd trouble never ends the loop: the manager logs what it waits
    /// for, backs off, rebuilds its view from etcd and goes on.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.sync_and_follow(&shutdown).await {
                Ok(()) => return,
                Err(e) if is_fenced(&e) => {
                    tracing::warn!(error = %format!("{e:#}"), "job manager: another host holds the role; stopping");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "job manager: waiting for etcd");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn sync_and_follow(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        // Writes queued before a failure are dropped: the rebuild below plans from etcd. A
        // batch still committing lands before the listings are taken.
        self.pending.clear();
        self.cleanups.clear();
        self.cleanups_due = None;
        self.prefetched.clear();
        self.vanished.clear();
        self.replan.clear();
        for batch in [self.in_flight.take(), self.beside.take()]
            .into_iter()
            .flatten()
        {
            let _ = batch.await;
        }
        // A rebuild of the queues may end a workflow and plan its resource's next one: with
        // the templates, not with none (which would read as "no work": READ_COMPLETE).
        self.load_templates().await?;
        let jobs_revision = self.rebuild_jobs().await?;
        self.settle().await?;
        let config_revision = self.rebuild_configs().await?;
        self.settle().await?;
        let keys = self.store.keys().clone();
        let mut finished = self
            .store
            .watch_events(
                &keys.queue_prefix(Queue::Finished),
                jobs_revision + 1,
                Events::Puts,
            )
            .await?;
        let mut configs = self
            .store
            .watch(&keys.config_watch_prefix(), config_revision + 1)
            .await?;
        let mut working = self
            .store
            .watch_events(
                &keys.queue_prefix(Queue::Working),
                jobs_revision + 1,
                Events::Deletes,
            )
            .await?;
        tracing::info!("job manager: following configs and finished jobs");
        let result = self
            .follow(shutdown, &mut finished, &mut configs, &mut working)
            .await;
        // Stopping or failing: let the batch being committed land (a rebuild re-reads it).
        let settled = self.settle().await;
        result.and(if shutdown.is_cancelled() {
            Ok(())
        } else {
            settled
        })
    }

    async fn follow(
        &mut self,
        shutdown: &CancellationToken,
        finished: &mut Watch,
        configs: &mut Watch,
        working: &mut Watch,
    ) -> anyhow::Result<()> {
        let keys = self.store.keys().clone();
        loop {
            let grace_over = self.vanished.front().map(|(at, _)| *at + CLAIM_GRACE);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changes = finished.next() => {
                    for change in burst(finished, changes?)? {
                        if let Change::Put(kv) = change {
                            self.on_finished(&kv).await?;
                        }
                    }
                    self.flush().await?;
                }
                changes = configs.next() => {
                    let changes = burst(configs, changes?)?;
                    // A new config key is planned without its `/state` (see `evaluate`).
                    let puts = changes.iter().filter_map(|change| match change {
                        Change::Put(kv) if !is_new_key(kv) => Some(kv),
                        _ => None,
                    });
                    self.prefetch_states(puts).await?;
                    for change in changes {
                        self.on_config_change(change).await?;
                    }
                    self.prefetched.clear();
                    self.flush().await?;
                }
                changes = working.next() => {
                    let now = Instant::now();
                    for change in burst(working, changes?)? {
                        if let Change::Delete { key, .. } = change {
                            if let Some(id) = keys.parse_job_key(Queue::Working, &key) {
                                self.vanished.push_back((now, id.to_string()));
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(self.cleanups_due.unwrap_or_else(Instant::now)),
                    if self.cleanups_due.is_some() => {
                    self.send_cleanups();
                    self.flush().await?;
                }
                _ = tokio::time::sleep_until(grace_over.unwrap_or_else(Instant::now)),
                    if grace_over.is_some() => {
                    // Finished keys already delivered first: under a burst the finished
                    // watch can lag the working one by more than the grace, and a job whose
                    // finished key waits there completed; looking at its claim would cost a
                    // read and a re-queue its compares refuse.
                    self.take_delivered_finished(finished).await?;
                    while let Some((at, _)) = self.vanished.front() {
                        if at.elapsed() < CLAIM_GRACE {
                            break;
                        }
                        if let Some((_, id)) = self.vanished.pop_front() {
                            self.on_claim_vanished(&id).await?;
                        }
                    }
                    self.flush().await?;
                }
                committed = wait_for(&mut self.in_flight), if self.in_flight.is_some() => {
                    self.in_flight = None;
                    self.on_unwritten(committed?).await?;
                }
                committed = wait_for(&mut self.beside), if self.beside.is_some() => {
                    self.beside = None;
                    self.on_unwritten(committed?).await?;
                }
            }
            self.plan_again().await?;
        }
    }

    /// Plans the resources in [`JobManager::replan`] again, from their `/state`.
    async fn plan_again(&mut self) -> anyhow::Result<()> {
        if self.replan.is_empty() {
            return Ok(());
        }
        while let Some(resource) = self.replan.pop() {
            self.dirty.insert(resource.clone());
            self.after_job_removed(resource).await?;
        }
        self.flush().await
    }

    /// Handles finished jobs the watch has already delivered, without waiting for more: one
    /// burst ([`MAX_BURST`] at most), so that a steady stream of them cannot hold back the
    /// rest of the loop.
    async fn take_delivered_finished(&mut self, finished: &mut Watch) -> anyhow::Result<()> {
        if let Some(changes) = finished.try_next() {
            for change in burst(finished, changes?)? {
                if let Change::Put(kv) = change {
                    self.on_finished(&kv).await?;
                }
            }
        }
        Ok(())
    }

    /// Reads the `/state` of every resource a burst of configs may plan for, in one round
    /// trip (per 128) instead of one each.
    async fn prefetch_states(&mut self, configs: impl Iterator<Item = &Kv>) -> anyhow::Result<()> {
        let mut keys = Vec::new();
        for kv in configs {
            let Some((schema, id)) = self.schema_of(&kv.key) else {
                continue;
            };
            if schema.id == HEAT_TEMPLATE || self.index.has_jobs(&(schema.id.clone(), id.clone())) {
                continue;
            }
            keys.push(self.store.keys().record(Record::State, &schema, &id));
        }
        keys.sort_unstable();
        keys.dedup();
        if keys.len() < 2 {
            return Ok(()); // one read either way
        }
        let found = self.store.get_many(&keys).await?;
        self.prefetched = keys.into_iter().zip(found).collect();
        Ok(())
    }

    /// Rebuilds the job index from `/jobs/`, cleans finished jobs and releases waiting jobs
    /// whose dependencies are all gone. Returns the listing's revision.
    async fn rebuild_jobs(&mut self) -> anyhow::Result<i64> {
        let keys = self.store.keys().clone();
        let (kvs, revision) = self.store.list(&keys.jobs_prefix()).await?;
        self.index = JobIndex::default();
        let mut waiting = Vec::new();
        let mut finished = Vec::new();
        let mut accounted = HashSet::new();
        for kv in &kvs {
            if let Some(id) = keys.parse_job_key(Queue::All, &kv.key) {
                self.index.insert_record(id, &kv.key, &kv.value);
                continue;
            }
            for queue in [
                Queue::Ready,
                Queue::Waiting,
                Queue::Working,
                Queue::Finished,
            ] {
                if let Some(id) = keys.parse_job_key(queue, &kv.key) {
                    accounted.insert(id.to_string());
                    match queue {
                        Queue::Waiting => waiting.push(id.to_string()),
                        Queue::Finished => finished.push(kv.clone()),
                        _ => {}
                    }
                }
            }
        }
        for id in &waiting {
            self.index.mark_waiting(id);
        }
        for kv in &finished {
            self.on_finished(kv).await?;
        }
        for id in self.index.releasable() {
            self.release(&id).await?;
        }
        // Jobs in no queue: their worker died while no manager was watching.
        for id in self.index.ids() {
            if !accounted.contains(&id) {
                self.on_claim_vanished(&id).await?;
            }
        }
        Ok(revision)
    }

    /// Loads every heat template (again at [`JobManager::rebuild_configs`], at its revision).
    async fn load_templates(&mut self) -> anyhow::Result<()> {
        let Some(schema) = self.schemas.get(HEAT_TEMPLATE).cloned() else {
            return Ok(());
        };
        let prefix = self.store.keys().record(Record::Config, &schema, "");
        let (kvs, _) = self.store.list(&prefix).await?;
        self.templates.clear();
        self.broken_templates.clear();
        for kv in &kvs {
            self.on_template(kv);
        }
        Ok(())
    }

    /// Lists every config, templates first so that resources see them, and acts on each.
    async fn rebuild_configs(&mut self) -> anyhow::Result<i64> {
        let prefix = self.store.keys().config_watch_prefix();
        let (kvs, revision) = self.store.list(&prefix).await?;
        self.templates.clear();
        self.broken_templates.clear();
        self.deferred.clear();
        let (templates, resources): (Vec<&Kv>, Vec<&Kv>) = kvs.iter().partition(|kv| {
            self.schema_of(&kv.key)
                .is_some_and(|(s, _)| s.id == HEAT_TEMPLATE)
        });
        for kv in templates {
            self.on_template(kv);
        }
        // Their `/state`s are read REBUILD_CHUNK at a time: one round trip each made a host
        // taking the role over 100,000 resources read for about half a minute first.
        for chunk in resources.chunks(REBUILD_CHUNK) {
            self.prefetch_states(chunk.iter().copied()).await?;
            for kv in chunk {
                self.on_resource(kv, false).await?;
            }
            self.prefetched.clear();
        }
        Ok(revision)
    }

    fn schema_of(&self, key: &str) -> Option<(Arc<Schema>, String)> {
        let (prefix, id) = self.store.keys().parse_config_key(key)?;
        Some((self.schemas.by_prefix(prefix)?.clone(), id.to_string()))
    }

    async fn on_config_change(&mut self, change: Change) -> anyhow::Result<()> {
        match change {
            Change::Put(kv) => match self.schema_of(&kv.key) {
                Some((s, _)) if s.id == HEAT_TEMPLATE => {
                    self.on_template(&kv);
                    Ok(())
                }
                _ => self.on_resource(&kv, is_new_key(&kv)).await,
            },
            Change::Delete { key, .. } => self.on_config_deleted(&key).await,
        }
    }

    /// A heat template was written. It is kept under its key's id, which is what resources
    /// look it up by and what a delete names.
    fn on_template(&mut self, kv: &Kv) {
        let Some((_, id)) = self.schema_of(&kv.key) else {
            return;
        };
        let parsed = ConfigEnvelope::parse(&kv.key, &kv.value)
            .and_then(|envelope| HeatTemplate::from_envelope(&kv.key, &envelope));
        match parsed {
            Ok(t) => {
                tracing::debug!(template = %t.id, handler = %t.handler, "heat template loaded");
                self.broken_templates.remove(&id);
                self.templates.insert(id, t);
            }
            Err(e) => {
                // Keep no stale copy: resources needing it fail with this error.
                tracing::error!(error = %e, "heat template does not parse; resources needing it fail");
                self.templates.remove(&id);
                self.broken_templates.insert(id, e.to_string());
            }
        }
    }

    async fn on_config_deleted(&mut self, key: &str) -> anyhow::Result<()> {
        let Some((schema, id)) = self.schema_of(key) else {
            return Ok(());
        };
        if schema.id == HEAT_TEMPLATE {
            self.templates.remove(&id);
            self.broken_templates.remove(&id);
            return Ok(());
        }
        let resource = (schema.id.clone(), id.clone());
        if self.index.has_jobs(&resource) {
            self.deleted_while_busy.insert(resource.clone());
            self.dirty.insert(resource);
            return Ok(());
        }
        self.forget(&schema, &id).await
    }

    /// gohan deleted the resource (after its logical delete): drops its `/state` and job
    /// state.
    async fn forget(&mut self, schema: &Schema, id: &str) -> anyhow::Result<()> {
        self.settle().await?;
        let keys = self.store.keys();
        let state_key = keys.record(Record::State, schema, id);
        self.prefetched.remove(&state_key);
        self.store.delete(&state_key).await?;
        self.store
            .delete(&keys.record(Record::JobState, schema, id))
            .await?;
        Ok(())
    }

    /// A resource's config: plans its workflow if it needs one. `new_key`: the config's key
    /// was just created (see [`JobManager::evaluate`]).
    async fn on_resource(&mut self, kv: &Kv, new_key: bool) -> anyhow::Result<()> {
        let Some((schema, id)) = self.schema_of(&kv.key) else {
            tracing::debug!(key = %kv.key, "config of an unknown resource type ignored");
            return Ok(());
        };
        let resource = (schema.id.clone(), id.clone());
        if self.index.has_jobs(&resource) {
            // One workflow per resource at a time; look again when it ends.
            self.dirty.insert(resource);
            return Ok(());
        }
        self.evaluate(&schema, &id, kv, new_key).await?;
        // Resources that were waiting for this one can go on now.
        if let Some(waiters) = self.deferred.remove(&resource) {
            for key in waiters {
                if let Some(kv) = self.store.get(&key).await? {
                    Box::pin(self.on_resource(&kv, false)).await?;
                }
            }
        }
        Ok(())
    }

    /// Plans what resource `id`'s config `kv` asks for, from the resource's `/state`.
    ///
    /// `new_key`: the config's key was just created, so the resource most likely has no
    /// `/state` yet. A create workflow is then planned without reading it, and written only
    /// while the `/state` does not exist: one round trip less on each new resource's way. If
    /// it has one after all, the batch hands the resource back and it is planned again from
    /// it ([`JobManager::replan`]). Any other outcome reads the `/state` first, except waiting
    /// for a related config: the wait reads nothing, and the `/state` is read when the
    /// resource is looked at again.
    async fn evaluate(
        &mut self,
        schema: &Schema,
        id: &str,
        kv: &Kv,
        new_key: bool,
    ) -> anyhow::Result<()> {
        let state_key = self.store.keys().record(Record::State, schema, id);
        let unread = new_key && !self.prefetched.contains_key(&state_key);
        let state = match self.prefetched.remove(&state_key) {
            Some(state) => state,
            None if unread => None,
            None => self.store.get(&state_key).await?,
        };
        let state_version = state
            .as_ref()
            .and_then(|s| StateRecord::parse(&state_key, &s.value).ok())
            .map(|s| s.version);
        let verdict = self.verdict(schema, id, kv, state_version).await?;
        let needs_state = !matches!(
            verdict,
            Verdict::Nothing
                | Verdict::Write {
                    action: Action::Create,
                    ..
                }
        );
        if unread && needs_state {
            return Box::pin(self.evaluate(schema, id, kv, false)).await;
        }
        match verdict {
            Verdict::Nothing => Ok(()),
            Verdict::Reject(message) => {
                self.reject_config(schema, id, state_version, &message, &kv.value)
                    .await
            }
            Verdict::Fail {
                action,
                version,
                message,
            } => {
                self.write_failed(&state_key, action, version, &message)
                    .await
            }
            Verdict::ReadComplete(version) => {
                let state = StateRecord::bare("READ_COMPLETE", version, String::new());
                self.settle().await?;
                self.prefetched.remove(&state_key);
                self.store.put(&state_key, state.to_json()).await?;
                tracing::debug!(key = %kv.key, "no template for any handler: READ_COMPLETE");
                Ok(())
            }
            Verdict::Write { jobs, new, .. } => {
                let unless_state = unread.then_some(state_key.as_str());
                self.write_jobs(&jobs, &new, unless_state).await
            }
        }
    }

    /// What resource `id`'s config `kv` asks for when its `/state` is at `state_version`.
    async fn verdict(
        &mut self,
        schema: &Schema,
        id: &str,
        kv: &Kv,
        state_version: Option<u64>,
    ) -> anyhow::Result<Verdict> {
        let config = match ConfigEnvelope::parse(&kv.key, &kv.value) {
            Ok(c) => c,
            Err(e) => return Ok(Verdict::Reject(e.to_string())),
        };
        if config.body_id().is_some_and(|b| b != id) {
            let message = format!(
                "{}: field \"body.id\" does not match the key's id {id:?}",
                kv.key
            );
            return Ok(Verdict::Fail {
                action: Action::Create,
                version: config.version,
                message,
            });
        }
        let Some(action) = decide(&config, state_version) else {
            return Ok(Verdict::Nothing);
        };
        let fail = |message| Verdict::Fail {
            action,
            version: config.version,
            message,
        };
        let steps = match self.steps_for(schema, id, &kv.key, &config).await? {
            Ok(Some(steps)) => steps,
            Ok(None) => return Ok(Verdict::Nothing), // deferred until a related config appears
            Err(message) => return Ok(fail(message)),
        };
        if steps.is_empty() {
            return Ok(Verdict::ReadComplete(config.version));
        }
        let jobs = plan(schema, id, &config, action, &steps);
        let new = new_jobs(&jobs);
        let size = self.store.workflow_bytes(&new);
        let budget = request_budget(self.config.max_request_bytes);
        if size > budget {
            return Ok(fail(format!(
                "{}: the workflow's {} job records and their keys come to {size} bytes (each \
                 record carries the config's body), over the {budget} bytes planned for one \
                 etcd transaction \
                 (89% of etcd_max_request_bytes, {}; raise it together with etcd's \
                 --max-request-bytes)",
                kv.key,
                jobs.len(),
                self.config.max_request_bytes
            )));
        }
        Ok(Verdict::Write { action, jobs, new })
    }

    /// The handlers' parts of a workflow. `Ok(Err(message))`: the resource fails with that
    /// message; `Ok(Ok(None))`: deferred until a related config appears.
    async fn steps_for(
        &mut self,
        schema: &Schema,
        id: &str,
        config_key: &str,
        config: &ConfigEnvelope,
    ) -> anyhow::Result<Result<Option<Vec<Step>>, String>> {
        let mut steps = Vec::new();
        for handler in handler_order(self.config.handlers.all()) {
            let Some(template_id) = template_id(&handler, schema) else {
                continue;
            };
            if let Some(error) = self.broken_templates.get(&template_id) {
                return Ok(Err(format!("{config_key}: {error}")));
            }
            let Some(template) = self.templates.get(&template_id).cloned() else {
                continue;
            };
            if !self.config.handlers.contains(&template.handler) {
                return Ok(Err(format!(
                    "heat template {}: field \"handler\": no plugin serves handler {:?}",
                    template.id, template.handler
                )));
            }
            match self.resolve(schema, &config.body, &template).await? {
                Ok(params) => steps.push(Step {
                    handler: template.handler.clone(),
                    params,
                }),
                Err(ResolveError::MissingRelated {
                    param,
                    field,
                    resource_type,
                    resource_id,
                }) => {
                    tracing::info!(key = %config_key, %param, %field, %resource_type, %resource_id,
                        "waiting for a related resource's config before planning");
                    self.deferred
                        .entry((resource_type, resource_id))
                        .or_default()
                        .insert(config_key.to_string());
                    return Ok(Ok(None));
                }
                Err(e) => {
                    return Ok(Err(format!(
                        "{config_key}: heat template {}: {e}",
                        template.id
                    )))
                }
            }
        }
        let _ = id;
        Ok(Ok(Some(steps)))
    }

    /// Resolves a template's parameters, fetching the related configs it walks through.
    async fn resolve(
        &self,
        schema: &Schema,
        body: &Map<String, Value>,
        template: &HeatTemplate,
    ) -> anyhow::Result<Result<Vec<crate::protocol::Param>, ResolveError>> {
        let mut loaded = Loaded::default();
        // Each round loads one more related config; a template walks a handful.
        for _ in 0..64 {
            match resolve_params(
                &template.parameter_mappings,
                &schema.id,
                body,
                &self.schemas,
                &loaded,
            ) {
                Err(ResolveError::NeedConfig {
                    resource_type,
                    resource_id,
                }) => match self.related_config(&resource_type, &resource_id).await? {
                    Ok(body) => {
                        loaded.0.insert((resource_type, resource_id), body);
                    }
                    Err(bad) => return Ok(Err(ResolveError::BadRelated(bad))),
                },
                other => return Ok(other),
            }
        }
        Ok(Err(ResolveError::Invalid {
            param: String::new(),
            problem: "the mappings walk through more than 64 related resources".into(),
        }))
    }

    /// The body of a related resource's config: `None` when it has none (yet), an error
    /// naming the key and field when it does not parse (waiting for it would not help).
    async fn related_config(
        &self,
        resource_type: &str,
        id: &str,
    ) -> anyhow::Result<Result<Option<Map<String, Value>>, String>> {
        let Some(schema) = self.schemas.get(resource_type) else {
            return Ok(Ok(None));
        };
        let key = self.store.keys().record(Record::Config, schema, id);
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(Ok(None));
        };
        Ok(ConfigEnvelope::parse(&key, &kv.value)
            .map(|c| Some(c.body))
            .map_err(|e| e.to_string()))
    }

    /// Queues a transaction for the next batch; a full batch is sent at once.
    async fn queue(&mut self, txn: Option<PlannedTxn>) -> anyhow::Result<()> {
        self.pending.extend(txn);
        if self.pending.len() >= MAX_PENDING {
            self.flush().await?;
        }
        Ok(())
    }

    /// Queues the clean-up of a finished job: it rides with the next batch, or goes alone
    /// after [`CLEANUP_LINGER`].
    async fn queue_cleanup(&mut self, txn: PlannedTxn) -> anyhow::Result<()> {
        self.cleanups.push(txn);
        self.cleanups_due
            .get_or_insert_with(|| Instant::now() + CLEANUP_LINGER);
        if self.cleanups.len() >= MAX_PENDING {
            self.send_cleanups();
            self.flush().await?;
        }
        Ok(())
    }

    /// Moves the waiting clean-ups into the next batch.
    fn send_cleanups(&mut self) {
        self.pending.append(&mut self.cleanups);
        self.cleanups_due = None;
    }

    /// Starts committing the queued transactions (and the clean-ups waiting for a ride), once
    /// the batches before them committed, or at once beside the batch in flight when they
    /// may ([`JobManager::send_beside`]); the manager goes on planning meanwhile.
    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() || self.send_beside() {
            return Ok(());
        }
        self.send_cleanups();
        self.land_batches().await?;
        let batch = std::mem::take(&mut self.pending);
        self.in_flight_resources = batch.iter().map(PlannedTxn::resource).collect();
        self.in_flight = Some(self.spawn_batch(batch, "in_order"));
        Ok(())
    }

    /// Sends the queued transactions beside the batch in flight rather than after it, when
    /// the order of the two cannot matter: every one is the create of a resource whose config
    /// key is new (written only while it has no `/state`), and no job of the batch in flight
    /// is that resource's. Without this a new resource waited for the batch before it to
    /// commit, and in etcd's slow tail that is 8-21 ms (BENCHMARKS.md, item 24). Answers
    /// whether it sent them.
    ///
    /// This rests on what a batch holds: workflow writes, clean-ups and releases, each
    /// writing only the `/jobs/` keys of its own job ids (and a clean-up the job state of its
    /// resource, under a compare); `/state` writes are not batched but settle first. A new
    /// kind of batched write that touches a resource's other keys must name its resource
    /// (`PlannedTxn::resource`) or keep everything in order. Clean-ups wait for the next
    /// batch in order (or their linger), never ride beside.
    fn send_beside(&mut self) -> bool {
        let independent = self.in_flight.is_some()
            && self.beside.is_none()
            && self.in_flight_resources.as_ref().is_some_and(|in_flight| {
                self.pending.iter().all(|txn| {
                    txn.is_guarded_create()
                        && txn.resource().is_some_and(|r| !in_flight.contains(&r))
                })
            });
        if independent {
            let batch = std::mem::take(&mut self.pending);
            self.beside = Some(self.spawn_batch(batch, "beside"));
        }
        independent
    }

    /// Starts committing `batch`, counted in its `lane`.
    fn spawn_batch(&self, batch: Vec<PlannedTxn>, lane: &str) -> Batch {
        crate::metrics::global()
            .manager_batches
            .get_or_create(&crate::metrics::labels([("lane", lane)]))
            .inc();
        let store = self.store.clone();
        let max_bytes = self.config.max_request_bytes;
        tokio::spawn(async move { Ok(store.batch(batch, max_bytes).await?) })
    }

    /// Waits for the batches committing (both, even when one failed) and handles what they
    /// did not write.
    async fn land_batches(&mut self) -> anyhow::Result<()> {
        let in_order = match self.in_flight.take() {
            Some(batch) => Some(batch.await),
            None => None,
        };
        let beside = match self.beside.take() {
            Some(batch) => Some(batch.await),
            None => None,
        };
        for landed in [in_order, beside].into_iter().flatten() {
            self.on_unwritten(landed??).await?;
        }
        Ok(())
    }

    /// Commits everything queued and waits for it. Every write that is not queued settles
    /// first, so that etcd sees the manager's writes in the order it made them.
    async fn settle(&mut self) -> anyhow::Result<()> {
        self.send_cleanups();
        self.flush().await?;
        self.land_batches().await
    }

    /// Workflows a batch did not write: their jobs leave the index.
    ///
    /// - Planned as a create without reading the `/state` ([`JobManager::evaluate`]): the
    ///   resource is planned again from its `/state` ([`JobManager::replan`]), whether the
    ///   `/state` was there or etcd refused the workflow (a refusal says nothing about the
    ///   `/state`, and failing the create could overwrite a current one).
    /// - etcd refused the workflow (its request limits are below what it needs): its resource
    ///   fails with etcd's answer. The `/state` is put at once, not queued: nothing else is
    ///   queued for a resource without jobs, and a batch beside holds none of the resources
    ///   of the batch in order.
    async fn on_unwritten(&mut self, unwritten: Vec<UnwrittenWorkflow>) -> anyhow::Result<()> {
        for UnwrittenWorkflow {
            first_job,
            why,
            state_unread,
        } in unwritten
        {
            let Ok(job) = first_job.parse::<JobId>() else {
                continue;
            };
            let resource = (job.resource_type.clone(), job.resource_id.clone());
            for id in self.index.ids_of(&resource) {
                self.index.remove(&id);
            }
            let error = match why {
                Unwritten::Refused(error) if !state_unread => error,
                // A `/state` found, or a refusal of a create planned without reading it.
                why => {
                    tracing::debug!(job_id = %first_job, ?why,
                        "a create planned without reading the /state was not written: \
                         planning again from the /state");
                    self.replan.push(resource);
                    continue;
                }
            };
            let Some(schema) = self.schemas.get(&job.resource_type) else {
                continue;
            };
            let config_key = self
                .store
                .keys()
                .record(Record::Config, schema, &job.resource_id);
            let message =
                format!("{config_key}: etcd refused the transaction writing its workflow: {error}");
            let Some((state_key, state)) = self.failed_state_of(&first_job, &message) else {
                continue;
            };
            tracing::error!(key = %state_key, error = %message, "resource failed");
            self.prefetched.remove(&state_key);
            self.store.put(&state_key, state).await?;
        }
        Ok(())
    }

    /// Queues the workflow `jobs` (`new`: their records as written); with `unless_state`,
    /// written only while that `/state` does not exist.
    async fn write_jobs(
        &mut self,
        jobs: &[JobRecord],
        new: &[NewJob],
        unless_state: Option<&str>,
    ) -> anyhow::Result<()> {
        let txn = match unless_state {
            Some(state_key) => self.store.workflow_txn_unless_state(new, state_key),
            None => self.store.workflow_txn(new),
        };
        self.queue(txn).await?;
        for r in jobs {
            let served_here = |p: &Arc<crate::plugins::PluginRegistry>| p.serves(&r.handler);
            if let Some(planned) = &self.config.planned {
                if self
                    .config
                    .handlers
                    .plugins
                    .as_ref()
                    .is_some_and(served_here)
                {
                    planned.insert(&r.job.id, r.job.param_resources());
                }
            }
            self.index.insert(&r.job, r.job.dependency.is_empty());
            tracing::info!(job_id = %r.job.id, "job written");
        }
        Ok(())
    }

    /// A config that cannot be parsed: its error goes to the resource's `/state`.
    async fn reject_config(
        &mut self,
        schema: &Schema,
        id: &str,
        state_version: Option<u64>,
        message: &str,
        raw: &[u8],
    ) -> anyhow::Result<()> {
        let version = serde_json::from_slice::<Value>(raw)
            .ok()
            .and_then(|v| v.get("version").and_then(Value::as_u64))
            .or(state_version)
            .unwrap_or(0);
        let action = if state_version.is_some() {
            Action::Modify
        } else {
            Action::Create
        };
        let state_key = self.store.keys().record(Record::State, schema, id);
        self.write_failed(&state_key, action, version, message)
            .await
    }

    async fn write_failed(
        &mut self,
        state_key: &str,
        action: Action,
        version: u64,
        message: &str,
    ) -> anyhow::Result<()> {
        tracing::error!(key = %state_key, error = %message, "resource failed");
        let state = StateRecord::bare(&action.failed_state(), version, message.to_string());
        self.settle().await?;
        self.prefetched.remove(state_key);
        self.store.put(state_key, state.to_json()).await?;
        Ok(())
    }

    /// `/jobs/finished/<id>` appeared: clean it, then release or cancel its dependants.
    async fn on_finished(&mut self, kv: &Kv) -> anyhow::Result<()> {
        let keys = self.store.keys().clone();
        let Some(id) = keys
            .parse_job_key(Queue::Finished, &kv.key)
            .map(str::to_string)
        else {
            return Ok(());
        };
        let failure = failure_of(&kv.value);
        let entry = self.index.remove(&id);
        let last_of = match &entry {
            Some(e) => e.is_last.then(|| e.resource.clone()),
            // A job this manager did not write (`esi-host jobs retry`, or written while it
            // ran elsewhere): its record, still there until the clean-up, says.
            None => self.last_job_resource(&id).await?,
        };
        let job_state = last_of.filter(|_| failure.is_none()).and_then(|(t, r)| {
            self.schemas
                .get(&t)
                .map(|s| keys.record(Record::JobState, s, &r))
        });
        let clean = self
            .store
            .clean_finished_txn(&id, job_state.as_deref().map(|k| (k, kv.create_revision)));
        match &failure {
            Some(error) => {
                // Dependants are cancelled before the failed job is cleaned: a rebuild in
                // between must not find them waiting on a job that is gone (which reads as
                // finished) and release them.
                self.cancel_dependants(&id, error).await?;
                self.queue_cleanup(clean).await?;
            }
            None => {
                self.queue_cleanup(clean).await?;
                for dependant in self.index.dependants(&id) {
                    if self.index.is_releasable(&dependant) {
                        self.release(&dependant).await?;
                    }
                }
            }
        }
        if let Some(entry) = entry {
            self.after_job_removed(entry.resource).await?;
        }
        Ok(())
    }

    /// The resource of job `id` if its record says it is the last job of its workflow.
    async fn last_job_resource(&self, id: &str) -> anyhow::Result<Option<ResourceKey>> {
        let key = self.store.keys().job(Queue::All, id);
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(None);
        };
        Ok(JobRecord::parse(&key, &kv.value)
            .ok()
            .filter(|r| r.job.is_last)
            .map(|r| (r.job.resource_type, r.job.resource_id)))
    }

    /// A claim disappeared. If the job did not complete, fail or go back to a queue in the
    /// same transaction, its worker is gone: the job goes back to ready with one more attempt.
    async fn on_claim_vanished(&mut self, id: &str) -> anyhow::Result<()> {
        if self.index.handler_of(id).is_none() {
            return Ok(()); // finished and cleaned, or cancelled
        }
        let key = self.store.keys().job(Queue::All, id);
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(());
        };
        let Ok(mut record) = JobRecord::parse(&key, &kv.value) else {
            return Ok(()); // a worker fails unreadable records; nothing to re-queue
        };
        // Back off before the retry, as for a failed attempt; the compares in the re-queue make
        // it a no-op if anything accounted for the job meanwhile.
        let delay = crate::retry::backoff(
            self.config.requeue_backoff,
            self.config.requeue_backoff_max,
            record.attempts,
        );
        record.attempts += 1;
        let (store, id, revision) = (self.store.clone(), id.to_string(), kv.mod_revision);
        // Usually the job completed and this delete is just seen before the finished key (two
        // watches); the re-queue's compares tell, so only an actual re-queue is worth a warning.
        tracing::debug!(job_id = %id, retry_in = ?delay, "claim gone; re-queueing unless the job is accounted for");
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // The compares make a repeat harmless (a re-queue that committed but whose answer
            // was lost finds the ready key and does nothing), so a failure is retried until
            // it goes through or this manager's term ends (a fenced write), rather than
            // leaving the job in no queue until the next manager start.
            let mut pause = Duration::from_millis(100);
            loop {
                match store
                    .requeue_orphan(&id, &record.handler, record.to_json(), revision)
                    .await
                {
                    Ok(true) => {
                        tracing::warn!(job_id = %id, attempts = record.attempts, "claim vanished without a result (its worker died); job re-queued");
                        return;
                    }
                    Ok(false) => {
                        tracing::debug!(job_id = %id, "job was accounted for meanwhile");
                        return;
                    }
                    Err(e) if e.is_fenced() => {
                        tracing::info!(job_id = %id, "no longer the job manager; the new one re-queues the job");
                        return;
                    }
                    Err(e) if e.is_refused() => {
                        tracing::error!(job_id = %id, error = %e, "etcd refuses to re-queue the job; it stays out of every queue");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(job_id = %id, error = %e, retry_in = ?pause, "re-queue failed; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(())
    }

    /// Cancels every job that (transitively) depends on a failed job. A dependant of another
    /// resource gets a failed `/state` naming the dependency, since no worker will report
    /// for it; the failed job's own resource already has one.
    ///
    /// All of them go in one transaction, with those `/state` records, committed before the
    /// failed job's clean-up (see [`Store::cancel_all`]).
    async fn cancel_dependants(&mut self, failed: &str, error: &str) -> anyhow::Result<()> {
        let failed_resource = failed
            .parse::<JobId>()
            .ok()
            .map(|j| (j.resource_type, j.resource_id));
        let mut doomed: Vec<String> = Vec::new();
        let mut queue = vec![failed.to_string()];
        while let Some(id) = queue.pop() {
            for dependant in self.index.dependants(&id) {
                if !doomed.contains(&dependant) {
                    tracing::info!(job_id = %dependant, cause = %id, %error, "job cancelled: a dependency failed");
                    doomed.push(dependant.clone());
                    queue.push(dependant);
                }
            }
        }
        if doomed.is_empty() {
            return Ok(());
        }
        // One failed `/state` per resource (the first of its jobs found names the cause): a
        // resource's later jobs would put the same key again, which etcd refuses.
        let mut states: BTreeMap<String, String> = BTreeMap::new();
        for dependant in &doomed {
            let Some(entry) = self.index.remove(dependant) else {
                continue;
            };
            if failed_resource.as_ref() != Some(&entry.resource) {
                let message =
                    format!("job {dependant} cancelled: its dependency {failed} failed: {error}");
                if let Some((key, state)) = self.failed_state_of(dependant, &message) {
                    states.entry(key).or_insert_with_key(|key| {
                        tracing::error!(%key, error = %message, "resource failed");
                        state
                    });
                }
            }
            self.dirty.insert(entry.resource);
        }
        self.settle().await?;
        for key in states.keys() {
            self.prefetched.remove(key);
        }
        // Last found first: should the cancellation take several transactions, each one
        // leaves no job behind that waits on a job already gone.
        doomed.reverse();
        let states: Vec<(String, String)> = states.into_iter().collect();
        self.store.cancel_all(&doomed, &states).await?;
        Ok(())
    }

    /// The failed `/state` record of the resource of `job_id`, which no worker will report
    /// for: its key and value.
    fn failed_state_of(&self, job_id: &str, message: &str) -> Option<(String, String)> {
        let id = job_id.parse::<JobId>().ok()?;
        let schema = self.schemas.get(&id.resource_type)?;
        let state_key = self
            .store
            .keys()
            .record(Record::State, schema, &id.resource_id);
        let state = StateRecord::bare(&id.action.failed_state(), id.version, message.to_string());
        Some((state_key, state.to_json()))
    }

    async fn release(&mut self, id: &str) -> anyhow::Result<()> {
        let Some(handler) = self.index.handler_of(id) else {
            return Ok(());
        };
        let release = self.store.release_txn(id, &handler);
        self.queue(Some(release)).await?;
        self.index.mark_ready(id);
        tracing::debug!(job_id = %id, "job released");
        Ok(())
    }

    /// When a resource's last job is gone, look at its config again if it changed meanwhile.
    async fn after_job_removed(&mut self, resource: ResourceKey) -> anyhow::Result<()> {
        if self.index.has_jobs(&resource) || !self.dirty.remove(&resource) {
            return Ok(());
        }
        let Some(schema) = self.schemas.get(&resource.0).cloned() else {
            return Ok(());
        };
        let key = self
            .store
            .keys()
            .record(Record::Config, &schema, &resource.1);
        match self.store.get(&key).await? {
            Some(kv) => {
                if self.deleted_while_busy.remove(&resource) {
                    self.forget(&schema, &resource.1).await?;
                }
                self.on_resource(&kv, false).await
            }
            None => {
                self.deleted_while_busy.remove(&resource);
                self.on_config_deleted(&key).await
            }
        }
    }
}

/// The records of a planned workflow as they are written.
fn new_jobs(jobs: &[JobRecord]) -> Vec<NewJob> {
    jobs.iter()
        .map(|r| NewJob {
            id: r.job.id.clone(),
            handler: r.handler.clone(),
            record: r.to_json(),
            ready: r.job.dependency.is_empty(),
        })
        .collect()
}

/// `first` and every response the watch already delivered after it, up to [`MAX_BURST`]
/// changes: a burst etcd sent as many responses is handled, and committed, as one.
fn burst(watch: &mut Watch, first: Vec<Change>) -> Result<Vec<Change>, WatchError> {
    let mut changes = first;
    while changes.len() < MAX_BURST {
        match watch.try_next() {
            Some(more) => changes.extend(more?),
            None => break,
        }
    }
    Ok(changes)
}

/// A batch of the manager's writes being committed: what it did not write, when it is done.
type Batch = tokio::task::JoinHandle<anyhow::Result<Vec<UnwrittenWorkflow>>>;

/// Waits for the batch being committed; answers with the workflows it did not write.
async fn wait_for(batch: &mut Option<Batch>) -> anyhow::Result<Vec<UnwrittenWorkflow>> {
    match batch {
        Some(handle) => handle.await?,
        None => Ok(Vec::new()),
    }
}

/// `true` when `kv` is the first version of its key: a config just created.
fn is_new_key(kv: &Kv) -> bool {
    kv.create_revision == kv.mod_revision
}

/// `true` when a write was refused because the election key is no longer ours.
fn is_fenced(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<StoreError>()
            .is_some_and(StoreError::is_fenced)
    })
}

/// The error of a job finished with `on_failure: fail`, if it failed.
fn failure_of(value: &[u8]) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    let parsed: Value = serde_json::from_slice(value).ok()?;
    parsed.get("failed").map(|e| {
        e.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string())
    })
}

/// Related configs loaded while resolving one template.
#[derive(Default)]
struct Loaded(HashMap<ResourceKey, Option<Map<String, Value>>>);

impl ConfigLookup for Loaded {
    fn config(&self, resource_type: &str, resource_id: &str) -> Lookup<'_> {
        match self
            .0
            .get(&(resource_type.to_string(), resource_id.to_string()))
        {
            Some(Some(body)) => Lookup::Found(body),
            Some(None) => Lookup::Absent,
            None => Lookup::NotLoaded,
        }
    }
}
