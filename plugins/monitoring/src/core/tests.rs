//! Behaviour of the core against an in-memory record store. The `template_file` strings are
//! copied from the real ESI heat templates (`fixtures/esi/heat_templates/*.json`).

use std::collections::HashMap;

use serde_json::{json, Value};

use super::*;

const HA_INTERFACE: &str = "primary:\n  type: etcd_reader\n  etcd_type: er_physical_interface\n  etcd_id: {{ primary_interface_id }}\nsecondary:\n  type: etcd_reader\n  etcd_type: er_physical_interface\n  etcd_id: {{ secondary_interface_id }}\n";
const ER_PHYSICAL_INTERFACE: &str = "interface:\n  type: physical_port\n  community_name: {{ community_name }}\n  device_ip: {{ device_ip }}\n  name: {{ name }}\n";
const EDGE_ROUTER: &str = "router:\n  type: router\n  community_name: {{ community_name }}\n  ip: {{ device_ip }}\n  mibs: []\n";
const VPN_INTERFACE: &str = "primary:\n  type: bgp_session\n  host: {{ primary_device_ip }}\n  port: {{ primary_device_port }}\n  login: {{ primary_device_login }}\n  password: {{ primary_device_password }}\n  peer_address: {{ primary_peer_ip }}\n  instance: {{ vrf_name }}\n  timeout: 120\nprimary_uplink:\n  type: logical_port\n  community_name: {{ community_name }}\n  device_ip: {{ primary_device_ip }}\n  name: {{ primary_port }}\nsecondary:\n  type: bgp_session\n  host: {{ secondary_device_ip }}\n  port: {{ secondary_device_port }}\n  login: {{ secondary_device_login }}\n  password: {{ secondary_device_password }}\n  peer_address: {{ secondary_peer_ip }}\n  instance: {{ vrf_name }}\n  timeout: 120\nsecondary_uplink:\n  type: logical_port\n  community_name: {{ community_name }}\n  device_ip: {{ secondary_device_ip }}\n  name: {{ secondary_port }}\ndb_mappings:\n  - mapped_id: {{ primary_device_ip }}-{{ primary_port }}\n    relation: \"primary\"\n  - mapped_id: {{ secondary_device_ip }}-{{ secondary_port }}\n    relation: \"secondary\"\n";
const GW_INTERFACE: &str = "primary:\n  type: vrrp_session\n  host: {{ primary_device_ip }}\n  port: {{ primary_device_port }}\n  login: {{ primary_device_login }}\n  password: {{ primary_device_password }}\n  interface: {{ primary_logical_interface_name }}\n  wanted_status: master\n  vrid: {{ vrid }}\n  timeout: 360\nsecondary:\n  type: vrrp_session\n  host: {{ secondary_device_ip }}\n  port: {{ secondary_device_port }}\n  login: {{ secondary_device_login }}\n  password: {{ secondary_device_password }}\n  interface: {{ secondary_logical_interface_name }}\n  wanted_status: backup\n  vrid: {{ vrid }}\n  timeout: 360\ndb_mappings:\n- mapped_id: {{primary_device_ip}}-{{primary_logical_interface_name}}\n  relation: {{service_type}}_primary\n- mapped_id: {{secondary_device_ip}}-{{secondary_logical_interface_name}}\n  relation: {{service_type}}_secondary\n";
const INTERNET_GATEWAY: &str = "uplink:\n  type: etcd_reader\n  etcd_type: ha_interface\n  etcd_id: {{ uplink_interface_id }}\n  timeout: 120\ndownlink:\n  type: etcd_reader\n  etcd_type: ha_interface\n  etcd_id: {{ downlink_interface_id }}\n  timeout: 120\ncounter_primary:\n  type: kafka_messenger\n  kafka_topic: monitor_igs_counter\n  in_firewall_name: {{ inet_in_filter }}\n  out_firewall_name: {{ inet_out_filter }}\n  counter_name_in_primary: {{ counter_name_in_primary }}\n  counter_name_out_primary: {{ counter_name_out_primary }}\n  counter_name_in_secondary: {{ counter_name_in_secondary }}\n  counter_name_out_secondary: {{ counter_name_out_secondary }}\n  server_username: {{ username }}\n  server_password: {{ password }}\n  server_ssh_port: {{ ssh_port }}\n  primary_server_ip: {{ primary_server_ip }}\n  secondary_server_ip: {{ secondary_server_ip }}\ndb_mappings:\n  - mapped_id: {{ primary_server_ip }}-{{ inet_in_filter }}-{{ counter_name_in_primary }}\n    relation: primary_in\n  - mapped_id: {{ primary_server_ip }}-{{ inet_out_filter }}-{{ counter_name_out_primary }}\n    relation: primary_out\n  - mapped_id: {{ secondary_server_ip }}-{{ inet_in_filter }}-{{ counter_name_in_secondary }}\n    relation: secondary_in\n  - mapped_id: {{ secondary_server_ip }}-{{ inet_out_filter }}-{{ counter_name_out_secondary }}\n    relation: secondary_out\n";

