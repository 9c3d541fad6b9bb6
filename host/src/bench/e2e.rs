//! End to end: ha_interface configs written as gohan writes them, until their `/state` says
//! `CREATE_COMPLETED`, through real hosts ([`Host::start`]) on the bench's etcd.
//!
//! Latency is taken where gohan would see it: a client-side timestamp just before each config
//! PUT, and one when a watch on the `/state` prefix (opened at the revision before the burst,
//! so nothing is missed) delivers that resource's completed state. Throughput is the number of
//! resources divided by the time from the first PUT to the last state.
//!
//! What a job costs in etcd is counted two ways, both over the same window (from the revision
//! before the burst until the job manager has cleaned every finished job):
//! - **commits**: the etcd revision delta, since every committed write transaction (or plain
//!   put/delete) bumps the revision by exactly one, minus the config PUTs the bench made;
//! - **round trips by kind**: the process-wide store counters minus the bench's own store,
//!   i.e. what the hosts did (gets, transactions including refused ones, watch events...).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::stats::{
    cpu_time, etcd_disk, for_each_concurrent, median, EtcdDisk, RssSampler, Summary,
};
use crate::host::{Host, HostConfig};
use crate::keys::{Keys, Queue, Record};
use crate::protocol::JobId;
use crate::schema::{Schema, SchemaRegistry};
use crate::seed;
use crate::store::counters::{CounterSnapshot, StoreCounters};
use crate::store::{Change, Store, Watch};
use crate::templates::{self, TemplateFile};

/// Config PUTs in flight at once in a burst: gohan serves many API clients at once.
const WRITERS: usize = 64;

/// How long after the last job is cleaned the window stays open. The job manager checks a
/// vanished claim after a backoff of up to `requeue_backoff` (500 ms) in a task of its own,
/// usually for a job that completed but whose finished key it had not seen yet; those checks
/// belong to the run that caused them.
const SETTLE: Duration = Duration::from_millis(700);

/// Resources run through a fresh fleet before anything is measured, so that plugin instances,
/// connections and the job manager's caches are warm.
const WARMUP: usize = 16;

/// One run: a burst (as fast as etcd takes the PUTs) or a paced stream of configs.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub label: String,
    pub hosts: usize,
    pub jobs: usize,
    /// Configs written per second, for a paced run.
    pub offered_per_s: Option<f64>,
    pub jobs_per_s: f64,
    /// Config PUT to `/state` PUT delivered by the watch.
    pub latency: Summary,
    pub cost: JobCost,
    /// Highest VmRSS of the process during the run.
    pub rss_peak_bytes: u64,
    /// The slowest resources: when their config was written (seconds into the run) and how
    /// long their state took, to tell a steady tail from a stall.
    pub slowest: Vec<Slow>,
    /// Median latency of each tenth of the resources in the order their configs were sent:
    /// rising means first come, first served; falling means the oldest work waits longest.
    pub p50_ms_by_send_decile: Vec<f64>,
    /// CPU time per job of this process (the hosts, plus the bench's own small share) and of
    /// etcd, over the run: with both summed against the cores, a saturated machine shows.
    pub host_cpu_ms_per_job: f64,
    pub etcd_cpu_ms_per_job: Option<f64>,
    /// How many jobs sat in `/jobs/ready/` and `/jobs/working/` while the run went on: a
    /// ready queue near zero with few jobs working means the job manager could not feed the
    /// worker; a long ready queue means the worker could not keep up.
    pub queues: QueueDepth,
    /// etcd's disk waits over the run, and how many were slow: a slow WAL sync or backend
    /// commit stalls every commit behind it, a latency tail the host did not cause.
    pub etcd_disk: Option<EtcdDisk>,
    /// Where the latency went, stage by stage (see [`Stages`]).
    pub stages: Stages,
}

