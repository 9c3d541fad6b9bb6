//! `esi-host bench`: where the time of a job goes, on this machine, against goals that are
//! relative to this machine.
//!
//! An absolute jobs-per-second number says little: it moves with the disk under etcd and the
//! CPU count. So the bench starts its own etcd ([`LocalEtcd`]) and measures, side by side in
//! one run:
//!
//! 1. the **etcd ceiling** ([`ceiling`]): completion-shaped transactions per second at the
//!    worker's concurrency, the most any host could get out of this etcd;
//! 2. **end to end** ([`e2e`]): ha_interfaces written as gohan writes them, through one and
//!    three in-process hosts, as a burst and paced at half the one-host peak (the latency
//!    goal is for a loaded, not a saturated, host);
//! 3. the **cost of a job** in etcd commits and round trips, from the revision delta and the
//!    store counters ([`crate::store::counters`]);
//! 4. the **plugin cost** ([`plugin_cost`]): a component call without its etcd reads, and the
//!    VLAN core as a component against the same core compiled natively;
//! 5. **hot reload** ([`reload`]) and the host's **memory** (VmRSS).
//!
//! Every phase runs under its own key root, so no phase's keys are seen by another's hosts.
//! Progress goes to stderr; the report ([`Report`]) to the caller.

pub mod ceiling;
pub mod e2e;
pub mod plugin_cost;
pub mod reload;
pub mod report;
pub mod stats;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::json;

use crate::local_etcd::LocalEtcd;
use crate::templates::{self, TemplateFile};
pub use report::{Figure, Report, Verdict};

/// Bench settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub plugin_dir: PathBuf,
    pub template_dir: PathBuf,
    /// Small sizes: the whole run in well under a minute.
    pub quick: bool,
    /// Run only these phases (all when empty); for iterating on one part.
    pub only: Vec<Phase>,
    /// Also pace one host at this many configs/s (`--paced-rate`).
    pub paced_rate: Option<f64>,
    /// The hosts compile plugins in child processes of this executable, as `esi-host run`
    /// does (see [`crate::HostConfig`]).
    pub child_compiler: Option<PathBuf>,
}

/// The phases of a run, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// End to end with one and three hosts, cost per job, memory.
    E2e,
    /// The etcd ceiling.
    Ceiling,
    /// Plugin call cost.
    Plugins,
    /// Hot reload.
    Reload,
}

/// How much of everything a run does.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    ceiling_txns: usize,
    burst_jobs: usize,
    /// A paced run lasts about this long...
    paced_seconds: f64,
    /// ...within these bounds on its number of jobs.
    paced_jobs: (usize, usize),
    plugin_calls: usize,
}

impl Sizes {
    fn for_mode(quick: bool) -> Sizes {
        if quick {
            Sizes {
                ceiling_txns: 2_000,
                burst_jobs: 300,
                paced_seconds: 2.0,
                paced_jobs: (50, 600),
                plugin_calls: 200,
            }
        } else {
            Sizes {
                ceiling_txns: 20_000,
                burst_jobs: 3_000,
                paced_seconds: 15.0,
                paced_jobs: (300, 10_000),
                plugin_calls: 3_000,
            }
        }
    }
}

/// The worker's default concurrency, which the ceiling uses too.
const WORKER_CONCURRENCY: usize = 64;

/// Key roots of the phases.
const CEILING_ROOT: &str = "/esi-bench/ceiling";
const ONE_HOST_ROOT: &str = "/esi-bench/one-host";
const THREE_HOSTS_ROOT: &str = "/esi-bench/three-hosts";
const PLUGIN_ROOT: &str = "/esi-bench/plugins";
const RELOAD_ROOT: &str = "/esi-bench/reload";

