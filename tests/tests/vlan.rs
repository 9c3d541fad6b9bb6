//! VLAN pools (PROTOCOL section 7) end to end: exact bitmaps, release, requested VLANs,
//! failures that leave the pool alone, and many hosts allocating from one pool at once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use esi_host::keys::Record;
use esi_host::seed;
use esi_tests::TestEnv;
use serde_json::{json, Value};

const SEED_POOL: &str = seed::HA_INTERFACE_ID;

/// An ha_interface config: the seed's body with another id and restricted spec.
fn ha_interface(id: &str, restricted: &str, with_state: bool) -> Value {
    let mut body = seed::records().unwrap()[0].value["body"].clone();
    body["id"] = json!(id);
    body["restricted_vlans"] = json!(restricted);
    if !with_state {
        body.as_object_mut().unwrap().remove("vlan_pool_state");
    }
    body
}

fn gateway(id: &str, pool: &str) -> Value {
    json!({"id": id, "name": format!("gw-{id}"), "downlink_interface_id": pool,
           "tenant_id": seed::TENANT_ID, "vrf_name": "vrf1", "status": "PENDING_CREATE"})
}

fn gateway_id(i: usize) -> String {
    format!("6a7e0000-0000-4000-8000-{i:012}")
}

async fn env_with_pool(restricted: &str) -> TestEnv {
    let env = TestEnv::new().await.unwrap();
    env.load_shipped_templates_named(&[
        "internet_gateway_vlan_pool",
        "vpn_gateway_vlan_pool",
        "common_function_gateway_vlan_pool",
    ])
    .await
    .unwrap();
    env.put_config(
        "ha_interface",
        SEED_POOL,
        &ha_interface(SEED_POOL, restricted, restricted == "0-1024,4094"),
        1,
    )
    .await
    .unwrap();
    env
}

async fn pool_record(env: &TestEnv, pool: &str) -> Value {
    env.get_json(&env.key(Record::VlanPool, "ha_interface", pool))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no pool record for {pool}"))
}

fn allocation_of(state: &Value) -> Value {
    serde_json::from_str(
        state["state"]["vlan_allocation"]
            .as_str()
            .expect("vlan_allocation in /state"),
    )
    .unwrap()
}

