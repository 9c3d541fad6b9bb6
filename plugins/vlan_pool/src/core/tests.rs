//! Jobs against an in-memory store that applies proposed writes the way the host's completion
//! transaction does: all or nothing, each compare on the mod revision checked first.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::*;

/// `template_file` of the shipped templates (`templates/*_vlan_pool.json`).
const INTERNET_GATEWAY: &str = "downlink:\n  pool: {{ downlink_interface_id }}\n";
const VPN_GATEWAY: &str = "downlink:\n  pool: {{ downlink_interface_id }}\nuplink:\n  pool: {{ uplink_interface_id }}\n  vlan_id: {{ uplink_vlan_id }}\n";

/// The seed's ha_interface, whose pool is `"0-1024,4094"`.
const SEED_POOL: &str = "372ed357-e622-41fb-a613-076d332838e2";
const UPLINK_POOL: &str = "0a0a0a0a-0000-4000-8000-00000000beef";

type Key = (RecordKind, String, String);

#[derive(Default)]
struct Store {
    records: HashMap<Key, Versioned>,
    revision: i64,
    failure: Option<HostError>,
    reads: Vec<Key>,
}

impl Store {
    fn put(&mut self, kind: RecordKind, resource_type: &str, resource_id: &str, value: &str) {
        self.revision += 1;
        let key = (kind, resource_type.to_owned(), resource_id.to_owned());
        let versioned = Versioned {
            value: value.to_owned(),
            mod_revision: self.revision,
        };
        self.records.insert(key, versioned);
    }

    fn put_template(&mut self, resource_type: &str, template_file: &str) {
        let id = format!("{resource_type}_vlan_pool");
        let body =
            json!({"handler": HANDLER, "id": id, "template_file": template_file, "watch": []});
        let envelope = json!({"body": body, "version": 1, "marked_for_deletion": false});
        self.put(
            RecordKind::Config,
            "heat_template",
            &id,
            &envelope.to_string(),
        );
    }

    /// An ha_interface config like the seed's, with its body JSON-encoded as gohan stores it.
    fn put_ha_interface(&mut self, id: &str, restricted: &str, state: Option<&str>) {
        let mut body = json!({"id": id, "name": "ha", "restricted_vlans": restricted,
                              "vlan_ids_available": 0, "link_type": "downlink"});
        if let Some(state) = state {
            body["vlan_pool_state"] = json!(state);
        }
        let envelope =
            json!({"body": body.to_string(), "version": 1, "marked_for_deletion": false});
        self.put(RecordKind::Config, POOL_TYPE, id, &envelope.to_string());
    }

    fn seed() -> Store {
        let mut store = Store::default();
        store.put_template("internet_gateway", INTERNET_GATEWAY);
        store.put_template("vpn_gateway", VPN_GATEWAY);
        let state = Pool::from_restricted("0-1024,4094").unwrap().to_base64();
        store.put_ha_interface(SEED_POOL, "0-1024,4094", Some(&state));
        store.put_ha_interface(UPLINK_POOL, "0-99", None);
        store
    }

    /// Applies a completion's writes in one transaction; `false` (and nothing written) when a
    /// compare fails.
    fn apply(&mut self, writes: &[ProposedWrite]) -> bool {
        for write in writes {
            let current = self.current_revision(&write.target);
            if write
                .expect_mod_revision
                .is_some_and(|expected| expected != current)
            {
                return false;
            }
        }
        for write in writes {
            let target = &write.target;
            match &write.op {
                WriteOp::Put(value) => self.put(
                    target.kind,
                    &target.resource_type,
                    &target.resource_id,
                    value,
                ),
                WriteOp::Delete => {
                    let key = (
                        target.kind,
                        target.resource_type.clone(),
                        target.resource_id.clone(),
                    );
                    self.records.remove(&key);
                }
            }
        }
        true
    }

    fn current_revision(&self, target: &RecordRef) -> i64 {
        let key = (
            target.kind,
            target.resource_type.clone(),
            target.resource_id.clone(),
        );
        self.records
            .get(&key)
            .map_or(0, |record| record.mod_revision)
    }

