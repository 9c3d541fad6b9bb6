//! One job: the template's items, the pools they name, allocation or release, and the pool
//! writes.

use std::collections::BTreeSet;

use esi_plugin_sdk::{config_body, host_error, scalar_text, Template};
use serde_json::{json, Map, Value};

use super::{
    Job, JobError, LogLevel, Logger, Outcome, Pool, ProposedWrite, RecordKind, RecordReader,
    RecordRef, RunContext, VlanPool, WriteOp, MAX_VLAN, OUTPUT_KEY, POOL_TYPE,
};

/// One top-level item of the rendered template: a VLAN from `pool`, `requested` if given.
struct Item {
    name: String,
    /// ha_interface id.
    pool: String,
    requested: Option<u16>,
}

/// A pool as this job read it, with the revision its write must compare against (0: the
/// record did not exist).
struct Loaded {
    pool: VlanPool,
    revision: i64,
}

/// Runs one `vlan_pool_worker` job.
///
/// `create` and `modify` allocate a VLAN for each item of the heat template
/// `<resource_type>_vlan_pool` and output `{"vlan_allocation": {<item>: {"ha_interface_id",
/// "vlan_id"}}}`; a VLAN the resource held in one of those pools but no item uses any more (a
/// modify that changed a requested VLAN) is released. `delete` and `logical_delete` release
/// every VLAN the resource holds in the pools the template names and output `{}` (nothing at
/// all if the template is gone). Either way each pool read is proposed back with a compare on
/// the revision read, even when nothing changed.
///
/// # Errors
///
/// [`JobError::Retryable`] when the host could not reach etcd. [`JobError::Permanent`] for an
/// unknown action, a missing or broken template, an item without a pool or with a bad
/// `vlan_id`, a missing ha_interface, a broken pool record, a refused request or an exhausted
/// pool; messages name the template, item, pool and VLAN involved.
pub fn handle(
    job: &Job,
    _context: &RunContext,
    reader: &mut dyn RecordReader,
    logger: &mut dyn Logger,
) -> Result<Outcome, JobError> {
    match job.action.as_str() {
        "create" | "modify" => allocate(job, reader, logger),
        "delete" | "logical_delete" => release(job, reader, logger),
        other => Err(JobError::Permanent(format!(
            "job {}: unknown action {other:?} (expected create, modify, delete or logical_delete)",
            job.id
        ))),
    }
}

fn template_id(job: &Job) -> String {
    format!("{}_vlan_pool", job.resource_type)
}

/// Who VLANs are allocated to: `<singular>:<resource id>`.
fn owner(job: &Job) -> String {
    format!("{}:{}", job.resource_type, job.resource_id)
}

fn allocate(
    job: &Job,
    reader: &mut dyn RecordReader,
    logger: &mut dyn Logger,
) -> Result<Outcome, JobError> {
    let template = Template::load(&template_id(job), reader)?;
    let items = parse_items(&template, template.render_document(job)?)?;
    let owner = owner(job);
    let mut pools: Vec<Loaded> = Vec::new();
    // Index into `pools` of each item's pool.
    let mut pool_of = Vec::with_capacity(items.len());
    for item in &items {
        let index = match pools
            .iter()
            .position(|loaded| loaded.pool.id() == item.pool)
        {
            Some(index) => index,
            None => {
                pools.push(load_or_create(&item.pool, reader, logger)?);
                pools.len() - 1
            }
        };
        pool_of.push(index);
    }
    let vlans = assign(&items, &pool_of, &mut pools, &owner)?;
    for (index, loaded) in pools.iter_mut().enumerate() {
        let keep: BTreeSet<u16> = (0..items.len())
            .filter(|&item| pool_of[item] == index)
            .map(|item| vlans[item])
            .collect();
        let released = loaded.pool.release_except(&owner, &keep);
        if !released.is_empty() {
            let message = format!(
                "released VLANs {released:?} of ha_interface {} that {owner} no longer uses",
                loaded.pool.id()
            );
            logger.log(LogLevel::Info, &message);
        }
    }
    let mut allocation = Map::new();
    for (item, vlan) in items.iter().zip(&vlans) {
        let message = format!(
            "item {}: VLAN {vlan} of ha_interface {}",
            item.name, item.pool
        );
        logger.log(LogLevel::Info, &message);
        let entry = json!({"ha_interface_id": item.pool, "vlan_id": vlan});
        allocation.insert(item.name.clone(), entry);
    }
    let mut output = Map::new();
    output.insert(OUTPUT_KEY.to_owned(), Value::Object(allocation));
    Ok(completed(Value::Object(output), &pools))
}