/// Runs the bench against a private etcd, which is stopped before this returns.
pub async fn run(config: &BenchConfig) -> anyhow::Result<Report> {
    let started = Instant::now();
    let rss_idle = stats::rss_bytes()?;
    for plugin in ["monitoring_worker", "vlan_pool_worker"] {
        let path = config.plugin_dir.join(format!("{plugin}.wasm"));
        if !path.exists() {
            bail!(
                "{} is missing: build the plugins with `cargo xtask build-plugins` or pass \
                 --plugins DIR",
                path.display()
            );
        }
    }
    let shipped = templates::read_dir(&config.template_dir).with_context(|| {
        format!(
            "reading the heat templates in {} (pass --templates DIR)",
            config.template_dir.display()
        )
    })?;
    let etcd = LocalEtcd::start().await?;
    progress(&format!("private etcd at {}", etcd.endpoint()));
    let result = run_against(config, etcd.endpoint(), etcd.pid(), &shipped, rss_idle).await;
    etcd.stop().await;
    let (figures, details) = result?;
    Ok(Report {
        mode: if config.quick { "quick" } else { "full" }.to_string(),
        machine: report::Machine::describe(),
        duration_s: started.elapsed().as_secs_f64(),
        figures,
        details,
    })
}

async fn run_against(
    config: &BenchConfig,
    endpoint: &str,
    etcd_pid: Option<u32>,
    shipped: &[TemplateFile],
    rss_idle: u64,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let sizes = Sizes::for_mode(config.quick);
    let runs = |phase: Phase| config.only.is_empty() || config.only.contains(&phase);
    let mut details = serde_json::Map::new();
    // The host phases go first, so that the memory figures carry no allocations of the
    // bench's other phases.
    let mut e2e_runs = None;
    let mut fixed_run = None;
    if runs(Phase::E2e) {
        progress("end to end, one host");
        let mut one = e2e::Fleet::start(
            endpoint,
            ONE_HOST_ROOT,
            &config.plugin_dir,
            shipped,
            1,
            etcd_pid,
            config.child_compiler.as_deref(),
        )
        .await?;
        let rss_loaded = stats::rss_bytes()?;
        let one_host = one_host_runs(&mut one, &sizes).await;
        let fixed = match (&one_host, config.paced_rate) {
            (Ok(_), Some(rate)) => Some(paced_at(&mut one, &sizes, rate, "a fixed rate").await),
            _ => None,
        };
        one.shutdown().await;
        let (burst_one, paced, paced_quarter) = one_host?;
        let fixed = fixed.transpose()?;

        progress("end to end, three hosts");
        let mut three = e2e::Fleet::start(
            endpoint,
            THREE_HOSTS_ROOT,
            &config.plugin_dir,
            shipped,
            3,
            etcd_pid,
            config.child_compiler.as_deref(),
        )
        .await?;
        let three_hosts = match three.warm_up().await {
            Ok(()) => three.run("burst, 3 hosts", sizes.burst_jobs, None).await,
            Err(e) => Err(e),
        };
        three.shutdown().await;
        let burst_three = three_hosts?;
        // Under load: the highest of the one-host runs, the burst (up to ~1,700 jobs waiting
        // in ready) and the paced ones (more jobs, each with its own config PUT in flight).
        let under_load = [
            Some(&burst_one),
            Some(&paced),
            Some(&paced_quarter),
            fixed.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|run| run.rss_peak_bytes)
        .max()
        .unwrap_or(0);
        let memory = Memory {
            idle: rss_idle,
            loaded: rss_loaded,
            under_load,
        };
        details.insert(
            "runs".into(),
            json!([burst_one, paced, paced_quarter, burst_three, fixed]),
        );
        fixed_run = fixed;
        details.insert(
            "memory_bytes".into(),
            json!({"idle": memory.idle, "plugins_loaded": memory.loaded,
                   "under_load": memory.under_load}),
        );
        e2e_runs = Some((burst_one, burst_three, paced, paced_quarter, memory));
    }

    let mut ceiling = None;
    if runs(Phase::Ceiling) {
        progress(&format!(
            "etcd ceiling: {} completion-shaped transactions, {WORKER_CONCURRENCY} at once",
            sizes.ceiling_txns
        ));
        let measured = ceiling::measure(
            endpoint,
            etcd_pid,
            CEILING_ROOT,
            sizes.ceiling_txns,
            WORKER_CONCURRENCY,
        )
        .await
        .context("measuring the etcd ceiling")?;
        details.insert("ceiling".into(), json!(measured));
        ceiling = Some(measured);
    }

    let mut plugins = None;
    if runs(Phase::Plugins) {
        progress("plugin cost");
        let waited = until_etcd_is_idle(etcd_pid).await;
        details.insert(
            "plugins_waited_for_idle_etcd_ms".into(),
            json!(stats::ms(waited)),
        );
        let measured = plugin_cost::measure(
            endpoint,
            PLUGIN_ROOT,
            &config.plugin_dir,
            shipped,
            sizes.plugin_calls,
        )
        .await
        .context("measuring the plugin cost")?;
        details.insert("plugins".into(), json!(measured));
        plugins = Some(measured);
    }

    let mut reload = None;
    if runs(Phase::Reload) {
        progress("hot reload");
        let measured = reload::measure(
            endpoint,
            RELOAD_ROOT,
            &config.plugin_dir,
            config.child_compiler.as_deref(),
        )
        .await
        .context("measuring hot reload")?;
        details.insert("reload".into(), json!(measured));
        reload = Some(measured);
    }

    let mut figures = Vec::new();
    if let Some(ceiling) = &ceiling {
        figures.extend(ceiling_figures(ceiling));
    }
    if let Some((one, three, paced, quarter, _)) = &e2e_runs {
        figures.extend(e2e_figures(one, three, paced, quarter, ceiling.as_ref()));
    }
    if let Some(fixed) = &fixed_run {
        figures.extend(fixed_rate_figures(fixed));
    }
    if let Some(plugins) = &plugins {
        figures.extend(plugin_figures(plugins));
    }
    if let Some(reload) = &reload {
        figures.extend(reload_figures(reload));
    }
    if let Some((_, _, _, _, memory)) = &e2e_runs {
        figures.extend(memory_figures(memory));
    }
    Ok((figures, serde_json::Value::Object(details)))
}

