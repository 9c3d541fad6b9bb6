//! The script and its interpretation, free of any WebAssembly types.
//!
//! # Examples
//!
//! ```
//! use scripted_worker::core::{handle, Job, JobError, RecordKind, RecordReader, RunContext};
//! use scripted_worker::core::{HostError, LogLevel, Outcome, Versioned};
//!
//! struct Nothing;
//! impl RecordReader for Nothing {
//!     fn read(&mut self, _: RecordKind, _: &str, _: &str) -> Result<Option<Versioned>, HostError> {
//!         Ok(None)
//!     }
//! }
//!
//! let job = Job {
//!     resource_input: serde_json::json!({"script": {"fail_retryable_until_attempt": 1}}),
//!     ..Job::default()
//! };
//! let mut log: Vec<(LogLevel, String)> = Vec::new();
//! let first = RunContext { attempts: 0, ..RunContext::default() };
//! assert_eq!(
//!     handle(&job, &first, &mut Nothing, &mut log),
//!     Err(JobError::Retryable("scripted retryable failure at attempt 0".into()))
//! );
//! let second = RunContext { attempts: 1, ..RunContext::default() };
//! let Ok(Outcome::Completed { output, .. }) = handle(&job, &second, &mut Nothing, &mut log) else {
//!     panic!("the second attempt completes");
//! };
//! assert_eq!(output, serde_json::json!({"scripted": {"attempts": 1}}));
//! ```

use serde_json::{json, Value};

pub use esi_plugin_sdk::{
    HostError, Job, JobError, LogLevel, Logger, Outcome, ProposedWrite, RecordKind, RecordReader,
    RecordRef, RunContext, Versioned, WriteOp,
};

/// The handler name (and plugin name) of this guest.
pub const HANDLER: &str = "scripted_worker";

/// The field of `resource_input` that holds the script.
pub const SCRIPT_FIELD: &str = "script";

/// What a run does, read from `resource_input.script`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// No script: complete with `{"scripted": {"attempts": K}}`.
    Complete,
    /// `{"fail_retryable_until_attempt": N}`: fail retryably while `attempts < N`, then complete.
    FailRetryableUntilAttempt(u32),
    /// `{"always": "retryable"}` or `{"always": "permanent"}`.
    Always(FailureKind),
    /// `{"trap": true}`: panic, which traps the instance.
    Trap,
    /// `{"spin": true}`: never return, so only the host's call deadline ends the run.
    Spin,
    /// `{"spin_until_attempt": N}`: never return while `attempts < N`, then complete; only
    /// something that stops the call (its deadline, or the host losing its lease) moves the
    /// job on.
    SpinUntilAttempt(u32),
    /// `{"allocate_mib": N}`: allocate and touch N MiB, then complete (a memory bomb when N is
    /// over the plugin's limit).
    AllocateMib(u32),
    /// `{"grow_kib": N}`: grow a buffer a byte at a time to N KiB with nothing allocated
    /// after it, then a second one while keeping a small block alive for every KiB on the
    /// way, check every byte of both and of the blocks, and complete with
    /// `{"grow_kib": {"bytes": N * 1024, "sum": <sum of one buffer's bytes>}}`. Past the SDK's
    /// job arena (`esi_plugin_sdk::ARENA_BYTES`) the first buffer leaves the arena as its last
    /// block (whose space the second then reuses), and the second leaves it while the blocks
    /// allocated after it stay: the allocator's hardest paths.
    GrowKib(u32),
    /// `{"small_blocks_kib": N}`: allocate N KiB in 64-byte blocks kept alive, and complete
    /// with `{"small_blocks_kib": {"pages_grown": <linear memory pages added meanwhile>}}`.
    /// With the SDK's job arena, a job that fits in it never grows the memory.
    SmallBlocksKib(u32),
    /// `{"recurse": N}`: recurse N calls deep, then complete (a stack overflow when N is big).
    Recurse(u32),
    /// `{"read": "<kind> <resource_type> <resource_id>"}`: read that record; a refused read
    /// fails the job permanently with the host's message, a granted one completes with it.
    Read(RecordRef),
    /// `{"read_many": ["<kind> <resource_type> <resource_id>", ...]}`: read them with one
    /// `read-many` call and complete with one answer each: the value, `null` when absent, or
    /// `{"refused": "<the host's error>"}`.
    ReadMany(Vec<RecordRef>),
    /// `{"write": "<kind> <resource_type> <resource_id>"}`: complete, proposing to put `{}`
    /// there; `{"write": ["<kind> <type> <id>", ...]}` proposes a put to each, in order (the
    /// same record twice if listed twice).
    Write(Vec<RecordRef>),
    /// `{"write_stale": "<kind> <resource_type> <resource_id>"}`: complete, proposing to put
    /// `{}` there only if the record's mod-revision is one etcd never reaches, so the write
    /// conflicts every time.
    WriteStale(RecordRef),
    /// `{"output_kib": N}`: complete with N KiB of output.
    OutputKib(u32),
    /// `{"wait_once_ms": N}`: ask to run again in N ms, then complete; the job holds its claim
    /// (and its plugin version) across the wait.
    WaitOnceMs(u32),
}