    fn pool(&self, id: &str) -> VlanPool {
        let key = (RecordKind::VlanPool, POOL_TYPE.to_owned(), id.to_owned());
        VlanPool::parse(id, &self.records[&key].value).unwrap()
    }
}

impl RecordReader for Store {
    fn read(
        &mut self,
        kind: RecordKind,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Option<Versioned>, HostError> {
        let key = (kind, resource_type.to_owned(), resource_id.to_owned());
        self.reads.push(key.clone());
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        Ok(self.records.get(&key).cloned())
    }
}

fn job(resource_type: &str, id: &str, action: &str, params: Value) -> Job {
    let params = params
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, value)| Param {
            param: name.clone(),
            kind: "value".to_owned(),
            value: value.clone(),
            resources: Vec::new(),
        })
        .collect();
    Job {
        id: format!("{action}:{HANDLER}:{resource_type}:{id}:1:abcde"),
        job_name: format!("{resource_type}:{id}:1"),
        handler: HANDLER.to_owned(),
        action: action.to_owned(),
        resource_type: resource_type.to_owned(),
        resource_id: id.to_owned(),
        version: 1,
        is_first: true,
        is_last: false,
        params,
        resource_input: json!({"id": id}),
        job_state: json!({}),
    }
}

fn gateway(id: &str, action: &str) -> Job {
    job(
        "internet_gateway",
        id,
        action,
        json!({"downlink_interface_id": SEED_POOL}),
    )
}

fn vpn(id: &str, action: &str, uplink_vlan: Value) -> Job {
    let params = json!({"downlink_interface_id": SEED_POOL, "uplink_interface_id": UPLINK_POOL,
                        "uplink_vlan_id": uplink_vlan});
    job("vpn_gateway", id, action, params)
}

fn run(job: &Job, store: &mut Store) -> Result<Outcome, JobError> {
    let mut log: Vec<(LogLevel, String)> = Vec::new();
    handle(job, &RunContext::default(), store, &mut log)
}

fn completed(result: Result<Outcome, JobError>) -> (Value, Vec<ProposedWrite>) {
    match result {
        Ok(Outcome::Completed { output, writes }) => (output, writes),
        other => panic!("expected a completed outcome, got {other:?}"),
    }
}