/// The one-host burst, then runs paced at half and at a quarter of the rate the burst
/// reached (the goal is at half; a quarter shows the latency of a lightly loaded machine).
async fn one_host_runs(
    fleet: &mut e2e::Fleet,
    sizes: &Sizes,
) -> anyhow::Result<(e2e::RunResult, e2e::RunResult, e2e::RunResult)> {
    fleet.warm_up().await?;
    let burst = fleet.run("burst, 1 host", sizes.burst_jobs, None).await?;
    let mut paced = Vec::new();
    for (share, label) in [(0.5, "50%"), (0.25, "25%")] {
        let rate = burst.jobs_per_s * share;
        let what = format!("{label} of the one-host peak");
        paced.push(paced_at(fleet, sizes, rate, &what).await?);
    }
    let quarter = paced.pop().context("the quarter-load run")?;
    let half = paced.pop().context("the half-load run")?;
    Ok((burst, half, quarter))
}

/// One host paced at `rate` configs/s for about `sizes.paced_seconds`; `what` says where the
/// rate comes from.
async fn paced_at(
    fleet: &mut e2e::Fleet,
    sizes: &Sizes,
    rate: f64,
    what: &str,
) -> anyhow::Result<e2e::RunResult> {
    let (least, most) = sizes.paced_jobs;
    let jobs = ((rate * sizes.paced_seconds) as usize).clamp(least, most);
    progress(&format!(
        "paced at {rate:.0} configs/s ({what}), {jobs} jobs"
    ));
    fleet
        .run(
            &format!("paced at {rate:.0} configs/s, 1 host"),
            jobs,
            Some(rate),
        )
        .await
}

/// The run paced at `--paced-rate`.
fn fixed_rate_figures(fixed: &e2e::RunResult) -> Vec<Figure> {
    vec![
        Figure::info(
            "paced_fixed_rate_jobs_per_s",
            "paced at --paced-rate: configs written per second",
            fixed.offered_per_s.unwrap_or(0.0),
            "jobs/s",
        ),
        Figure::info(
            "paced_fixed_latency_p50_ms",
            "paced at --paced-rate: config -> state p50",
            fixed.latency.p50_ms,
            "ms",
        ),
        Figure::info(
            "paced_fixed_latency_p99_ms",
            "paced at --paced-rate: config -> state p99",
            fixed.latency.p99_ms,
            "ms",
        ),
    ]
}