const HA_ID: &str = "372ed357-e622-41fb-a613-076d332838e2";
const PRIMARY_ID: &str = "a752c6c0-2075-4e7f-9040-5fcefcad0252";
const SECONDARY_ID: &str = "96c3629b-9bfb-4d54-adc1-750d024c2858";
const TENANT_ID: &str = "0b576f6f4cbf414f829cd12f008bf08f";

type Key = (RecordKind, String, String);

/// Records by kind, type and id; `failure` makes every read fail instead.
#[derive(Default)]
struct MemoryRecords {
    records: HashMap<Key, String>,
    failure: Option<HostError>,
    reads: Vec<Key>,
}

impl MemoryRecords {
    /// A store holding the heat template `<resource_type>_monitoring` with this body.
    fn with_body(resource_type: &str, body: Value) -> Self {
        let mut records = MemoryRecords::default();
        let envelope = json!({"body": body, "version": 1, "marked_for_deletion": false});
        let id = format!("{resource_type}_monitoring");
        records.put(
            RecordKind::Config,
            "heat_template",
            &id,
            &envelope.to_string(),
        );
        records
    }

    fn with_template(resource_type: &str, template_file: &str) -> Self {
        let body = json!({
            "handler": "monitoring_worker",
            "id": format!("{resource_type}_monitoring"),
            "template_file": template_file,
            "watch": [],
        });
        Self::with_body(resource_type, body)
    }

    fn put(&mut self, kind: RecordKind, resource_type: &str, resource_id: &str, value: &str) {
        let key = (kind, resource_type.to_owned(), resource_id.to_owned());
        self.records.insert(key, value.to_owned());
    }

    /// A `/state` record as the worker writes it: `state_monitoring` JSON-encoded.
    fn put_state(&mut self, resource_type: &str, resource_id: &str, monitoring: Value) {
        let state = json!({
            "state": {
                "state_monitoring": monitoring.to_string(),
                "worker_state": "CREATE_COMPLETED",
            },
            "version": 1,
            "error": "",
        });
        self.put(
            RecordKind::State,
            resource_type,
            resource_id,
            &state.to_string(),
        );
    }
}

impl RecordReader for MemoryRecords {
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
        Ok(self.records.get(&key).map(|value| Versioned {
            value: value.clone(),
            mod_revision: 7,
        }))
    }
}

fn job(resource_type: &str, action: &str, params: Value) -> Job {
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
        id: format!("{action}:monitoring_worker:{resource_type}:{HA_ID}:1:zv0bv"),
        job_name: format!("{resource_type}:{HA_ID}:1"),
        handler: HANDLER.to_owned(),
        action: action.to_owned(),
        resource_type: resource_type.to_owned(),
        resource_id: HA_ID.to_owned(),
        version: 1,
        is_first: true,
        is_last: true,
        params,
        resource_input: json!({"id": HA_ID, "tenant_id": TENANT_ID, "name": "sample"}),
        job_state: json!({}),
    }
}

