//! Plain-Rust mirrors of the `esi:worker` WIT types, and the two host capabilities a plugin core
//! uses ([`RecordReader`], [`Logger`]) as traits.
//!
//! Free-form WIT fields that travel as JSON text (param values, `resource-input`, `job-state`,
//! `config`, a completion's `output`) are parsed [`Value`]s here, so a core never handles JSON
//! text it did not read from a record itself.

use std::fmt;

use serde_json::Value;

/// One resolved template parameter of a job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Param {
    /// Name of the parameter, as used in `template_file`.
    pub param: String,
    /// `value` (use [`Param::value`] as is) or `output_key` (`value` names a job_state field).
    pub kind: String,
    pub value: Value,
    /// The related resources the value depended on.
    pub resources: Vec<ResourceRef>,
}

/// A resource named by its singular schema id and its id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceRef {
    pub resource_type: String,
    pub resource_id: String,
}

/// The parts of a job record plugins look at.
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
    /// Milliseconds since this attempt first ran: the only clock a plugin has.
    pub elapsed_ms: u64,
    /// Free-form plugin configuration.
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
    /// When set, the write (and with it the completion) only happens if the record's mod
    /// revision still equals this; 0 means the record must not exist. A failed compare re-runs
    /// the job. `None` for records that belong to the job's resource alone.
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

    /// Reads several records, one answer per target in order, each what [`read`] would
    /// answer. The host's reader asks for them in one round trip (`read-many`); this default,
    /// for in-memory readers, reads them one by one.
    ///
    /// [`read`]: RecordReader::read
    fn read_many(&mut self, targets: &[RecordRef]) -> Vec<Result<Option<Versioned>, HostError>> {
        targets
            .iter()
            .map(|t| self.read(t.kind, &t.resource_type, &t.resource_id))
            .collect()
    }
}

/// Receives the notable events of a run.
pub trait Logger {
    fn log(&mut self, level: LogLevel, message: &str);
}

/// Collects log lines, for tests and benchmarks.
impl Logger for Vec<(LogLevel, String)> {
    fn log(&mut self, level: LogLevel, message: &str) {
        self.push((level, message.to_owned()));
    }
}

/// Turns a failed host read into a job error that says what was being read: an unreachable
/// etcd may come back, so only that is retryable.
pub fn host_error(error: HostError, what: &str) -> JobError {
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
pub fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}
