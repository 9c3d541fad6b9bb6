//! What running a job in a component costs, measured on [`PluginEngine`] directly.
//!
//! A job's `handle` call is a fresh instance plus the call, and the call reads records through
//! the host import. Those reads are etcd round trips, not plugin cost, so every component is
//! timed twice: with its reads going to etcd (what a job sees), and with the same records
//! served from memory ([`RecordAccess::preloaded`]), which is the plugin's own cost. How many
//! reads a call makes is counted with the store's counters, not assumed, and a call served
//! from memory must make none.
//!
//! The VLAN plugin's core is also a plain Rust crate, so the same job can run natively
//! (`vlan_pool_worker::core::handle` with the records served from memory): the ratio of the
//! component's cost to the native one is what the sandbox costs for allocate + encode. The
//! two are timed in alternating rounds, so that a change of the machine's speed during the
//! phase moves both sides of the ratio.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use vlan_pool_worker::core as vlan;

use super::stats::{cpu_time, median, median_of, us, Summary};
use crate::keys::{Keys, Record};
use crate::plugins::bindings::esi::worker::types as wit;
use crate::plugins::host_api::RecordAccess;
use crate::plugins::{cache, Limits, LoadedPlugin, PluginEngine};
use crate::protocol::{Action, Job, JobId, JobRecord};
use crate::schema::{SchemaRegistry, HEAT_TEMPLATE};
use crate::seed;
use crate::store::Store;
use crate::templates::{self, TemplateFile};

/// What the plugin phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct PluginCost {
    /// `PluginEngine::load` of each component (compile cache warm after the first run).
    pub load_ms: HashMap<String, f64>,
    pub monitoring: CallCost,
    pub vlan: CallCost,
    /// The VLAN job natively: `vlan_pool_worker::core::handle`, records from memory (median
    /// over the ratio's rounds).
    pub vlan_native_us: f64,
    /// Just the pool work natively: parse the bitmap, allocate one VLAN, encode the record.
    pub vlan_native_allocate_encode_us: f64,
    /// The median of `vlan_ratio_rounds`: the VLAN job as a component (records in memory)
    /// over the same job natively. `vlan.plugin_us` and `vlan_native_us` are the medians of
    /// all the rounds' samples, so their quotient is close to it but not always equal.
    pub vlan_component_native_ratio: f64,
    /// Each round's ratio: the component's median over the native median, timed back to back
    /// (ten rounds).
    pub vlan_ratio_rounds: Vec<f64>,
    /// `vlan.warm_call_us` over the native job's median timed right after the warm calls:
    /// the sandboxed code's own speed, without what a fresh instance adds.
    pub vlan_warm_native_ratio: f64,
}

/// One component's `handle` cost.
#[derive(Debug, Clone, Serialize)]
pub struct CallCost {
    pub iterations: usize,
    /// etcd reads one call makes (counted).
    pub reads_per_call: f64,
    /// Instantiate + handle, its reads going to etcd.
    pub call: Summary,
    /// Median of instantiate + handle with the same records served from memory: the plugin's
    /// own cost, without etcd round trips. For the VLAN component, the median of the ratio's
    /// rounds (`PluginCost::vlan_ratio_rounds`), which make the same calls.
    pub plugin_us: f64,
    /// CPU time of this process per call served from memory (mean over the run's own block of
    /// such calls, also for VLAN; 10 ms resolution in total).
    pub plugin_cpu_us: f64,
    /// What a fresh instance adds (records from memory): `instantiate_us` and
    /// `first_call_us` are the medians over instances of one call each, `warm_call_us` that
    /// of the calls after the first on instances of several. A job always gets a fresh
    /// instance; `plugin_us` is about instantiate + first call + tearing the instance down.
    pub instantiate_us: f64,
    pub first_call_us: f64,
    pub warm_call_us: f64,
}

