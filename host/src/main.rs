//! The `esi-host` command line: parse arguments, call the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use esi_host::bench::{self, BenchConfig};
use esi_host::demo::{self, DemoConfig};
use esi_host::inspect::{self, JobQueue};
use esi_host::keys::Keys;
use esi_host::plugins::{compiler, Limits, Tier};
use esi_host::schema::SchemaRegistry;
use esi_host::settings::{self, RunSettings, SettingsError};
use esi_host::store::Store;
use esi_host::{templates, vlan, Host};

/// Worker daemon of an ESI-style orchestrator on etcd.
#[derive(Parser)]
#[command(name = "esi-host", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the job manager and the worker until SIGINT or SIGTERM.
    Run(Box<RunArgs>),
    /// Manage heat templates.
    #[command(subcommand)]
    Templates(TemplatesCommand),
    /// Start a private etcd, run a host and show the seed's four records appear.
    Demo(DemoArgs),
    /// Inspect VLAN pools.
    #[command(subcommand)]
    Vlan(VlanCommand),
    /// The fleet's plugins, and offline validation of a component.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Print a shell completion script, e.g. `esi-host completions bash > /etc/bash_completion.d/esi-host`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Inspect jobs (the queues under /jobs/ and the dead jobs) and retry a dead one.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Inspect one resource: its config, /state, job state, monitoring and jobs.
    #[command(subcommand)]
    Resource(ResourceCommand),
    /// Measure this machine: etcd ceiling, end-to-end jobs/s and latency, etcd round trips
    /// per job, plugin cost, hot reload and memory, against the goals of issue #6.
    Bench(BenchArgs),
    /// Internal: compiles the component on stdin into --output, for a host's plugin loader.
    #[command(name = compiler::SUBCOMMAND, hide = true)]
    CompileComponent(CompileArgs),
}

