//! The pure logic of `monitoring_worker` (PROTOCOL section 6), free of any WebAssembly types.
//!
//! A job goes in with a [`RecordReader`] and a [`Logger`]; an [`Outcome`] or a [`JobError`]
//! comes out. Nothing here talks to etcd or keeps a clock: the only inputs are the job, the
//! [`RunContext`] the host measured, and the records read through the reader. That keeps the
//! logic callable from native unit tests and benchmarks with an in-memory reader, while the
//! wasm component (`src/component.rs`) only converts WIT types to these and back.
//!
//! The steps for `create` and `modify`:
//! 1. [`template`] reads the heat template `<resource_type>_monitoring`, renders its
//!    `template_file` with the job's params (Jinja2 semantics) and parses the YAML.
//! 2. [`items`] turns each top-level key into an item: `etcd_reader` items read another
//!    resource's `/state`, device probes and `kafka_messenger` items become monitoring targets
//!    that external collectors run, and `db_mappings` becomes a resource-mapping record.
//! 3. The output is `{"state_monitoring": {<item>: <status>}}`, and the monitoring-target and
//!    resource-mapping records are put (or deleted, when the template has none) in the job's
//!    completion transaction.
//!
//! `delete` and `logical_delete` skip the template entirely and only remove the two records, so
//! a resource can be deleted even after its template is gone.
//!
//! # Examples
//!
//! ```
//! use monitoring_worker::core::{
//!     handle, HostError, Job, LogLevel, Outcome, RecordKind, RecordReader, RunContext, Versioned,
//! };
//!
//! /// A store with no records at all: enough for a delete, which reads nothing.
//! struct Empty;
//! impl RecordReader for Empty {
//!     fn read(&mut self, _: RecordKind, _: &str, _: &str) -> Result<Option<Versioned>, HostError> {
//!         Ok(None)
//!     }
//! }
//!
//! let job = Job {
//!     action: "delete".into(),
//!     resource_type: "ha_interface".into(),
//!     resource_id: "372ed357".into(),
//!     ..Job::default()
//! };
//! let mut log: Vec<(LogLevel, String)> = Vec::new();
//! let outcome = handle(&job, &RunContext::default(), &mut Empty, &mut log).unwrap();
//! let Outcome::Completed { output, writes } = outcome else { panic!("a delete never waits") };
//! assert_eq!(output, serde_json::json!({}));
//! assert_eq!(writes.len(), 2);
//! ```

mod items;
mod template;
#[cfg(test)]
mod tests;

use std::fmt;

use serde_json::{Map, Value};

/// The handler name jobs carry for this plugin.
pub const HANDLER: &str = "monitoring_worker";

/// One resolved template parameter of a job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Param {
    /// Name of the parameter, as used in `template_file`.
    pub param: String,
    /// `value` (use [`Param::value`] as is) or `output_key` (`value` names a job_state field).
    pub kind: String,
    pub value: Value,
    /// The related resources the value depended on (not used here; kept for completeness).
    pub resources: Vec<ResourceRef>,
}

/// A resource named by its singular schema id and its id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceRef {
    pub resource_type: String,
    pub resource_id: String,
}

/// The parts of a job record this plugin looks at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Job {
    pub id: String,
    pub job_name: String,
    pub handler: String,
    /// `create`, `modify`, `delete` or `logical_delete`.
    pub action: String,
    /// Singular schema id (`ha_interface`).
    pub resource_type: String,
    pub resource_id: String,
    /// The config version this job realises.
    pub version: u64,
    pub is_first: bool,
    pub is_last: bool,
    pub params: Vec<Param>,
    /// The resource's config body.
    pub resource_input: Value,
    /// The workflow's job state so far (an object).
    pub job_state: Value,
}

/// What the host knows about this run of the job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunContext {
    pub attempts: u32,
    pub reruns: u32,
    /// Milliseconds since this attempt first ran: the only clock `etcd_reader` time-outs have.
    pub elapsed_ms: u64,
    /// Free-form plugin configuration (unused so far).
    pub config: Value,
}

/// The kinds of record a plugin can name; mirrors the WIT `record-kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    Config,
    State,
    Monitoring,
    MonitoringTarget,
    ResourceMapping,
    VlanPool,
}

/// A record addressed by kind and resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef {
    pub kind: RecordKind,
    pub resource_type: String,
    pub resource_id: String,
}

/// A stored record value with the etcd revision it was last modified at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: String,
    pub mod_revision: i64,
}

/// Why the host could not answer a read; mirrors the WIT `host-error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    UnknownType(String),
    Denied(String),
    Unavailable(String),
}

/// What to do with a record in the completion transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Put this JSON text.
    Put(String),
    Delete,
}

/// A write the host applies atomically with the job's completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProposedWrite {
    pub target: RecordRef,
    pub op: WriteOp,
    /// Always `None` here: the records this plugin writes belong to its job alone.
    pub expect_mod_revision: Option<i64>,
}

