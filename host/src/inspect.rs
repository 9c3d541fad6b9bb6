//! `esi-host jobs list|show|retry` and `esi-host resource show`: what the job queues and one
//! resource's records say, as an operator (a table) or a script (`--json`) wants to read them.
//!
//! # Why it looks like this
//!
//! - **Reading is split from rendering.** [`read_jobs`] takes one listing of `/jobs/` (a single
//!   etcd revision, so a job moving between queues is never seen in two queues or in none),
//!   plus the dead jobs and the host records. [`job_rows`] turns that [`JobsSnapshot`] into
//!   [`JobRow`]s without touching etcd, and the `render_*` functions turn views into text. The
//!   pure half is unit-tested here; the etcd half in `tests/tests/inspect.rs`.
//! - **Owner host.** A claim (`/jobs/working/<id>`) holds only a reservation uuid, but it is
//!   bound to its host's lease, and every running host registers `/esi-worker/hosts/<host_id>`
//!   on that same lease. The owner of a claim is the host record with the claim's lease; a claim
//!   whose lease no host record has is shown with its lease only.
//! - **Age.** etcd keeps no timestamps and a job record has no creation time, so a live job's
//!   age is the number of etcd revisions since its `/jobs/all` record was created
//!   (`age_revisions`; every write anywhere in etcd advances the revision, so it orders jobs but
//!   is not a duration). A dead job's record carries `failed_at_unix`, so its age is in seconds
//!   since it failed (`age_seconds`).
//! - **Retry re-runs one job.** When a job fails for good with `on_failure: fail`, the job
//!   manager cancels the rest of its workflow; `jobs retry` puts only the dead job back (in
//!   [`crate::store::Store::retry_dead_job`], one transaction whose compares make it happen at
//!   most once and never over a live job). To redo a whole workflow, gohan writes the
//!   resource's config again.
//! - **Stable JSON.** The `--json` output is these types serialized with serde: the field names
//!   below are an interface for scripts. An unknown value is `null` (or `""` for the resource
//!   type and id of a job whose id and record are both unreadable).

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::keys::{Keys, Queue, Record};
use crate::protocol::{ConfigEnvelope, JobId, JobRecord, RecordError};
use crate::schema::{Schema, SchemaRegistry};
use crate::store::{Kv, Store};

/// Where a job is, as `jobs list` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobQueue {
    Ready,
    Waiting,
    Working,
    Finished,
    /// A `/jobs/all` record no queue holds: its claim vanished (its worker died) and the job
    /// manager has not re-queued it yet.
    Unqueued,
    /// `/esi-worker/dead_jobs/<id>`: failed for good.
    Dead,
}

impl JobQueue {
    pub fn as_str(self) -> &'static str {
        match self {
            JobQueue::Ready => "ready",
            JobQueue::Waiting => "waiting",
            JobQueue::Working => "working",
            JobQueue::Finished => "finished",
            JobQueue::Unqueued => "unqueued",
            JobQueue::Dead => "dead",
        }
    }

    /// The queues a live job's key can be in, most telling first: a job briefly in two
    /// (never within one revision by the protocol's transactions) is reported by the first.
    const LIVE: [(Queue, JobQueue); 4] = [
        (Queue::Working, JobQueue::Working),
        (Queue::Ready, JobQueue::Ready),
        (Queue::Waiting, JobQueue::Waiting),
        (Queue::Finished, JobQueue::Finished),
    ];
}

/// One line of `jobs list` (and of the jobs of `resource show`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobRow {
    pub id: String,
    pub queue: JobQueue,
    pub handler: String,
    /// Singular schema id, from the record (or the job id when the record is unreadable).
    pub resource_type: String,
    pub resource_id: String,
    /// Previous attempts (`null` when the record is missing or unreadable).
    pub attempts: Option<u32>,
    /// Seconds since the job failed (dead jobs only: live records carry no time).
    pub age_seconds: Option<u64>,
    /// etcd revisions since the record (`/jobs/all`, or the dead-job record) was created.
    pub age_revisions: Option<i64>,
    /// The host holding the claim of a working job, when its host record is found.
    pub owner_host: Option<String>,
    /// The last error of a dead job.
    pub error: Option<String>,
    /// Why the job's record could not be read, when it could not.
    pub record_problem: Option<String>,
}

/// `jobs list --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobList {
    /// The etcd revision `/jobs/` was listed at.
    pub revision: i64,
    pub jobs: Vec<JobRow>,
}

/// Everything `jobs list` and `resource show` read about jobs, as etcd returned it.
#[derive(Debug, Clone, Default)]
pub struct JobsSnapshot {
    /// Every key under `/jobs/`, and the revision of that listing.
    pub jobs: Vec<Kv>,
    pub revision: i64,
    /// Every key under `/esi-worker/dead_jobs/`, and the revision of that listing.
    pub dead: Vec<Kv>,
    pub dead_revision: i64,
    /// Every `/esi-worker/hosts/` record.
    pub hosts: Vec<Kv>,
    /// Now, in seconds since the Unix epoch (for the age of dead jobs).
    pub now_unix: u64,
}

