//! The wasmtime engine and how one plugin call runs.
//!
//! One `Engine` serves every plugin. Instances come from the pooling allocator, so a fresh
//! instance per job costs microseconds; after a trap an instance is dead anyway, and a fresh
//! one per job means no job can see another's memory. Every call gets a wall-clock deadline
//! through epoch interruption (a ticker thread advances the epoch) and a memory cap through
//! `StoreLimits`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimitsBuilder,
    UpdateDeadline,
};

use super::bindings::esi::worker::types::{Job, JobError, Outcome, PluginInfo, RunContext};
use super::bindings::{Handler, HandlerPre};
use super::cache::CompileCache;
use super::host_api::{HostState, RecordAccess};

/// How often the epoch advances; deadlines are whole ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);

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

/// A compiled, validated plugin, ready to instantiate.
pub struct LoadedPlugin {
    pub info: PluginInfo,
    pub path: PathBuf,
    /// sha256 of the component file, hex.
    pub sha256: String,
    pre: HandlerPre<HostState>,
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
}

/// Owns the engine, the linker and the epoch ticker.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<HostState>,
    limits: Limits,
    cache: Option<CompileCache>,
    ticker_stop: Arc<AtomicBool>,
}

impl PluginEngine {
    /// An engine; with `cache_dir`, compiled components are kept there across restarts.
    pub fn new(limits: Limits, cache_dir: Option<&Path>) -> anyhow::Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(limits.max_instances)
            .total_core_instances(limits.max_instances * 2)
            .total_memories(limits.max_instances * 2)
            .total_tables(limits.max_instances * 2)
            .total_stacks(limits.max_instances)
            .max_memory_size(limits.max_memory_bytes);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = wt(Engine::new(&config)).context("creating the wasmtime engine")?;
        let mut linker = Linker::new(&engine);
        wt(Handler::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        ))
        .context("linking the esi:worker host interface")?;
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
        spawn_epoch_ticker(engine.clone(), ticker_stop.clone());
        Ok(PluginEngine {
            engine,
            linker,
            limits,
            cache,
            ticker_stop,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles a component file, links it and asks it to `describe()` itself.
    pub async fn load(&self, path: &Path) -> anyhow::Result<LoadedPlugin> {
        let bytes = tokio::fs::read(path)
            .await
            .with_context(|| format!("reading plugin {}", path.display()))?;
        let sha256 = CompileCache::digest(&bytes);
        let (engine, cache, digest) = (self.engine.clone(), self.cache.clone(), sha256.clone());
        let component = tokio::task::spawn_blocking(move || match &cache {
            Some(cache) => cache.load_or_compile(&engine, &bytes, &digest),
            None => wt(Component::new(&engine, &bytes)),
        })
        .await
        .context("compiling plugin")?
        .with_context(|| format!("{} is not a valid WebAssembly component", path.display()))?;
        let pre = wt(self.linker.instantiate_pre(&component)).with_context(|| {
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
        let never = CancellationToken::new();
        let (mut store, instance) = self
            .instantiate(&pre, &name, None, never.clone())
            .await
            .map_err(anyhow::Error::new)?;
        let info = instance
            .call_describe(&mut store)
            .await
            .map_err(|e| self.classify(&name, e, &never))
            .with_context(|| format!("{}: describe() failed", path.display()))?;
        validate_info(&info)
            .with_context(|| format!("{}: describe() answered badly", path.display()))?;
        Ok(LoadedPlugin {
            info,
            path: path.to_path_buf(),
            sha256,
            pre,
        })
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
        let name = plugin.info.name.clone();
        let (mut store, instance) = self
            .instantiate(&plugin.pre, &name, Some(access), interrupt.clone())
            .await?;
        instance
            .call_handle(&mut store, job, context)
            .await
            .map_err(|e| self.classify(&name, e, interrupt))
    }

    async fn instantiate(
        &self,
        pre: &HandlerPre<HostState>,
        plugin: &str,
        access: Option<RecordAccess>,
        interrupt: CancellationToken,
    ) -> Result<(Store<HostState>, Handler), CallError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.max_memory_bytes)
            .instances(16)
            .build();
        let mut store = Store::new(&self.engine, HostState::new(plugin, access, limits));
        store.limiter(|s| &mut s.limits);
        // Every tick: stop the call if its deadline passed or it was interrupted, otherwise
        // yield to the async runtime so a long call never holds a runtime thread.
        let deadline = Instant::now() + self.limits.call_deadline;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if interrupt.is_cancelled() || Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        let instance =
            pre.instantiate_async(&mut store)
                .await
                .map_err(|e| CallError::Instantiate {
                    plugin: plugin.to_string(),
                    message: format!("{e:#}"),
                })?;
        Ok((store, instance))
    }

    fn classify(
        &self,
        plugin: &str,
        error: wasmtime::Error,
        interrupt: &CancellationToken,
    ) -> CallError {
        if let Some(wasmtime::Trap::Interrupt) = error.downcast_ref::<wasmtime::Trap>() {
            if interrupt.is_cancelled() {
                return CallError::Interrupted {
                    plugin: plugin.to_string(),
                };
            }
            return CallError::Deadline {
                plugin: plugin.to_string(),
                deadline: self.limits.call_deadline,
            };
        }
        CallError::Trap {
            plugin: plugin.to_string(),
            message: format!("{error:#}"),
        }
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn spawn_epoch_ticker(engine: Engine, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("esi-epoch-ticker".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .map(drop)
        .unwrap_or_else(|e| {
            tracing::error!("cannot start the epoch ticker, deadlines are off: {e}")
        });
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
