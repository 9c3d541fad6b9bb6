//! The wasmtime engine and how one plugin call runs.
//!
//! One `Engine` serves every plugin. Instances come from the pooling allocator, so a fresh
//! instance per job costs microseconds; after a trap an instance is dead anyway, and a fresh
//! one per job means no job can see another's memory. Every call gets a wall-clock deadline
//! through epoch interruption (a ticker thread advances the epoch) and a memory cap through
//! `StoreLimits`.
//!
//! Code comes in two tiers. Cranelift's optimised code is what jobs normally run on, and it
//! is kept in the compile cache. A build the cache has not seen takes Cranelift about a second
//! to compile, so a hot reload first serves it compiled by Winch, wasmtime's baseline
//! compiler (about 5x faster to compile, 2-3x slower to run, same sandbox), while Cranelift
//! compiles it in the background; see [`crate::plugins::registry`].

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use prometheus_client::metrics::histogram::Histogram;
use tokio_util::sync::CancellationToken;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
    ProfilingStrategy, Store, StoreLimitsBuilder, Strategy, UpdateDeadline,
};

use super::bindings::esi::worker::types::{Job, JobError, Outcome, PluginInfo, RunContext};
use super::bindings::{Handler, HandlerPre};
use super::cache::CompileCache;
use super::compiler::{ChildCompiler, ChildError};
use super::host_api::{HostState, RecordAccess};
use super::manifest::Manifest;
use crate::metrics;
use tracing::Instrument as _;

/// How often the epoch advances; deadlines are whole ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Output plus proposed writes one call may return, unless its manifest says otherwise: well
/// under etcd's default request limit (1.5 MiB), which the completion must fit in.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Sandbox limits applied to every call.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Wall-clock limit of one `handle` or `describe` call, host reads included.
    pub call_deadline: Duration,
    /// Linear memory one instance may grow to.
    pub max_memory_bytes: usize,
    /// Instances that may exist at once (pool size).
    pub max_instances: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_deadline: Duration::from_secs(30),
            max_memory_bytes: 128 << 20,
            max_instances: 256,
        }
    }
}

/// Which compiler produced a plugin's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Winch: compiled fast, runs slower; serves a new build until the optimised one is ready.
    Baseline,
    /// Cranelift.
    Optimized,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Baseline => "baseline",
            Tier::Optimized => "optimized",
        }
    }
}

/// A compiled, validated plugin, ready to instantiate.
pub struct LoadedPlugin {
    /// The plugin's name: its file stem, as in status records and counters.
    pub name: String,
    pub info: PluginInfo,
    pub path: PathBuf,
    /// sha256 of the component file, hex.
    pub sha256: String,
    /// What the operator granted it (an empty manifest when it has none).
    pub manifest: Arc<Manifest>,
    /// The handlers routed to it: the manifest's, else the ones it describes.
    pub handlers: Vec<String>,
    /// The manifest's version, else the one it describes.
    pub version: String,
    pub loaded_at_unix: u64,
    pub tier: Tier,
    /// Bounds the instances of this plugin that run at once (`limits.max_instances`).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The manifest's `config` as JSON, handed to every call.
    config_json: String,
    limits: Limits,
    max_output_bytes: usize,
    pre: HandlerPre<HostState>,
    timings: CallTimings,
}

/// The histograms a plugin's calls are timed into, looked up on its first call and kept: later
/// calls only record into them, without building labels or searching the metric families.
/// Not at load, so that a plugin that never runs (one the registry refuses, say) exports no
/// empty series.
struct CallTimings {
    plugin: String,
    version: String,
    histograms: OnceLock<(Histogram, Histogram)>,
}

impl CallTimings {
    fn of(plugin: &str, version: &str) -> CallTimings {
        CallTimings {
            plugin: plugin.to_string(),
            version: version.to_string(),
            histograms: OnceLock::new(),
        }
    }

    /// The instantiation and call histograms.
    fn get(&self) -> &(Histogram, Histogram) {
        self.histograms.get_or_init(|| {
            let labels = metrics::labels([("plugin", &self.plugin), ("version", &self.version)]);
            let metrics = metrics::global();
            (
                metrics.plugin_instantiate.get_or_create(&labels).clone(),
                metrics.plugin_call.get_or_create(&labels).clone(),
            )
        })
    }
}

impl LoadedPlugin {
    /// The limits its calls run under: the manifest's, within the host's.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The most bytes of output and proposed writes one call may return.
    pub fn max_output_bytes(&self) -> usize {
        self.max_output_bytes
    }