/// A resource's way from config PUT to `/state`, cut where the bench's watches see it move:
/// - `put`: the bench's config PUT, from sending it until etcd answered;
/// - `manager`: from that answer until its job appeared in `/jobs/ready/` (the job manager
///   saw the config, read its state and wrote the workflow);
/// - `claim`: from ready until the job appeared in `/jobs/working/` (a worker claimed it);
/// - `run`: from working until the completed `/state` arrived (the plugin call and the
///   completion transaction).
///
/// Each stage's end is when the bench's own watch delivered the event, so every stage but
/// `put` includes one watch delivery; the four add up to the resource's latency. A resource
/// whose job the bench did not see in both queues is left out (the watches start before the
/// first PUT and drop no event, so the bench test expects none to be).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stages {
    pub put: Summary,
    pub manager: Summary,
    pub claim: Summary,
    pub run: Summary,
}

/// The stage times of one resource, in milliseconds: put, manager, claim, run.
type StageTimes = [f64; 4];

impl Stages {
    fn of(resources: impl Iterator<Item = [Duration; 4]>) -> Stages {
        let mut each: [Vec<Duration>; 4] = Default::default();
        for stages in resources {
            for (all, stage) in each.iter_mut().zip(stages) {
                all.push(stage);
            }
        }
        let [put, manager, claim, run] = each.map(Summary::of);
        Stages {
            put,
            manager,
            claim,
            run,
        }
    }
}

/// When the bench's watches first saw each resource's job ready and working, by resource id.
#[derive(Debug, Default)]
struct Seen {
    ready: HashMap<String, Instant>,
    working: HashMap<String, Instant>,
}

impl Seen {
    /// The stages of the resource sent as `sent` and completed at `done`; `None` unless its
    /// job was seen in both queues. The queues are separate watches, so a claim can be
    /// delivered just before the ready key it replaced: each stage starts where the previous
    /// one ended, never before.
    fn stages(&self, sent: &Sent, done: Instant) -> Option<[Duration; 4]> {
        let (ready, working) = (*self.ready.get(&sent.id)?, *self.working.get(&sent.id)?);
        let ready = ready.max(sent.acked);
        let working = working.max(ready);
        Some([
            sent.acked - sent.at,
            ready - sent.acked,
            working - ready,
            done.saturating_duration_since(working),
        ])
    }
}

/// Sampled queue lengths of a run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueueDepth {
    pub samples: usize,
    pub ready_mean: f64,
    pub ready_max: usize,
    pub working_mean: f64,
    pub working_max: usize,
}

/// Samples the ready and working queues every 50 ms until stopped.
///
/// It lists each queue once and then follows it by watch. Listing both queues every 50 ms
/// slowed the runs it measured: until etcd compacts, a range walks every key the prefix
/// ever held, deleted ones included, and it holds etcd's index lock while it does, which
/// every commit needs. After 50,000 jobs each pair of listings took 30 ms, and the median
/// latency of one run repeated at the same rate rose from 10 to 33 ms.
struct QueueSampler {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<(QueueDepth, Seen)>,
}

/// The keys under one queue prefix, kept up to date by a watch, and when the job of each
/// resource first appeared there.
struct Followed {
    keys: HashSet<String>,
    watch: Watch,
    queue: Queue,
    layout: Keys,
    first_seen: HashMap<String, Instant>,
}

impl Followed {
    async fn start(store: &Store, queue: Queue) -> anyhow::Result<Followed> {
        let layout = store.keys().clone();
        let prefix = layout.queue_prefix(queue);
        let (kvs, revision) = store.list(&prefix).await?;
        let watch = store.watch(&prefix, revision + 1).await?;
        let keys = kvs.into_iter().map(|kv| kv.key).collect();
        Ok(Followed {
            keys,
            watch,
            queue,
            layout,
            first_seen: HashMap::new(),
        })
    }

    fn apply(&mut self, changes: Vec<Change>) {
        let now = Instant::now();
        for change in changes {
            match change {
                Change::Put(kv) => {
                    let job = self.layout.parse_job_key(self.queue, &kv.key);
                    if let Some(Ok(id)) = job.map(str::parse::<JobId>) {
                        self.first_seen.entry(id.resource_id).or_insert(now);
                    }
                    self.keys.insert(kv.key)
                }
                Change::Delete { key, .. } => self.keys.remove(&key),
            };
        }
    }
}