/// The VLAN of each item, in item order. Requested items go first, so that an unrequested
/// item of the same owner and pool never reuses the VLAN a requested one holds.
fn assign(
    items: &[Item],
    pool_of: &[usize],
    pools: &mut [Loaded],
    owner: &str,
) -> Result<Vec<u16>, JobError> {
    let mut vlans: Vec<Option<u16>> = vec![None; items.len()];
    let requested = (0..items.len()).filter(|&index| items[index].requested.is_some());
    let unrequested = (0..items.len()).filter(|&index| items[index].requested.is_none());
    for index in requested.chain(unrequested) {
        let item = &items[index];
        let taken_by_this_job: BTreeSet<u16> = (0..items.len())
            .filter(|&other| pool_of[other] == pool_of[index])
            .filter_map(|other| vlans[other])
            .collect();
        let vlan = pools[pool_of[index]]
            .pool
            .allocate(owner, item.requested, &taken_by_this_job)
            .map_err(|error| JobError::Permanent(format!("item {}: {error}", item.name)))?;
        vlans[index] = Some(vlan);
    }
    // Every index was visited once above, so every entry is set.
    Ok(vlans.into_iter().flatten().collect())
}

fn release(
    job: &Job,
    reader: &mut dyn RecordReader,
    logger: &mut dyn Logger,
) -> Result<Outcome, JobError> {
    let id = template_id(job);
    let Some(template) = Template::read(&id, reader)? else {
        let message = format!("heat template {id} does not exist: no VLAN to release");
        logger.log(LogLevel::Info, &message);
        return Ok(completed(Value::Object(Map::new()), &[]));
    };
    let items = parse_items(&template, template.render_document(job)?)?;
    let owner = owner(job);
    let mut seen = BTreeSet::new();
    let mut pools = Vec::new();
    for item in &items {
        if !seen.insert(item.pool.as_str()) {
            continue;
        }
        // A pool that was never created holds nothing of anyone's.
        let Some(mut loaded) = read_pool(&item.pool, reader)? else {
            continue;
        };
        let released = loaded.pool.release_owner(&owner);
        let message = format!(
            "released VLANs {released:?} of ha_interface {} held by {owner}",
            item.pool
        );
        logger.log(LogLevel::Info, &message);
        pools.push(loaded);
    }
    Ok(completed(Value::Object(Map::new()), &pools))
}

/// The job's outcome: `output`, and each pool put back with a compare on the revision read.
fn completed(output: Value, pools: &[Loaded]) -> Outcome {
    let writes = pools
        .iter()
        .map(|loaded| ProposedWrite {
            target: RecordRef {
                kind: RecordKind::VlanPool,
                resource_type: POOL_TYPE.to_owned(),
                resource_id: loaded.pool.id().to_owned(),
            },
            op: WriteOp::Put(loaded.pool.to_record().to_json()),
            expect_mod_revision: Some(loaded.revision),
        })
        .collect();
    Outcome::Completed { output, writes }
}