    pub fn config_json(&self) -> &str {
        &self.config_json
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("info", &self.info)
            .field("path", &self.path)
            .finish()
    }
}

/// Why a call produced no answer (as opposed to the plugin returning a job error).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("plugin {plugin} exceeded its {deadline:?} deadline")]
    Deadline { plugin: String, deadline: Duration },
    #[error("plugin {plugin} trapped: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin {plugin} could not be instantiated: {message}")]
    Instantiate { plugin: String, message: String },
    #[error("plugin {plugin} was stopped: the host lost the lease its job was claimed under")]
    Interrupted { plugin: String },
    #[error(
        "plugin {plugin} hit its memory limit of {limit_mib} MiB (limits.memory_mib): {message}"
    )]
    Memory {
        plugin: String,
        limit_mib: usize,
        message: String,
    },
    #[error("plugin {plugin} overflowed its stack (too deep a recursion)")]
    StackOverflow { plugin: String },
}

impl CallError {
    /// Failures that would repeat on a retry with the same input: the guest grew past its
    /// memory limit or recursed past its stack. Traps and deadlines may be transient (a slow
    /// read, an instance pool briefly full) and are retried.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            CallError::Memory { .. } | CallError::StackOverflow { .. }
        )
    }

    /// A short name of the failure, for counters and status records.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Deadline { .. } => "deadline",
            CallError::Memory { .. } => "memory",
            CallError::StackOverflow { .. } => "stack",
            CallError::Trap { .. } => "trap",
            CallError::Instantiate { .. } => "instantiate",
            CallError::Interrupted { .. } => "interrupted",
        }
    }
}

/// Bytes of each pooled memory, table and async stack reset in place rather than decommitted.
const KEEP_RESIDENT_BYTES: usize = 2 << 20;

/// Set (to anything) to have the optimising engine write `/tmp/perf-<pid>.map`, so that
/// `perf report` names the plugins' compiled functions.
pub(crate) const PERF_MAP_ENV: &str = "ESI_PERF_MAP";

/// Decommits the pool gathers before it makes the system calls for them.
const DECOMMIT_BATCH: usize = 16;

/// Owns the engines, their linkers and the epoch ticker.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<HostState>,
    /// Winch, for a first serving of new builds; instances on demand (it serves briefly).
    baseline: Engine,
    baseline_linker: Linker<HostState>,
    limits: Limits,
    cache: Option<CompileCache>,
    /// Compiles in child processes (`None`: in this one).
    compiler: Option<ChildCompiler>,
    ticker_stop: Arc<AtomicBool>,
}