/// Instances the instantiation and first-call figures are taken over (one call each), and
/// then the warm-call figures (`CALLS_PER_INSTANCE` calls each). An instance that serves
/// many calls leaves its pool slot slower for every later instance in it (each call bumps
/// the job arena further, and the slot then costs more to set up and reset: after instances
/// of 11 calls a fresh-instance VLAN job took 59-64 µs instead of 46-47, and the next
/// instantiation 11 µs instead of 5), so the warm instances take three calls each and come
/// last, after the VLAN ratio's rounds.
const WARM_INSTANCES: usize = 200;
const CALLS_PER_INSTANCE: usize = 3;

/// A job and the records it reads, ready to run both ways.
struct Case {
    job: Job,
    /// Keys the plugin reads, in order, and whether each exists.
    reads: Vec<String>,
}

/// Runs the plugin phase under `root` with `iterations` calls per component.
pub async fn measure(
    endpoint: &str,
    root: &str,
    plugin_dir: &Path,
    templates: &[TemplateFile],
    iterations: usize,
) -> anyhow::Result<PluginCost> {
    let schemas = Arc::new(SchemaRegistry::built_in());
    let store = Store::connect(&[endpoint.to_string()], Keys::new(root))
        .await
        .context("connecting the plugin phase's etcd client")?;
    templates::load(&store, &schemas, templates)
        .await
        .context("loading the heat templates")?;
    let cases = write_records(&store, &schemas).await?;
    let engine = PluginEngine::new(Limits::default(), Some(&cache::default_dir()))?;
    let mut load_ms = HashMap::new();
    let load = |name: &str| {
        let path = plugin_dir.join(format!("{name}.wasm"));
        let engine = &engine;
        async move {
            let started = Instant::now();
            let plugin = engine
                .load(&path)
                .await
                .with_context(|| format!("loading {}", path.display()))?;
            anyhow::Ok((plugin, started.elapsed()))
        }
    };
    let (monitoring_plugin, t) = load("monitoring_worker").await?;
    load_ms.insert("monitoring_worker".to_string(), super::stats::ms(t));
    let (vlan_plugin, t) = load("vlan_pool_worker").await?;
    load_ms.insert("vlan_pool_worker".to_string(), super::stats::ms(t));
    let access = RecordAccess::new(store.clone(), schemas);
    let monitoring = time_calls(&engine, &monitoring_plugin, &access, &cases.0, iterations).await?;
    // The ratio's rounds first, on pool slots that have only served single jobs (see
    // `CALLS_PER_INSTANCE`).
    let call = ComponentCall::new(&engine, &vlan_plugin, &cases.1);
    let rounds = time_vlan_rounds(&call, &access, &store, &cases.1, iterations).await?;
    let mut vlan_call = time_calls(&engine, &vlan_plugin, &access, &cases.1, iterations).await?;
    // The VLAN figures of the ratio all come from its rounds.
    vlan_call.plugin_us = us(median(rounds.component));
    // The warm calls' native counterpart, timed right after them.
    let native_after_warm = NativeVlan::new(&store, &cases.1).await?.time(iterations)?;
    let warm_native_ratio = vlan_call.warm_call_us / us(median(native_after_warm)).max(1e-3);
    let allocate_encode = time_allocate_encode(iterations * ALLOCATE_ENCODE_PER_CALL)?;
    Ok(PluginCost {
        load_ms,
        vlan_component_native_ratio: median_of(&rounds.ratios),
        vlan_ratio_rounds: rounds.ratios,
        vlan_warm_native_ratio: warm_native_ratio,
        monitoring,
        vlan: vlan_call,
        vlan_native_us: us(median(rounds.native)),
        vlan_native_allocate_encode_us: allocate_encode,
    })
}