/// Whether bit `vlan` is set in a pool's `vlan_pool_state` (MSB first).
fn bit(record: &Value, vlan: usize) -> bool {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(record["vlan_pool_state"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes.len(), 512);
    bytes[vlan / 8] & (0x80 >> (vlan % 8)) != 0
}

fn set_bits(record: &Value) -> u64 {
    (0..4096).filter(|&v| bit(record, v)).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_get_the_lowest_free_vlan_and_a_deleted_one_gives_it_back() {
    let env = env_with_pool("0-1024,4094").await;
    let host = env.start_host().await.unwrap();

    env.put_config(
        "internet_gateway",
        &gateway_id(1),
        &gateway(&gateway_id(1), SEED_POOL),
        1,
    )
    .await
    .unwrap();
    let state = env
        .wait_completed("internet_gateway", &gateway_id(1))
        .await
        .unwrap();
    assert_eq!(
        allocation_of(&state),
        json!({"downlink": {"ha_interface_id": SEED_POOL, "vlan_id": 1025}})
    );
    let pool = pool_record(&env, SEED_POOL).await;
    assert_eq!(pool["vlan_ids_available"], 3068);
    assert!(bit(&pool, 1025) && !bit(&pool, 1026));
    assert_eq!(
        pool["allocations"]["1025"],
        format!("internet_gateway:{}", gateway_id(1))
    );

    env.put_config(
        "internet_gateway",
        &gateway_id(2),
        &gateway(&gateway_id(2), SEED_POOL),
        1,
    )
    .await
    .unwrap();
    let state = env
        .wait_completed("internet_gateway", &gateway_id(2))
        .await
        .unwrap();
    assert_eq!(allocation_of(&state)["downlink"]["vlan_id"], 1026);

    // What `esi-host vlan show` prints, as data.
    let view = esi_host::vlan::show(&env.store, &env.schemas, SEED_POOL)
        .await
        .unwrap();
    assert!(view.stored);
    assert_eq!(view.vlan_ids_available, 3067);
    assert_eq!(view.restricted_vlans, "0-1024,4094");
    let owners: Vec<(String, String)> = view
        .allocated
        .iter()
        .map(|a| (a.vlans.clone(), a.owner.clone()))
        .collect();
    assert_eq!(
        owners,
        [
            (
                "1025".to_string(),
                format!("internet_gateway:{}", gateway_id(1))
            ),
            (
                "1026".to_string(),
                format!("internet_gateway:{}", gateway_id(2))
            )
        ]
    );
    assert!(
        view.render().contains("available   3067 of 4096"),
        "{}",
        view.render()
    );

    // gohan's delete: marked_for_deletion with a version bump.
    let marked = json!({"body": gateway(&gateway_id(1), SEED_POOL).to_string(), "version": 2, "marked_for_deletion": true});
    env.put_config_raw("internet_gateway", &gateway_id(1), &marked.to_string())
        .await
        .unwrap();
    let deleted = env
        .wait_for_state(
            "internet_gateway",
            &gateway_id(1),
            Duration::from_secs(60),
            |s| s["version"] == 2,
        )
        .await
        .unwrap();
    assert_eq!(deleted["state"]["worker_state"], "LOGICAL_DELETE_COMPLETED");
    let pool = pool_record(&env, SEED_POOL).await;
    assert!(!bit(&pool, 1025));
    assert_eq!(pool["vlan_ids_available"], 3068);

    env.put_config(
        "internet_gateway",
        &gateway_id(3),
        &gateway(&gateway_id(3), SEED_POOL),
        1,
    )
    .await
    .unwrap();
    let state = env
        .wait_completed("internet_gateway", &gateway_id(3))
        .await
        .unwrap();
    assert_eq!(allocation_of(&state)["downlink"]["vlan_id"], 1025);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vpn_gateway_gets_its_requested_uplink_vlan_and_a_bad_request_changes_nothing() {
    let env = env_with_pool("0-1024,4094").await;
    let uplink = "0a0a0a0a-0000-4000-8000-00000000beef";
    env.put_config(
        "ha_interface",
        uplink,
        &ha_interface(uplink, "0-99", false),
        1,
    )
    .await
    .unwrap();
    let host = env.start_host().await.unwrap();
    let vpn = |id: &str, vlan: u64| {
        json!({"id": id, "name": "vpn", "downlink_interface_id": SEED_POOL, "uplink_interface_id": uplink,
               "uplink_vlan_id": vlan, "tenant_id": seed::TENANT_ID})
    };

    let first = "7b000000-0000-4000-8000-000000000001";
    env.put_config("vpn_gateway", first, &vpn(first, 122), 1)
        .await
        .unwrap();
    let state = env.wait_completed("vpn_gateway", first).await.unwrap();
    assert_eq!(
        allocation_of(&state),
        json!({"downlink": {"ha_interface_id": SEED_POOL, "vlan_id": 1025},
               "uplink": {"ha_interface_id": uplink, "vlan_id": 122}})
    );
    let before = (
        pool_record(&env, SEED_POOL).await,
        pool_record(&env, uplink).await,
    );

    for (id, vlan) in [
        ("7b000000-0000-4000-8000-000000000002", 122),
        ("7b000000-0000-4000-8000-000000000003", 50),
    ] {
        env.put_config("vpn_gateway", id, &vpn(id, vlan), 1)
            .await
            .unwrap();
        let state = env
            .wait_for_state("vpn_gateway", id, Duration::from_secs(60), |s| {
                s["state"]["worker_state"] != ""
            })
            .await
            .unwrap();
        assert_eq!(state["state"]["worker_state"], "CREATE_FAILED", "{state}");
        let error = state["error"].as_str().unwrap();
        assert!(
            error.contains(uplink) && error.contains(&vlan.to_string()),
            "{error}"
        );
    }
    let after = (
        pool_record(&env, SEED_POOL).await,
        pool_record(&env, uplink).await,
    );
    assert_eq!(before, after, "a failed allocation changes no pool");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_allocate_300_distinct_vlans_from_one_pool() {
    let env = env_with_pool("0-1024,4094").await;
    let mut a = env.host_config();
    a.host_id = "vlan-a".into();
    let mut b = env.host_config();
    b.host_id = "vlan-b".into();
    let (host_a, host_b) = (
        esi_host::Host::start(a).await.unwrap(),
        esi_host::Host::start(b).await.unwrap(),
    );
    let ids: Vec<String> = (0..300).map(gateway_id).collect();
    for id in &ids {
        env.put_config("internet_gateway", id, &gateway(id, SEED_POOL), 1)
            .await
            .unwrap();
    }
    let mut vlans = HashSet::new();
    for id in &ids {
        let state = env
            .wait_for_state("internet_gateway", id, Duration::from_secs(300), |s| {
                s["state"]["worker_state"] != ""
            })
            .await
            .unwrap();
        assert_eq!(
            state["state"]["worker_state"], "CREATE_COMPLETED",
            "{id}: {state}"
        );
        assert!(
            vlans.insert(
                allocation_of(&state)["downlink"]["vlan_id"]
                    .as_u64()
                    .unwrap()
            ),
            "VLAN given twice"
        );
    }
    let pool = pool_record(&env, SEED_POOL).await;
    assert_eq!(pool["vlan_ids_available"], 3069 - 300);
    assert_eq!(set_bits(&pool), 4096 - (3069 - 300));
    let allocations = pool["allocations"].as_object().unwrap();
    assert_eq!(allocations.len(), 300);
    let owners: HashSet<&str> = allocations.values().map(|o| o.as_str().unwrap()).collect();
    assert_eq!(owners.len(), 300, "each gateway recorded once");
    for vlan in &vlans {
        assert!(bit(&pool, *vlan as usize));
    }
    host_a.shutdown().await;
    host_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_fails_only_the_gateways_that_did_not_fit() {
    // 5 free VLANs: 1, 4090, 4091, 4092 and 4093 (0 and 4095 are never free).
    let env = env_with_pool("2-4089,4094").await;
    let view = esi_host::vlan::show(&env.store, &env.schemas, SEED_POOL)
        .await
        .unwrap();
    assert!(
        !view.stored,
        "no job used the pool yet: computed from the config"
    );
    assert_eq!(view.vlan_ids_available, 5);
    let host = env.start_host().await.unwrap();
    let ids: Vec<String> = (0..8).map(gateway_id).collect();
    for id in &ids {
        env.put_config("internet_gateway", id, &gateway(id, SEED_POOL), 1)
            .await
            .unwrap();
    }
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let state = env
            .wait_for_state("internet_gateway", id, Duration::from_secs(60), |s| {
                s["state"]["worker_state"] != ""
            })
            .await
            .unwrap();
        let ws = state["state"]["worker_state"].as_str().unwrap().to_string();
        if ws == "CREATE_FAILED" {
            assert!(
                state["error"].as_str().unwrap().contains(SEED_POOL),
                "{state}"
            );
        }
        *outcomes.entry(ws).or_default() += 1;
    }
    assert_eq!(outcomes.get("CREATE_COMPLETED"), Some(&5), "{outcomes:?}");
    assert_eq!(outcomes.get("CREATE_FAILED"), Some(&3), "{outcomes:?}");
    assert_eq!(pool_record(&env, SEED_POOL).await["vlan_ids_available"], 0);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_workflow_allocates_its_vlan_before_monitoring() {
    let env = env_with_pool("0-1024,4094").await;
    let template = "downlink:\n  type: etcd_reader\n  etcd_type: ha_interface\n  etcd_id: {{ downlink_interface_id }}\nvlan:\n  type: logical_port\n  name: unit-{{ vlan.downlink.vlan_id }}\n";
    let mappings = json!({"downlink_interface_id": {"field": "downlink_interface_id"},
                          "vlan": {"output_key": "vlan_allocation"}});
    env.put_template(
        "internet_gateway_monitoring",
        "monitoring_worker",
        template,
        mappings,
    )
    .await
    .unwrap();
    env.put_monitoring_state(
        "ha_interface",
        SEED_POOL,
        &json!({"primary": "ACTIVE", "secondary": "ACTIVE"}),
    )
    .await
    .unwrap();
    let mut recorder = env.record_changes().await.unwrap();
    let host = env.start_host().await.unwrap();
    let id = gateway_id(42);
    env.put_config("internet_gateway", &id, &gateway(&id, SEED_POOL), 1)
        .await
        .unwrap();
    let state = env.wait_completed("internet_gateway", &id).await.unwrap();
    assert_eq!(allocation_of(&state)["downlink"]["vlan_id"], 1025);
    let monitoring: Value =
        serde_json::from_str(state["state"]["state_monitoring"].as_str().unwrap()).unwrap();
    assert_eq!(monitoring["downlink"], "ACTIVE");
    // The monitoring job read the VLAN job's output through an output_key parameter.
    let target = env
        .get_json(&env.key(Record::MonitoringTarget, "internet_gateway", &id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(target["vlan"]["properties"]["name"], "unit-1025");
    let state_key = env.key(Record::State, "internet_gateway", &id);
    recorder
        .until_put(&state_key, Duration::from_secs(10))
        .await
        .unwrap();
    let handlers: Vec<String> = recorder
        .puts_under(&env.job_key(esi_host::keys::Queue::All, ""))
        .iter()
        .map(|(_, j)| j[0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(handlers, ["vlan_pool_worker", "monitoring_worker"]);
    host.shutdown().await;
}