#[derive(Subcommand)]
enum JobsCommand {
    /// List jobs: id, handler, resource, attempts, age and owner host.
    ///
    /// Without --state: every job under /jobs/ and then every dead job, with a QUEUE column
    /// (ready, waiting, working, finished, unqueued = its claim vanished and the job manager has
    /// not re-queued it yet, dead).
    ///
    /// AGE: etcd keeps no timestamps and job records carry none, so a live job's age is the
    /// number of etcd revisions since its /jobs/all record was written (e.g. `17rev`; every
    /// etcd write counts); a dead job's is the time since it failed (`42s`, `5m`, `3h`, `2d`).
    /// OWNER: the host registered (/esi-worker/hosts/<id>) on the lease of the job's claim;
    /// `?` when no host record is on that lease, `-` when the job is not claimed.
    ///
    /// --json prints {"revision": N, "jobs": [{"id", "queue", "handler", "resource_type",
    /// "resource_id", "attempts", "age_seconds", "age_revisions", "owner_host", "error",
    /// "record_problem"}]}; unknown values are null.
    List {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Only the jobs in this queue.
        #[arg(long, value_enum)]
        state: Option<JobStateArg>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one job: its record, the queues holding it, its claim, finished value and dead-job
    /// record.
    ///
    /// --json prints {"id", "handler", "resource_type", "resource_id", "queues": [...],
    /// "record": {"key", "create_revision", "mod_revision", "attempts", "value", "problem"},
    /// "claim": {"key", "reservation", "lease", "owner_host"}, "finished": {"key", "value",
    /// "failed"}, "dead": {"key", "mod_revision", "error", "attempts", "failed_at_unix",
    /// "age_seconds", "job", "problem"}}; an absent part is null. Exits non-zero if no key of
    /// the job exists.
    Show {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The job id (`<action>:<handler>:<type>:<resource_id>:<version>:<suffix>`).
        job_id: String,
    },
    /// Re-run one dead job: put it back to ready with attempts reset to 0.
    ///
    /// Only a dead job (/esi-worker/dead_jobs/<id>) whose record the job manager has cleaned
    /// can be retried: in one transaction, and only if /jobs/all/<id> and every queue key of the
    /// id are absent and the dead-job record is unchanged, it writes /jobs/all/<id> (the kept
    /// record, attempts 0) and /jobs/ready/<id> and deletes the dead-job record. Anything else
    /// is refused with a non-zero exit and nothing is written.
    ///
    /// This re-runs that single job. When it failed with on_failure "fail", the rest of its
    /// workflow was cancelled and stays cancelled; to redo a whole workflow, have gohan write
    /// the resource's config again (a new version).
    Retry {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// The dead job's id.
        job_id: String,
    },
}

/// The queues `jobs list --state` filters on.
#[derive(Clone, Copy, ValueEnum)]
enum JobStateArg {
    Ready,
    Waiting,
    Working,
    Dead,
}

impl From<JobStateArg> for JobQueue {
    fn from(state: JobStateArg) -> Self {
        match state {
            JobStateArg::Ready => JobQueue::Ready,
            JobStateArg::Waiting => JobQueue::Waiting,
            JobStateArg::Working => JobQueue::Working,
            JobStateArg::Dead => JobQueue::Dead,
        }
    }
}

#[derive(Subcommand)]
enum ResourceCommand {
    /// Show one resource: config (version, body), /state, job state, monitoring record,
    /// monitoring targets, and its jobs (under /jobs/ and dead).
    ///
    /// --json prints {"resource_type", "plural", "resource_id", "config": {"key",
    /// "mod_revision", "version", "marked_for_deletion", "body", "problem"}, "state",
    /// "job_state", "monitoring", "monitoring_targets" (each {"key", "mod_revision", "value"}),
    /// "jobs": [rows as in `jobs list --json`]}; an absent record is null. Exits non-zero if
    /// nothing at all is stored for the resource.
    Show {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The resource type, singular (ha_interface) or plural (ha_interfaces).
        resource_type: String,
        /// The resource id.
        resource_id: String,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Every plugin on every running host (/esi-worker/plugins/<host>/<plugin>): version,
    /// sha256, handlers, failures by kind and state (active, or rejected: <why>).
    List {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate a component and its manifest (<name>.toml beside it) as a host would load
    /// them, without etcd. Exits non-zero with the reason if a host would reject it.
    Check {
        /// The component file.
        component: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VlanCommand {
    /// Show an ha_interface's pool: available count, restricted and allocated ranges, owners.
    Show {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The ha_interface id.
        ha_interface_id: String,
    },
}

#[derive(Args)]
struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long = "etcd",
        env = "ESI_ETCD",
        value_delimiter = ',',
        required = true
    )]
    endpoints: Vec<String>,
    /// Root namespace for every key (empty: the layout gohan reads).
    #[arg(long, env = "ESI_KEY_ROOT", default_value = "")]
    key_root: String,
}

#[derive(Args)]
struct RunArgs {
    /// A TOML file with any of the settings below (same names, `_` for `-`). Flags and their
    /// environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// etcd endpoints, comma-separated.
    #[arg(long = "etcd", env = "ESI_ETCD", value_delimiter = ',')]
    endpoints: Option<Vec<String>>,
    /// Root namespace for every key (empty: the layout gohan reads).
    #[arg(long, env = "ESI_KEY_ROOT")]
    key_root: Option<String>,
    /// Directory of plugin components (*.wasm, with *.toml manifests).
    #[arg(long = "plugins", env = "ESI_PLUGINS")]
    plugin_dir: Option<PathBuf>,
    /// TTL of the host's etcd lease, in seconds (2-3600, default 60); claims vanish this long
    /// after the host dies.
    #[arg(long)]
    lease_ttl: Option<u64>,
    /// Name of this host in logs and fleet records (default: <hostname>-<pid>).
    #[arg(long)]
    host_id: Option<String>,
    /// A gohan schema file to use instead of the built-in ESI schemas.
    #[arg(long)]
    schemas: Option<PathBuf>,
    /// Jobs this host runs at once (1-4096, default 64).
    #[arg(long)]
    concurrency: Option<u64>,
    /// Handlers served by workers outside this host (their jobs are planned, not run here).
    #[arg(long = "external-handler", value_delimiter = ',')]
    external_handlers: Option<Vec<String>>,
    /// On SIGTERM/SIGINT, seconds in-flight jobs may run before they are handed back to ready
    /// (default 25).
    #[arg(long)]
    drain_timeout: Option<u64>,
    /// Directory of compiled plugins kept across restarts (default: ~/.cache/esi-host).
    #[arg(long, env = "ESI_COMPILE_CACHE")]
    compile_cache: Option<PathBuf>,
    /// Compile every plugin at start, keeping no cache.
    #[arg(long, conflicts_with = "compile_cache")]
    no_compile_cache: bool,
    /// Run only the worker role (no job manager).
    #[arg(long)]
    worker_only: bool,
    /// Do not watch the plugin directory for new or changed plugins.
    #[arg(long)]
    no_hot_reload: bool,
    /// Attempts after which a retryable failure (or a job whose workers kept dying) fails
    /// (default 5).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// First delay before a failed job runs again, in milliseconds; doubles per attempt
    /// (default 500).
    #[arg(long)]
    retry_backoff_ms: Option<u64>,
    /// Longest delay between retries of a failed job, in milliseconds (default 30000).
    #[arg(long)]
    retry_backoff_max_ms: Option<u64>,
    /// First delay before the job manager re-queues a job whose worker died, in milliseconds;
    /// doubles per attempt, with jitter (default 500).
    #[arg(long)]
    requeue_backoff_ms: Option<u64>,
    /// Longest re-queue delay, in milliseconds (default 30000).
    #[arg(long)]
    requeue_backoff_max_ms: Option<u64>,
    /// etcd's --max-request-bytes (default 1572864, etcd's own): the job manager fails a
    /// resource whose workflow would not fit and cuts its batches of writes to fit.
    #[arg(long)]
    etcd_max_request_bytes: Option<u64>,
    /// Milliseconds, per rank, a host waits before it claims a job other hosts serving its
    /// handler rank first (0-10000, default 50; 0: every host claims every job at once).
    #[arg(long)]
    claim_affinity_ms: Option<u64>,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 127.0.0.1:9464.
    #[arg(long)]
    metrics_addr: Option<String>,
}

impl RunArgs {
    /// The settings given on the command line (or through their environment variables).
    fn settings(&self) -> RunSettings {
        RunSettings {
            etcd: self.endpoints.clone(),
            plugins: self.plugin_dir.clone(),
            key_root: self.key_root.clone(),
            lease_ttl: self.lease_ttl,
            host_id: self.host_id.clone(),
            schemas: self.schemas.clone(),
            concurrency: self.concurrency,
            external_handlers: self.external_handlers.clone(),
            drain_timeout: self.drain_timeout,
            compile_cache: self.compile_cache.clone(),
            no_compile_cache: self.no_compile_cache.then_some(true),
            worker_only: self.worker_only.then_some(true),
            hot_reload: self.no_hot_reload.then_some(false),
            max_attempts: self.max_attempts,
            retry_backoff_ms: self.retry_backoff_ms,
            retry_backoff_max_ms: self.retry_backoff_max_ms,
            requeue_backoff_ms: self.requeue_backoff_ms,
            requeue_backoff_max_ms: self.requeue_backoff_max_ms,
            etcd_max_request_bytes: self.etcd_max_request_bytes,
            claim_affinity_ms: self.claim_affinity_ms,
            metrics_addr: self.metrics_addr.clone(),
        }
    }
}

#[derive(Subcommand)]
enum TemplatesCommand {
    /// Write the heat templates in DIR into /config/v2.0/heat_templates/.
    Load {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Directory of template files.
        #[arg(default_value = "templates")]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct CompileArgs {
    #[arg(long, value_parser = ["optimized", "baseline"])]
    tier: String,
    #[arg(long)]
    max_memory_bytes: usize,
    #[arg(long)]
    max_instances: u32,
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    /// Small sizes: finishes in well under a minute.
    #[arg(long)]
    quick: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Directory of plugin components.
    #[arg(long = "plugins", default_value = "target/plugins")]
    plugin_dir: PathBuf,
    /// Directory of heat templates.
    #[arg(long = "templates", default_value = "templates")]
    template_dir: PathBuf,
    /// Run only these phases (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<bench::Phase>,
    /// Also run one host paced at this many configs/s: latency at a fixed load, comparable
    /// across builds (the 50% and 25% runs move with each build's peak).
    #[arg(long, value_name = "CONFIGS_PER_S", value_parser = positive_rate)]
    paced_rate: Option<f64>,
}

/// `--paced-rate`: a rate the bench can pace at (0, negative or NaN would never finish).
fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 1.0 => Ok(rate),
        Ok(_) => Err(format!("{text} is not a rate of at least 1 config/s")),
        Err(e) => Err(format!("{text} is not a number: {e}")),
    }
}

#[derive(Args)]
struct DemoArgs {
    /// Directory of plugin components.
    #[arg(long = "plugins", default_value = "target/plugins")]
    plugin_dir: PathBuf,
    /// Directory of heat templates.
    #[arg(long = "templates", default_value = "templates")]
    template_dir: PathBuf,
    /// How long to wait for the seed's records, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::CompileComponent(args) = &cli.command {
        // A child of a host's plugin loader: no runtime, and only the error on stderr, which
        // the host reports as the compile's.
        return ExitCode::from(compile_component(args));
    }
    let default_level = if matches!(cli.command, Command::Demo(_) | Command::Bench(_)) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("esi-host: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("esi-host: {e:#}");
            if e.downcast_ref::<SettingsError>().is_some() {
                ExitCode::from(EXIT_BAD_SETTINGS)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run(*args).await,
        Command::Templates(TemplatesCommand::Load { etcd, dir }) => {
            let store = Store::connect(&etcd.endpoints, Keys::new(&etcd.key_root)).await?;
            let files = templates::read_dir(&dir)?;
            templates::load(&store, &SchemaRegistry::built_in(), &files).await?;
            println!("loaded {} templates from {}", files.len(), dir.display());
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "esi-host",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Plugins(PluginsCommand::List { etcd, json }) => {
            let store = Store::connect(&etcd.endpoints, Keys::new(&etcd.key_root)).await?;
            let entries = esi_host::plugins::fleet::list(&store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", esi_host::plugins::fleet::render(&entries));
            }
            Ok(())
        }
        Command::Plugins(PluginsCommand::Check { component, json }) => {
            let report = esi_host::plugins::fleet::check(&component).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::Vlan(VlanCommand::Show {
            etcd,
            json,
            ha_interface_id,
        }) => {
            let store = Store::connect(&etcd.endpoints, Keys::new(&etcd.key_root)).await?;
            let view = vlan::show(&store, &SchemaRegistry::built_in(), &ha_interface_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", view.render());
            }
            Ok(())
        }
        Command::Jobs(command) => jobs(command).await,
        Command::Resource(ResourceCommand::Show {
            etcd,
            json,
            resource_type,
            resource_id,
        }) => {
            let store = Store::connect(&etcd.endpoints, Keys::new(&etcd.key_root)).await?;
            let schemas = SchemaRegistry::built_in();
            let view =
                inspect::show_resource(&store, &schemas, &resource_type, &resource_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", view.render());
            }
            Ok(())
        }
        Command::Bench(args) => {
            let report = bench::run(&BenchConfig {
                plugin_dir: args.plugin_dir,
                template_dir: args.template_dir,
                quick: args.quick,
                only: args.only,
                paced_rate: args.paced_rate,
                child_compiler: compiler::own_executable(),
            })
            .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::CompileComponent(args) => match compile_component(&args) {
            0 => Ok(()),
            code => anyhow::bail!("compile-component exited with status {code}"),
        },
        Command::Demo(args) => {
            demo::run(DemoConfig {
                plugin_dir: args.plugin_dir,
                template_dir: args.template_dir,
                timeout: Duration::from_secs(args.timeout),
                child_compiler: compiler::own_executable(),
            })
            .await
        }
    }
}

async fn jobs(command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::List { etcd, state, json } => {
            let store = Store::connect(&etcd.endpoints, Keys::new(&etcd.key_root)).await?;
            let list = inspect::list_jobs(&store, state.map(JobQueue::from)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", inspect::render_job_table(&list.jobs, state.is_none()));
            }
        }
        JobsCommand::Show { etcd, json, job_id } => {
            let store = Store::connect(&etcd.endpoints, Keys::new(&etcd.key_root)).await?;
            let view = inspect::show_job(&store, &job_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", view.render());
            }
        }
        JobsCommand::Retry { etcd, job_id } => {
            let store = Store::connect(&etcd.endpoints, Keys::new(&etcd.key_root)).await?;
            let retried = inspect::retry_job(&store, &job_id).await?;
            println!(
                "job {} re-queued at {} with attempts reset to 0 (it had failed after {} attempts: {})",
                retried.id,
                retried.ready_key,
                retried.failed_attempts.map_or("?".to_string(), |a| a.to_string()),
                retried.error
            );
        }
    }
    Ok(())
}

/// Exit status for a start-up refused because of a setting (as clap uses for bad flags).
const EXIT_BAD_SETTINGS: u8 = 2;

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => RunSettings::from_file(path)?,
        None => RunSettings::default(),
    };
    let mut config = file.overlay(args.settings()).into_host_config()?;
    config.child_compiler = compiler::own_executable();
    settings::check_etcd_reachable(&config.etcd_endpoints, Duration::from_secs(5)).await?;
    Host::start(config).await?.run_until_signalled().await
}

fn compile_component(args: &CompileArgs) -> u8 {
    let tier = if args.tier == "baseline" {
        Tier::Baseline
    } else {
        Tier::Optimized
    };
    let limits = Limits {
        max_memory_bytes: args.max_memory_bytes,
        max_instances: args.max_instances,
        ..Limits::default()
    };
    compiler::child_main(tier, &limits, &args.output)
}

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