impl PluginEngine {
    /// An engine; with `cache_dir`, compiled components are kept there across restarts.
    pub fn new(limits: Limits, cache_dir: Option<&Path>) -> anyhow::Result<Self> {
        let engine = wt(Engine::new(&engine_config(Tier::Optimized, &limits)))
            .context("creating the wasmtime engine")?;
        let linker = linker_for(&engine)?;
        let baseline = wt(Engine::new(&engine_config(Tier::Baseline, &limits)))
            .context("creating the baseline (Winch) wasmtime engine")?;
        let baseline_linker = linker_for(&baseline)?;
        let cache = match cache_dir {
            Some(dir) => match CompileCache::open(dir, &engine) {
                Ok(cache) => Some(cache),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "compile cache disabled");
                    None
                }
            },
            None => None,
        };
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(vec![engine.clone(), baseline.clone()], ticker_stop.clone());
        Ok(PluginEngine {
            engine,
            linker,
            baseline,
            baseline_linker,
            limits,
            cache,
            compiler: None,
            ticker_stop,
        })
    }

    /// Compiles components in child processes (of an `esi-host` executable, normally the
    /// host's own), which leave this process none of the compiler's memory. A child that
    /// cannot be started is logged and the compile done here instead.
    pub fn with_child_compiler(mut self, compiler: ChildCompiler) -> Self {
        self.compiler = Some(compiler);
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles a component file with Cranelift (or takes it from the compile cache), links
    /// it, asks it to `describe()` itself and checks it against its manifest (`<name>.toml`
    /// beside it, if any).
    pub async fn load(&self, path: &Path) -> anyhow::Result<LoadedPlugin> {
        self.load_tier(path, Tier::Optimized).await
    }

    /// Whether the compile cache holds the optimised code of the component `sha256`.
    pub fn has_optimized(&self, sha256: &str) -> bool {
        self.cache.as_ref().is_some_and(|c| c.contains(sha256))
    }

    /// As [`PluginEngine::load`], compiled by the compiler of `tier`.
    pub async fn load_tier(&self, path: &Path, tier: Tier) -> anyhow::Result<LoadedPlugin> {
        let manifest = Manifest::load_for(path)?.unwrap_or_default();
        let bytes = tokio::fs::read(path)
            .await
            .with_context(|| format!("reading plugin {}", path.display()))?;
        self.load_bytes(path, bytes.into(), manifest, tier).await
    }

    /// As [`PluginEngine::load_tier`], from the component's bytes and manifest as read
    /// already (`path` names the plugin and its errors).
    pub async fn load_bytes(
        &self,
        path: &Path,
        bytes: Arc<[u8]>,
        manifest: Manifest,
        tier: Tier,
    ) -> anyhow::Result<LoadedPlugin> {
        let sha256 = CompileCache::digest(&bytes);
        let (engine, linker, cache) = match tier {
            Tier::Optimized => (self.engine.clone(), &self.linker, self.cache.clone()),
            Tier::Baseline => (self.baseline.clone(), &self.baseline_linker, None),
        };
        let compile = Compile {
            engine,
            tier,
            limits: self.limits.clone(),
            child: self.compiler.clone(),
        };
        let digest = sha256.clone();
        let component = tokio::task::spawn_blocking(move || match &cache {
            Some(cache) => cache.load_or_compile(&compile, &bytes, &digest),
            None => compile.component(&bytes),
        })
        .await
        .context("compiling plugin")?
        .with_context(|| format!("{} is not a valid WebAssembly component", path.display()))?;
        let pre = wt(linker.instantiate_pre(&component)).with_context(|| {
            format!(
                "{} does not fit the esi:worker host interface",
                path.display()
            )
        })?;
        let pre = wt(HandlerPre::new(pre)).with_context(|| {
            format!(
                "{} does not export the esi:worker handler world",
                path.display()
            )
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Under the manifest's memory limit, as every job will be: a plugin that cannot
        // start within it is rejected here, not failed at each job. The deadline stays the
        // host's: a manifest's may be longer (a load, and a host's start, would wait for it)
        // or shorter than a cold first call.
        let limits = self.limits_for(&manifest);
        let describe_limits = Limits {
            call_deadline: self.limits.call_deadline,
            ..limits.clone()
        };
        let never = CancellationToken::new();
        let call = CallSetup {
            plugin: &name,
            access: None,
            grants: Arc::new(Manifest::default()),
            limits: &describe_limits,
            interrupt: never.clone(),
        };
        let (mut store, instance) = self
            .instantiate(&pre, call)
            .await
            .map_err(anyhow::Error::new)
            .with_context(|| format!("{}: cannot be instantiated", path.display()))?;
        let info = instance
            .call_describe(&mut store)
            .await
            .map_err(|e| classify(&name, &describe_limits, e, &never))
            .with_context(|| format!("{}: describe() failed", path.display()))?;
        validate_info(&info)
            .with_context(|| format!("{}: describe() answered badly", path.display()))?;
        manifest
            .check_handlers(&info.handlers)
            .map_err(|e| anyhow::anyhow!("{}: {e}", Manifest::path_for(path).display()))?;
        let loaded_at_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let version = manifest
            .version
            .clone()
            .unwrap_or_else(|| info.version.clone());
        Ok(LoadedPlugin {
            handlers: manifest
                .handlers
                .clone()
                .unwrap_or_else(|| info.handlers.clone()),
            timings: CallTimings::of(&name, &version),
            version,
            loaded_at_unix,
            tier,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_instances as usize)),
            config_json: serde_json::Value::Object(manifest.config.clone()).to_string(),
            max_output_bytes: manifest
                .limits
                .max_output_bytes
                .unwrap_or(DEFAULT_MAX_OUTPUT_BYTES),
            limits,
            manifest: Arc::new(manifest),
            name,
            info,
            path: path.to_path_buf(),
            sha256,
            pre,
        })
    }

    /// A plugin's limits: its manifest's, but never beyond the host's.
    fn limits_for(&self, manifest: &Manifest) -> Limits {
        let host = &self.limits;
        let asked = &manifest.limits;
        Limits {
            call_deadline: asked
                .deadline
                .unwrap_or(host.call_deadline)
                .min(host.call_deadline.max(Duration::from_secs(600))),
            max_memory_bytes: asked
                .memory_bytes
                .unwrap_or(host.max_memory_bytes)
                .min(host.max_memory_bytes),
            max_instances: asked
                .max_instances
                .unwrap_or(host.max_instances)
                .min(host.max_instances),
        }
    }

    /// Runs one job in a fresh instance. Cancelling `interrupt` stops the call at the next
    /// epoch tick, as the deadline does.
    pub async fn handle(
        &self,
        plugin: &LoadedPlugin,
        access: RecordAccess,
        job: &Job,
        context: &RunContext,
        interrupt: &CancellationToken,
    ) -> Result<Result<Outcome, JobError>, CallError> {
        let span =
            tracing::info_span!("plugin_call", plugin = %plugin.name, version = %plugin.version);
        self.handle_in_span(plugin, access, job, context, interrupt)
            .instrument(span)
            .await
    }

    async fn handle_in_span(
        &self,
        plugin: &LoadedPlugin,
        access: RecordAccess,
        job: &Job,
        context: &RunContext,
        interrupt: &CancellationToken,
    ) -> Result<Result<Outcome, JobError>, CallError> {
        let call = CallSetup::for_job(plugin, access, interrupt);
        let started = Instant::now();
        let (mut store, instance) = self.instantiate(&plugin.pre, call).await?;
        let instantiated = Instant::now();
        let (instantiate_time, call_time) = plugin.timings.get();
        instantiate_time.observe((instantiated - started).as_secs_f64());
        let answer = instance.call_handle(&mut store, job, context).await;
        call_time.observe(instantiated.elapsed().as_secs_f64());
        answer.map_err(|e| {
            let error = classify(&plugin.name, &plugin.limits, e, interrupt);
            match error {
                CallError::Trap { message, .. } if store.data().limits.memory_refused => {
                    CallError::Memory {
                        plugin: plugin.name.clone(),
                        limit_mib: plugin.limits.max_memory_bytes >> 20,
                        message,
                    }
                }
                other => other,
            }
        })
    }

    /// For the bench only: instantiates `plugin` once and calls `handle` `calls` times on
    /// that one instance. Returns how long the instantiation and each call took. Jobs never
    /// share an instance (a job gets a fresh one, see [`PluginEngine::handle`]); this tells
    /// what the guest's code costs on a warm instance apart from what a fresh instance adds.
    /// Crate-private so that nothing outside the bench can share an instance between jobs.
    ///
    /// # Errors
    ///
    /// A failed instantiation, a trap, or a call that does not complete the job.
    pub(crate) async fn time_calls_on_one_instance(
        &self,
        plugin: &LoadedPlugin,
        access: RecordAccess,
        job: &Job,
        context: &RunContext,
        calls: usize,
    ) -> anyhow::Result<(Duration, Vec<Duration>)> {
        let interrupt = CancellationToken::new();
        let call = CallSetup::for_job(plugin, access, &interrupt);
        let started = Instant::now();
        let (mut store, instance) = self.instantiate(&plugin.pre, call).await?;
        let instantiate = started.elapsed();
        let mut took = Vec::with_capacity(calls);
        for _ in 0..calls {
            let started = Instant::now();
            let answer = instance
                .call_handle(&mut store, job, context)
                .await
                .map_err(|e| classify(&plugin.name, &plugin.limits, e, &interrupt))?;
            took.push(started.elapsed());
            if !matches!(answer, Ok(Outcome::Completed(_))) {
                anyhow::bail!("{} did not complete the job: {answer:?}", plugin.name);
            }
        }
        Ok((instantiate, took))
    }

    async fn instantiate(
        &self,
        pre: &HandlerPre<HostState>,
        call: CallSetup<'_>,
    ) -> Result<(Store<HostState>, Handler), CallError> {
        let CallSetup {
            plugin,
            access,
            grants,
            limits,
            interrupt,
        } = call;
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory_bytes)
            .instances(16)
            .build();
        let state = HostState::new(plugin, access, grants, store_limits);
        let mut store = Store::new(pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        // Every tick: stop the call if its deadline passed or it was interrupted, otherwise
        // yield to the async runtime so a long call never holds a runtime thread.
        let deadline = Instant::now() + limits.call_deadline;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if interrupt.is_cancelled() || Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        let instance = match pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            // The module's initial memory is over the limit: every instance would fail alike.
            Err(e) if store.data().limits.memory_refused => {
                return Err(CallError::Memory {
                    plugin: plugin.to_string(),
                    limit_mib: limits.max_memory_bytes >> 20,
                    message: format!("its initial memory alone does not fit ({e:#})"),
                })
            }
            Err(e) => {
                return Err(CallError::Instantiate {
                    plugin: plugin.to_string(),
                    message: format!("{e:#}"),
                })
            }
        };
        Ok((store, instance))
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn spawn_epoch_ticker(engines: Vec<Engine>, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("esi-epoch-ticker".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                for engine in &engines {
                    engine.increment_epoch();
                }
            }
        })
        .map(drop)
        .unwrap_or_else(|e| {
            tracing::error!("cannot start the epoch ticker, deadlines are off: {e}")
        });
}

