//! The seed document ("Create Ha Interface": four etcd records) and the resources around it.
//!
//! The document is embedded as shipped and parsed here, so the demo writes exactly its record
//! (1) and the tests compare against exactly its records (2)-(4). The seed names the
//! ha_interface's relations but not their bodies; [`chain`] supplies plausible ones for the two
//! edge routers, two er_physical_interfaces and the ha_router it points at.

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

/// The seed document, verbatim.
pub const DOCUMENT: &str = include_str!("../../tests/fixtures/seed/000_711b0a66473f7832.txt");

pub const HA_INTERFACE_ID: &str = "372ed357-e622-41fb-a613-076d332838e2";
pub const PRIMARY_INTERFACE_ID: &str = "a752c6c0-2075-4e7f-9040-5fcefcad0252";
pub const SECONDARY_INTERFACE_ID: &str = "96c3629b-9bfb-4d54-adc1-750d024c2858";
pub const HA_ROUTER_ID: &str = "3a3d7a43-d749-44e8-90bc-de7b37d1d258";
pub const PRIMARY_ROUTER_ID: &str = "5d0a3c4e-1b7f-4d59-9a53-2f0c8d3e6a11";
pub const SECONDARY_ROUTER_ID: &str = "8e4b2f6a-7c1d-4a3e-b5f9-0d6c2e8a4b22";
pub const TENANT_ID: &str = "0b576f6f4cbf414f829cd12f008bf08f";

/// One record of the seed: its key and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedRecord {
    pub key: String,
    pub value: Value,
}

/// The four records of the seed, in document order: config, job, job state, state.
pub fn records() -> anyhow::Result<Vec<SeedRecord>> {
    let mut out = Vec::new();
    let mut lines = DOCUMENT.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "```" {
            continue;
        }
        let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        let Some((key, json)) = block.split_first() else {
            continue;
        };
        let value = serde_json::from_str(&json.join("\n"))
            .with_context(|| format!("seed record {key} is not JSON"))?;
        out.push(SeedRecord {
            key: key.trim().to_string(),
            value,
        });
    }
    if out.len() != 4 {
        bail!(
            "the seed document should hold 4 records, found {}",
            out.len()
        );
    }
    Ok(out)
}

/// A resource to create: its schema id, id and body.
#[derive(Debug, Clone)]
pub struct Resource {
    pub resource_type: &'static str,
    pub id: String,
    pub body: Value,
}

/// The seed's ha_interface and everything it refers to, dependencies first: two edge routers,
/// two er_physical_interfaces, the ha_router and the ha_interface (body from seed record 1).
pub fn chain() -> anyhow::Result<Vec<Resource>> {
    let ha_interface = records()?[0]
        .value
        .get("body")
        .cloned()
        .context("seed record (1) has no body")?;
    let router = |id: &str, name: &str, ip: &str| Resource {
        resource_type: "edge_router",
        id: id.to_string(),
        body: json!({"id": id, "name": name, "ip": ip, "login": "esi", "password": "secret",
                     "ssh_port": 22, "tenant_id": TENANT_ID, "status": "PENDING_CREATE"}),
    };
    let interface = |id: &str, device: &str, name: &str| Resource {
        resource_type: "er_physical_interface",
        id: id.to_string(),
        body: json!({"id": id, "name": name, "device_id": device, "tenant_id": TENANT_ID,
                     "status": "PENDING_CREATE"}),
    };
    Ok(vec![
        router(PRIMARY_ROUTER_ID, "edge-router-1", "192.0.2.11"),
        router(SECONDARY_ROUTER_ID, "edge-router-2", "192.0.2.12"),
        interface(PRIMARY_INTERFACE_ID, PRIMARY_ROUTER_ID, "xe-0/0/1"),
        interface(SECONDARY_INTERFACE_ID, SECONDARY_ROUTER_ID, "xe-0/0/1"),
        Resource {
            resource_type: "ha_router",
            id: HA_ROUTER_ID.to_string(),
            body: json!({"id": HA_ROUTER_ID, "name": "sample-ha-router",
                         "primary_router_id": PRIMARY_ROUTER_ID, "secondary_router_id": SECONDARY_ROUTER_ID,
                         "tenant_id": TENANT_ID, "status": "PENDING_CREATE"}),
        },
        Resource {
            resource_type: "ha_interface",
            id: HA_INTERFACE_ID.to_string(),
            body: ha_interface,
        },
    ])
}

/// The config envelope gohan writes: `body` as a JSON-encoded string, as gohan stores it.
pub fn gohan_envelope(body: &Value, version: u64) -> String {
    json!({"body": body.to_string(), "version": version, "marked_for_deletion": false}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_document_has_its_four_records() {
        let r = records().unwrap();
        assert_eq!(
            r[0].key,
            format!("/config/v2.0/ha_interfaces/{HA_INTERFACE_ID}")
        );
        assert!(r[1]
            .key
            .starts_with("/jobs/all/create:monitoring_worker:ha_interface:"));
        assert_eq!(r[2].value["state_monitoring"]["secondary"], "ACTIVE");
        assert_eq!(r[3].value["state"]["worker_state"], "CREATE_COMPLETED");
        assert_eq!(chain().unwrap().len(), 6);
    }
}
