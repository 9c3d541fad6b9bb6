//! Prometheus metrics, and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.
//!
//! The metrics are process-wide ([`global`]): one `esi-host` process is one host, and the
//! roles, the plugin registry and the lease keeper all count into the same set without
//! threading a handle through every constructor. (Tests that read counts run one host per test
//! binary for that reason.) Names follow Prometheus conventions: `esi_` prefix, `_total` for
//! counters, `_seconds` for durations.
//!
//! `/readyz` answers 200 only when etcd answers, the host's lease is held and at least one
//! plugin is active; otherwise 503 with the reasons, one per line.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::keys::Queue;
use crate::lease::HostLease;
use crate::plugins::PluginRegistry;
use crate::store::Store;

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Every metric the host exports.
pub struct Metrics {
    registry: Registry,
    pub jobs_claimed: Family<Labels, Counter>,
    pub claims_lost: Family<Labels, Counter>,
    pub claims_deferred: Family<Labels, Counter>,
    pub jobs_completed: Family<Labels, Counter>,
    pub jobs_failed: Family<Labels, Counter>,
    pub jobs_retried: Family<Labels, Counter>,
    pub job_duration: Histograms,
    pub plugin_call: Histograms,
    pub plugin_instantiate: Histograms,
    pub plugin_traps: Family<Labels, Counter>,
    pub plugin_reloads: Family<Labels, Counter>,
    pub plugin_rejections: Family<Labels, Counter>,
    pub plugin_compiles: Family<Labels, Counter>,
    pub manager_batches: Family<Labels, Counter>,
    pub etcd_op: Histograms,
    pub etcd_errors: Family<Labels, Counter>,
    pub lease_keepalive_failures: Counter,
    pub worker_restarts: Counter,
    pub worker_relists: Family<Labels, Counter>,
    pub queue_depth: Family<Labels, Gauge>,
}

/// Buckets from 50 µs to about 13 s: plugin calls take microseconds, etcd transactions
/// milliseconds, whole jobs anything up to their waits.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("esi");
        let histograms = || Histograms::new_with_constructor(seconds_histogram);
        let m = Metrics {
            jobs_claimed: Family::default(),
            claims_lost: Family::default(),
            claims_deferred: Family::default(),
            jobs_completed: Family::default(),
            jobs_failed: Family::default(),
            jobs_retried: Family::default(),
            job_duration: histograms(),
            plugin_call: histograms(),
            plugin_instantiate: histograms(),
            plugin_traps: Family::default(),
            plugin_reloads: Family::default(),
            plugin_rejections: Family::default(),
            plugin_compiles: Family::default(),
            manager_batches: Family::default(),
            etcd_op: histograms(),
            etcd_errors: Family::default(),
            lease_keepalive_failures: Counter::default(),
            worker_restarts: Counter::default(),
            worker_relists: Family::default(),
            queue_depth: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "jobs_claimed",
            "Jobs claimed, by handler",
            m.jobs_claimed.clone(),
        );
        r.register(
            "claims_lost",
            "Claims sent for jobs another host had claimed first, by handler: each one a \
             transaction etcd refused",
            m.claims_lost.clone(),
        );
        r.register(
            "claims_deferred",
            "Jobs another host ranked first that this host took after the affinity delay, by \
             handler: the first host was slow, busy or gone",
            m.claims_deferred.clone(),
        );
        r.register(
            "jobs_completed",
            "Jobs completed, by handler and action",
            m.jobs_completed.clone(),
        );
        r.register(
            "jobs_failed",
            "Jobs failed for good, by handler and action",
            m.jobs_failed.clone(),
        );
        r.register(
            "jobs_retried",
            "Job attempts that failed retryably and were re-queued, by handler",
            m.jobs_retried.clone(),
        );
        r.register(
            "job_duration_seconds",
            "From claim to completion or failure, by handler",
            m.job_duration.clone(),
        );
        r.register(
            "plugin_call_duration_seconds",
            "One handle() call, by plugin and version",
            m.plugin_call.clone(),
        );
        r.register(
            "plugin_instantiate_duration_seconds",
            "Instantiating a plugin for one call, by plugin and version",
            m.plugin_instantiate.clone(),
        );
        r.register(
            "plugin_traps",
            "Plugin calls that ended without an answer, by plugin and kind",
            m.plugin_traps.clone(),
        );
        r.register(
            "plugin_reloads",
            "Plugin versions swapped in",
            m.plugin_reloads.clone(),
        );
        r.register(
            "plugin_rejections",
            "Plugin versions rejected at load",
            m.plugin_rejections.clone(),
        );
        r.register(
            "plugin_compiles",
            "Components compiled (compile cache hits not counted), by tier and by the process \
             that compiled them: child (a child compiler) or host (the host's own, when it has \
             no child compiler or could not start one)",
            m.plugin_compiles.clone(),
        );
        r.register(
            "manager_batches",
            "Batches of the job manager's writes, by lane: in_order (after the batch before \
             it) or beside (creates of new resources sent while a batch commits)",
            m.manager_batches.clone(),
        );
        r.register(
            "etcd_operation_duration_seconds",
            "etcd requests, by operation",
            m.etcd_op.clone(),
        );
        r.register(
            "etcd_errors",
            "Failed etcd requests, by operation",
            m.etcd_errors.clone(),
        );
        r.register(
            "lease_keepalive_failures",
            "Lease renewals that failed or timed out",
            m.lease_keepalive_failures.clone(),
        );
        r.register(
            "worker_restarts",
            "Times a worker's follow of the ready queue failed and started over with a new \
             listing (etcd unreachable, a watch cancelled or compacted past)",
            m.worker_restarts.clone(),
        );
        r.register(
            "worker_relists",
            "Times a worker listed the ready queue again without starting over, by reason \
             (plugins_changed, compacted: its watch of ready deletes started too far back)",
            m.worker_relists.clone(),
        );
        r.register(
            "queue_depth",
            "Jobs per queue (ready, waiting, working), read from etcd at scrape time",
            m.queue_depth.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// `[(name, value)]` labels.
pub fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// What `/readyz` looks at.
#[derive(Clone)]
pub struct Readiness {
    pub store: Store,
    pub lease: Arc<HostLease>,
    pub plugins: Arc<PluginRegistry>,
}

impl Readiness {
    /// `Ok` when ready, else the reasons it is not.
    pub async fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let key = self.store.keys().job_manager_election();
        let probe = self.store.get(&key);
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(format!("etcd unreachable: {e}")),
            Err(_) => problems.push("etcd did not answer within 2 s".into()),
        }
        if self.lease.term().lost().is_cancelled() {
            problems.push("the host's lease is lost; taking a new one".into());
        }
        if self.plugins.handlers().is_empty() {
            problems.push("no plugin is active".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Reads the queue depths into the gauges (count-only requests).
    async fn refresh_queue_depth(&self) {
        for (queue, name) in [
            (Queue::Ready, "ready"),
            (Queue::Waiting, "waiting"),
            (Queue::Working, "working"),
        ] {
            let prefix = self.store.keys().queue_prefix(queue);
            if let Ok(n) = self.store.count(&prefix).await {
                global()
                    .queue_depth
                    .get_or_create(&labels([("queue", name)]))
                    .set(n);
            }
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown`. Returns the bound
/// address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: cannot listen: {e}"))?;
    let bound = listener.local_addr()?;
    let metrics_readiness = readiness.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let readiness = metrics_readiness.clone();
                async move {
                    readiness.refresh_queue_depth().await;
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        global().encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    match readiness.check().await {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(problems) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready:\n{}\n", problems.join("\n")),
                        ),
                    }
                }
            }),
        );
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}