/// The configuration of the engine of `tier`. A child compiler builds the same one, so that
/// the code it compiles is code this host's engine accepts.
fn engine_config(tier: Tier, limits: &Limits) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true).epoch_interruption(true);
    match tier {
        Tier::Optimized => {
            let mut pool = PoolingAllocationConfig::default();
            pool.total_component_instances(limits.max_instances)
                .total_core_instances(limits.max_instances * 2)
                .total_memories(limits.max_instances * 2)
                .total_tables(limits.max_instances * 2)
                .total_stacks(limits.max_instances)
                .max_memory_size(limits.max_memory_bytes)
                // A job gets a fresh instance, so the cost of a call is mostly setting up and
                // tearing down its memory, table and async stack. Resetting them by `memset`
                // (only the pages the last instance touched, found with PAGEMAP_SCAN where the
                // kernel has it) instead of `madvise` keeps the pages mapped: the next instance
                // takes no page faults and the host no TLB shootdowns. The bound is per slot,
                // and only slots that were used stay warm.
                .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
                .table_keep_resident(KEEP_RESIDENT_BYTES)
                .async_stack_keep_resident(KEEP_RESIDENT_BYTES)
                .pagemap_scan(Enabled::Auto)
                .decommit_batch_size(DECOMMIT_BATCH);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            if std::env::var_os(PERF_MAP_ENV).is_some() {
                config.profiler(ProfilingStrategy::PerfMap);
            }
        }
        // Instances on demand: it serves briefly.
        Tier::Baseline => {
            config.strategy(Strategy::Winch);
        }
    }
    config
}

