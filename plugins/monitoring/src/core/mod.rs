//! The pure logic of `monitoring_worker` (PROTOCOL section 6), free of any WebAssembly types.
//!
//! A job goes in with a [`RecordReader`] and a [`Logger`]; an [`Outcome`] or a [`JobError`]
//! comes out. Nothing here talks to etcd or keeps a clock: the only inputs are the job, the
//! [`RunContext`] the host measured, and the records read through the reader. That keeps the
//! logic callable from native unit tests and benchmarks with an in-memory reader, while the
//! wasm component (`src/component.rs`, with `esi_plugin_sdk`'s glue) only converts WIT types to
//! these and back. The job and record types are `esi_plugin_sdk`'s, re-exported here.
//!
//! The steps for `create` and `modify`:
//! 1. [`Template`] (from `esi_plugin_sdk`) reads the heat template
//!    `<resource_type>_monitoring`, renders its `template_file` with the job's params (Jinja2
//!    semantics) and parses the YAML.
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
#[cfg(test)]
mod tests;

use serde_json::{Map, Value};

use esi_plugin_sdk::{host_error, scalar_text, Template};
pub use esi_plugin_sdk::{
    HostError, Job, JobError, LogLevel, Logger, Outcome, Param, ProposedWrite, RecordKind,
    RecordReader, RecordRef, ResourceRef, RunContext, Versioned, WriteOp,
};

/// The handler name jobs carry for this plugin.
pub const HANDLER: &str = "monitoring_worker";

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
    let template = Template::load(&format!("{}_monitoring", job.resource_type), reader)?;
    let document = template.render_document(job)?;
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