/// Reads the job queues, the dead jobs and the host records.
pub async fn read_jobs(store: &Store) -> anyhow::Result<JobsSnapshot> {
    let keys = store.keys();
    let (jobs, revision) = store.list(&keys.jobs_prefix()).await?;
    let (dead, dead_revision) = store.list(&keys.dead_jobs_prefix()).await?;
    let (hosts, _) = store.list(&keys.hosts_prefix()).await?;
    Ok(JobsSnapshot {
        jobs,
        revision,
        dead,
        dead_revision,
        hosts,
        now_unix: now_unix(),
    })
}

/// `jobs list`: every job (live ones by id, then dead ones by id), or those in one queue.
pub async fn list_jobs(store: &Store, only: Option<JobQueue>) -> anyhow::Result<JobList> {
    let snapshot = read_jobs(store).await?;
    let jobs = job_rows(store.keys(), &snapshot)
        .into_iter()
        .filter(|row| only.is_none_or(|q| row.queue == q))
        .collect();
    Ok(JobList {
        revision: snapshot.revision,
        jobs,
    })
}

/// The keys one live job id has under `/jobs/`.
#[derive(Default)]
struct LiveKeys<'a> {
    record: Option<&'a Kv>,
    queues: Vec<(JobQueue, &'a Kv)>,
}

/// Turns a snapshot into rows: one per job id under `/jobs/`, then one per dead job.
pub fn job_rows(keys: &Keys, snapshot: &JobsSnapshot) -> Vec<JobRow> {
    let mut live: BTreeMap<&str, LiveKeys> = BTreeMap::new();
    for kv in &snapshot.jobs {
        if let Some(id) = keys.parse_job_key(Queue::All, &kv.key) {
            live.entry(id).or_default().record = Some(kv);
            continue;
        }
        for (queue, place) in JobQueue::LIVE {
            if let Some(id) = keys.parse_job_key(queue, &kv.key) {
                live.entry(id).or_default().queues.push((place, kv));
            }
        }
    }
    let owners = owners_by_lease(&snapshot.hosts);
    let mut rows: Vec<JobRow> = live
        .into_iter()
        .map(|(id, found)| live_row(keys, id, &found, snapshot.revision, &owners))
        .collect();
    let mut dead: Vec<JobRow> = snapshot
        .dead
        .iter()
        .filter_map(|kv| {
            let id = keys.parse_dead_job_key(&kv.key)?;
            Some(dead_row(id, kv, snapshot))
        })
        .collect();
    dead.sort_by(|a, b| a.id.cmp(&b.id));
    rows.extend(dead);
    rows
}

fn live_row(
    keys: &Keys,
    id: &str,
    found: &LiveKeys,
    revision: i64,
    owners: &HashMap<i64, String>,
) -> JobRow {
    let queue = JobQueue::LIVE
        .iter()
        .find_map(|(_, place)| found.queues.iter().find(|(q, _)| q == place))
        .map_or(JobQueue::Unqueued, |(q, _)| *q);
    let mut row = JobRow::from_id(id, queue);
    // A ready or waiting key holds the handler: the best guess when the record is missing.
    if let Some((_, kv)) = found
        .queues
        .iter()
        .find(|(q, _)| matches!(q, JobQueue::Ready | JobQueue::Waiting))
    {
        row.handler = kv.value_str().into_owned();
    }
    match found.record {
        Some(kv) => {
            row.age_revisions = Some(revision - kv.create_revision);
            row.apply_record(JobRecord::parse(&kv.key, &kv.value));
        }
        None => {
            row.age_revisions = found
                .queues
                .iter()
                .map(|(_, kv)| revision - kv.create_revision)
                .max();
            row.record_problem = Some(format!("no record at {}", keys.job(Queue::All, id)));
        }
    }
    row.owner_host = found
        .queues
        .iter()
        .find(|(q, _)| *q == JobQueue::Working)
        .and_then(|(_, kv)| owners.get(&kv.lease).cloned());
    row
}

fn dead_row(id: &str, kv: &Kv, snapshot: &JobsSnapshot) -> JobRow {
    let mut row = JobRow::from_id(id, JobQueue::Dead);
    row.age_revisions = Some(snapshot.dead_revision - kv.create_revision);
    match DeadJob::parse(kv) {
        Ok(dead) => {
            row.age_seconds = dead
                .failed_at_unix
                .map(|t| snapshot.now_unix.saturating_sub(t));
            row.error = Some(dead.error.clone());
            row.apply_record(dead.record(&kv.key));
            // The count at the time of the failure, which the dead-job record keeps itself.
            row.attempts = dead.attempts.or(row.attempts);
        }
        Err(problem) => row.record_problem = Some(problem),
    }
    row
}

impl JobRow {
    /// A row with what the job id alone tells.
    fn from_id(id: &str, queue: JobQueue) -> JobRow {
        let parsed = id.parse::<JobId>().ok();
        JobRow {
            id: id.to_string(),
            queue,
            handler: parsed
                .as_ref()
                .map(|j| j.handler.clone())
                .unwrap_or_default(),
            resource_type: parsed
                .as_ref()
                .map(|j| j.resource_type.clone())
                .unwrap_or_default(),
            resource_id: parsed.map(|j| j.resource_id).unwrap_or_default(),
            attempts: None,
            age_seconds: None,
            age_revisions: None,
            owner_host: None,
            error: None,
            record_problem: None,
        }
    }