/// The engine of `tier` under `limits`, for `esi-host compile-component` to compile with for
/// its parent ([`super::compiler`]).
pub fn compiler_engine(tier: Tier, limits: &Limits) -> anyhow::Result<Engine> {
    wt(Engine::new(&engine_config(tier, limits)))
        .with_context(|| format!("creating the {} wasmtime engine", tier.as_str()))
}

/// How a component's code is compiled: by whom, for which engine.
pub(crate) struct Compile {
    pub engine: Engine,
    tier: Tier,
    limits: Limits,
    child: Option<ChildCompiler>,
}

impl Compile {
    /// Whether compiles go to a child process.
    pub fn has_child(&self) -> bool {
        self.child.is_some()
    }

    /// The compiled component, by a child process into a file in a private temporary
    /// directory and mapped from there, or else here.
    fn component(&self, bytes: &[u8]) -> anyhow::Result<Component> {
        if self.child.is_some() {
            let dir = tempfile::Builder::new()
                .prefix("esi-host-compile-")
                .permissions(std::fs::Permissions::from_mode(0o700))
                .tempdir();
            match dir {
                Ok(dir) => {
                    let output = dir.path().join("component.cwasm");
                    if let Some(component) = self.in_child(bytes, &output)? {
                        // The mapping outlives the file, which goes with the directory.
                        return Ok(component);
                    }
                }
                Err(e) => tracing::warn!(error = %e,
                    "no directory for a child compiler's code; compiling in the host's process"),
            }
        }
        self.here(bytes)
    }

