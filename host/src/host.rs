//! One esi-host process: a lease, the job manager and the worker, started and stopped together.
//!
//! [`Host::start`] spawns the tasks and returns a [`Host`] handle; [`Host::shutdown`] cancels
//! them, waits for them, and revokes the lease so that etcd drops our claims at once instead of
//! after the TTL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::keys::Keys;
use crate::lease::{self, HostLease};
use crate::manager::{election, JobManager, ManagerConfig, ServedHandlers};
use crate::plugins::compiler::ChildCompiler;
use crate::plugins::{Limits, PluginEngine, PluginRegistry};
use crate::schema::SchemaRegistry;
use crate::store::Store;
use crate::worker::hints::PlannedParams;
use crate::worker::{Worker, WorkerConfig};

/// Everything a host needs to start.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub etcd_endpoints: Vec<String>,
    pub plugin_dir: PathBuf,
    /// Root namespace of every key (empty in production).
    pub key_root: String,
    pub host_id: String,
    pub lease_ttl: Duration,
    pub schemas: Option<PathBuf>,
    /// Handlers served by workers outside this process (e.g. a heat worker).
    pub external_handlers: Vec<String>,
    pub run_manager: bool,
    /// Where compiled plugins are kept across restarts (`None`: compile every time).
    pub compile_cache: Option<PathBuf>,
    /// An `esi-host` executable (the running one, for `esi-host run`) that compiles plugins in
    /// child processes, so that none of the compiler's memory stays with the host (`None`:
    /// compile in this process).
    pub child_compiler: Option<PathBuf>,
    /// On shutdown, how long in-flight jobs may run before they are handed back to ready.
    pub drain_timeout: Duration,
    /// First delay before the job manager re-queues a job whose worker died; doubles per
    /// attempt, with jitter, up to `requeue_backoff_max`.
    pub requeue_backoff: Duration,
    pub requeue_backoff_max: Duration,
    /// etcd's `--max-request-bytes`: the job manager plans its writes to fit it.
    pub etcd_max_request_bytes: usize,
    pub worker: WorkerConfig,
    pub limits: Limits,
    /// Watch the plugin directory and swap in new or changed plugins while running.
    pub hot_reload: bool,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (`None`: nowhere).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl HostConfig {
    /// Defaults for everything but where etcd and the plugins are.
    pub fn new(etcd_endpoints: Vec<String>, plugin_dir: PathBuf) -> Self {
        HostConfig {
            etcd_endpoints,
            plugin_dir,
            key_root: String::new(),
            host_id: default_host_id(),
            lease_ttl: Duration::from_secs(60),
            schemas: None,
            external_handlers: Vec::new(),
            run_manager: true,
            compile_cache: Some(crate::plugins::cache::default_dir()),
            child_compiler: None,
            drain_timeout: Duration::from_secs(25),
            requeue_backoff: Duration::from_millis(500),
            requeue_backoff_max: Duration::from_secs(30),
            etcd_max_request_bytes: crate::store::jobs::ETCD_DEFAULT_MAX_REQUEST_BYTES,
            worker: WorkerConfig::default(),
            limits: Limits::default(),
            hot_reload: true,
            metrics_addr: None,
        }
    }
}

/// `<hostname>-<pid>`: unique per process on a machine, readable in logs.
pub fn default_host_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "esi-host".into());
    format!("{host}-{}", std::process::id())
}

/// The value of `/esi-worker/hosts/<host_id>`. Its lease (etcd's, not in the value) is the
/// one the host's claims are bound to.
fn host_record(host_id: &str, handlers: &[String]) -> String {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    serde_json::json!({
        "host_id": host_id,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "started_at_unix": started,
        "handlers": handlers,
    })
    .to_string()
}

/// How long a drain waits for etcd to delete the host's plugin status records.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(2);

