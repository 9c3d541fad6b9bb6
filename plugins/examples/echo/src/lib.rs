//! `example_echo_worker`: a third-party handler, written the way an outside author would.
//!
//! It shows the whole path a new handler takes through esi-host, with nothing built in:
//!
//! 1. **Code**: a crate with a pure core ([`handle`], plain Rust, unit-tested natively) and a
//!    `wasm32`-only shell made by [`esi_plugin_sdk::export_plugin!`], pointed at a copy of
//!    `wit/worker.wit` (here the repository's, `../../../wit`).
//! 2. **Build**: `cargo build --target wasm32-unknown-unknown --release -p example_echo_worker`,
//!    then make it a component with `wasm-tools component new` (or `cargo xtask build-plugins
//!    example_echo_worker`, which also checks it imports nothing but `esi:worker`).
//! 3. **Manifest**: `example_echo_worker.toml` beside the `.wasm`: the handler it serves, what it
//!    may read and write (nothing, here), its limits and its config.
//! 4. **Template**: a heat template whose id is `<resource type>_<handler>`, e.g.
//!    `ha_router_example_echo_worker` (see `templates/`): the job manager plans a job for this
//!    handler, after the built-in ones, for every resource of that type once a plugin serving
//!    it is loaded.
//!
//! The job echoes its resolved template parameters and the plugin's config into the workflow's
//! job state (and so into the resource's `/state`), under `echo`.

use serde_json::{json, Map, Value};

pub use esi_plugin_sdk::{Job, JobError, LogLevel, Logger, Outcome, RecordReader, RunContext};

/// The handler (and plugin) name.
pub const HANDLER: &str = "example_echo_worker";

/// Echoes `job.params` (name -> value) and `context.config`.
///
/// # Errors
///
/// A parameter of kind `output_key` whose job-state field is missing is a permanent error
/// naming the parameter.
pub fn handle(
    job: &Job,
    context: &RunContext,
    _reader: &mut dyn RecordReader,
    logger: &mut dyn Logger,
) -> Result<Outcome, JobError> {
    let mut params = Map::new();
    for p in &job.params {
        let value = if p.kind == "output_key" {
            let field = p.value.as_str().unwrap_or_default();
            job.job_state.get(field).cloned().ok_or_else(|| {
                JobError::Permanent(format!(
                    "parameter {:?}: job state has no field {field:?}",
                    p.param
                ))
            })?
        } else {
            p.value.clone()
        };
        params.insert(p.param.clone(), value);
    }
    logger.log(
        LogLevel::Info,
        &format!(
            "echoing {} parameters of {} {}",
            params.len(),
            job.resource_type,
            job.resource_id
        ),
    );
    Ok(Outcome::Completed {
        output: json!({ "echo": { "params": Value::Object(params), "config": context.config } }),
        writes: Vec::new(),
    })
}

#[cfg(target_arch = "wasm32")]
mod component {
    esi_plugin_sdk::export_plugin!(
        EchoWorker,
        crate::HANDLER,
        crate::handle,
        wit = "../../../wit"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use esi_plugin_sdk::{HostError, Param, RecordKind, Versioned};

    struct NoRecords;

    impl RecordReader for NoRecords {
        fn read(
            &mut self,
            _: RecordKind,
            _: &str,
            _: &str,
        ) -> Result<Option<Versioned>, HostError> {
            Ok(None)
        }
    }

    fn param(name: &str, kind: &str, value: Value) -> Param {
        Param {
            param: name.into(),
            kind: kind.into(),
            value,
            resources: Vec::new(),
        }
    }

    #[test]
    fn params_and_config_are_echoed() {
        let job = Job {
            params: vec![
                param("router_name", "value", json!("r1")),
                param("vlan", "output_key", json!("allocated_vlan")),
            ],
            job_state: json!({"allocated_vlan": 1025}),
            ..Job::default()
        };
        let context = RunContext {
            config: json!({"greeting": "hello"}),
            ..RunContext::default()
        };
        let mut log: Vec<(LogLevel, String)> = Vec::new();
        let Ok(Outcome::Completed { output, writes }) =
            handle(&job, &context, &mut NoRecords, &mut log)
        else {
            panic!("echo completes");
        };
        assert!(writes.is_empty());
        assert_eq!(
            output,
            json!({"echo": {"params": {"router_name": "r1", "vlan": 1025}, "config": {"greeting": "hello"}}})
        );
    }

    #[test]
    fn a_missing_output_key_is_a_permanent_error_naming_the_parameter() {
        let job = Job {
            params: vec![param("vlan", "output_key", json!("allocated_vlan"))],
            job_state: json!({}),
            ..Job::default()
        };
        let mut log: Vec<(LogLevel, String)> = Vec::new();
        match handle(&job, &RunContext::default(), &mut NoRecords, &mut log) {
            Err(JobError::Permanent(m)) => assert!(m.contains("\"vlan\""), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