    fn apply_record(&mut self, record: Result<JobRecord, RecordError>) {
        match record {
            Ok(record) => {
                self.handler = record.handler;
                self.resource_type = record.job.resource_type;
                self.resource_id = record.job.resource_id;
                self.attempts = Some(record.attempts);
            }
            Err(e) => self.record_problem = Some(e.to_string()),
        }
    }

    /// `type/id`, or `?` when neither the record nor the id tells.
    fn resource(&self) -> String {
        if self.resource_type.is_empty() && self.resource_id.is_empty() {
            "?".to_string()
        } else {
            format!("{}/{}", self.resource_type, self.resource_id)
        }
    }
}

/// The value of `/esi-worker/dead_jobs/<id>` (written by the worker when a job fails for good).
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct DeadJob {
    /// The `/jobs/all` record as it was when the job failed.
    job: Value,
    #[serde(default)]
    error: String,
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    failed_at_unix: Option<u64>,
}

impl DeadJob {
    fn parse(kv: &Kv) -> Result<DeadJob, String> {
        serde_json::from_slice(&kv.value).map_err(|e| {
            format!(
                "{}: not a dead-job record {{\"job\", \"error\", \"attempts\", \"failed_at_unix\"}}: {e}",
                kv.key
            )
        })
    }

    /// The job record kept in field `job`.
    fn record(&self, key: &str) -> Result<JobRecord, RecordError> {
        kept_job_record(key, &self.job)
    }
}

/// The `/jobs/all` record kept in field `job` of the dead-job record at `key`.
fn kept_job_record(key: &str, job: &Value) -> Result<JobRecord, RecordError> {
    JobRecord::parse(
        &format!("{key} (field \"job\")"),
        job.to_string().as_bytes(),
    )
}

/// Maps each lease to the id of the host registered on it.
fn owners_by_lease(hosts: &[Kv]) -> HashMap<i64, String> {
    hosts
        .iter()
        .filter(|kv| kv.lease != 0)
        .map(|kv| {
            let id = serde_json::from_slice::<Value>(&kv.value)
                .ok()
                .and_then(|v| v.get("host_id").and_then(Value::as_str).map(str::to_string))
                // A host record without a readable id still names the host by its key.
                .unwrap_or_else(|| kv.key.clone());
            (kv.lease, id)
        })
        .collect()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// jobs show / jobs retry

/// `jobs show --json`: everything stored about one job id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobView {
    pub id: String,
    pub handler: String,
    pub resource_type: String,
    pub resource_id: String,
    /// Which of ready, waiting, working, finished hold the id, plus dead if a dead-job record
    /// exists.
    pub queues: Vec<JobQueue>,
    /// `/jobs/all/<id>`.
    pub record: Option<StoredJob>,
    /// `/jobs/working/<id>`.
    pub claim: Option<Claim>,
    /// `/jobs/finished/<id>`.
    pub finished: Option<Finished>,
    /// `/esi-worker/dead_jobs/<id>`.
    pub dead: Option<DeadView>,
}

/// A `/jobs/all` record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredJob {
    pub key: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub attempts: Option<u32>,
    /// The stored value (`[handler, job, attempts]`), or its text if it is not JSON.
    pub value: Value,
    pub problem: Option<String>,
}

/// A claim: `/jobs/working/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub key: String,
    pub reservation: String,
    /// The etcd lease the claim is bound to (`0`: none, which no host writes).
    pub lease: i64,
    /// The host registered on that lease, if its record is found.
    pub owner_host: Option<String>,
}

/// `/jobs/finished/<id>`: `""` for a success, `{"failed": <error>}` for a failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finished {
    pub key: String,
    pub value: String,
    pub failed: Option<String>,
}

/// A dead-job record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadView {
    pub key: String,
    pub mod_revision: i64,
    pub error: String,
    pub attempts: Option<u32>,
    pub failed_at_unix: Option<u64>,
    pub age_seconds: Option<u64>,
    /// The `/jobs/all` record as it was when the job failed.
    pub job: Value,
    pub problem: Option<String>,
}

/// `jobs show`: reads every key of one job id. Fails if none exists.
pub async fn show_job(store: &Store, id: &str) -> anyhow::Result<JobView> {
    let view = read_job(store, id).await?;
    if view.queues.is_empty() && view.record.is_none() {
        let keys = store.keys();
        bail!(
            "no job {id}: nothing at {}, in any queue under {}, or at {}",
            keys.job(Queue::All, id),
            keys.jobs_prefix(),
            keys.dead_job(id)
        );
    }
    Ok(view)
}

