//! The `esi-host` commands an operator runs against etcd, run as the binary.

use std::path::PathBuf;
use std::process::Command;

use esi_host::keys::{Keys, Record};
use esi_host::local_etcd::LocalEtcd;
use esi_host::schema::SchemaRegistry;
use esi_host::store::Store;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn esi_host(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_esi-host"))
        .args(args)
        .output()
        .expect("esi-host runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_load_writes_every_shipped_template() {
    let etcd = LocalEtcd::start().await.unwrap();
    let dir = repo().join("templates");
    let (ok, stdout, stderr) = esi_host(&[
        "templates",
        "load",
        "--etcd",
        etcd.endpoint(),
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let shipped = std::fs::read_dir(&dir).unwrap().count();
    assert!(
        stdout.contains(&format!("loaded {shipped} templates")),
        "{stdout}"
    );
    let store = Store::connect(&[etcd.endpoint().to_string()], Keys::new(""))
        .await
        .unwrap();
    let (templates, _) = store.list("/config/v2.0/heat_templates/").await.unwrap();
    assert_eq!(templates.len(), shipped);
    etcd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vlan_show_prints_a_pool_as_a_table_and_as_json() {
    let etcd = LocalEtcd::start().await.unwrap();
    let store = Store::connect(&[etcd.endpoint().to_string()], Keys::new(""))
        .await
        .unwrap();
    let schemas = SchemaRegistry::built_in();
    let seed = esi_host::seed::records().unwrap();
    let key = store.keys().record(
        Record::Config,
        schemas.get("ha_interface").unwrap(),
        esi_host::seed::HA_INTERFACE_ID,
    );
    store.put(&key, seed[0].value.to_string()).await.unwrap();

    let id = esi_host::seed::HA_INTERFACE_ID;
    let (ok, table, stderr) = esi_host(&["vlan", "show", "--etcd", etcd.endpoint(), id]);
    assert!(ok, "{stderr}");
    assert!(table.contains("available   3069 of 4096"), "{table}");
    assert!(
        table.contains("restricted  0-1024,4094 (spec \"0-1024,4094\")"),
        "{table}"
    );
    let (ok, json, stderr) = esi_host(&["vlan", "show", "--etcd", etcd.endpoint(), "--json", id]);
    assert!(ok, "{stderr}");
    let view: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(view["vlan_ids_available"], 3069);
    assert_eq!(view["stored"], false);

    let (ok, _, stderr) = esi_host(&[
        "vlan",
        "show",
        "--etcd",
        etcd.endpoint(),
        "no-such-interface",
    ]);
    assert!(!ok);
    assert!(stderr.contains("no-such-interface"), "{stderr}");
    etcd.stop().await;
}