/// Writes what the two jobs read: the seed's interface states and its ha_interface (the VLAN
/// pool's owner). Returns the monitoring case and the VLAN case.
async fn write_records(store: &Store, schemas: &SchemaRegistry) -> anyhow::Result<(Case, Case)> {
    let keys = store.keys();
    let schema = |name: &str| {
        schemas
            .get(name)
            .with_context(|| format!("the built-in schemas have no {name}"))
    };
    let (ha, interface, template) = (
        schema("ha_interface")?,
        schema("er_physical_interface")?,
        schema(HEAT_TEMPLATE)?,
    );
    let state = json!({
        "state": {"state_monitoring": json!({"interface": "ACTIVE"}).to_string(),
                  "worker_state": "CREATE_COMPLETED"},
        "version": 1, "error": ""});
    let interfaces = [seed::PRIMARY_INTERFACE_ID, seed::SECONDARY_INTERFACE_ID];
    for id in interfaces {
        store
            .put(
                &keys.record(Record::State, interface, id),
                state.to_string(),
            )
            .await?;
    }
    let records = seed::records()?;
    let ha_config = keys.record(Record::Config, ha, seed::HA_INTERFACE_ID);
    store.put(&ha_config, records[0].value.to_string()).await?;

    // The seed's own job record (2) is the monitoring job.
    let monitoring = JobRecord::parse(&records[1].key, records[1].value.to_string().as_bytes())
        .context("seed record (2) is not a job record")?;
    let mut monitoring_reads =
        vec![keys.record(Record::Config, template, "ha_interface_monitoring")];
    monitoring_reads.extend(interfaces.map(|id| keys.record(Record::State, interface, id)));

    let gateway = "6a7e0000-0000-4000-8000-00000000be01";
    let id = JobId {
        action: Action::Create,
        handler: vlan::HANDLER.to_string(),
        resource_type: "internet_gateway".into(),
        resource_id: gateway.into(),
        version: 1,
        suffix: JobId::random_suffix(),
    };
    let job = json!({
        "id": id.to_string(), "job_name": id.job_name(), "handler": vlan::HANDLER,
        "action": "create", "resource_type": "internet_gateway", "resource_id": gateway,
        "version": 1, "is_first": true, "is_last": true, "dependency": [], "on_failure": "fail",
        "params": [{"param": "downlink_interface_id", "type": "value", "value": seed::HA_INTERFACE_ID,
                    "resources": [{"resource_type": "ha_interface", "resource_id": seed::HA_INTERFACE_ID}]}],
        "resource_input": {"id": gateway, "name": "gw-bench", "tenant_id": seed::TENANT_ID,
                           "downlink_interface_id": seed::HA_INTERFACE_ID, "vrf_name": "vrf1",
                           "status": "PENDING_CREATE"},
    });
    let vlan_job = JobRecord::parse(
        &id.to_string(),
        json!([vlan::HANDLER, job, 0]).to_string().as_bytes(),
    )
    .context("the bench's VLAN job record")?;
    // The template, the pool record (absent: every call allocates from the config's bitmap,
    // since the bench applies no write), and the pool's ha_interface config.
    let vlan_reads = vec![
        keys.record(Record::Config, template, "internet_gateway_vlan_pool"),
        keys.record(Record::VlanPool, ha, seed::HA_INTERFACE_ID),
        ha_config,
    ];
    Ok((
        Case {
            job: monitoring.job,
            reads: monitoring_reads,
        },
        Case {
            job: vlan_job.job,
            reads: vlan_reads,
        },
    ))
}

/// One component call of a bench case: a fresh instance and `handle`, as the worker makes it.
struct ComponentCall<'a> {
    engine: &'a PluginEngine,
    plugin: &'a LoadedPlugin,
    job: wit::Job,
    context: wit::RunContext,
    never: CancellationToken,
}

impl<'a> ComponentCall<'a> {
    fn new(engine: &'a PluginEngine, plugin: &'a LoadedPlugin, case: &Case) -> Self {
        ComponentCall {
            engine,
            plugin,
            job: wit_job(&case.job),
            context: wit::RunContext {
                attempts: 0,
                reruns: 0,
                elapsed_ms: 0,
                config: plugin.config_json().to_string(),
            },
            never: CancellationToken::new(),
        }
    }