/// Reads every key of one job id (a view with no record and no queue when none exists).
async fn read_job(store: &Store, id: &str) -> anyhow::Result<JobView> {
    let keys = store.keys();
    let mut view = JobView {
        id: id.to_string(),
        handler: String::new(),
        resource_type: String::new(),
        resource_id: String::new(),
        queues: Vec::new(),
        record: None,
        claim: None,
        finished: None,
        dead: None,
    };
    let from_id = JobRow::from_id(id, JobQueue::Unqueued);
    (view.handler, view.resource_type, view.resource_id) =
        (from_id.handler, from_id.resource_type, from_id.resource_id);
    for (queue, place) in JobQueue::LIVE {
        let key = keys.job(queue, id);
        let Some(kv) = store.get(&key).await? else {
            continue;
        };
        view.queues.push(place);
        match place {
            JobQueue::Working => view.claim = Some(claim_of(store, kv).await?),
            JobQueue::Finished => view.finished = Some(finished_of(kv)),
            _ => {}
        }
    }
    if let Some(kv) = store.get(&keys.job(Queue::All, id)).await? {
        let parsed = JobRecord::parse(&kv.key, &kv.value);
        view.record = Some(stored_job(&kv, parsed.as_ref()));
        if let Ok(record) = parsed {
            view.take_names(record);
        }
    }
    if let Some(kv) = store.get(&keys.dead_job(id)).await? {
        view.queues.push(JobQueue::Dead);
        let (dead, record) = dead_view(&kv, now_unix());
        if view.record.is_none() {
            if let Some(record) = record {
                view.take_names(record);
            }
        }
        view.dead = Some(dead);
    }
    Ok(view)
}

impl JobView {
    fn take_names(&mut self, record: JobRecord) {
        self.handler = record.handler;
        self.resource_type = record.job.resource_type;
        self.resource_id = record.job.resource_id;
    }

    /// `true` when a key under `/jobs/` still accounts for the job.
    fn is_live(&self) -> bool {
        self.record.is_some() || self.queues.iter().any(|q| *q != JobQueue::Dead)
    }
}

fn stored_job(kv: &Kv, parsed: Result<&JobRecord, &RecordError>) -> StoredJob {
    StoredJob {
        key: kv.key.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        attempts: parsed.ok().map(|r| r.attempts),
        value: json_or_text(&kv.value),
        problem: parsed.err().map(ToString::to_string),
    }
}

async fn claim_of(store: &Store, kv: Kv) -> anyhow::Result<Claim> {
    let (hosts, _) = store.list(&store.keys().hosts_prefix()).await?;
    Ok(Claim {
        reservation: kv.value_str().into_owned(),
        lease: kv.lease,
        owner_host: owners_by_lease(&hosts).remove(&kv.lease),
        key: kv.key,
    })
}

fn finished_of(kv: Kv) -> Finished {
    let value = kv.value_str().into_owned();
    let failed = serde_json::from_str::<Value>(&value).ok().and_then(|v| {
        v.get("failed")
            .map(|f| f.as_str().map_or(f.to_string(), str::to_string))
    });
    Finished {
        key: kv.key,
        value,
        failed,
    }
}

fn dead_view(kv: &Kv, now: u64) -> (DeadView, Option<JobRecord>) {
    match DeadJob::parse(kv) {
        Ok(dead) => {
            let record = dead.record(&kv.key);
            let view = DeadView {
                key: kv.key.clone(),
                mod_revision: kv.mod_revision,
                attempts: dead.attempts,
                failed_at_unix: dead.failed_at_unix,
                age_seconds: dead.failed_at_unix.map(|t| now.saturating_sub(t)),
                problem: record.as_ref().err().map(ToString::to_string),
                error: dead.error,
                job: dead.job,
            };
            (view, record.ok())
        }
        Err(problem) => (
            DeadView {
                key: kv.key.clone(),
                mod_revision: kv.mod_revision,
                error: String::new(),
                attempts: None,
                failed_at_unix: None,
                age_seconds: None,
                job: json_or_text(&kv.value),
                problem: Some(problem),
            },
            None,
        ),
    }
}

/// Why `jobs retry` did nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetryRefused {
    #[error(
        "job {id} is not dead: there is no dead-job record at {dead_key}; only a job that \
         failed for good can be retried (see `esi-host jobs list --state dead`)"
    )]
    NotDead { id: String, dead_key: String },
    #[error(
        "job {id} still exists ({found_at}); only a dead job whose record the job manager has \
         cleaned can be retried: wait until `esi-host jobs show {id}` shows it as dead only"
    )]
    StillExists { id: String, found_at: String },
    #[error(
        "job {id} changed while it was being retried (its record or a queue key reappeared, or \
         its dead-job record changed); nothing was written: see `esi-host jobs show {id}`"
    )]
    Changed { id: String },
}

/// What `jobs retry` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retried {
    pub id: String,
    pub handler: String,
    /// The key the job is ready at now.
    pub ready_key: String,
    /// The attempts the job had failed after (now reset to 0).
    pub failed_attempts: Option<u32>,
    /// The error it had failed with.
    pub error: String,
}