/// Resident memory of this process at three moments, in bytes.
struct Memory {
    idle: u64,
    loaded: u64,
    under_load: u64,
}

fn ceiling_figures(ceiling: &ceiling::Ceiling) -> Vec<Figure> {
    vec![
        Figure::info(
            "etcd_ceiling_txn_per_s",
            "etcd ceiling: completion-shaped txns, 64 at once",
            ceiling.txn_per_s,
            "txn/s",
        ),
        Figure::info(
            "etcd_commit_latency_ms",
            "etcd: one completion-shaped txn alone (p50)",
            ceiling.sequential_txn.p50_ms,
            "ms",
        ),
        Figure::info(
            "etcd_cpu_ms_per_txn",
            "etcd CPU per completion-shaped txn, at the ceiling",
            ceiling.etcd_cpu_ms_per_txn.unwrap_or(0.0),
            "ms",
        ),
        Figure::info(
            "etcd_get_latency_ms",
            "etcd: one get alone (p50)",
            ceiling.sequential_get.p50_ms,
            "ms",
        ),
    ]
}

fn e2e_figures(
    one: &e2e::RunResult,
    three: &e2e::RunResult,
    paced: &e2e::RunResult,
    quarter: &e2e::RunResult,
    ceiling: Option<&ceiling::Ceiling>,
) -> Vec<Figure> {
    let commits = one.cost.commits_per_job;
    let per_job = &one.cost.per_job;
    // The goal divides the ceiling by the transactions a job needs: its claim, its
    // completion and its share of the manager's writes, each counted even when it rode in
    // another's commit (a batch or a group commit). The ceiling's transactions are each a
    // commit of its own, so dividing by commits would credit a group of 16 completions with
    // the cost of one.
    let needed = per_job.txn_logical;
    let mut figures = vec![
        Figure::below(
            "commits_per_job",
            "etcd commits per job (revision delta)",
            commits,
            "txn",
            4.0,
            true,
        ),
        Figure::info(
            "txns_needed_per_job",
            "transactions per job, nested ones counted (host)",
            needed,
            "txn",
        ),
        match ceiling {
            Some(ceiling) => Figure::at_least(
                "e2e_1host_jobs_per_s",
                "end to end, 1 host (goal: 70% of ceiling / transactions per job)",
                one.jobs_per_s,
                "jobs/s",
                0.7 * ceiling.txn_per_s / needed.max(1e-9),
            ),
            None => Figure::info(
                "e2e_1host_jobs_per_s",
                "end to end, 1 host (no ceiling measured: no goal)",
                one.jobs_per_s,
                "jobs/s",
            ),
        },
        Figure::info(
            "e2e_3hosts_jobs_per_s",
            "end to end, 3 hosts",
            three.jobs_per_s,
            "jobs/s",
        ),
        Figure::info(
            "burst_1host_latency_p50_ms",
            "burst, 1 host: config -> state p50",
            one.latency.p50_ms,
            "ms",
        ),
        Figure::info(
            "burst_1host_latency_p99_ms",
            "burst, 1 host: config -> state p99",
            one.latency.p99_ms,
            "ms",
        ),
        Figure::info(
            "burst_3hosts_latency_p50_ms",
            "burst, 3 hosts: config -> state p50",
            three.latency.p50_ms,
            "ms",
        ),
        Figure::info(
            "burst_3hosts_latency_p99_ms",
            "burst, 3 hosts: config -> state p99",
            three.latency.p99_ms,
            "ms",
        ),
        Figure::info(
            "paced_rate_jobs_per_s",
            "paced run: configs written per second",
            paced.offered_per_s.unwrap_or(0.0),
            "jobs/s",
        ),
        Figure::below(
            "paced_latency_p50_ms",
            "paced at 50% of peak: config -> state p50",
            paced.latency.p50_ms,
            "ms",
            10.0,
            false,
        ),
        Figure::below(
            "paced_latency_p99_ms",
            "paced at 50% of peak: config -> state p99",
            paced.latency.p99_ms,
            "ms",
            50.0,
            false,
        ),
        Figure::info(
            "paced_latency_max_ms",
            "paced at 50% of peak: config -> state max",
            paced.latency.max_ms,
            "ms",
        ),
    ];
    figures.extend(stage_figures(paced));
    figures.extend([
        Figure::info(
            "paced_quarter_latency_p50_ms",
            "paced at 25% of peak: config -> state p50",
            quarter.latency.p50_ms,
            "ms",
        ),
        Figure::info(
            "paced_quarter_latency_p99_ms",
            "paced at 25% of peak: config -> state p99",
            quarter.latency.p99_ms,
            "ms",
        ),
        Figure::info(
            "paced_cpu_ms_per_job",
            "CPU per job at 50% of peak, host + etcd",
            paced.host_cpu_ms_per_job + paced.etcd_cpu_ms_per_job.unwrap_or(0.0),
            "ms",
        ),
        Figure::info(
            "paced_wal_syncs_per_job",
            "etcd WAL syncs per job at 50% of peak",
            wal_syncs_per_job(paced),
            "syncs",
        ),
        Figure::info(
            "burst_wal_syncs_per_job",
            "etcd WAL syncs per job, burst 1 host",
            wal_syncs_per_job(one),
            "syncs",
        ),
        Figure::info(
            "host_cpu_ms_per_job",
            "CPU per job, bench process (host + bench), burst 1 host",
            one.host_cpu_ms_per_job,
            "ms",
        ),
        Figure::info(
            "etcd_cpu_ms_per_job",
            "CPU per job, etcd, burst 1 host",
            one.etcd_cpu_ms_per_job.unwrap_or(0.0),
            "ms",
        ),
        Figure::info(
            "host_refused_writes_per_job",
            "host write requests etcd refused (compare failed), per job",
            one.cost.refused_per_job,
            "txn",
        ),
        Figure::info(
            "host_txns_per_job",
            "host round trips per job: txn (incl. refused)",
            per_job.txn,
            "ops",
        ),
        Figure::info(
            "host_gets_per_job",
            "host round trips per job: get",
            per_job.get,
            "ops",
        ),
        Figure::info(
            "host_lists_per_job",
            "host round trips per job: list",
            per_job.list,
            "ops",
        ),
        Figure::info(
            "host_puts_deletes_per_job",
            "host round trips per job: plain put + delete",
            per_job.put + per_job.delete,
            "ops",
        ),
        Figure::info(
            "host_watch_events_per_job",
            "watch events delivered to the host per job",
            per_job.watch_events,
            "events",
        ),
    ]);
    // A slow WAL sync or backend commit stalls every commit behind it: these tell a tail
    // etcd's disk caused from one the host caused.
    for (name, label, run) in [
        (
            "paced_slow_disk_waits",
            "paced at 50% of peak: etcd disk waits over 32 ms",
            paced,
        ),
        (
            "paced_quarter_slow_disk_waits",
            "paced at 25% of peak: etcd disk waits over 32 ms",
            quarter,
        ),
    ] {
        if let Some(disk) = run.etcd_disk {
            figures.push(Figure::info(name, label, disk.slow() as f64, "waits"));
        }
    }
    figures
}