    /// One call, its reads going to `access`; fails unless the job completes.
    async fn run(&self, access: &RecordAccess) -> anyhow::Result<()> {
        let name = &self.plugin.name;
        let answer = self
            .engine
            .handle(
                self.plugin,
                access.clone(),
                &self.job,
                &self.context,
                &self.never,
            )
            .await
            .with_context(|| format!("calling {name}"))?;
        // As the worker does after each call (it learns what to prefetch from them).
        access.take_reads();
        match answer {
            Ok(wit::Outcome::Completed(_)) => Ok(()),
            Ok(wit::Outcome::Wait(ms)) => bail!("{name} asked to wait {ms} ms"),
            Err(e) => bail!("{name} failed the bench's job: {e:?}"),
        }
    }

    /// `samples` calls with reads going to `access`, each timed.
    async fn time(&self, access: &RecordAccess, samples: usize) -> anyhow::Result<Vec<Duration>> {
        let mut took = Vec::with_capacity(samples);
        for _ in 0..samples {
            let started = Instant::now();
            self.run(access).await?;
            took.push(started.elapsed());
        }
        Ok(took)
    }
}

/// `access` with the records `case` reads served from memory: a call then costs no etcd
/// round trip.
async fn preloaded(access: &RecordAccess, case: &Case) -> anyhow::Result<RecordAccess> {
    let mut records = HashMap::new();
    for key in &case.reads {
        let found = access.store.get(key).await?;
        records.insert(
            key.clone(),
            found.map(|kv| wit::Versioned {
                value: kv.value_str().into_owned(),
                mod_revision: kv.mod_revision,
            }),
        );
    }
    Ok(RecordAccess {
        preloaded: Arc::new(records),
        ..access.clone()
    })
}