/// `jobs retry`: puts a dead job back to ready with attempts reset to 0 (see the module docs
/// for what that does to its workflow).
pub async fn retry_job(store: &Store, id: &str) -> anyhow::Result<Retried> {
    let keys = store.keys();
    let view = read_job(store, id).await?;
    let Some(dead) = &view.dead else {
        return Err(RetryRefused::NotDead {
            id: id.to_string(),
            dead_key: keys.dead_job(id),
        }
        .into());
    };
    if view.is_live() {
        let mut found_at: Vec<String> = view.record.iter().map(|r| r.key.clone()).collect();
        found_at.extend(
            view.queues
                .iter()
                .filter(|q| **q != JobQueue::Dead)
                .map(|q| format!("queue {}", q.as_str())),
        );
        return Err(RetryRefused::StillExists {
            id: id.to_string(),
            found_at: found_at.join(", "),
        }
        .into());
    }
    let mut record = kept_job_record(&dead.key, &dead.job)
        .with_context(|| format!("cannot retry job {id}: its dead-job record has no usable job"))?;
    record.attempts = 0;
    let retried = store
        .retry_dead_job(id, &record.handler, record.to_json(), dead.mod_revision)
        .await?;
    if !retried {
        return Err(RetryRefused::Changed { id: id.to_string() }.into());
    }
    Ok(Retried {
        id: id.to_string(),
        ready_key: keys.job(Queue::Ready, id),
        handler: record.handler,
        failed_attempts: dead.attempts,
        error: dead.error.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// resource show

/// `resource show --json`: one resource as the whole stack sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceView {
    /// Singular schema id.
    pub resource_type: String,
    pub plural: String,
    pub resource_id: String,
    /// `/config<prefix>/<id>`, written by gohan.
    pub config: Option<ConfigView>,
    /// `/state<prefix>/<id>`, the worker's answer to gohan.
    pub state: Option<Stored>,
    /// `/esi-worker/job_state<prefix>/<id>`, the running workflow's scratch state.
    pub job_state: Option<Stored>,
    /// `/monitoring<prefix>/<id>`, written by collectors.
    pub monitoring: Option<Stored>,
    /// `/esi-worker/monitoring_targets<prefix>/<id>`.
    pub monitoring_targets: Option<Stored>,
    /// The resource's jobs under `/jobs/` and its dead jobs (queue `dead`).
    pub jobs: Vec<JobRow>,
}

/// A config envelope.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigView {
    pub key: String,
    pub mod_revision: i64,
    pub version: Option<u64>,
    pub marked_for_deletion: Option<bool>,
    /// The body as an object (gohan stores it as a JSON string), or the whole stored value when
    /// it cannot be read (see `problem`).
    pub body: Value,
    pub problem: Option<String>,
}

/// Any other record: its key and value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stored {
    pub key: String,
    pub mod_revision: i64,
    /// The stored JSON, or its text if it is not JSON.
    pub value: Value,
}

/// Finds a resource type by schema id, singular or plural name.
pub fn resource_type<'r>(schemas: &'r SchemaRegistry, name: &str) -> anyhow::Result<&'r Schema> {
    if let Some(schema) = schemas.get(name) {
        return Ok(schema);
    }
    let close: Vec<&str> = schemas
        .iter()
        .map(|s| s.id.as_str())
        .filter(|id| id.contains(name) || name.contains(*id))
        .take(5)
        .collect();
    let hint = if close.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", close.join(", "))
    };
    bail!(
        "unknown resource type {name:?}{hint}: give a schema id, singular or plural name, e.g. \
         ha_interface or ha_interfaces"
    )
}

/// `resource show`: the records and jobs of one resource. Fails if nothing at all is stored
/// for it (most likely a wrong id).
pub async fn show_resource(
    store: &Store,
    schemas: &SchemaRegistry,
    type_name: &str,
    id: &str,
) -> anyhow::Result<ResourceView> {
    let schema = resource_type(schemas, type_name)?;
    let keys = store.keys();
    let config_key = keys.record(Record::Config, schema, id);
    let config = store.get(&config_key).await?.map(|kv| config_view(&kv));
    let stored = |record: Record| {
        let key = keys.record(record, schema, id);
        async move {
            anyhow::Ok(store.get(&key).await?.map(|kv| Stored {
                value: json_or_text(&kv.value),
                mod_revision: kv.mod_revision,
                key: kv.key,
            }))
        }
    };
    let snapshot = read_jobs(store).await?;
    let jobs = job_rows(keys, &snapshot)
        .into_iter()
        .filter(|row| row.resource_type == schema.id && row.resource_id == id)
        .collect();
    let view = ResourceView {
        resource_type: schema.id.clone(),
        plural: schema.plural.clone(),
        resource_id: id.to_string(),
        config,
        state: stored(Record::State).await?,
        job_state: stored(Record::JobState).await?,
        monitoring: stored(Record::Monitoring).await?,
        monitoring_targets: stored(Record::MonitoringTarget).await?,
        jobs,
    };
    if view.is_empty() {
        bail!(
            "nothing is stored for {} {id}: no config at {}, no /state, no job",
            schema.id,
            config_key
        );
    }
    Ok(view)
}

impl ResourceView {
    fn is_empty(&self) -> bool {
        self.config.is_none()
            && self.state.is_none()
            && self.job_state.is_none()
            && self.monitoring.is_none()
            && self.monitoring_targets.is_none()
            && self.jobs.is_empty()
    }
}