fn permanent(result: Result<Outcome, JobError>) -> String {
    match result {
        Err(JobError::Permanent(message)) => message,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

/// Runs the job and applies its writes, which must commit; returns the output.
fn commit(job: &Job, store: &mut Store) -> Value {
    let (output, writes) = completed(run(job, store));
    assert!(store.apply(&writes), "compare failed for {writes:?}");
    output
}

fn downlink_vlan(output: &Value) -> u64 {
    output[OUTPUT_KEY]["downlink"]["vlan_id"]
        .as_u64()
        .expect("a downlink VLAN")
}

#[test]
fn first_allocation_on_the_seed_pool_gets_1025_and_creates_the_record() {
    let mut store = Store::seed();
    let (output, writes) = completed(run(&gateway("gw1", "create"), &mut store));
    assert_eq!(
        output,
        json!({"vlan_allocation": {"downlink": {"ha_interface_id": SEED_POOL, "vlan_id": 1025}}})
    );
    assert_eq!(writes.len(), 1);
    let write = &writes[0];
    let target = RecordRef {
        kind: RecordKind::VlanPool,
        resource_type: "ha_interface".to_owned(),
        resource_id: SEED_POOL.to_owned(),
    };
    assert_eq!(write.target, target);
    assert_eq!(
        write.expect_mod_revision,
        Some(0),
        "the record must not exist yet"
    );
    let WriteOp::Put(text) = &write.op else {
        panic!("{write:?}")
    };
    let record: Value = serde_json::from_str(text).unwrap();
    assert_eq!(record["vlan_ids_available"], 3068);
    assert_eq!(record["restricted_vlans"], "0-1024,4094");
    assert_eq!(
        record["allocations"],
        json!({"1025": "internet_gateway:gw1"})
    );
    let pool = Pool::from_base64(record["vlan_pool_state"].as_str().unwrap()).unwrap();
    assert!(!pool.is_free(1025) && pool.is_free(1026));
}

#[test]
fn allocations_go_up_and_a_released_vlan_is_given_out_again() {
    let mut store = Store::seed();
    assert_eq!(
        downlink_vlan(&commit(&gateway("gw1", "create"), &mut store)),
        1025
    );
    let (output, writes) = completed(run(&gateway("gw2", "create"), &mut store));
    assert_eq!(downlink_vlan(&output), 1026);
    let stored = store.current_revision(&writes[0].target);
    assert!(stored > 0);
    assert_eq!(writes[0].expect_mod_revision, Some(stored));
    assert!(store.apply(&writes));

    let output = commit(&gateway("gw1", "logical_delete"), &mut store);
    assert_eq!(output, json!({}));
    let pool = store.pool(SEED_POOL);
    assert!(pool.bitmap().is_free(1025));
    assert_eq!(pool.available(), 3068);
    assert_eq!(pool.allocations().len(), 1);

    assert_eq!(
        downlink_vlan(&commit(&gateway("gw3", "create"), &mut store)),
        1025
    );
    assert_eq!(store.pool(SEED_POOL).available(), 3067);
}

#[test]
fn a_retry_gets_the_same_vlan_and_changes_nothing() {
    let mut store = Store::seed();
    let first = commit(&gateway("gw1", "create"), &mut store);
    let before = store.pool(SEED_POOL);
    let (again, writes) = completed(run(&gateway("gw1", "create"), &mut store));
    assert_eq!(again, first);
    assert_eq!(
        writes.len(),
        1,
        "the put is still proposed, with its compare"
    );
    assert!(store.apply(&writes));
    assert_eq!(store.pool(SEED_POOL), before);
}

#[test]
fn a_vpn_gateway_gets_its_requested_uplink_vlan() {
    let mut store = Store::seed();
    let (output, writes) = completed(run(&vpn("vpn1", "create", json!(122)), &mut store));
    assert_eq!(
        output,
        json!({"vlan_allocation": {
            "downlink": {"ha_interface_id": SEED_POOL, "vlan_id": 1025},
            "uplink": {"ha_interface_id": UPLINK_POOL, "vlan_id": 122},
        }})
    );
    let targets: Vec<&str> = writes
        .iter()
        .map(|w| w.target.resource_id.as_str())
        .collect();
    assert_eq!(targets, [SEED_POOL, UPLINK_POOL]);
    assert!(writes.iter().all(|w| w.expect_mod_revision == Some(0)));
    assert!(store.apply(&writes));
    let uplink = store.pool(UPLINK_POOL);
    assert_eq!(uplink.allocations()[&122], "vpn_gateway:vpn1");
    assert_eq!(uplink.available(), 4096 - 100 - 1 - 1);
    // A retry keeps both.
    assert_eq!(
        commit(&vpn("vpn1", "create", json!(122)), &mut store),
        output
    );
}

#[test]
fn a_vpn_gateway_without_a_requested_uplink_vlan_gets_the_lowest_free() {
    let mut store = Store::seed();
    let output = commit(&vpn("vpn1", "create", Value::Null), &mut store);
    assert_eq!(output[OUTPUT_KEY]["uplink"]["vlan_id"], 100);
}

#[test]
fn two_items_on_one_pool_keep_distinct_vlans_across_retries() {
    let mut store = Store::seed();
    let params = json!({"downlink_interface_id": SEED_POOL, "uplink_interface_id": SEED_POOL,
                        "uplink_vlan_id": 2000});
    let job = job("vpn_gateway", "vpn1", "create", params);
    let output = commit(&job, &mut store);
    assert_eq!(downlink_vlan(&output), 1025);
    assert_eq!(output[OUTPUT_KEY]["uplink"]["vlan_id"], 2000);
    let (again, writes) = completed(run(&job, &mut store));
    assert_eq!(again, output);
    assert_eq!(writes.len(), 1, "one write per pool");
}

#[test]
fn a_restricted_or_taken_request_fails_naming_pool_and_vlan() {
    let mut store = Store::seed();
    commit(&vpn("vpn1", "create", json!(122)), &mut store);
    let before = (store.pool(SEED_POOL), store.pool(UPLINK_POOL));
    for (vlan, reason) in [
        (122, "already allocated to vpn_gateway:vpn1"),
        (50, "is restricted"),
        (5, "is restricted"),
    ] {
        let message = permanent(run(&vpn("vpn2", "create", json!(vlan)), &mut store));
        assert!(message.contains(UPLINK_POOL), "{message}");
        assert!(message.contains(&format!("VLAN {vlan} ")), "{message}");
        assert!(
            message.contains(reason) && message.contains("item uplink"),
            "{message}"
        );
    }
    assert_eq!((store.pool(SEED_POOL), store.pool(UPLINK_POOL)), before);
}

#[test]
fn an_exhausted_pool_fails_naming_it() {
    let mut store = Store::seed();
    store.put_ha_interface(SEED_POOL, "2-4094", None);
    assert_eq!(
        downlink_vlan(&commit(&gateway("gw1", "create"), &mut store)),
        1
    );
    let message = permanent(run(&gateway("gw2", "create"), &mut store));
    assert!(
        message.contains("item downlink")
            && message.contains(SEED_POOL)
            && message.contains("no free VLAN"),
        "{message}"
    );
}

#[test]
fn a_lost_compare_reruns_on_the_new_pool() {
    let mut store = Store::seed();
    let (first, first_writes) = completed(run(&gateway("gw1", "create"), &mut store));
    let (second, second_writes) = completed(run(&gateway("gw2", "create"), &mut store));
    assert_eq!(
        (downlink_vlan(&first), downlink_vlan(&second)),
        (1025, 1025)
    );
    assert!(store.apply(&first_writes));
    assert!(
        !store.apply(&second_writes),
        "the second job read a pool that changed"
    );
    assert_eq!(
        downlink_vlan(&commit(&gateway("gw2", "create"), &mut store)),
        1026
    );
}

#[test]
fn a_modify_that_changes_the_requested_vlan_releases_the_old_one() {
    let mut store = Store::seed();
    commit(&vpn("vpn1", "create", json!(122)), &mut store);
    let output = commit(&vpn("vpn1", "modify", json!(130)), &mut store);
    assert_eq!(output[OUTPUT_KEY]["uplink"]["vlan_id"], 130);
    assert_eq!(downlink_vlan(&output), 1025);
    let uplink = store.pool(UPLINK_POOL);
    assert!(uplink.bitmap().is_free(122));
    assert_eq!(
        uplink.allocations().keys().copied().collect::<Vec<_>>(),
        [130]
    );
}

#[test]
fn the_pool_comes_from_the_config_state_or_else_from_restricted_vlans() {
    // The seed's own state: the same pool as its restricted spec.
    let mut store = Store::seed();
    commit(&gateway("gw1", "create"), &mut store);
    let from_state = store.pool(SEED_POOL);
    let mut store = Store::seed();
    store.put_ha_interface(SEED_POOL, "0-1024,4094", None);
    commit(&gateway("gw1", "create"), &mut store);
    assert_eq!(store.pool(SEED_POOL), from_state);

    // A state with an extra bit keeps it; a broken one is ignored with a warning.
    let mut extra = Pool::from_restricted("0-1025,4094").unwrap();
    assert!(extra.allocate(1027));
    store = Store::seed();
    store.put_ha_interface(SEED_POOL, "0-1024,4094", Some(&extra.to_base64()));
    assert_eq!(
        downlink_vlan(&commit(&gateway("gw1", "create"), &mut store)),
        1026
    );
    assert_eq!(
        downlink_vlan(&commit(&gateway("gw2", "create"), &mut store)),
        1028
    );

    store = Store::seed();
    store.put_ha_interface(SEED_POOL, "0-1024,4094", Some("AAAA"));
    let mut log: Vec<(LogLevel, String)> = Vec::new();
    let outcome = handle(
        &gateway("gw1", "create"),
        &RunContext::default(),
        &mut store,
        &mut log,
    );
    assert_eq!(downlink_vlan(&completed(outcome).0), 1025);
    assert!(
        log.iter()
            .any(|(level, line)| *level == LogLevel::Warn && line.contains("3 bytes")),
        "{log:?}"
    );
}

#[test]
fn a_missing_ha_interface_or_bad_restricted_spec_is_permanent() {
    let mut store = Store::seed();
    let job = job(
        "internet_gateway",
        "gw1",
        "create",
        json!({"downlink_interface_id": "nope"}),
    );
    assert_eq!(
        permanent(run(&job, &mut store)),
        "ha_interface nope does not exist"
    );
    store.put_ha_interface(SEED_POOL, "1,abc", None);
    let message = permanent(run(&gateway("gw1", "create"), &mut store));
    assert!(
        message.contains(SEED_POOL) && message.contains("\"abc\""),
        "{message}"
    );
}

#[test]
fn a_broken_pool_record_is_permanent_naming_it() {
    let mut store = Store::seed();
    store.put(RecordKind::VlanPool, POOL_TYPE, SEED_POOL, "{not json");
    let message = permanent(run(&gateway("gw1", "create"), &mut store));
    assert!(
        message.starts_with(&format!("vlan pool record of ha_interface {SEED_POOL}: ")),
        "{message}"
    );
}

#[test]
fn an_item_without_a_pool_or_with_a_bad_vlan_id_is_permanent_naming_it() {
    let mut store = Store::seed();
    let message = permanent(run(
        &job("internet_gateway", "gw1", "create", json!({})),
        &mut store,
    ));
    assert!(
        message.contains("internet_gateway_vlan_pool")
            && message.contains("item downlink: pool is missing"),
        "{message}"
    );
    for bad in [json!(5000), json!("abc"), json!(-1)] {
        let message = permanent(run(&vpn("vpn1", "create", bad.clone()), &mut store));
        assert!(
            message.contains("item uplink: vlan_id must be"),
            "{bad}: {message}"
        );
    }
}

#[test]
fn a_delete_without_template_or_pool_record_does_nothing() {
    let mut store = Store::default();
    let (output, writes) = completed(run(&gateway("gw1", "delete"), &mut store));
    assert_eq!((output, writes), (json!({}), vec![]));
    let mut store = Store::seed();
    let (output, writes) = completed(run(&gateway("gw1", "logical_delete"), &mut store));
    assert_eq!((output, writes), (json!({}), vec![]));
    // It looked for the pool record but never built a pool from the config.
    let pool_key = (
        RecordKind::VlanPool,
        POOL_TYPE.to_owned(),
        SEED_POOL.to_owned(),
    );
    assert!(store.reads.contains(&pool_key), "{:?}", store.reads);
    let config_reads = store.reads.iter().filter(|(kind, resource_type, _)| {
        *kind == RecordKind::Config && resource_type == POOL_TYPE
    });
    assert_eq!(config_reads.count(), 0);
}

#[test]
fn a_delete_releases_the_owner_in_every_pool_with_a_compare() {
    let mut store = Store::seed();
    commit(&vpn("vpn1", "create", json!(122)), &mut store);
    commit(&gateway("gw1", "create"), &mut store);
    let (output, writes) = completed(run(&vpn("vpn1", "delete", json!(122)), &mut store));
    assert_eq!(output, json!({}));
    assert_eq!(writes.len(), 2);
    for write in &writes {
        assert_eq!(
            write.expect_mod_revision,
            Some(store.current_revision(&write.target))
        );
    }
    assert!(store.apply(&writes));
    assert_eq!(store.pool(UPLINK_POOL).allocations().len(), 0);
    let seed = store.pool(SEED_POOL);
    assert_eq!(
        seed.allocations().values().collect::<Vec<_>>(),
        ["internet_gateway:gw1"]
    );
    assert!(seed.bitmap().is_free(1025) && !seed.bitmap().is_free(1026));
}

#[test]
fn unavailable_store_is_retryable_and_denied_read_is_permanent() {
    let mut store = Store::seed();
    store.failure = Some(HostError::Unavailable("no leader".to_owned()));
    let result = run(&gateway("gw1", "create"), &mut store);
    assert!(
        matches!(&result, Err(JobError::Retryable(m)) if m.contains("no leader")),
        "{result:?}"
    );
    store.failure = Some(HostError::Denied("vlan-pool".to_owned()));
    let message = permanent(run(&gateway("gw1", "create"), &mut store));
    assert!(message.contains("access denied"), "{message}");
}

#[test]
fn unknown_action_is_a_permanent_error() {
    let mut store = Store::seed();
    let message = permanent(run(&gateway("gw1", "explode"), &mut store));
    assert!(message.contains("unknown action \"explode\""), "{message}");
}