/// What a successful run asks the host to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The job is done; `output` (an object) is merged into the workflow's job state.
    Completed {
        output: Value,
        writes: Vec<ProposedWrite>,
    },
    /// Run the job again after this many milliseconds.
    Wait { millis: u32 },
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// Transient (etcd unavailable): the host retries with backoff.
    Retryable(String),
    /// The input can never succeed: the workflow fails with this message.
    Permanent(String),
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Retryable(message) => write!(f, "retryable: {message}"),
            JobError::Permanent(message) => write!(f, "permanent: {message}"),
        }
    }
}

impl std::error::Error for JobError {}

/// Severity of a log line; mirrors the WIT `log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Reads records through the host.
pub trait RecordReader {
    /// Reads one record; `Ok(None)` when it does not exist.
    fn read(
        &mut self,
        kind: RecordKind,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Option<Versioned>, HostError>;
}

/// Receives the notable events of a run (waiting, time-outs, why an item is DOWN).
pub trait Logger {
    fn log(&mut self, level: LogLevel, message: &str);
}

/// Collects log lines, for tests and benchmarks.
impl Logger for Vec<(LogLevel, String)> {
    fn log(&mut self, level: LogLevel, message: &str) {
        self.push((level, message.to_owned()));
    }
}

/// Runs one `monitoring_worker` job.
///
/// # Errors
///
/// [`JobError::Retryable`] when the host could not reach etcd; [`JobError::Permanent`] for an
/// unknown action, a missing or broken template, an unknown item type, or a denied read. Every
/// message names the template, item or field involved.
pub fn handle(
    job: &Job,
    context: &RunContext,
    reader: &mut dyn RecordReader,
    logger: &mut dyn Logger,
) -> Result<Outcome, JobError> {
    match job.action.as_str() {
        "create" | "modify" => realise(job, context, reader, logger),
        "delete" | "logical_delete" => Ok(Outcome::Completed {
            output: Value::Object(Map::new()),
            writes: vec![
                delete(job, RecordKind::MonitoringTarget),
                delete(job, RecordKind::ResourceMapping),
            ],
        }),
        other => Err(JobError::Permanent(format!(
            "job {}: unknown action {other:?} (expected create, modify, delete or logical_delete)",
            job.id
        ))),
    }
}

/// Renders the template, evaluates its items and proposes the records they imply.
fn realise(
    job: &Job,
    context: &RunContext,
    reader: &mut dyn RecordReader,
    logger: &mut dyn Logger,
) -> Result<Outcome, JobError> {
    let template = template::load(job, reader)?;
    let document = template::render_document(&template, job)?;
    let plan = items::Plan::from_document(&template.id, document, job)?;
    let statuses = match plan.observe(context, reader, logger)? {
        items::Observed::Done(statuses) => statuses,
        items::Observed::Wait(millis) => return Ok(Outcome::Wait { millis }),
    };
    let mut output = Map::new();
    output.insert("state_monitoring".to_owned(), Value::Object(statuses));
    let writes = vec![
        put_or_delete(job, RecordKind::MonitoringTarget, plan.targets_record()),
        put_or_delete(job, RecordKind::ResourceMapping, plan.mappings_record(job)),
    ];
    Ok(Outcome::Completed {
        output: Value::Object(output),
        writes,
    })
}

/// The record of `kind` for the job's own resource.
fn own_record(job: &Job, kind: RecordKind) -> RecordRef {
    RecordRef {
        kind,
        resource_type: job.resource_type.clone(),
        resource_id: job.resource_id.clone(),
    }
}

fn delete(job: &Job, kind: RecordKind) -> ProposedWrite {
    ProposedWrite {
        target: own_record(job, kind),
        op: WriteOp::Delete,
        expect_mod_revision: None,
    }
}

/// Puts `value`, or deletes the record when there is nothing to record, so that a modify which
/// drops every probe also removes the stale record.
fn put_or_delete(job: &Job, kind: RecordKind, value: Option<Value>) -> ProposedWrite {
    match value {
        Some(value) => ProposedWrite {
            target: own_record(job, kind),
            op: WriteOp::Put(value.to_string()),
            expect_mod_revision: None,
        },
        None => delete(job, kind),
    }
}

/// Turns a failed host read into a job error that says what was being read.
fn host_error(error: HostError, what: &str) -> JobError {
    match error {
        HostError::Unavailable(message) => {
            JobError::Retryable(format!("reading {what}: etcd unavailable: {message}"))
        }
        HostError::Denied(message) => {
            JobError::Permanent(format!("reading {what}: access denied: {message}"))
        }
        HostError::UnknownType(message) => {
            JobError::Permanent(format!("reading {what}: unknown resource type: {message}"))
        }
    }
}

/// The text of a YAML/JSON scalar, or `None` for null, lists and objects. YAML turns
/// `etcd_id: 1234` into a number and `wanted_status: yes` into a bool; both are meant as text.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}