fn config_view(kv: &Kv) -> ConfigView {
    match ConfigEnvelope::parse(&kv.key, &kv.value) {
        Ok(config) => ConfigView {
            key: kv.key.clone(),
            mod_revision: kv.mod_revision,
            version: Some(config.version),
            marked_for_deletion: Some(config.marked_for_deletion),
            body: Value::Object(config.body),
            problem: None,
        },
        Err(e) => ConfigView {
            key: kv.key.clone(),
            mod_revision: kv.mod_revision,
            version: None,
            marked_for_deletion: None,
            body: json_or_text(&kv.value),
            problem: Some(e.to_string()),
        },
    }
}

/// A stored value as JSON, or as a JSON string of its text when it is not JSON.
fn json_or_text(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

// ---------------------------------------------------------------------------------------------
// Rendering (pure)

/// The `jobs list` table. `with_queue`: add the QUEUE column (when no `--state` filters).
pub fn render_job_table(rows: &[JobRow], with_queue: bool) -> String {
    if rows.is_empty() {
        return "no jobs\n".to_string();
    }
    let mut headers = vec!["ID"];
    if with_queue {
        headers.push("QUEUE");
    }
    headers.extend(["HANDLER", "RESOURCE", "ATTEMPTS", "AGE", "OWNER"]);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let mut line = vec![row.id.clone()];
            if with_queue {
                line.push(row.queue.as_str().to_string());
            }
            line.extend([
                or_dash(&row.handler),
                row.resource(),
                row.attempts.map_or("?".to_string(), |a| a.to_string()),
                format_age(row.age_seconds, row.age_revisions),
                owner_cell(row),
            ]);
            line
        })
        .collect();
    table(&headers, &cells)
}