    /// Compiles `bytes` in a child process into `output` and loads it. `None` when there is
    /// no child compiler, or it could not compile for a reason that is not the component's,
    /// or its code does not load: the caller compiles here. An error when the compiler
    /// rejected the component.
    pub fn in_child(&self, bytes: &[u8], output: &Path) -> anyhow::Result<Option<Component>> {
        let Some(child) = &self.child else {
            return Ok(None);
        };
        match child.compile(self.tier, &self.limits, bytes, output) {
            Ok(()) => {}
            Err(ChildError::Unavailable(e)) => {
                tracing::warn!(compiler = %child.exe().display(), error = %format!("{e:#}"),
                    "cannot compile in a child process; compiling in the host's");
                return Ok(None);
            }
            Err(ChildError::Rejected(message)) => bail!("{message}"),
        }
        // SAFETY: `output` was written just now by a child compiler running this host's engine
        // configuration, into a directory only this user can write; deserializing also checks
        // the code was compiled for a compatible engine.
        let mapped = unsafe { Component::deserialize_file(&self.engine, output) };
        let loaded = mapped.or_else(|e| {
            // A file system mounted noexec cannot be mapped as code: copy it into memory.
            let bytes = std::fs::read(output).map_err(|_| e)?;
            // SAFETY: as above.
            unsafe { Component::deserialize(&self.engine, &bytes) }
        });
        match loaded {
            Ok(component) => {
                self.count("child");
                Ok(Some(component))
            }
            Err(e) => {
                tracing::warn!(compiler = %child.exe().display(), error = %e,
                    "the child compiler's code does not load; compiling in the host's process");
                Ok(None)
            }
        }
    }

    /// Compiles `bytes` in this process.
    fn here(&self, bytes: &[u8]) -> anyhow::Result<Component> {
        self.count("host");
        let component = wt(Component::new(&self.engine, bytes));
        return_freed_heap();
        component
    }

    /// Counts a compile by the process that did it.
    pub fn count(&self, process: &str) {
        let labels = metrics::labels([("tier", self.tier.as_str()), ("process", process)]);
        metrics::global()
            .plugin_compiles
            .get_or_create(&labels)
            .inc();
    }
}

/// Hands the heap memory a compile in this process freed back to the kernel. Cranelift
/// allocates tens of MiB per component on wasmtime's compile threads and frees it when done,
/// but glibc keeps freed memory in each thread's arena. This gives back about a quarter of
/// what a host that compiled both bundled plugins kept (~20 of ~80 MiB); the rest stays
/// fragmented, which is why hosts compile in a child process ([`super::compiler`]).
pub(crate) fn return_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases memory glibc's allocator holds free; it is safe to
    // call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn classify(
    plugin: &str,
    limits: &Limits,
    error: wasmtime::Error,
    interrupt: &CancellationToken,
) -> CallError {
    if let Some(wasmtime::Trap::StackOverflow) = error.downcast_ref::<wasmtime::Trap>() {
        return CallError::StackOverflow {
            plugin: plugin.to_string(),
        };
    }
    if let Some(wasmtime::Trap::Interrupt) = error.downcast_ref::<wasmtime::Trap>() {
        if interrupt.is_cancelled() {
            return CallError::Interrupted {
                plugin: plugin.to_string(),
            };
        }
        return CallError::Deadline {
            plugin: plugin.to_string(),
            deadline: limits.call_deadline,
        };
    }
    CallError::Trap {
        plugin: plugin.to_string(),
        message: format!("{error:#}"),
    }
}

/// What one call is instantiated with.
struct CallSetup<'a> {
    plugin: &'a str,
    access: Option<RecordAccess>,
    grants: Arc<Manifest>,
    limits: &'a Limits,
    interrupt: CancellationToken,
}

impl<'a> CallSetup<'a> {
    /// The setup of a `handle` call of `plugin` reading through `access`.
    fn for_job(
        plugin: &'a LoadedPlugin,
        access: RecordAccess,
        interrupt: &CancellationToken,
    ) -> CallSetup<'a> {
        CallSetup {
            plugin: &plugin.name,
            access: Some(access),
            grants: plugin.manifest.clone(),
            limits: &plugin.limits,
            interrupt: interrupt.clone(),
        }
    }
}

/// A linker of `engine` that provides the esi:worker host interface.
fn linker_for(engine: &Engine) -> anyhow::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wt(Handler::add_to_linker::<HostState, HasSelf<HostState>>(
        &mut linker,
        |s| s,
    ))
    .context("linking the esi:worker host interface")?;
    Ok(linker)
}

/// wasmtime 48 has its own error type; this converts it for `anyhow` context chains.
fn wt<T>(result: wasmtime::Result<T>) -> anyhow::Result<T> {
    result.map_err(anyhow::Error::from)
}

fn validate_info(info: &PluginInfo) -> anyhow::Result<()> {
    anyhow::ensure!(!info.name.is_empty(), "empty plugin name");
    anyhow::ensure!(
        !info.handlers.is_empty(),
        "plugin {} serves no handler",
        info.name
    );
    for h in &info.handlers {
        anyhow::ensure!(
            !h.is_empty() && !h.contains([':', '/']),
            "plugin {}: handler name {h:?} is empty or contains ':' or '/'",
            info.name
        );
    }
    Ok(())
}