/// The seed's ha_interface create job (seed 000, record 2).
fn seed_job() -> Job {
    let mut job = job(
        "ha_interface",
        "create",
        json!({"primary_interface_id": PRIMARY_ID, "secondary_interface_id": SECONDARY_ID}),
    );
    for param in &mut job.params {
        param.resources = vec![ResourceRef {
            resource_type: "er_physical_interface".to_owned(),
            resource_id: param.value.as_str().unwrap_or_default().to_owned(),
        }];
    }
    job
}

fn seed_records(secondary: &str) -> MemoryRecords {
    let mut records = MemoryRecords::with_template("ha_interface", HA_INTERFACE);
    let primary = json!({"interface": "ACTIVE"});
    records.put_state("er_physical_interface", PRIMARY_ID, primary);
    let secondary = json!({"interface": secondary});
    records.put_state("er_physical_interface", SECONDARY_ID, secondary);
    records
}

fn run_at(job: &Job, records: &mut MemoryRecords, elapsed_ms: u64) -> Result<Outcome, JobError> {
    let context = RunContext {
        elapsed_ms,
        config: json!({}),
        ..RunContext::default()
    };
    let mut log: Vec<(LogLevel, String)> = Vec::new();
    handle(job, &context, records, &mut log)
}

fn run(job: &Job, records: &mut MemoryRecords) -> Result<Outcome, JobError> {
    run_at(job, records, 0)
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

/// The JSON a write puts into the job's own record of `kind`; `None` if it deletes it.
fn written(writes: &[ProposedWrite], kind: RecordKind) -> Option<Value> {
    let matching: Vec<&ProposedWrite> = writes.iter().filter(|w| w.target.kind == kind).collect();
    assert_eq!(matching.len(), 1, "one write of {kind:?} in {writes:?}");
    let write = matching[0];
    assert_eq!(write.target.resource_id, HA_ID);
    assert_eq!(write.expect_mod_revision, None);
    match &write.op {
        WriteOp::Put(text) => Some(serde_json::from_str(text).expect("put value is JSON")),
        WriteOp::Delete => None,
    }
}

#[test]
fn seed_ha_interface_with_both_interfaces_active_reports_active() {
    let mut records = seed_records("ACTIVE");
    let (output, writes) = completed(run(&seed_job(), &mut records));
    assert_eq!(
        output.to_string(),
        r#"{"state_monitoring":{"primary":"ACTIVE","secondary":"ACTIVE"}}"#
    );
    assert_eq!(written(&writes, RecordKind::MonitoringTarget), None);
    assert_eq!(written(&writes, RecordKind::ResourceMapping), None);
    assert_eq!(writes[0].target.resource_type, "ha_interface");
}

#[test]
fn seed_reads_the_template_and_both_interface_states() {
    let mut records = seed_records("ACTIVE");
    completed(run(&seed_job(), &mut records));
    let reads: Vec<(RecordKind, &str, &str)> = records
        .reads
        .iter()
        .map(|(kind, rtype, id)| (*kind, rtype.as_str(), id.as_str()))
        .collect();
    assert_eq!(
        reads,
        [
            (
                RecordKind::Config,
                "heat_template",
                "ha_interface_monitoring"
            ),
            (RecordKind::State, "er_physical_interface", PRIMARY_ID),
            (RecordKind::State, "er_physical_interface", SECONDARY_ID),
        ]
    );
}

#[test]
fn secondary_with_a_down_interface_reports_down() {
    let mut records = seed_records("DOWN");
    let (output, _) = completed(run(&seed_job(), &mut records));
    assert_eq!(
        output,
        json!({"state_monitoring": {"primary": "ACTIVE", "secondary": "DOWN"}})
    );
}

#[test]
fn state_with_an_error_reports_down() {
    let mut records = seed_records("ACTIVE");
    let failed = json!({
        "state": {"state_monitoring": "{\"interface\": \"ACTIVE\"}", "worker_state": "CREATE_FAILED"},
        "version": 1,
        "error": "device unreachable",
    });
    records.put(
        RecordKind::State,
        "er_physical_interface",
        SECONDARY_ID,
        &failed.to_string(),
    );
    let (output, _) = completed(run(&seed_job(), &mut records));
    assert_eq!(output["state_monitoring"]["secondary"], "DOWN");
}

#[test]
fn state_without_state_monitoring_or_with_garbage_reports_down() {
    let mut records = seed_records("ACTIVE");
    let read_complete =
        json!({"state": {"worker_state": "READ_COMPLETE"}, "version": 1, "error": ""});
    records.put(
        RecordKind::State,
        "er_physical_interface",
        PRIMARY_ID,
        &read_complete.to_string(),
    );
    let garbage = json!({"state": {"state_monitoring": "{not json"}, "version": 1, "error": ""});
    records.put(
        RecordKind::State,
        "er_physical_interface",
        SECONDARY_ID,
        &garbage.to_string(),
    );
    let (output, _) = completed(run(&seed_job(), &mut records));
    assert_eq!(
        output,
        json!({"state_monitoring": {"primary": "DOWN", "secondary": "DOWN"}})
    );
}

#[test]
fn state_monitoring_stored_as_an_object_is_accepted() {
    let mut records = seed_records("ACTIVE");
    let object =
        json!({"state": {"state_monitoring": {"a": "ACTIVE", "b": "ACTIVE"}}, "error": ""});
    records.put(
        RecordKind::State,
        "er_physical_interface",
        SECONDARY_ID,
        &object.to_string(),
    );
    let (output, _) = completed(run(&seed_job(), &mut records));
    assert_eq!(output["state_monitoring"]["secondary"], "ACTIVE");
}

#[test]
fn missing_state_before_timeout_waits_default_time_between_retries() {
    let mut records = seed_records("ACTIVE");
    records
        .records
        .retain(|(kind, _, id), _| !(*kind == RecordKind::State && id == SECONDARY_ID));
    let outcome = run_at(&seed_job(), &mut records, 30_000);
    assert_eq!(outcome, Ok(Outcome::Wait { millis: 10_000 }));
}

#[test]
fn missing_state_waits_the_templates_time_between_retries() {
    let template = "uplink:\n  type: etcd_reader\n  etcd_type: ha_interface\n  etcd_id: {{ id }}\n  time_between_retries: 3\n  timeout: 60\n";
    let mut records = MemoryRecords::with_template("internet_gateway", template);
    let job = job("internet_gateway", "create", json!({"id": "up-1"}));
    assert_eq!(run(&job, &mut records), Ok(Outcome::Wait { millis: 3_000 }));
}

#[test]
fn waiting_items_use_the_smallest_interval_and_fractional_seconds() {
    let template = "a:\n  type: etcd_reader\n  etcd_type: ha_interface\n  etcd_id: x\n  time_between_retries: 4\nb:\n  type: etcd_reader\n  etcd_type: ha_interface\n  etcd_id: y\n  time_between_retries: 0.25\n";
    let mut records = MemoryRecords::with_template("internet_gateway", template);
    let job = job("internet_gateway", "create", json!({}));
    assert_eq!(run(&job, &mut records), Ok(Outcome::Wait { millis: 250 }));
}

#[test]
fn wait_does_not_overshoot_the_timeout() {
    let mut records = MemoryRecords::with_template("ha_interface", HA_INTERFACE);
    let outcome = run_at(&seed_job(), &mut records, 117_500);
    assert_eq!(outcome, Ok(Outcome::Wait { millis: 2_500 }));
}

#[test]
fn missing_state_past_timeout_reports_down_and_logs_it() {
    let mut records = seed_records("ACTIVE");
    records
        .records
        .retain(|(kind, _, id), _| !(*kind == RecordKind::State && id == SECONDARY_ID));
    let context = RunContext {
        elapsed_ms: 120_000,
        ..RunContext::default()
    };
    let mut log: Vec<(LogLevel, String)> = Vec::new();
    let (output, _) = completed(handle(&seed_job(), &context, &mut records, &mut log));
    assert_eq!(
        output,
        json!({"state_monitoring": {"primary": "ACTIVE", "secondary": "DOWN"}})
    );
    assert!(
        log.iter().any(|(level, line)| *level == LogLevel::Warn
            && line.contains("secondary")
            && line.contains(SECONDARY_ID)),
        "{log:?}"
    );
}

#[test]
fn er_physical_interface_registers_a_physical_port_target() {
    let mut records = MemoryRecords::with_template("er_physical_interface", ER_PHYSICAL_INTERFACE);
    let params = json!({"community_name": "EDGE_ROUTER_COMMUNITY", "device_ip": "10.0.0.1", "name": "xe-0/0/1"});
    let (output, writes) = completed(run(
        &job("er_physical_interface", "create", params),
        &mut records,
    ));
    assert_eq!(output, json!({"state_monitoring": {"interface": "ACTIVE"}}));
    let targets = written(&writes, RecordKind::MonitoringTarget);
    let expected = json!({"interface": {
        "type": "physical_port",
        "properties": {"community_name": "EDGE_ROUTER_COMMUNITY", "device_ip": "10.0.0.1", "name": "xe-0/0/1"},
        "tenant_id": TENANT_ID,
        "version": 1,
        "action": "create",
    }});
    assert_eq!(targets, Some(expected));
    assert_eq!(written(&writes, RecordKind::ResourceMapping), None);
}

#[test]
fn edge_router_registers_a_router_target_without_tenant() {
    let mut records = MemoryRecords::with_template("edge_router", EDGE_ROUTER);
    let mut job = job(
        "edge_router",
        "modify",
        json!({"community_name": "C", "device_ip": "10.1.1.1"}),
    );
    job.resource_input = json!({"ip": "10.1.1.1"});
    job.version = 3;
    let (output, writes) = completed(run(&job, &mut records));
    assert_eq!(output, json!({"state_monitoring": {"router": "ACTIVE"}}));
    let expected = json!({"router": {
        "type": "router",
        "properties": {"community_name": "C", "ip": "10.1.1.1", "mibs": []},
        "tenant_id": null,
        "version": 3,
        "action": "modify",
    }});
    assert_eq!(
        written(&writes, RecordKind::MonitoringTarget),
        Some(expected)
    );
}

fn vpn_params() -> Value {
    json!({
        "primary_device_ip": "10.0.0.1", "primary_device_port": 22,
        "primary_device_login": "admin", "primary_device_password": "secret1",
        "primary_peer_ip": "192.168.0.1", "vrf_name": "vrf-1",
        "community_name": "EDGE_ROUTER_COMMUNITY", "primary_port": "ae0.100",
        "secondary_device_ip": "10.0.0.2", "secondary_device_port": 22,
        "secondary_device_login": "admin", "secondary_device_password": "secret2",
        "secondary_peer_ip": "192.168.0.2", "secondary_port": "ae0.200",
    })
}

#[test]
fn vpn_interface_bgp_sessions_expect_established() {
    let mut records = MemoryRecords::with_template("vpn_interface", VPN_INTERFACE);
    let (output, writes) = completed(run(
        &job("vpn_interface", "create", vpn_params()),
        &mut records,
    ));
    assert_eq!(
        output.to_string(),
        r#"{"state_monitoring":{"primary":"ESTABLISHED","primary_uplink":"ACTIVE","secondary":"ESTABLISHED","secondary_uplink":"ACTIVE"}}"#
    );
    let targets = written(&writes, RecordKind::MonitoringTarget).expect("targets are put");
    let names: Vec<&String> = targets.as_object().expect("object").keys().collect();
    assert_eq!(
        names,
        ["primary", "primary_uplink", "secondary", "secondary_uplink"]
    );
    assert_eq!(
        targets["primary"]["properties"],
        json!({"host": "10.0.0.1", "port": 22, "login": "admin", "password": "secret1",
               "peer_address": "192.168.0.1", "instance": "vrf-1"})
    );
    assert_eq!(targets["secondary_uplink"]["type"], "logical_port");
    let mappings = written(&writes, RecordKind::ResourceMapping);
    let expected = json!({"db_mappings": [
        {"mapped_id": "10.0.0.1-ae0.100", "relation": "primary"},
        {"mapped_id": "10.0.0.2-ae0.200", "relation": "secondary"},
    ], "version": 1});
    assert_eq!(mappings, Some(expected));
}

#[test]
fn gw_interface_vrrp_sessions_expect_their_wanted_status() {
    let mut records = MemoryRecords::with_template("gw_interface", GW_INTERFACE);
    let params = json!({
        "primary_device_ip": "10.0.0.1", "primary_device_port": 22,
        "primary_device_login": "admin", "primary_device_password": "pw",
        "primary_logical_interface_name": "ae1.10", "vrid": 7,
        "secondary_device_ip": "10.0.0.2", "secondary_device_port": 22,
        "secondary_device_login": "admin", "secondary_device_password": "pw",
        "secondary_logical_interface_name": "ae1.20", "service_type": "internet",
    });
    let (output, writes) = completed(run(&job("gw_interface", "create", params), &mut records));
    assert_eq!(
        output,
        json!({"state_monitoring": {"primary": "master", "secondary": "backup"}})
    );
    let targets = written(&writes, RecordKind::MonitoringTarget).expect("targets are put");
    assert_eq!(
        targets["primary"]["properties"],
        json!({"host": "10.0.0.1", "port": 22, "login": "admin", "password": "pw",
               "interface": "ae1.10", "vrid": 7})
    );
    let mappings = written(&writes, RecordKind::ResourceMapping).expect("mappings are put");
    assert_eq!(
        mappings["db_mappings"],
        json!([{"mapped_id": "10.0.0.1-ae1.10", "relation": "internet_primary"},
               {"mapped_id": "10.0.0.2-ae1.20", "relation": "internet_secondary"}])
    );
}

#[test]
fn internet_gateway_registers_kafka_messenger_and_db_mappings() {
    let mut records = MemoryRecords::with_template("internet_gateway", INTERNET_GATEWAY);
    records.put_state(
        "ha_interface",
        "up-1",
        json!({"primary": "ACTIVE", "secondary": "ACTIVE"}),
    );
    records.put_state(
        "ha_interface",
        "down-1",
        json!({"primary": "ACTIVE", "secondary": "DOWN"}),
    );
    let params = json!({
        "uplink_interface_id": "up-1", "downlink_interface_id": "down-1",
        "inet_in_filter": "IN", "inet_out_filter": "OUT",
        "counter_name_in_primary": "vrf_IN", "counter_name_out_primary": "vrf_OUT",
        "counter_name_in_secondary": "vrf_IN", "counter_name_out_secondary": "vrf_OUT",
        "username": "admin", "password": "pw", "ssh_port": 22,
        "primary_server_ip": "10.0.0.1", "secondary_server_ip": "10.0.0.2",
    });
    let (output, writes) = completed(run(
        &job("internet_gateway", "create", params),
        &mut records,
    ));
    assert_eq!(
        output,
        json!({"state_monitoring": {"uplink": "ACTIVE", "downlink": "DOWN"}})
    );
    let targets = written(&writes, RecordKind::MonitoringTarget).expect("targets are put");
    let counter = &targets["counter_primary"];
    assert_eq!(counter["type"], "kafka_messenger");
    assert_eq!(counter["kafka_topic"], "monitor_igs_counter");
    assert_eq!(counter["properties"].get("kafka_topic"), None);
    assert_eq!(counter["properties"]["server_ssh_port"], 22);
    assert_eq!(counter["properties"]["in_firewall_name"], "IN");
    assert_eq!(targets.as_object().map(|t| t.len()), Some(1));
    let mappings = written(&writes, RecordKind::ResourceMapping).expect("mappings are put");
    assert_eq!(
        mappings["db_mappings"][0],
        json!({"mapped_id": "10.0.0.1-IN-vrf_IN", "relation": "primary_in"})
    );
    assert_eq!(
        mappings["db_mappings"][3],
        json!({"mapped_id": "10.0.0.2-OUT-vrf_OUT", "relation": "secondary_out"})
    );
}

#[test]
fn numeric_mapped_id_is_recorded_as_text() {
    let template = "db_mappings:\n  - mapped_id: {{ n }}\n    relation: r\n";
    let mut records = MemoryRecords::with_template("gw_interface", template);
    let (_, writes) = completed(run(
        &job("gw_interface", "create", json!({"n": 42})),
        &mut records,
    ));
    let mappings = written(&writes, RecordKind::ResourceMapping).expect("mappings are put");
    assert_eq!(
        mappings["db_mappings"],
        json!([{"mapped_id": "42", "relation": "r"}])
    );
}

#[test]
fn db_mappings_that_is_not_a_list_is_a_permanent_error() {
    let mut records = MemoryRecords::with_template("gw_interface", "db_mappings: oops\n");
    let message = permanent(run(&job("gw_interface", "create", json!({})), &mut records));
    assert!(
        message.contains("gw_interface_monitoring") && message.contains("db_mappings"),
        "{message}"
    );
}

#[test]
fn invalid_yaml_is_a_permanent_error_naming_the_template() {
    let mut records =
        MemoryRecords::with_template("ha_interface", "primary: [unclosed\n  type: x\n");
    let message = permanent(run(&seed_job(), &mut records));
    assert!(
        message.starts_with(
            "heat template ha_interface_monitoring: rendered template_file is not valid YAML: "
        ),
        "{message}"
    );
}

#[test]
fn template_syntax_error_is_a_permanent_error_naming_the_template() {
    let mut records = MemoryRecords::with_template("ha_interface", "primary: {{ oops\n");
    let message = permanent(run(&seed_job(), &mut records));
    assert!(
        message.contains("heat template ha_interface_monitoring: cannot render"),
        "{message}"
    );
}

#[test]
fn unknown_item_type_is_a_permanent_error_naming_the_item() {
    let template =
        "primary:\n  type: etcd_reader\n  etcd_type: t\n  etcd_id: i\nprobe:\n  type: telepathy\n";
    let mut records = MemoryRecords::with_template("ha_interface", template);
    let message = permanent(run(&seed_job(), &mut records));
    assert!(
        message.contains("ha_interface_monitoring")
            && message.contains("item probe")
            && message.contains("\"telepathy\""),
        "{message}"
    );
}

#[test]
fn item_without_type_is_a_permanent_error_naming_the_item() {
    let mut records = MemoryRecords::with_template("ha_interface", "primary:\n  etcd_id: x\n");
    let message = permanent(run(&seed_job(), &mut records));
    assert!(message.contains("item primary: has no type"), "{message}");
}

#[test]
fn top_level_that_is_not_a_mapping_is_a_permanent_error() {
    let mut records = MemoryRecords::with_template("ha_interface", "- a\n- b\n");
    let message = permanent(run(&seed_job(), &mut records));
    assert!(message.contains("not a YAML mapping"), "{message}");
}

#[test]
fn missing_template_is_a_permanent_error_naming_it() {
    let mut records = MemoryRecords::default();
    let message = permanent(run(&seed_job(), &mut records));
    assert_eq!(
        message,
        "heat template ha_interface_monitoring: does not exist"
    );
}

#[test]
fn template_body_stored_as_a_json_string_is_accepted() {
    let body = json!({"id": "ha_interface_monitoring", "template_file": HA_INTERFACE}).to_string();
    let mut records = seed_records("ACTIVE");
    let string_body = MemoryRecords::with_body("ha_interface", Value::String(body));
    records.records.extend(string_body.records);
    let (output, _) = completed(run(&seed_job(), &mut records));
    assert_eq!(
        output,
        json!({"state_monitoring": {"primary": "ACTIVE", "secondary": "ACTIVE"}})
    );
}

#[test]
fn output_key_params_come_from_the_job_state() {
    let template = "primary:\n  type: etcd_reader\n  etcd_type: er_physical_interface\n  etcd_id: {{ port }}\n";
    let mut records = seed_records("ACTIVE");
    records
        .records
        .extend(MemoryRecords::with_template("ha_interface", template).records);
    let mut job = seed_job();
    job.params = vec![Param {
        param: "port".to_owned(),
        kind: "output_key".to_owned(),
        value: json!("allocated_port"),
        resources: Vec::new(),
    }];
    job.job_state = json!({"allocated_port": PRIMARY_ID});
    let (output, _) = completed(run(&job, &mut records));
    assert_eq!(output, json!({"state_monitoring": {"primary": "ACTIVE"}}));
}

#[test]
fn undefined_variables_render_empty_and_resource_is_in_the_context() {
    let template = "switch:\n  type: switch\n  ip: {{ nowhere }}\n  name: {{ resource.name }}\n  gone: {{ nothing }}\n";
    let mut records = MemoryRecords::with_template("ese_device", template);
    let mut job = job("ese_device", "create", json!({}));
    job.params.push(Param {
        param: "nothing".to_owned(),
        kind: "value".to_owned(),
        value: Value::Null,
        resources: Vec::new(),
    });
    let (_, writes) = completed(run(&job, &mut records));
    let targets = written(&writes, RecordKind::MonitoringTarget).expect("targets are put");
    assert_eq!(
        targets["switch"]["properties"],
        json!({"ip": null, "name": "sample", "gone": null})
    );
}

#[test]
fn delete_removes_the_targets_and_mappings_without_reading_anything() {
    for action in ["delete", "logical_delete"] {
        let mut records = MemoryRecords::default();
        let (output, writes) =
            completed(run(&job("gw_interface", action, json!({})), &mut records));
        assert_eq!(output, json!({}));
        assert_eq!(written(&writes, RecordKind::MonitoringTarget), None);
        assert_eq!(written(&writes, RecordKind::ResourceMapping), None);
        assert_eq!(writes.len(), 2);
        assert!(
            records.reads.is_empty(),
            "{action} read {:?}",
            records.reads
        );
    }
}

#[test]
fn unknown_action_is_a_permanent_error() {
    let mut records = seed_records("ACTIVE");
    let message = permanent(run(
        &job("ha_interface", "explode", json!({})),
        &mut records,
    ));
    assert!(message.contains("unknown action \"explode\""), "{message}");
}

#[test]
fn unavailable_store_is_retryable_and_denied_read_is_permanent() {
    let mut records = seed_records("ACTIVE");
    records.failure = Some(HostError::Unavailable("no leader".to_owned()));
    let result = run(&seed_job(), &mut records);
    assert!(
        matches!(&result, Err(JobError::Retryable(m)) if m.contains("no leader")),
        "{result:?}"
    );
    records.failure = Some(HostError::Denied("state".to_owned()));
    let message = permanent(run(&seed_job(), &mut records));
    assert!(
        message.contains("heat template ha_interface_monitoring"),
        "{message}"
    );
}

#[test]
fn etcd_reader_without_an_id_is_a_permanent_error() {
    let mut records = MemoryRecords::with_template("ha_interface", HA_INTERFACE);
    let message = permanent(run(&job("ha_interface", "create", json!({})), &mut records));
    assert!(
        message.contains("item primary: etcd_id is missing or empty"),
        "{message}"
    );
}
