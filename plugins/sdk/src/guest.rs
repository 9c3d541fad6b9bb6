//! The WebAssembly side of every plugin: WIT types in, core types through, WIT types out.
//!
//! The bindings of the `esi:worker` interfaces are generated here once; a plugin's own
//! [`export_plugin!`](crate::export_plugin) generates only the `handler` world's exports and
//! maps the interfaces to these modules (wit-bindgen's `with`), so there is one set of WIT types
//! and one copy of the conversions below.
//!
//! The WIT contract passes every free-form value (param values, `resource-input`, `job-state`,
//! `config`) as JSON text, so this is also where that text is parsed; text that does not parse
//! can never succeed on a retry, so it is a permanent error naming the field.

use std::fmt::{self, Display};

use serde_json::Value;

use crate as core;

/// The generated bindings. The suffix keeps this crate's component-type custom section apart
/// from the plugin's: the linker concatenates sections of the same name.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "handler",
        type_section_suffix: "esi_plugin_sdk",
    });
}

pub use bindings::esi::worker::host;
pub use bindings::esi::worker::types as wit;

/// A plugin core's entry point: the signature of every `core::handle`.
pub type Handler = fn(
    &core::Job,
    &core::RunContext,
    &mut dyn core::RecordReader,
    &mut dyn core::Logger,
) -> Result<core::Outcome, core::JobError>;

/// The `describe` export: a plugin serving one handler named like itself.
pub fn describe(name: &str, version: &str) -> wit::PluginInfo {
    wit::PluginInfo {
        name: name.to_owned(),
        version: version.to_owned(),
        handlers: vec![name.to_owned()],
    }
}

/// The `handle` export: converts the job and context, runs `handler` against the host imports,
/// converts the result back.
pub fn handle(
    job: wit::Job,
    context: wit::RunContext,
    handler: Handler,
) -> Result<wit::Outcome, wit::JobError> {
    let job = job_from_wit(job).map_err(error_to_wit)?;
    let context = context_from_wit(context).map_err(error_to_wit)?;
    handler(&job, &context, &mut HostRecords, &mut HostLog)
        .map(outcome_to_wit)
        .map_err(error_to_wit)
}

/// Reads records through the `host` import.
struct HostRecords;

impl core::RecordReader for HostRecords {
    fn read(
        &mut self,
        kind: core::RecordKind,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Option<core::Versioned>, core::HostError> {
        let record = wit::RecordRef {
            kind: kind_to_wit(kind),
            resource_type: resource_type.to_owned(),
            resource_id: resource_id.to_owned(),
        };
        answer_from_wit(host::read(&record))
    }

    fn read_many(
        &mut self,
        targets: &[core::RecordRef],
    ) -> Vec<Result<Option<core::Versioned>, core::HostError>> {
        let records: Vec<wit::RecordRef> = targets
            .iter()
            .map(|t| wit::RecordRef {
                kind: kind_to_wit(t.kind),
                resource_type: t.resource_type.clone(),
                resource_id: t.resource_id.clone(),
            })
            .collect();
        host::read_many(&records)
            .into_iter()
            .map(answer_from_wit)
            .collect()
    }
}

/// One answer of `read` or `read-many`.
fn answer_from_wit(
    answer: Result<Option<wit::Versioned>, wit::HostError>,
) -> Result<Option<core::Versioned>, core::HostError> {
    match answer {
        Ok(found) => Ok(found.map(|versioned| core::Versioned {
            value: versioned.value,
            mod_revision: versioned.mod_revision,
        })),
        Err(wit::HostError::UnknownType(message)) => Err(core::HostError::UnknownType(message)),
        Err(wit::HostError::Denied(message)) => Err(core::HostError::Denied(message)),
        Err(wit::HostError::Unavailable(message)) => Err(core::HostError::Unavailable(message)),
    }
}

/// Logs through the `host` import, under the job's span.
struct HostLog;

impl core::Logger for HostLog {
    fn log(&mut self, level: core::LogLevel, message: &str) {
        let level = match level {
            core::LogLevel::Trace => wit::LogLevel::Trace,
            core::LogLevel::Debug => wit::LogLevel::Debug,
            core::LogLevel::Info => wit::LogLevel::Info,
            core::LogLevel::Warn => wit::LogLevel::Warn,
            core::LogLevel::Error => wit::LogLevel::Error,
        };
        host::log(level, message);
    }
}

/// Parses a JSON-text field of the WIT job or context; `field` names it in the error.
fn parse_json(field: impl Display, text: &str) -> Result<Value, core::JobError> {
    serde_json::from_str(text)
        .map_err(|error| core::JobError::Permanent(format!("{field} is not valid JSON: {error}")))
}

/// The name of a param's value in errors, formatted only when one is made.
struct ParamValueField<'a> {
    index: usize,
    param: &'a str,
}