fn owner_cell(row: &JobRow) -> String {
    match (&row.owner_host, row.queue) {
        (Some(host), _) => host.clone(),
        (None, JobQueue::Working) => "?".to_string(),
        (None, _) => "-".to_string(),
    }
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

/// `42s`, `5m`, `3h`, `2d` when a time is known, else `17rev` (etcd revisions), else `?`.
pub fn format_age(seconds: Option<u64>, revisions: Option<i64>) -> String {
    match (seconds, revisions) {
        (Some(s), _) if s < 120 => format!("{s}s"),
        (Some(s), _) if s < 120 * 60 => format!("{}m", s / 60),
        (Some(s), _) if s < 48 * 3600 => format!("{}h", s / 3600),
        (Some(s), _) => format!("{}d", s / 86400),
        (None, Some(r)) => format!("{r}rev"),
        (None, None) => "?".to_string(),
    }
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// Indents every line of `text` by `n` spaces.
fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

impl JobView {
    /// The human-readable `jobs show`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut field = |name: &str, value: String| out.push_str(&format!("{name:<10}{value}\n"));
        field("job", self.id.clone());
        field("handler", or_dash(&self.handler));
        field(
            "resource",
            if self.resource_type.is_empty() {
                "?".to_string()
            } else {
                format!("{}/{}", self.resource_type, self.resource_id)
            },
        );
        let queues: Vec<&str> = self.queues.iter().map(|q| q.as_str()).collect();
        field(
            "queues",
            if queues.is_empty() {
                "none (the claim vanished; the job manager re-queues it)".to_string()
            } else {
                queues.join(", ")
            },
        );
        field(
            "record",
            match &self.record {
                Some(r) => format!(
                    "{}  attempts {}, created at revision {}, modified at revision {}{}",
                    r.key,
                    r.attempts.map_or("?".to_string(), |a| a.to_string()),
                    r.create_revision,
                    r.mod_revision,
                    r.problem
                        .as_ref()
                        .map_or(String::new(), |p| format!("\n          unreadable: {p}")),
                ),
                None => "none".to_string(),
            },
        );
        field(
            "claim",
            match &self.claim {
                Some(c) => format!(
                    "reservation {}  lease {:x}  owner {}",
                    c.reservation,
                    c.lease,
                    c.owner_host
                        .as_deref()
                        .unwrap_or("? (no host record on that lease)")
                ),
                None => "none".to_string(),
            },
        );
        field(
            "finished",
            match &self.finished {
                Some(Finished {
                    failed: Some(error),
                    ..
                }) => format!("failed: {error}"),
                Some(_) => "yes".to_string(),
                None => "no".to_string(),
            },
        );
        field(
            "dead",
            match &self.dead {
                Some(d) => format!(
                    "{}  after {} attempts, {} ago\n          error: {}{}",
                    d.key,
                    d.attempts.map_or("?".to_string(), |a| a.to_string()),
                    format_age(d.age_seconds, None),
                    d.error,
                    d.problem
                        .as_ref()
                        .map_or(String::new(), |p| format!("\n          unreadable: {p}")),
                ),
                None => "no".to_string(),
            },
        );
        let job = self
            .record
            .as_ref()
            .map(|r| &r.value)
            .or(self.dead.as_ref().map(|d| &d.job));
        if let Some(job) = job {
            out.push_str("job record\n");
            out.push_str(&indent(&pretty(job), 2));
        }
        out
    }
}

impl ResourceView {
    /// The human-readable `resource show`.
    pub fn render(&self) -> String {
        let mut out = format!("{} {}\n", self.resource_type, self.resource_id);
        match &self.config {
            Some(c) => {
                let mut about = match c.version {
                    Some(v) => format!("version {v}"),
                    None => "unreadable".to_string(),
                };
                if c.marked_for_deletion == Some(true) {
                    about.push_str(", marked for deletion");
                }
                out.push_str(&format!("\nconfig  {}  ({about})\n", c.key));
                if let Some(problem) = &c.problem {
                    out.push_str(&format!("  problem: {problem}\n"));
                }
                out.push_str(&indent(&pretty(&c.body), 2));
            }
            None => out.push_str("\nconfig  none\n"),
        }
        for (name, stored) in [
            ("state", &self.state),
            ("job state", &self.job_state),
            ("monitoring", &self.monitoring),
            ("monitoring targets", &self.monitoring_targets),
        ] {
            match stored {
                Some(s) => {
                    out.push_str(&format!("\n{name}  {}{}\n", s.key, state_summary(name, s)));
                    out.push_str(&indent(&pretty(&s.value), 2));
                }
                None => out.push_str(&format!("\n{name}  none\n")),
            }
        }
        out.push_str(&format!("\njobs ({})\n", self.jobs.len()));
        if !self.jobs.is_empty() {
            out.push_str(&render_job_table(&self.jobs, true));
        }
        out
    }
}

/// `  (CREATE_COMPLETED, version 1)` for a `/state`, empty for other records.
fn state_summary(name: &str, stored: &Stored) -> String {
    if name != "state" {
        return String::new();
    }
    let worker_state = stored.value["state"]["worker_state"]
        .as_str()
        .unwrap_or("?");
    let version = stored.value["version"]
        .as_u64()
        .map_or("?".to_string(), |v| v.to_string());
    match stored.value["error"].as_str() {
        Some(error) if !error.is_empty() => {
            format!("  ({worker_state}, version {version}, error: {error})")
        }
        _ => format!("  ({worker_state}, version {version})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "create:monitoring_worker:ha_interface:r1:1:abcde";

    fn kv(key: &str, value: &str, create_revision: i64, lease: i64) -> Kv {
        Kv {
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
            create_revision,
            mod_revision: create_revision,
            lease,
        }
    }

    fn record(id: &str, attempts: u32) -> String {
        let job_id: JobId = id.parse().unwrap();
        serde_json::json!([job_id.handler, {
            "id": id, "job_name": job_id.job_name(), "handler": job_id.handler,
            "action": job_id.action, "resource_type": job_id.resource_type,
            "resource_id": job_id.resource_id, "version": job_id.version,
            "is_first": true, "is_last": true}, attempts])
        .to_string()
    }

    #[test]
    fn a_working_job_is_owned_by_the_host_registered_on_its_claims_lease() {
        let keys = Keys::new("/t");
        let snapshot = JobsSnapshot {
            jobs: vec![
                kv(&keys.job(Queue::All, ID), &record(ID, 2), 10, 0),
                kv(&keys.job(Queue::Working, ID), "reservation-1", 12, 77),
            ],
            revision: 20,
            hosts: vec![
                kv(&keys.host("other"), r#"{"host_id": "other"}"#, 3, 5),
                kv(&keys.host("h1"), r#"{"host_id": "h1"}"#, 4, 77),
            ],
            ..JobsSnapshot::default()
        };
        let rows = job_rows(&keys, &snapshot);
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.queue, JobQueue::Working);
        assert_eq!(row.owner_host.as_deref(), Some("h1"));
        assert_eq!(row.attempts, Some(2));
        assert_eq!(row.age_revisions, Some(10));
        assert_eq!(
            (row.resource_type.as_str(), row.resource_id.as_str()),
            ("ha_interface", "r1")
        );
    }

    #[test]
    fn a_claim_on_a_lease_no_host_registered_has_an_unknown_owner() {
        let keys = Keys::new("");
        let snapshot = JobsSnapshot {
            jobs: vec![
                kv(&keys.job(Queue::All, ID), &record(ID, 0), 1, 0),
                kv(&keys.job(Queue::Working, ID), "r", 2, 9),
            ],
            revision: 2,
            ..JobsSnapshot::default()
        };
        let rows = job_rows(&keys, &snapshot);
        assert_eq!(rows[0].owner_host, None);
        assert!(render_job_table(&rows, false)
            .lines()
            .nth(1)
            .unwrap()
            .ends_with('?'));
    }

    #[test]
    fn dead_jobs_follow_live_jobs_with_their_age_in_seconds_and_error() {
        let keys = Keys::new("");
        let dead_id = "create:monitoring_worker:ha_interface:r2:1:zzzzz";
        let dead = serde_json::json!({
            "job": serde_json::from_str::<Value>(&record(dead_id, 4)).unwrap(),
            "error": "boom", "attempts": 4, "failed_at_unix": 1_000});
        let snapshot = JobsSnapshot {
            jobs: vec![
                kv(&keys.job(Queue::Ready, ID), "monitoring_worker", 6, 0),
                kv(&keys.job(Queue::All, ID), &record(ID, 0), 5, 0),
            ],
            revision: 9,
            dead: vec![kv(&keys.dead_job(dead_id), &dead.to_string(), 3, 0)],
            dead_revision: 9,
            now_unix: 1_300,
            ..JobsSnapshot::default()
        };
        let rows = job_rows(&keys, &snapshot);
        assert_eq!(
            rows.iter().map(|r| r.queue).collect::<Vec<_>>(),
            [JobQueue::Ready, JobQueue::Dead]
        );
        let d = &rows[1];
        assert_eq!(d.id, dead_id);
        assert_eq!(d.age_seconds, Some(300));
        assert_eq!(d.attempts, Some(4));
        assert_eq!(d.error.as_deref(), Some("boom"));
        assert_eq!(format_age(d.age_seconds, d.age_revisions), "5m");
        assert_eq!(
            format_age(rows[0].age_seconds, rows[0].age_revisions),
            "4rev"
        );
    }

    #[test]
    fn a_queue_key_without_a_record_is_listed_from_its_id_and_names_the_missing_key() {
        let keys = Keys::new("");
        let snapshot = JobsSnapshot {
            jobs: vec![kv(&keys.job(Queue::Waiting, ID), "monitoring_worker", 2, 0)],
            revision: 3,
            ..JobsSnapshot::default()
        };
        let rows = job_rows(&keys, &snapshot);
        assert_eq!(rows[0].queue, JobQueue::Waiting);
        assert_eq!(rows[0].handler, "monitoring_worker");
        assert_eq!(rows[0].resource_id, "r1");
        assert_eq!(rows[0].attempts, None);
        assert!(
            rows[0]
                .record_problem
                .as_deref()
                .unwrap()
                .contains("/jobs/all/"),
            "{rows:?}"
        );
    }

    #[test]
    fn a_record_in_no_queue_is_unqueued_and_an_unreadable_one_says_why() {
        let keys = Keys::new("");
        let snapshot = JobsSnapshot {
            jobs: vec![kv(&keys.job(Queue::All, ID), "[1]", 1, 0)],
            revision: 1,
            ..JobsSnapshot::default()
        };
        let rows = job_rows(&keys, &snapshot);
        assert_eq!(rows[0].queue, JobQueue::Unqueued);
        assert!(rows[0]
            .record_problem
            .as_deref()
            .unwrap()
            .contains("/jobs/all/"));
        // The id still tells the handler and resource.
        assert_eq!(rows[0].handler, "monitoring_worker");
    }

    #[test]
    fn table_aligns_columns_and_leaves_the_last_one_unpadded() {
        let text = table(
            &["ID", "NAME"],
            &[
                vec!["a".into(), "x".into()],
                vec!["long-id".into(), "yy".into()],
            ],
        );
        assert_eq!(text, "ID       NAME\na        x\nlong-id  yy\n");
    }

    #[test]
    fn job_table_has_a_queue_column_only_when_asked() {
        let row = JobRow::from_id(ID, JobQueue::Ready);
        let with = render_job_table(std::slice::from_ref(&row), true);
        let without = render_job_table(std::slice::from_ref(&row), false);
        assert!(with.starts_with("ID "), "{with}");
        assert!(with.lines().next().unwrap().contains("QUEUE"));
        assert!(!without.contains("QUEUE"));
        assert!(with.contains("ha_interface/r1"));
        assert_eq!(render_job_table(&[], true), "no jobs\n");
    }

    #[test]
    fn ages_use_the_largest_whole_unit() {
        assert_eq!(format_age(Some(59), None), "59s");
        assert_eq!(format_age(Some(7_199), None), "119m");
        assert_eq!(format_age(Some(7_200), None), "2h");
        assert_eq!(format_age(Some(3 * 86_400), Some(5)), "3d");
        assert_eq!(format_age(None, None), "?");
    }

    #[test]
    fn a_finished_value_tells_a_failure_from_a_success() {
        let ok = finished_of(kv("/jobs/finished/x", "", 1, 0));
        assert_eq!(ok.failed, None);
        let failed = finished_of(kv("/jobs/finished/x", r#"{"failed": "no pool"}"#, 1, 0));
        assert_eq!(failed.failed.as_deref(), Some("no pool"));
    }

    #[test]
    fn unknown_resource_types_are_refused_with_close_names() {
        let schemas = SchemaRegistry::built_in();
        assert_eq!(
            resource_type(&schemas, "ha_interfaces").unwrap().id,
            "ha_interface"
        );
        assert_eq!(
            resource_type(&schemas, "ha_interface").unwrap().id,
            "ha_interface"
        );
        let err = resource_type(&schemas, "interface")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ha_interface"), "{err}");
    }

    #[test]
    fn state_summary_shows_worker_state_version_and_error() {
        let stored = Stored {
            key: "/state/v2.0/ha_interfaces/x".into(),
            mod_revision: 1,
            value: serde_json::json!({"state": {"worker_state": "CREATE_FAILED"}, "version": 2,
                                      "error": "bad"}),
        };
        assert_eq!(
            state_summary("state", &stored),
            "  (CREATE_FAILED, version 2, error: bad)"
        );
        assert_eq!(state_summary("monitoring", &stored), "");
    }
}
