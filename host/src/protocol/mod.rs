//! Record shapes of the ESI worker protocol (PROTOCOL section 3), as serde types.
//!
//! Parsing never panics and every error names the etcd key and the field, because an operator
//! reading a log line or a `/state` `error` must be able to find the bad record with `etcdctl`.

mod config;
mod job;
mod state;

pub use config::{ConfigEnvelope, HeatTemplate};
pub use job::{Action, Job, JobId, JobRecord, OnFailure, Param, ResourceRef};
pub use state::StateRecord;

/// A record that could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{key}: field {field:?}: {problem}")]
pub struct RecordError {
    /// The etcd key of the record.
    pub key: String,
    /// The field at fault (`""` for the record as a whole).
    pub field: String,
    /// What is wrong and, where possible, what was expected.
    pub problem: String,
}

impl RecordError {
    pub(crate) fn new(key: &str, field: &str, problem: impl Into<String>) -> Self {
        RecordError {
            key: key.to_string(),
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}