impl Display for ParamValueField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job.params[{}] ({}).value", self.index, self.param)
    }
}

fn job_from_wit(job: wit::Job) -> Result<core::Job, core::JobError> {
    let params = job
        .params
        .into_iter()
        .enumerate()
        .map(|(index, param)| param_from_wit(index, param))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(core::Job {
        resource_input: parse_json("job.resource-input", &job.resource_input)?,
        job_state: parse_json("job.job-state", &job.job_state)?,
        id: job.id,
        job_name: job.job_name,
        handler: job.handler,
        action: job.action,
        resource_type: job.resource_type,
        resource_id: job.resource_id,
        version: job.version,
        is_first: job.is_first,
        is_last: job.is_last,
        params,
    })
}

fn param_from_wit(index: usize, param: wit::Param) -> Result<core::Param, core::JobError> {
    let field = ParamValueField {
        index,
        param: &param.param,
    };
    Ok(core::Param {
        value: parse_json(field, &param.value)?,
        param: param.param,
        kind: param.kind,
        resources: param
            .resources
            .into_iter()
            .map(|resource| core::ResourceRef {
                resource_type: resource.resource_type,
                resource_id: resource.resource_id,
            })
            .collect(),
    })
}

fn context_from_wit(context: wit::RunContext) -> Result<core::RunContext, core::JobError> {
    Ok(core::RunContext {
        attempts: context.attempts,
        reruns: context.reruns,
        elapsed_ms: context.elapsed_ms,
        config: parse_json("run-context.config", &context.config)?,
    })
}

fn kind_to_wit(kind: core::RecordKind) -> wit::RecordKind {
    match kind {
        core::RecordKind::Config => wit::RecordKind::Config,
        core::RecordKind::State => wit::RecordKind::State,
        core::RecordKind::Monitoring => wit::RecordKind::Monitoring,
        core::RecordKind::MonitoringTarget => wit::RecordKind::MonitoringTarget,
        core::RecordKind::ResourceMapping => wit::RecordKind::ResourceMapping,
        core::RecordKind::VlanPool => wit::RecordKind::VlanPool,
    }
}

fn outcome_to_wit(outcome: core::Outcome) -> wit::Outcome {
    match outcome {
        core::Outcome::Completed { output, writes } => wit::Outcome::Completed(wit::Completion {
            output: output.to_string(),
            writes: writes.into_iter().map(write_to_wit).collect(),
        }),
        core::Outcome::Wait { millis } => wit::Outcome::Wait(millis),
    }
}

fn write_to_wit(write: core::ProposedWrite) -> wit::ProposedWrite {
    wit::ProposedWrite {
        target: wit::RecordRef {
            kind: kind_to_wit(write.target.kind),
            resource_type: write.target.resource_type,
            resource_id: write.target.resource_id,
        },
        op: match write.op {
            core::WriteOp::Put(value) => wit::WriteOp::Put(value),
            core::WriteOp::Delete => wit::WriteOp::Delete,
        },
        expect_mod_revision: write.expect_mod_revision,
    }
}

fn error_to_wit(error: core::JobError) -> wit::JobError {
    match error {
        core::JobError::Retryable(message) => wit::JobError::Retryable(message),
        core::JobError::Permanent(message) => wit::JobError::Permanent(message),
    }
}