impl QueueSampler {
    /// Starts following both queues before it returns, so that the run's first jobs are seen.
    async fn start(store: &Store) -> QueueSampler {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let (ready, working) = (
            Followed::start(store, Queue::Ready).await,
            Followed::start(store, Queue::Working).await,
        );
        let task = tokio::spawn(async move {
            let (Ok(mut ready), Ok(mut working)) = (ready, working) else {
                tracing::warn!("bench: cannot follow the job queues; no queue depths this run");
                return (QueueDepth::default(), Seen::default());
            };
            let (mut depth, mut ready_sum, mut working_sum) = (QueueDepth::default(), 0, 0);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    changes = ready.watch.next() => match changes {
                        Ok(changes) => ready.apply(changes),
                        Err(e) => {
                            tracing::warn!(error = %e, "bench: queue depths end early");
                            break;
                        }
                    },
                    changes = working.watch.next() => match changes {
                        Ok(changes) => working.apply(changes),
                        Err(e) => {
                            tracing::warn!(error = %e, "bench: queue depths end early");
                            break;
                        }
                    },
                    _ = tick.tick() => {
                        let (r, w) = (ready.keys.len(), working.keys.len());
                        depth.samples += 1;
                        (ready_sum, working_sum) = (ready_sum + r, working_sum + w);
                        depth.ready_max = depth.ready_max.max(r);
                        depth.working_max = depth.working_max.max(w);
                    }
                }
            }
            let n = depth.samples.max(1) as f64;
            depth.ready_mean = ready_sum as f64 / n;
            depth.working_mean = working_sum as f64 / n;
            let seen = Seen {
                ready: ready.first_seen,
                working: working.first_seen,
            };
            (depth, seen)
        });
        QueueSampler { stop, task }
    }

    async fn stop(self) -> (QueueDepth, Seen) {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

/// One slow resource of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Slow {
    pub sent_at_s: f64,
    pub latency_ms: f64,
    /// Its stages (put, manager, claim, run; see [`Stages`]), when the bench saw them all.
    pub stages_ms: Option<StageTimes>,
}

/// What the jobs of one run cost in etcd (see the module docs).
#[derive(Debug, Clone, Serialize)]
pub struct JobCost {
    /// etcd revisions (commits) per job, the bench's own PUTs excluded.
    pub commits_per_job: f64,
    /// Write requests the hosts sent that etcd did not commit (a compare failed), per job.
    pub refused_per_job: f64,
    /// The hosts' round trips over the run.
    pub host_ops: CounterSnapshot,
    pub per_job: OpsPerJob,
}

/// [`CounterSnapshot`] divided by the number of jobs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OpsPerJob {
    pub get: f64,
    pub list: f64,
    pub put: f64,
    pub delete: f64,
    pub txn: f64,
    /// Transactions, counting each one nested in a batch or group commit.
    pub txn_logical: f64,
    pub watch_events: f64,
}

impl OpsPerJob {
    fn of(ops: &CounterSnapshot, jobs: usize) -> OpsPerJob {
        let per = |n: u64| n as f64 / jobs.max(1) as f64;
        OpsPerJob {
            get: per(ops.get),
            list: per(ops.list),
            put: per(ops.put),
            delete: per(ops.delete),
            txn: per(ops.txn),
            txn_logical: per(ops.txn + ops.txn_shared),
            watch_events: per(ops.watch_events),
        }
    }
}

/// One resource of a run: its config and the two interface states its monitoring job reads.
struct Resource {
    /// The ha_interface's id, which its job ids carry.
    id: String,
    config_key: String,
    envelope: String,
    state_key: String,
    interface_states: [(String, String); 2],
}

/// Hosts sharing the bench's etcd under one key root, and the bench's own client.
pub struct Fleet {
    store: Store,
    /// The bench's etcd, for its `/metrics`.
    endpoint: String,
    schemas: SchemaRegistry,
    hosts: Vec<Host>,
    /// etcd's process, for its CPU time.
    etcd_pid: Option<u32>,
    /// Numbers the runs, so that every run's resource ids are new.
    runs: u32,
    /// The hosts' compile cache, new and empty: the first host compiles the plugins, as a
    /// host does on its first start or for a new build, and the memory figures include it.
    _compile_cache: tempfile::TempDir,
}