/// Where the half-load run's latency went (see [`e2e::Stages`]): p50 and p99 of each stage.
fn stage_figures(paced: &e2e::RunResult) -> Vec<Figure> {
    let stages = &paced.stages;
    let mut figures = Vec::new();
    for (name, what, summary) in [
        ("put", "the bench's config PUT", &stages.put),
        ("manager", "config -> job ready (manager)", &stages.manager),
        ("claim", "ready -> claimed (worker)", &stages.claim),
        ("run", "claimed -> state (plugin + completion)", &stages.run),
    ] {
        for (quantile, value) in [("p50", summary.p50_ms), ("p99", summary.p99_ms)] {
            figures.push(Figure::info(
                &format!("paced_stage_{name}_{quantile}_ms"),
                &format!("paced at 50% of peak, {quantile}: {what}"),
                value,
                "ms",
            ));
        }
    }
    figures
}

/// etcd's WAL syncs (raft rounds that reached the disk) per job of a run: how well the run's
/// writes shared commits.
fn wal_syncs_per_job(run: &e2e::RunResult) -> f64 {
    run.etcd_disk
        .map_or(0.0, |disk| disk.wal_syncs as f64 / run.jobs.max(1) as f64)
}

fn plugin_figures(plugins: &plugin_cost::PluginCost) -> Vec<Figure> {
    vec![
        Figure::below(
            "plugin_monitoring_us",
            "monitoring job: instantiate + handle, without etcd reads",
            plugins.monitoring.plugin_us,
            "us",
            100.0,
            false,
        ),
        Figure::info(
            "plugin_monitoring_with_reads_us",
            "monitoring job: instantiate + handle, with its etcd reads (p50)",
            plugins.monitoring.call.p50_ms * 1e3,
            "us",
        ),
        Figure::info(
            "plugin_vlan_us",
            "VLAN job as a component, without etcd reads",
            plugins.vlan.plugin_us,
            "us",
        ),
        Figure::info(
            "native_vlan_us",
            "VLAN job natively (same core, records in memory)",
            plugins.vlan_native_us,
            "us",
        ),
        Figure::below(
            "vlan_component_native_ratio",
            "VLAN allocate + encode: component / native",
            plugins.vlan_component_native_ratio,
            "x",
            3.0,
            false,
        ),
        // What the per-job fresh instance costs, apart from the guest's code.
        Figure::info(
            "plugin_vlan_instantiate_us",
            "VLAN component: instantiation alone",
            plugins.vlan.instantiate_us,
            "us",
        ),
        Figure::info(
            "plugin_vlan_first_call_us",
            "VLAN component: first call on a fresh instance",
            plugins.vlan.first_call_us,
            "us",
        ),
        Figure::info(
            "plugin_vlan_warm_call_us",
            "VLAN component: later calls on one instance (not how jobs run)",
            plugins.vlan.warm_call_us,
            "us",
        ),
        Figure::info(
            "vlan_warm_native_ratio",
            "VLAN warm call / native: the sandboxed code's own speed",
            plugins.vlan_warm_native_ratio,
            "x",
        ),
    ]
}