/// The pool record of ha_interface `id`, if it exists.
fn read_pool(id: &str, reader: &mut dyn RecordReader) -> Result<Option<Loaded>, JobError> {
    let what = format!("vlan pool record of ha_interface {id}");
    let Some(record) = reader
        .read(RecordKind::VlanPool, POOL_TYPE, id)
        .map_err(|error| host_error(error, &what))?
    else {
        return Ok(None);
    };
    let pool = VlanPool::parse(id, &record.value)
        .map_err(|error| JobError::Permanent(error.to_string()))?;
    Ok(Some(Loaded {
        pool,
        revision: record.mod_revision,
    }))
}

/// The pool record of ha_interface `id`, or a new pool from its config.
fn load_or_create(
    id: &str,
    reader: &mut dyn RecordReader,
    logger: &mut dyn Logger,
) -> Result<Loaded, JobError> {
    if let Some(loaded) = read_pool(id, reader)? {
        return Ok(loaded);
    }
    Ok(Loaded {
        pool: pool_from_config(id, reader, logger)?,
        revision: 0,
    })
}

/// A new pool from the ha_interface's config: its `vlan_pool_state` if present and valid,
/// else an empty one, with its `restricted_vlans` set either way.
fn pool_from_config(
    id: &str,
    reader: &mut dyn RecordReader,
    logger: &mut dyn Logger,
) -> Result<VlanPool, JobError> {
    let what = format!("{POOL_TYPE} {id}");
    let record = reader
        .read(RecordKind::Config, POOL_TYPE, id)
        .map_err(|error| host_error(error, &format!("config of {what}")))?
        .ok_or_else(|| JobError::Permanent(format!("{what} does not exist")))?;
    let body = config_body(&what, &record.value)?;
    let restricted = match body.get("restricted_vlans") {
        None | Some(Value::Null) => "",
        Some(Value::String(spec)) => spec.as_str(),
        Some(other) => {
            let message = format!("{what}: restricted_vlans {other} is not a string");
            return Err(JobError::Permanent(message));
        }
    };
    let state = match body.get("vlan_pool_state") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) if text.is_empty() => None,
        Some(state) => match state.as_str().map(Pool::from_base64) {
            Some(Ok(pool)) => Some(pool),
            invalid => {
                let reason = match invalid {
                    Some(Err(error)) => error.to_string(),
                    _ => format!("vlan_pool_state {state} is not a string"),
                };
                let message =
                    format!("{what}: ignoring {reason}; computing the pool from restricted_vlans");
                logger.log(LogLevel::Warn, &message);
                None
            }
        },
    };
    VlanPool::new(id, restricted, state)
        .map_err(|error| JobError::Permanent(format!("{what}: {error}")))
}

fn parse_items(template: &Template, document: Map<String, Value>) -> Result<Vec<Item>, JobError> {
    document
        .into_iter()
        .map(|(name, value)| Item::parse(template, name, value))
        .collect()
}

impl Item {
    fn parse(template: &Template, name: String, value: Value) -> Result<Item, JobError> {
        let error = |message: String| template.error(format!("item {name}: {message}"));
        let Value::Object(props) = value else {
            return Err(error("is not a mapping with pool and vlan_id".to_owned()));
        };
        let pool = match props.get("pool").and_then(scalar_text) {
            Some(pool) if !pool.trim().is_empty() => pool,
            _ => {
                let message = "pool is missing or empty (did a template variable render empty?)";
                return Err(error(message.to_owned()));
            }
        };
        let requested = match props.get("vlan_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) if text.trim().is_empty() => None,
            Some(value) => Some(vlan_id(value).ok_or_else(|| {
                error(format!(
                    "vlan_id must be a VLAN id from 0 to 4095, got {value}"
                ))
            })?),
        };
        Ok(Item {
            name,
            pool,
            requested,
        })
    }
}

/// A VLAN id given as a YAML number or text.
fn vlan_id(value: &Value) -> Option<u16> {
    let id = match value {
        Value::Number(number) => number.as_u64()?,
        Value::String(text) => text.trim().parse::<u64>().ok()?,
        _ => return None,
    };
    u16::try_from(id).ok().filter(|&id| id <= MAX_VLAN)
}