impl Fleet {
    /// Loads the templates under `root` and starts `hosts` hosts there (see [`Fleet::warm_up`]).
    pub async fn start(
        endpoint: &str,
        root: &str,
        plugin_dir: &Path,
        templates: &[TemplateFile],
        hosts: usize,
        etcd_pid: Option<u32>,
        child_compiler: Option<&Path>,
    ) -> anyhow::Result<Fleet> {
        let schemas = SchemaRegistry::built_in();
        let store = Store::connect(&[endpoint.to_string()], Keys::new(root))
            .await
            .context("connecting the bench's etcd client")?;
        templates::load(&store, &schemas, templates)
            .await
            .context("loading the heat templates")?;
        let compile_cache = tempfile::Builder::new()
            .prefix("esi-bench-compile-cache-")
            .tempdir()
            .context("creating the bench hosts' compile cache")?;
        let mut fleet = Fleet {
            store,
            endpoint: endpoint.to_string(),
            schemas,
            hosts: Vec::with_capacity(hosts),
            etcd_pid,
            runs: 0,
            _compile_cache: compile_cache,
        };
        for i in 1..=hosts {
            let mut config = HostConfig::new(vec![endpoint.to_string()], plugin_dir.to_path_buf());
            config.key_root = root.to_string();
            config.host_id = format!("bench-host-{i}-of-{hosts}");
            config.compile_cache = Some(fleet._compile_cache.path().to_path_buf());
            config.child_compiler = child_compiler.map(Path::to_path_buf);
            match Host::start(config).await {
                Ok(host) => fleet.hosts.push(host),
                Err(e) => {
                    fleet.shutdown().await;
                    return Err(e.context(format!("starting bench host {i} of {hosts}")));
                }
            }
        }
        Ok(fleet)
    }

    /// Runs a few resources through, unmeasured.
    pub async fn warm_up(&mut self) -> anyhow::Result<()> {
        self.run("warm-up", WARMUP, None)
            .await
            .context("warming up the hosts")
            .map(drop)
    }

    /// Stops every host (draining it).
    pub async fn shutdown(self) {
        for host in self.hosts {
            host.shutdown().await;
        }
    }