/// The two kinds of [`JobError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Retryable,
    Permanent,
}

impl FailureKind {
    fn name(self) -> &'static str {
        match self {
            FailureKind::Retryable => "retryable",
            FailureKind::Permanent => "permanent",
        }
    }

    fn error(self, message: String) -> JobError {
        match self {
            FailureKind::Retryable => JobError::Retryable(message),
            FailureKind::Permanent => JobError::Permanent(message),
        }
    }
}

impl Script {
    /// Reads the script of a job. A script this guest does not understand is a permanent
    /// error naming the field, so a typo in a test shows up as such instead of as a success.
    pub fn of(resource_input: &Value) -> Result<Script, JobError> {
        let script = match resource_input.get(SCRIPT_FIELD) {
            None | Some(Value::Null) => return Ok(Script::Complete),
            Some(script) => script,
        };
        let bad = |why: &str| {
            JobError::Permanent(format!(
                "resource_input.{SCRIPT_FIELD} {script}: {why}; expected one of \
                 {{\"fail_retryable_until_attempt\": N}}, {{\"always\": \"retryable\"|\"permanent\"}}, \
                 {{\"trap\": true}}, {{\"spin\": true}}, {{\"spin_until_attempt\": N}}, \
                 {{\"wait_once_ms\": N}}, {{\"allocate_mib\": N}}, {{\"grow_kib\": N}}, \
                 {{\"small_blocks_kib\": N}}, \
                 {{\"recurse\": N}}, {{\"output_kib\": N}}, \
                 {{\"read\": \"<kind> <type> <id>\"}}, {{\"read_many\": [\"<kind> <type> <id>\", ...]}}, \
                 {{\"write\": \"<kind> <type> <id>\" | [\"<kind> <type> <id>\", ...]}}, \
                 {{\"write_stale\": \"<kind> <type> <id>\"}}"
            ))
        };
        let Some(object) = script.as_object() else {
            return Err(bad("not an object"));
        };
        let mut entries = object.iter();
        let (Some((name, value)), None) = (entries.next(), entries.next()) else {
            return Err(bad("needs exactly one field"));
        };
        match (name.as_str(), value) {
            ("fail_retryable_until_attempt", Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Script::FailRetryableUntilAttempt)
                .ok_or_else(|| bad("the attempt is not a small non-negative integer")),
            ("always", Value::String(kind)) if kind == "retryable" => {
                Ok(Script::Always(FailureKind::Retryable))
            }
            ("always", Value::String(kind)) if kind == "permanent" => {
                Ok(Script::Always(FailureKind::Permanent))
            }
            ("trap", Value::Bool(true)) => Ok(Script::Trap),
            ("spin", Value::Bool(true)) => Ok(Script::Spin),
            ("spin_until_attempt", Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Script::SpinUntilAttempt)
                .ok_or_else(|| bad("the attempt is not a small non-negative integer")),
            ("allocate_mib", Value::Number(n)) => small(n)
                .map(Script::AllocateMib)
                .ok_or_else(|| bad("not a small non-negative integer")),
            ("grow_kib", Value::Number(n)) => small(n)
                .map(Script::GrowKib)
                .ok_or_else(|| bad("not a small non-negative integer")),
            ("small_blocks_kib", Value::Number(n)) => small(n)
                .map(Script::SmallBlocksKib)
                .ok_or_else(|| bad("not a small non-negative integer")),
            ("recurse", Value::Number(n)) => small(n)
                .map(Script::Recurse)
                .ok_or_else(|| bad("not a small non-negative integer")),
            ("wait_once_ms", Value::Number(n)) => small(n)
                .map(Script::WaitOnceMs)
                .ok_or_else(|| bad("not a small non-negative integer")),
            ("output_kib", Value::Number(n)) => small(n)
                .map(Script::OutputKib)
                .ok_or_else(|| bad("not a small non-negative integer")),
            ("read", Value::String(target)) => record_ref(target)
                .map(Script::Read)
                .ok_or_else(|| bad("expected \"<kind> <resource_type> <resource_id>\"")),
            ("read_many", Value::Array(targets)) => record_refs(targets)
                .map(Script::ReadMany)
                .ok_or_else(|| bad("expected a list of \"<kind> <resource_type> <resource_id>\"")),
            ("write", Value::String(target)) => record_ref(target)
                .map(|target| Script::Write(vec![target]))
                .ok_or_else(|| bad("expected \"<kind> <resource_type> <resource_id>\"")),
            ("write_stale", Value::String(target)) => record_ref(target)
                .map(Script::WriteStale)
                .ok_or_else(|| bad("expected \"<kind> <resource_type> <resource_id>\"")),
            ("write", Value::Array(targets)) => record_refs(targets)
                .map(Script::Write)
                .ok_or_else(|| bad("expected a list of \"<kind> <resource_type> <resource_id>\"")),
            _ => Err(bad("unknown script")),
        }
    }
}