/// A running host.
pub struct Host {
    /// Stops the roles: the manager resigns and the worker stops claiming.
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// Stops the lease keep-alive, after the drain.
    lease_keeper: (CancellationToken, tokio::task::JoinHandle<()>),
    worker: Arc<Worker>,
    drain_timeout: Duration,
    store: Store,
    lease: Arc<HostLease>,
    plugins: Arc<PluginRegistry>,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl Host {
    /// Loads plugins, connects to etcd, takes a lease and starts the roles.
    pub async fn start(config: HostConfig) -> anyhow::Result<Host> {
        let schemas = Arc::new(match &config.schemas {
            Some(path) => SchemaRegistry::from_file(path)?,
            None => SchemaRegistry::built_in(),
        });
        let mut engine = PluginEngine::new(config.limits.clone(), config.compile_cache.as_deref())?;
        if let Some(exe) = &config.child_compiler {
            engine = engine.with_child_compiler(ChildCompiler::new(exe.clone()));
        }
        let engine = Arc::new(engine);
        let plugins = Arc::new(PluginRegistry::load_dir(engine.clone(), &config.plugin_dir).await?);
        if plugins.handlers().is_empty() {
            tracing::warn!(dir = %config.plugin_dir.display(), "no plugin loaded: this host will claim no job");
        }
        let store = Store::connect(&config.etcd_endpoints, Keys::new(&config.key_root))
            .await
            .context("connecting to etcd")?;
        let ttl = config.lease_ttl.max(Duration::from_secs(1));
        let ttl_seconds = i64::try_from(ttl.as_secs()).unwrap_or(60);
        let lease = Arc::new(HostLease::new(
            store
                .grant_lease(ttl_seconds)
                .await
                .context("taking the host's lease")?,
        ));
        lease
            .publish(
                &store,
                &store.keys().host(&config.host_id),
                host_record(&config.host_id, &plugins.handlers()),
            )
            .await
            .context("registering the host")?;
        tracing::info!(host_id = %config.host_id, lease = lease.id(), handlers = ?plugins.handlers(), "esi-host started");

        let config_host_id = config.host_id.clone();
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let keeper_stop = CancellationToken::new();
        let keeper = tokio::spawn(lease::keep(
            store.clone(),
            lease.clone(),
            ttl,
            keeper_stop.clone(),
        ));
        // Params of the jobs planned here, for this host's worker to read with its claims.
        let planned = Arc::new(PlannedParams::default());
        if config.run_manager {
            let handlers = ServedHandlers {
                external: config.external_handlers.iter().cloned().collect(),
                plugins: Some(plugins.clone()),
            };
            let config = ManagerConfig {
                handlers,
                requeue_backoff: config.requeue_backoff,
                requeue_backoff_max: config.requeue_backoff_max,
                max_request_bytes: config.etcd_max_request_bytes,
                planned: Some(planned.clone()),
            };
            let (store, schemas, lease) = (store.clone(), schemas.clone(), lease.clone());
            // Every manager write compares the election key with our id (a fencing token), so
            // a manager that lost the role cannot write, even before its watch tells it so.
            let manager_store =
                store.fenced_by(store.keys().job_manager_election(), config_host_id.clone());
            tasks.spawn(election::run_elected(
                store.clone(),
                config_host_id.clone(),
                move || lease.id(),
                shutdown.clone(),
                move |term| {
                    JobManager::new(manager_store.clone(), schemas.clone(), config.clone())
                        .run(term)
                },
            ));
        }
        let worker = Worker::new(
            // Claims and completions of jobs running at once share commits.
            store.grouped(),
            schemas,
            engine,
            plugins.clone(),
            config.worker.clone(),
            lease.clone(),
            planned,
            config.host_id.clone(),
        );
        tasks.spawn(worker.clone().run(shutdown.clone()));
        plugins
            .publish_status(
                store.clone(),
                lease.clone(),
                &config.host_id,
                shutdown.clone(),
            )
            .await;
        if config.hot_reload {
            tasks.spawn(plugins.clone().watch(shutdown.clone()));
        }
        let metrics_addr = match config.metrics_addr {
            Some(addr) => {
                let readiness = crate::metrics::Readiness {
                    store: store.clone(),
                    lease: lease.clone(),
                    plugins: plugins.clone(),
                };
                Some(crate::metrics::serve(addr, readiness, shutdown.clone()).await?)
            }
            None => None,
        };
        Ok(Host {
            shutdown,
            tasks,
            lease_keeper: (keeper_stop, keeper),
            worker,
            drain_timeout: config.drain_timeout,
            store,
            lease,
            plugins,
            metrics_addr,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    pub fn plugins(&self) -> &PluginRegistry {
        &self.plugins
    }

    /// Drains: stops claiming, deletes the plugin status records (other hosts stop ranking
    /// this one first for jobs) and resigns the job manager role, lets in-flight jobs finish
    /// up to the drain timeout, hands the rest back to ready, then revokes the lease.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        // Other hosts stop deferring new jobs to this one (a bounded wait: etcd may be gone).
        let withdrawn = tokio::time::timeout(WITHDRAW_TIMEOUT, self.plugins.withdraw_statuses());
        if withdrawn.await.is_err() {
            tracing::warn!(
                "could not withdraw the plugin status records in time; they go with the lease"
            );
        }
        while self.tasks.join_next().await.is_some() {}
        // The lease stays alive while in-flight jobs finish or are handed back.
        self.worker.drain(self.drain_timeout).await;
        self.lease_keeper.0.cancel();
        let _ = self.lease_keeper.1.await;
        let lease = self.lease.id();
        if let Err(e) = self.store.revoke_lease(lease).await {
            tracing::warn!(error = %e, "could not revoke the lease; it expires by itself");
        }
        tracing::info!("esi-host stopped");
    }

    /// Stops without draining, as if the process had died: the lease is revoked at once, so
    /// every claim vanishes and the job manager re-queues those jobs. In-flight job tasks are
    /// left running, like a frozen process that resumes: their fenced writes must fail. For
    /// chaos tests.
    pub async fn abandon(mut self) {
        self.shutdown.cancel();
        self.lease_keeper.0.cancel();
        let lease = self.lease.id();
        let _ = self.store.revoke_lease(lease).await;
        while self.tasks.join_next().await.is_some() {}
    }

    /// Runs until SIGINT or SIGTERM, then shuts down.
    pub async fn run_until_signalled(self) -> anyhow::Result<()> {
        wait_for_signal().await?;
        tracing::info!("signal received, shutting down");
        self.shutdown().await;
        Ok(())
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