    /// etcd's disk waits so far; `None` (with a warning) when its `/metrics` cannot be read.
    async fn disk(&self) -> Option<EtcdDisk> {
        match etcd_disk(&self.endpoint).await {
            Ok(disk) => Some(disk),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "bench: no etcd disk counts this run"
                );
                None
            }
        }
    }

    fn ha_interface(&self) -> anyhow::Result<&Schema> {
        self.schemas
            .get("ha_interface")
            .map(|schema| &**schema)
            .context("the built-in schemas have no ha_interface")
    }

    /// Writes `jobs` new ha_interfaces (all at once, or `pace` per second) and waits for
    /// every one's `/state`, then for the job manager to clean up.
    pub async fn run(
        &mut self,
        label: &str,
        jobs: usize,
        pace: Option<f64>,
    ) -> anyhow::Result<RunResult> {
        self.runs += 1;
        let resources = self.resources(self.runs, jobs)?;
        self.prepare(&resources).await?;
        let keys = self.store.keys().clone();
        let state_prefix = keys.record(Record::State, self.ha_interface()?, "");
        let jobs_prefix = keys.jobs_prefix();
        let (_, before) = self.store.list(&jobs_prefix).await?;
        let host_ops_before = self.host_ops();
        let cpu_before = (
            cpu_time(None)?,
            self.etcd_pid.map(|p| cpu_time(Some(p))).transpose()?,
        );
        let disk_before = self.disk().await;
        let watch = self.store.watch(&state_prefix, before + 1).await?;
        let expected: HashSet<String> = resources.iter().map(|r| r.state_key.clone()).collect();
        // Generous: a stuck workflow must end the bench with a message, not hang it.
        let timeout = Duration::from_secs(60) + Duration::from_millis(50) * jobs as u32;
        let deadline = Instant::now() + timeout;
        let watcher = tokio::spawn(collect_states(watch, expected, deadline));
        let sampler = RssSampler::start(Duration::from_millis(25));
        let queue_sampler = QueueSampler::start(&self.store).await;
        let sent = match pace {
            None => self.write_burst(resources).await,
            Some(rate) => self.write_paced(resources, rate).await,
        };
        let delivered = watcher.await.context("the state watcher panicked")?;
        let rss_peak_bytes = sampler.stop().await;
        let (queues, seen) = queue_sampler.stop().await;
        let (sent, delivered) = (sent?, delivered?);
        wait_jobs_drained(&self.store, &jobs_prefix, deadline).await?;
        tokio::time::sleep(SETTLE).await;
        let after = wait_jobs_drained(&self.store, &jobs_prefix, deadline).await?;
        let host_ops = self.host_ops().since(&host_ops_before);
        let cpu_after = (
            cpu_time(None)?,
            self.etcd_pid.map(|p| cpu_time(Some(p))).transpose()?,
        );
        let etcd_disk = match (disk_before, self.disk().await) {
            (Some(before), Some(after)) => Some(after.since(before)),
            _ => None,
        };
        let per_job_ms = |d: Duration| super::stats::ms(d) / jobs.max(1) as f64;
        let host_cpu_ms_per_job = per_job_ms(cpu_after.0.saturating_sub(cpu_before.0));
        let etcd_cpu_ms_per_job = match (cpu_before.1, cpu_after.1) {
            (Some(before), Some(after)) => Some(per_job_ms(after.saturating_sub(before))),
            _ => None,
        };

        let first_sent = sent
            .values()
            .map(|s| s.at)
            .min()
            .unwrap_or_else(Instant::now);
        // (sent, latency, stages) of every resource whose state arrived.
        let mut timed: Vec<(Instant, Duration, Option<[Duration; 4]>)> = delivered
            .iter()
            .filter_map(|(key, done)| {
                let s = sent.get(key)?;
                let stages = seen.stages(s, *done);
                Some((s.at, done.saturating_duration_since(s.at), stages))
            })
            .collect();
        let stages = Stages::of(timed.iter().filter_map(|(_, _, stages)| *stages));
        timed.sort_by_key(|(_, latency, _)| std::cmp::Reverse(*latency));
        let slowest = timed
            .iter()
            .take(5)
            .map(|(s, latency, stages)| Slow {
                sent_at_s: s.saturating_duration_since(first_sent).as_secs_f64(),
                latency_ms: super::stats::ms(*latency),
                stages_ms: stages.map(|stages| stages.map(super::stats::ms)),
            })
            .collect();
        timed.sort_by_key(|(sent_at, _, _)| *sent_at);
        let decile = timed.len().div_ceil(10).max(1);
        let p50_ms_by_send_decile = timed
            .chunks(decile)
            .map(|chunk| super::stats::ms(median(chunk.iter().map(|(_, l, _)| *l).collect())))
            .collect();
        let latencies: Vec<Duration> = timed.into_iter().map(|(_, latency, _)| latency).collect();
        let last_state = delivered.values().max().copied().unwrap_or(first_sent);
        let span = last_state.saturating_duration_since(first_sent);
        let bench_writes = i64::try_from(jobs).unwrap_or(i64::MAX);
        let commits = (after - before - bench_writes).max(0);
        let requests = host_ops.txn + host_ops.put + host_ops.delete;
        Ok(RunResult {
            label: label.to_string(),
            hosts: self.hosts.len(),
            jobs,
            offered_per_s: pace,
            jobs_per_s: jobs as f64 / span.as_secs_f64().max(1e-9),
            latency: Summary::of(latencies),
            cost: JobCost {
                commits_per_job: commits as f64 / jobs.max(1) as f64,
                refused_per_job: requests.saturating_sub(commits.unsigned_abs()) as f64
                    / jobs.max(1) as f64,
                host_ops,
                per_job: OpsPerJob::of(&host_ops, jobs),
            },
            rss_peak_bytes,
            slowest,
            p50_ms_by_send_decile,
            host_cpu_ms_per_job,
            etcd_cpu_ms_per_job,
            queues,
            etcd_disk,
            stages,
        })
    }

    /// What every store of the process did, minus the bench's own.
    fn host_ops(&self) -> CounterSnapshot {
        let everyone = StoreCounters::process_totals().snapshot();
        everyone.since(&self.store.counters().snapshot())
    }

    /// `jobs` distinct ha_interfaces, each with its own two er_physical_interfaces.
    fn resources(&self, run: u32, jobs: usize) -> anyhow::Result<Vec<Resource>> {
        let keys = self.store.keys();
        let ha = self.ha_interface()?;
        let interface = self
            .schemas
            .get("er_physical_interface")
            .context("the built-in schemas have no er_physical_interface")?;
        let template = seed::records()?[0]
            .value
            .get("body")
            .cloned()
            .context("seed record (1) has no body")?;
        let interface_state = json!({
            "state": {"state_monitoring": json!({"interface": "ACTIVE"}).to_string(),
                      "worker_state": "CREATE_COMPLETED"},
            "version": 1, "error": ""})
        .to_string();
        Ok((0..jobs)
            .map(|i| {
                // uuid-shaped ids: run number, role (0 = ha_interface, 1/2 = its interfaces), index.
                let id = |role: u32| format!("be{run:06x}-000{role}-4000-8000-{i:012}");
                let (ha_id, primary, secondary) = (id(0), id(1), id(2));
                let mut body = template.clone();
                body["id"] = Value::String(ha_id.clone());
                body["primary_interface_id"] = Value::String(primary.clone());
                body["secondary_interface_id"] = Value::String(secondary.clone());
                Resource {
                    config_key: keys.record(Record::Config, ha, &ha_id),
                    envelope: seed::gohan_envelope(&body, 1),
                    state_key: keys.record(Record::State, ha, &ha_id),
                    id: ha_id,
                    interface_states: [
                        (
                            keys.record(Record::State, interface, &primary),
                            interface_state.clone(),
                        ),
                        (
                            keys.record(Record::State, interface, &secondary),
                            interface_state.clone(),
                        ),
                    ],
                }
            })
            .collect())
    }

    /// Writes the interface states the jobs will read (before the clock starts).
    async fn prepare(&self, resources: &[Resource]) -> anyhow::Result<()> {
        let puts: Vec<(String, String)> = resources
            .iter()
            .flat_map(|r| r.interface_states.iter().cloned())
            .collect();
        let store = self.store.clone();
        for_each_concurrent(puts, WRITERS, move |(key, value)| {
            let store = store.clone();
            async move { Ok(store.put(&key, value).await?) }
        })
        .await
        .context("writing the interface states")
    }

    /// PUTs every config, `WRITERS` at once. Returns when each was sent and answered, by
    /// state key.
    async fn write_burst(&self, resources: Vec<Resource>) -> anyhow::Result<SentMap> {
        let sent = Arc::new(Mutex::new(HashMap::with_capacity(resources.len())));
        let (store, record) = (self.store.clone(), sent.clone());
        for_each_concurrent(resources, WRITERS, move |r| {
            let (store, record) = (store.clone(), record.clone());
            async move { put_config(&store, &record, r).await }
        })
        .await?;
        Ok(take(&sent))
    }

    /// PUTs the configs at `rate` per second, each on its own task so that a slow PUT does
    /// not hold back the next. Finished tasks are reaped as the run goes: a `JoinSet` keeps
    /// a task's allocation until it is joined, and 10,000 unjoined writers added ~90 MiB to
    /// the process's peak RSS, which the run reports as the host's.
    async fn write_paced(&self, resources: Vec<Resource>, rate: f64) -> anyhow::Result<SentMap> {
        let sent = Arc::new(Mutex::new(HashMap::with_capacity(resources.len())));
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for (i, r) in resources.into_iter().enumerate() {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            while let Some(done) = tasks.try_join_next() {
                done.context("a config writer panicked")??;
            }
            let (store, record) = (self.store.clone(), sent.clone());
            tasks.spawn(async move { put_config(&store, &record, r).await });
        }
        while let Some(done) = tasks.join_next().await {
            done.context("a config writer panicked")??;
        }
        Ok(take(&sent))
    }
}