fn small(n: &serde_json::Number) -> Option<u32> {
    n.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// A list of [`record_ref`]s; `None` if any is not one.
fn record_refs(targets: &[Value]) -> Option<Vec<RecordRef>> {
    targets
        .iter()
        .map(|t| t.as_str().and_then(record_ref))
        .collect()
}

/// `"<kind> <resource_type> <resource_id>"`, kinds named as in the WIT (`vlan-pool`, ...).
fn record_ref(text: &str) -> Option<RecordRef> {
    let mut parts = text.split_whitespace();
    let kind = match parts.next()? {
        "config" => RecordKind::Config,
        "state" => RecordKind::State,
        "monitoring" => RecordKind::Monitoring,
        "monitoring-target" => RecordKind::MonitoringTarget,
        "resource-mapping" => RecordKind::ResourceMapping,
        "vlan-pool" => RecordKind::VlanPool,
        _ => return None,
    };
    let (resource_type, resource_id) = (parts.next()?, parts.next()?);
    parts.next().is_none().then(|| RecordRef {
        kind,
        resource_type: resource_type.to_string(),
        resource_id: resource_id.to_string(),
    })
}

/// Runs one `scripted_worker` job: follows its script.
///
/// # Errors
///
/// Whatever the script asks for, and [`JobError::Permanent`] for a script it cannot read.
///
/// # Panics
///
/// With `{"trap": true}`, on purpose.
pub fn handle(
    job: &Job,
    context: &RunContext,
    reader: &mut dyn RecordReader,
    logger: &mut dyn Logger,
) -> Result<Outcome, JobError> {
    let script = Script::of(&job.resource_input)?;
    let attempt = context.attempts;
    logger.log(
        LogLevel::Info,
        &format!("following {script:?} at attempt {attempt}"),
    );
    let config = &context.config;
    match script {
        Script::Complete => Ok(completed(attempt, config)),
        Script::FailRetryableUntilAttempt(until) if attempt < until => Err(JobError::Retryable(
            format!("scripted retryable failure at attempt {attempt}"),
        )),
        Script::FailRetryableUntilAttempt(_) => Ok(completed(attempt, config)),
        Script::Always(kind) => Err(kind.error(format!("scripted {} failure", kind.name()))),
        Script::Trap => panic!("scripted trap at attempt {attempt}"),
        Script::Spin => spin(),
        Script::SpinUntilAttempt(until) if attempt < until => spin(),
        Script::SpinUntilAttempt(_) => Ok(completed(attempt, config)),
        Script::AllocateMib(mib) => {
            // black_box makes every chunk escape, so the allocations cannot be optimised away.
            let mut bomb: Vec<Vec<u8>> = Vec::new();
            for _ in 0..mib {
                bomb.push(std::hint::black_box(vec![1u8; 1 << 20]));
            }
            std::hint::black_box(&bomb);
            Ok(completed(attempt, config))
        }
        Script::GrowKib(kib) => grow(kib),
        Script::SmallBlocksKib(kib) => small_blocks(kib),
        Script::Recurse(depth) => {
            std::hint::black_box(recurse(depth));
            Ok(completed(attempt, config))
        }
        Script::Read(target) => {
            match reader.read(target.kind, &target.resource_type, &target.resource_id) {
                Ok(found) => Ok(Outcome::Completed {
                    output: json!({"scripted": {"read": found.map(|v| v.value)}}),
                    writes: Vec::new(),
                }),
                Err(e) => Err(JobError::Permanent(format!("read refused: {e:?}"))),
            }
        }
        Script::ReadMany(targets) => {
            let answers: Vec<Value> = reader
                .read_many(&targets)
                .into_iter()
                .map(|answer| match answer {
                    Ok(found) => json!(found.map(|v| v.value)),
                    Err(e) => json!({"refused": format!("{e:?}")}),
                })
                .collect();
            Ok(Outcome::Completed {
                output: json!({"scripted": {"read_many": answers}}),
                writes: Vec::new(),
            })
        }
        Script::Write(targets) => Ok(Outcome::Completed {
            output: json!({"scripted": {"attempts": attempt}}),
            writes: targets
                .into_iter()
                .map(|target| ProposedWrite {
                    target,
                    op: WriteOp::Put("{}".into()),
                    expect_mod_revision: None,
                })
                .collect(),
        }),
        Script::WriteStale(target) => Ok(Outcome::Completed {
            output: json!({"scripted": {"attempts": attempt}}),
            writes: vec![ProposedWrite {
                target,
                op: WriteOp::Put("{}".into()),
                expect_mod_revision: Some(i64::MAX),
            }],
        }),
        Script::WaitOnceMs(millis) if context.reruns == 0 => Ok(Outcome::Wait { millis }),
        Script::WaitOnceMs(_) => Ok(completed(attempt, config)),
        Script::OutputKib(kib) => Ok(Outcome::Completed {
            output: json!({"scripted": {"padding": "x".repeat(kib as usize * 1024)}}),
            writes: Vec::new(),
        }),
    }
}

/// `{"grow_kib": N}`: see [`Script::GrowKib`].
fn grow(kib: u32) -> Result<Outcome, JobError> {
    let len = kib as usize * 1024;
    let byte = |i: usize| (i % 251) as u8;
    let mut alone: Vec<u8> = Vec::new();
    for i in 0..len {
        alone.push(byte(i));
    }
    let mut shared: Vec<u8> = Vec::new();
    let mut kept: Vec<Box<usize>> = Vec::new();
    for i in 0..len {
        shared.push(byte(i));
        if i % 1024 == 0 {
            kept.push(Box::new(i));
        }
    }
    let intact = alone.iter().enumerate().all(|(i, b)| *b == byte(i))
        && shared == alone
        && kept.iter().enumerate().all(|(k, i)| **i == k * 1024);
    if !intact {
        return Err(JobError::Permanent(
            "grow_kib: a buffer or a kept block changed".into(),
        ));
    }
    let sum: u64 = alone.iter().map(|b| u64::from(*b)).sum();
    Ok(Outcome::Completed {
        output: json!({"scripted": {"grow_kib": {"bytes": len, "sum": sum}}}),
        writes: Vec::new(),
    })
}

/// `{"small_blocks_kib": N}`: see [`Script::SmallBlocksKib`].
fn small_blocks(kib: u32) -> Result<Outcome, JobError> {
    let before = memory_pages();
    let blocks: Vec<Box<[u8; 64]>> = (0..kib as usize * 16)
        .map(|i| Box::new([i as u8; 64]))
        .collect();
    std::hint::black_box(&blocks);
    let grown = memory_pages() - before;
    Ok(Outcome::Completed {
        output: json!({"scripted": {"small_blocks_kib": {"pages_grown": grown}}}),
        writes: Vec::new(),
    })
}

/// The linear memory's size in 64 KiB pages (0 natively).
fn memory_pages() -> usize {
    #[cfg(target_arch = "wasm32")]
    return core::arch::wasm32::memory_size(0);
    #[cfg(not(target_arch = "wasm32"))]
    return 0;
}

/// Recurses `depth` calls deep. The values stay in wasm locals (no frame in the shadow stack
/// in linear memory), so what overflows is the wasm call stack itself; `black_box` on each
/// call's result keeps the compiler from turning the recursion into a loop.
fn recurse(depth: u32) -> u64 {
    if depth == 0 {
        return 1;
    }
    std::hint::black_box(recurse(depth - 1)).wrapping_add(u64::from(depth))
}

/// The output of a run that completes: the attempt, and the plugin's config when it has one
/// (so a test can tell which manifest a job ran under).
fn completed(attempt: u32, config: &Value) -> Outcome {
    let mut scripted = json!({"attempts": attempt});
    if config.as_object().is_some_and(|c| !c.is_empty()) {
        scripted["config"] = config.clone();
    }
    Outcome::Completed {
        output: json!({ "scripted": scripted }),
        writes: Vec::new(),
    }
}

/// Busy-loops forever. `black_box` keeps the loop a real loop, with the back edge where
/// wasmtime checks its epoch deadline.
fn spin() -> ! {
    let mut turns: u64 = 0;
    loop {
        turns = std::hint::black_box(turns.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn run(script: Value, attempts: u32) -> Result<Outcome, JobError> {
        let job = Job {
            resource_input: json!({ "name": "x", "script": script }),
            ..Job::default()
        };
        let context = RunContext {
            attempts,
            ..RunContext::default()
        };
        let mut log: Vec<(LogLevel, String)> = Vec::new();
        handle(&job, &context, &mut NoRecords, &mut log)
    }

    #[test]
    fn no_script_completes_with_the_attempt() {
        let job = Job {
            resource_input: json!({"name": "x"}),
            ..Job::default()
        };
        let context = RunContext {
            attempts: 3,
            ..RunContext::default()
        };
        let mut log: Vec<(LogLevel, String)> = Vec::new();
        assert_eq!(
            handle(&job, &context, &mut NoRecords, &mut log),
            Ok(completed(3, &Value::Null))
        );
    }

    #[test]
    fn retryable_failures_stop_at_the_scripted_attempt() {
        let script = json!({"fail_retryable_until_attempt": 2});
        assert_eq!(
            run(script.clone(), 1),
            Err(JobError::Retryable(
                "scripted retryable failure at attempt 1".into()
            ))
        );
        assert_eq!(run(script, 2), Ok(completed(2, &Value::Null)));
    }

    #[test]
    fn always_fails_with_the_scripted_kind() {
        assert_eq!(
            run(json!({"always": "retryable"}), 7),
            Err(JobError::Retryable("scripted retryable failure".into()))
        );
        assert_eq!(
            run(json!({"always": "permanent"}), 0),
            Err(JobError::Permanent("scripted permanent failure".into()))
        );
    }

    #[test]
    #[should_panic(expected = "scripted trap")]
    fn trap_panics() {
        let _ = run(json!({"trap": true}), 0);
    }

    #[test]
    fn an_unreadable_script_is_a_permanent_error_naming_the_field() {
        for script in [
            json!("trap"),
            json!({}),
            json!({"trap": true, "spin": true}),
            json!({"always": "sometimes"}),
            json!({"fail_retryable_until_attempt": -1}),
            json!({"trap": false}),
            json!({"read": "secrets ha_interface x"}),
            json!({"write": "config ha_interface"}),
        ] {
            match run(script.clone(), 0) {
                Err(JobError::Permanent(message)) => {
                    assert!(message.contains("resource_input.script"), "{message}")
                }
                other => panic!("{script}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_read_completes_with_the_value_and_a_refused_read_fails_permanently() {
        struct Granted;
        impl RecordReader for Granted {
            fn read(
                &mut self,
                kind: RecordKind,
                _: &str,
                id: &str,
            ) -> Result<Option<Versioned>, HostError> {
                match kind {
                    RecordKind::State => Ok(Some(Versioned {
                        value: format!("state of {id}"),
                        mod_revision: 3,
                    })),
                    _ => Err(HostError::Denied("not granted".into())),
                }
            }
        }
        let run_with = |script: Value| {
            let job = Job {
                resource_input: json!({ "script": script }),
                ..Job::default()
            };
            let mut log: Vec<(LogLevel, String)> = Vec::new();
            handle(&job, &RunContext::default(), &mut Granted, &mut log)
        };
        let Ok(Outcome::Completed { output, .. }) =
            run_with(json!({"read": "state ha_interface a"}))
        else {
            panic!("a granted read completes");
        };
        assert_eq!(output, json!({"scripted": {"read": "state of a"}}));
        match run_with(json!({"read": "config ha_interface a"})) {
            Err(JobError::Permanent(m)) => assert!(m.contains("not granted"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_write_script_proposes_a_put_to_its_record() {
        let Ok(Outcome::Completed { writes, .. }) =
            run(json!({"write": "vlan-pool ha_interface p1"}), 0)
        else {
            panic!("a write script completes");
        };
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].target.kind, RecordKind::VlanPool);
        assert_eq!(writes[0].target.resource_id, "p1");
    }

    #[test]
    fn a_write_script_with_a_list_proposes_a_put_to_each_record_in_order() {
        let Ok(Outcome::Completed { writes, .. }) = run(
            json!({"write": ["monitoring-target t a", "monitoring-target t a", "vlan-pool t p"]}),
            0,
        ) else {
            panic!("a write script completes");
        };
        let ids: Vec<&str> = writes
            .iter()
            .map(|w| w.target.resource_id.as_str())
            .collect();
        assert_eq!(ids, ["a", "a", "p"]);
        assert!(run(json!({"write": ["monitoring-target t"]}), 0).is_err());
    }

    #[test]
    fn a_stale_write_script_expects_a_revision_etcd_never_reaches() {
        let Ok(Outcome::Completed { writes, .. }) =
            run(json!({"write_stale": "monitoring-target t a"}), 0)
        else {
            panic!("a stale write script completes");
        };
        assert_eq!(writes[0].expect_mod_revision, Some(i64::MAX));
    }

    #[test]
    fn the_plugin_config_shows_in_the_output_when_set() {
        let job = Job::default();
        let context = RunContext {
            config: json!({"build": 3}),
            ..RunContext::default()
        };
        let mut log: Vec<(LogLevel, String)> = Vec::new();
        let Ok(Outcome::Completed { output, .. }) =
            handle(&job, &context, &mut NoRecords, &mut log)
        else {
            panic!("no script completes");
        };
        assert_eq!(
            output,
            json!({"scripted": {"attempts": 0, "config": {"build": 3}}})
        );
    }
}