/// Times `iterations` calls of `plugin`, with their reads going to etcd and then served from
/// memory, and the calls on one instance that tell what a fresh one adds.
async fn time_calls(
    engine: &PluginEngine,
    plugin: &LoadedPlugin,
    access: &RecordAccess,
    case: &Case,
    iterations: usize,
) -> anyhow::Result<CallCost> {
    let call = ComponentCall::new(engine, plugin, case);
    // Warm up, and count the reads one call makes.
    const COUNTED: usize = 20;
    let gets_before = access.store.counters().snapshot().get;
    for _ in 0..COUNTED {
        call.run(access).await?;
    }
    let reads_per_call =
        (access.store.counters().snapshot().get - gets_before) as f64 / COUNTED as f64;
    let calls = call.time(access, iterations).await?;

    // The same calls with the records they read served from memory: the plugin's own cost.
    let in_memory = preloaded(access, case).await?;
    let gets_before = access.store.counters().snapshot().get;
    let cpu_before = cpu_time(None)?;
    let own = call.time(&in_memory, iterations).await?;
    let cpu = cpu_time(None)?.saturating_sub(cpu_before);
    // Instantiation and first call on instances of one call each, as jobs get them; then the
    // warm calls, on instances of several (which leave their slots slower: see
    // `CALLS_PER_INSTANCE`).
    let (mut instantiate, mut first, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for calls in [1, CALLS_PER_INSTANCE] {
        for _ in 0..WARM_INSTANCES {
            let (took, calls) = engine
                .time_calls_on_one_instance(
                    plugin,
                    in_memory.clone(),
                    &call.job,
                    &call.context,
                    calls,
                )
                .await?;
            in_memory.take_reads();
            if calls.len() == 1 {
                instantiate.push(took);
                first.push(calls[0]);
            } else {
                warm.extend_from_slice(&calls[1..]);
            }
        }
    }
    all_preloaded(&access.store, gets_before, &plugin.name)?;
    Ok(CallCost {
        iterations,
        reads_per_call,
        call: Summary::of(calls),
        plugin_us: us(median(own)),
        plugin_cpu_us: us(cpu) / iterations.max(1) as f64,
        instantiate_us: us(median(instantiate)),
        first_call_us: us(median(first)),
        warm_call_us: us(median(warm)),
    })
}

/// The VLAN job run natively: `vlan_pool_worker::core::handle` with its records served from
/// memory, on the job as a plugin core sees it.
struct NativeVlan {
    reader: MemoryReader,
    job: vlan::Job,
    context: vlan::RunContext,
}

impl NativeVlan {
    async fn new(store: &Store, case: &Case) -> anyhow::Result<Self> {
        let template = store
            .get(&case.reads[0])
            .await?
            .context("the VLAN template")?;
        let config = store
            .get(&case.reads[2])
            .await?
            .context("the pool's ha_interface")?;
        let versioned = |kv: crate::store::Kv| vlan::Versioned {
            value: kv.value_str().into_owned(),
            mod_revision: kv.mod_revision,
        };
        let mut records = HashMap::new();
        records.insert(
            (
                vlan::RecordKind::Config,
                HEAT_TEMPLATE.to_string(),
                "internet_gateway_vlan_pool".to_string(),
            ),
            versioned(template),
        );
        records.insert(
            (
                vlan::RecordKind::Config,
                "ha_interface".to_string(),
                seed::HA_INTERFACE_ID.to_string(),
            ),
            versioned(config),
        );
        Ok(NativeVlan {
            reader: MemoryReader(records),
            job: core_job(&case.job),
            context: vlan::RunContext {
                config: Value::Object(Map::new()),
                ..vlan::RunContext::default()
            },
        })
    }

    /// `samples` jobs, each timed; fails unless every one completes.
    fn time(&mut self, samples: usize) -> anyhow::Result<Vec<Duration>> {
        let mut took = Vec::with_capacity(samples);
        for _ in 0..samples {
            let mut logs: Vec<(vlan::LogLevel, String)> = Vec::new();
            let started = Instant::now();
            let outcome = vlan::handle(&self.job, &self.context, &mut self.reader, &mut logs);
            took.push(started.elapsed());
            if !matches!(outcome, Ok(vlan::Outcome::Completed { .. })) {
                bail!("the VLAN core failed the bench's job natively: {outcome:?}");
            }
        }
        Ok(took)
    }
}

/// The component and the native VLAN job, timed in alternating rounds.
struct VlanRounds {
    /// Every component call (records in memory).
    component: Vec<Duration>,
    /// Every native job.
    native: Vec<Duration>,
    /// Each round's component median over its native median.
    ratios: Vec<f64>,
}

/// Rounds of the VLAN ratio. This VM changes speed for minutes at a time (the same native
/// job has taken 14 µs in one run and 19 µs in the next), so the component and the native
/// core are timed back to back in each round and the ratio is the median of the rounds'.
const RATIO_ROUNDS: usize = 10;

/// Native jobs timed per component call in a round: a round of 300 component calls (~14 ms)
/// times 3,000 native jobs (~42 ms), a median as steady as the component's.
const NATIVE_PER_CALL: usize = 10;

/// Samples of the native allocate + encode figure per component call of the phase.
const ALLOCATE_ENCODE_PER_CALL: usize = 10;

/// Times the VLAN job as a component (records in memory) and natively in [`RATIO_ROUNDS`]
/// alternating rounds of `iterations / RATIO_ROUNDS` component calls (at least one) and
/// [`NATIVE_PER_CALL`] times as many native jobs, after one untimed round of each to warm up.
async fn time_vlan_rounds(
    call: &ComponentCall<'_>,
    access: &RecordAccess,
    store: &Store,
    case: &Case,
    iterations: usize,
) -> anyhow::Result<VlanRounds> {
    let in_memory = preloaded(access, case).await?;
    let mut native = NativeVlan::new(store, case).await?;
    let per_round = (iterations / RATIO_ROUNDS).max(1);
    // Warm both up: caches, the allocator, the pool's slots.
    call.time(&in_memory, per_round).await?;
    native.time(per_round * NATIVE_PER_CALL)?;
    let gets_before = store.counters().snapshot().get;
    let mut rounds = VlanRounds {
        component: Vec::with_capacity(per_round * RATIO_ROUNDS),
        native: Vec::with_capacity(per_round * RATIO_ROUNDS * NATIVE_PER_CALL),
        ratios: Vec::with_capacity(RATIO_ROUNDS),
    };
    for _ in 0..RATIO_ROUNDS {
        let component = call.time(&in_memory, per_round).await?;
        let native = native.time(per_round * NATIVE_PER_CALL)?;
        let native_us = us(median(native.clone())).max(1e-3);
        rounds
            .ratios
            .push(us(median(component.clone())) / native_us);
        rounds.component.extend(component);
        rounds.native.extend(native);
    }
    all_preloaded(store, gets_before, &call.plugin.name)?;
    Ok(rounds)
}

/// Fails the bench if calls meant to read only preloaded records read etcd since
/// `gets_before` (the store's read count then).
fn all_preloaded(store: &Store, gets_before: u64, plugin: &str) -> anyhow::Result<()> {
    let unserved = store.counters().snapshot().get - gets_before;
    if unserved > 0 {
        bail!("{plugin} read {unserved} records the bench did not preload: add them to its case");
    }
    Ok(())
}

/// Parse the seed's pool bitmap, allocate one VLAN, encode the record: median µs.
fn time_allocate_encode(iterations: usize) -> anyhow::Result<f64> {
    let body = &seed::records()?[0].value["body"];
    let restricted = body["restricted_vlans"].as_str().unwrap_or("");
    let state = body["vlan_pool_state"]
        .as_str()
        .context("seed record (1) has no vlan_pool_state")?;
    let mut samples: Vec<Duration> = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let started = Instant::now();
        let bitmap = vlan::Pool::from_base64(state)?;
        let mut pool = vlan::VlanPool::new(seed::HA_INTERFACE_ID, restricted, Some(bitmap))?;
        pool.allocate(&format!("internet_gateway:{i}"), None, &BTreeSet::new())?;
        let record = pool.to_record().to_json();
        samples.push(started.elapsed());
        std::hint::black_box(record);
    }
    Ok(us(median(samples)))
}