/// When a config PUT was sent and when etcd answered it.
#[derive(Debug, Clone)]
struct Sent {
    /// The resource's id.
    id: String,
    at: Instant,
    acked: Instant,
}

type SentMap = HashMap<String, Sent>;

async fn put_config(store: &Store, sent: &Mutex<SentMap>, r: Resource) -> anyhow::Result<()> {
    let at = Instant::now();
    store
        .put(&r.config_key, r.envelope)
        .await
        .with_context(|| format!("writing config {}", r.config_key))?;
    let acked = Instant::now();
    sent.lock().unwrap_or_else(PoisonError::into_inner).insert(
        r.state_key,
        Sent {
            id: r.id,
            at,
            acked,
        },
    );
    Ok(())
}

fn take(sent: &Mutex<SentMap>) -> SentMap {
    std::mem::take(&mut *sent.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Follows the `/state` watch until every expected key says `*_COMPLETED`; when each arrived.
async fn collect_states(
    mut watch: Watch,
    mut expected: HashSet<String>,
    deadline: Instant,
) -> anyhow::Result<HashMap<String, Instant>> {
    let total = expected.len();
    let mut delivered = HashMap::with_capacity(total);
    while !expected.is_empty() {
        let Ok(changes) = tokio::time::timeout_at(deadline, watch.next()).await else {
            bail!(
                "only {} of {total} resources reached CREATE_COMPLETED in time; one still \
                 waiting is {:?}",
                delivered.len(),
                expected.iter().next()
            );
        };
        let now = Instant::now();
        for change in changes.context("watching the resources' /state")? {
            let Change::Put(kv) = change else { continue };
            if !expected.contains(&kv.key) {
                continue;
            }
            let state: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            let worker_state = state["state"]["worker_state"].as_str().unwrap_or("");
            if worker_state.ends_with("_FAILED") {
                bail!("{} failed: {}", kv.key, state["error"]);
            }
            if worker_state.ends_with("_COMPLETED") {
                expected.remove(&kv.key);
                delivered.insert(kv.key, now);
            }
        }
    }
    Ok(delivered)
}

/// Waits until nothing is left under `/jobs/`; the revision at which that was seen.
async fn wait_jobs_drained(store: &Store, prefix: &str, deadline: Instant) -> anyhow::Result<i64> {
    loop {
        let (left, revision) = store.list(prefix).await?;
        if left.is_empty() {
            return Ok(revision);
        }
        if Instant::now() > deadline {
            bail!(
                "{} job keys were still under {prefix} at the deadline, e.g. {}",
                left.len(),
                left[0].key
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn stages_add_up_to_the_latency_and_never_run_backwards() {
        let t0 = Instant::now();
        let sent = |id: &str| Sent {
            id: id.to_string(),
            at: t0,
            acked: t0 + ms(1),
        };
        let mut seen = Seen::default();
        seen.ready.insert("r1".into(), t0 + ms(4));
        seen.working.insert("r1".into(), t0 + ms(6));
        let stages = seen.stages(&sent("r1"), t0 + ms(10));
        assert_eq!(stages, Some([ms(1), ms(3), ms(2), ms(4)]));

        // The claim's watch delivered before the ready key's: the claim stage is empty and
        // the stages still add up to the latency.
        seen.ready.insert("r2".into(), t0 + ms(7));
        seen.working.insert("r2".into(), t0 + ms(5));
        let stages = seen.stages(&sent("r2"), t0 + ms(10));
        assert_eq!(stages, Some([ms(1), ms(6), ms(0), ms(3)]));

        // A resource whose job the bench never saw claimed has no stages.
        seen.ready.insert("r3".into(), t0 + ms(2));
        assert_eq!(seen.stages(&sent("r3"), t0 + ms(9)), None);
    }
}