fn reload_figures(reload: &reload::Reload) -> Vec<Figure> {
    vec![
        Figure::below(
            "reload_new_build_ms",
            "hot reload, rename -> serving (new build: baseline code)",
            reload.new_build_ms,
            "ms",
            1000.0,
            false,
        ),
        Figure::info(
            "reload_new_build_optimized_ms",
            "hot reload, rename -> optimised code of the new build serving",
            reload.new_build_optimized_ms,
            "ms",
        ),
        Figure::info(
            "reload_known_build_ms",
            "hot reload, rename -> serving (build in compile cache)",
            reload.known_build_ms,
            "ms",
        ),
    ]
}

fn memory_figures(memory: &Memory) -> Vec<Figure> {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    vec![
        Figure::info(
            "rss_idle_mib",
            "host RSS idle (no host started)",
            mib(memory.idle),
            "MiB",
        ),
        Figure::info(
            "rss_loaded_mib",
            "host RSS, both plugins loaded",
            mib(memory.loaded),
            "MiB",
        ),
        Figure::below(
            "rss_under_load_mib",
            "host RSS, both plugins, under load (peak of the 1-host runs)",
            mib(memory.under_load),
            "MiB",
            100.0,
            false,
        ),
    ]
}

/// Waits, at most 10 s, until etcd has used under 5% of a core for 200 ms. The plugin phase
/// times calls of ~0.1 ms on a 2-core machine right after the ceiling's 20,000 writes, and
/// should not share the machine with etcd finishing them.
async fn until_etcd_is_idle(etcd_pid: Option<u32>) -> Duration {
    let Some(pid) = etcd_pid else {
        return Duration::ZERO;
    };
    let started = Instant::now();
    let window = Duration::from_millis(200);
    while started.elapsed() < Duration::from_secs(10) {
        let Ok(before) = stats::cpu_time(Some(pid)) else {
            break;
        };
        tokio::time::sleep(window).await;
        let Ok(after) = stats::cpu_time(Some(pid)) else {
            break;
        };
        if after.saturating_sub(before) < window / 20 {
            break;
        }
    }
    started.elapsed()
}

fn progress(message: &str) {
    eprintln!("# {message}");
}