/// Records served from memory, for the native run.
struct MemoryReader(HashMap<(vlan::RecordKind, String, String), vlan::Versioned>);

impl vlan::RecordReader for MemoryReader {
    fn read(
        &mut self,
        kind: vlan::RecordKind,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Option<vlan::Versioned>, vlan::HostError> {
        let key = (kind, resource_type.to_string(), resource_id.to_string());
        Ok(self.0.get(&key).cloned())
    }
}

/// The job as the worker hands it to a component (a first job: empty job state).
fn wit_job(job: &Job) -> wit::Job {
    crate::worker::to_wit_job(job, &serde_json::Map::new())
}

/// The same job as a plugin core sees it natively.
fn core_job(job: &Job) -> vlan::Job {
    vlan::Job {
        id: job.id.clone(),
        job_name: job.job_name.clone(),
        handler: job.handler.clone(),
        action: job.action.as_str().to_string(),
        resource_type: job.resource_type.clone(),
        resource_id: job.resource_id.clone(),
        version: job.version,
        is_first: job.is_first,
        is_last: job.is_last,
        params: job
            .params
            .iter()
            .map(|p| vlan::Param {
                param: p.param.clone(),
                kind: p.kind.clone(),
                value: p.value.clone(),
                resources: p
                    .resources
                    .iter()
                    .map(|r| vlan::ResourceRef {
                        resource_type: r.resource_type.clone(),
                        resource_id: r.resource_id.clone(),
                    })
                    .collect(),
            })
            .collect(),
        resource_input: Value::Object(job.resource_input.clone()),
        job_state: Value::Object(Map::new()),
    }
}
