//! `esi-host vlan show`: one ha_interface's VLAN pool as an operator wants to read it.
//!
//! The bitmap logic is the VLAN plugin's own pure core (`vlan_pool_worker::core`), called
//! natively, so the CLI and the component can never disagree about what a record means.

use anyhow::{bail, Context as _};
use serde::Serialize;
use serde_json::Value;
use vlan_pool_worker::core::{format_ranges, Pool, VlanPool, POOL_TYPE};

use crate::keys::Record;
use crate::protocol::ConfigEnvelope;
use crate::schema::SchemaRegistry;
use crate::store::Store;

/// What `vlan show` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolView {
    pub ha_interface_id: String,
    /// The key of the authoritative pool record.
    pub key: String,
    /// `false`: no job has used the pool yet; the view is computed from the ha_interface config.
    pub stored: bool,
    pub vlan_ids_available: u32,
    pub restricted_vlans: String,
    /// Restricted VLANs as merged ranges, e.g. `0-1024,4094-4095`.
    pub restricted_ranges: String,
    pub allocated: Vec<Allocation>,
}

/// A run of consecutive VLANs held by one owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Allocation {
    pub vlans: String,
    pub owner: String,
}

/// Reads the pool of ha_interface `id` (or computes it from the config if no job used it yet).
pub async fn show(store: &Store, schemas: &SchemaRegistry, id: &str) -> anyhow::Result<PoolView> {
    let schema = schemas
        .get(POOL_TYPE)
        .context("the schema registry has no ha_interface type")?;
    let key = store.keys().record(Record::VlanPool, schema, id);
    let (pool, stored) = match store.get(&key).await? {
        Some(kv) => (VlanPool::parse(id, &kv.value_str())?, true),
        None => (pool_from_config(store, schemas, id).await?, false),
    };
    let restricted: Vec<_> = pool.restricted_ranges().to_vec();
    Ok(PoolView {
        ha_interface_id: id.to_string(),
        key,
        stored,
        vlan_ids_available: pool.available(),
        restricted_vlans: pool.restricted_spec().to_string(),
        restricted_ranges: format_ranges(&restricted),
        allocated: pool
            .allocated_ranges()
            .into_iter()
            .map(|(range, owner)| Allocation {
                vlans: format_ranges(&[range]),
                owner: owner.to_string(),
            })
            .collect(),
    })
}

async fn pool_from_config(
    store: &Store,
    schemas: &SchemaRegistry,
    id: &str,
) -> anyhow::Result<VlanPool> {
    let schema = schemas
        .get(POOL_TYPE)
        .context("the schema registry has no ha_interface type")?;
    let key = store.keys().record(Record::Config, schema, id);
    let Some(kv) = store.get(&key).await? else {
        bail!("no VLAN pool and no ha_interface config at {key}");
    };
    let config = ConfigEnvelope::parse(&key, &kv.value)?;
    let restricted = config
        .body
        .get("restricted_vlans")
        .and_then(Value::as_str)
        .unwrap_or("");
    let state = config
        .body
        .get("vlan_pool_state")
        .and_then(Value::as_str)
        .and_then(|s| Pool::from_base64(s).ok());
    VlanPool::new(id, restricted, state)
        .with_context(|| format!("{key}: field \"restricted_vlans\""))
}

impl PoolView {
    /// The human-readable table.
    pub fn render(&self) -> String {
        let mut out = format!(
            "pool        ha_interface {}\nrecord      {}{}\navailable   {} of 4096\nrestricted  {} (spec {:?})\n",
            self.ha_interface_id,
            self.key,
            if self.stored { "" } else { " (not created yet: computed from the ha_interface config)" },
            self.vlan_ids_available,
            self.restricted_ranges,
            self.restricted_vlans,
        );
        if self.allocated.is_empty() {
            out.push_str("allocated   none\n");
        } else {
            out.push_str("allocated\n");
            for a in &self.allocated {
                out.push_str(&format!("  {:<12} {}\n", a.vlans, a.owner));
            }
        }
        out
    }
}
