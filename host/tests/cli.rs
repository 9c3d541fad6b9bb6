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

/// Runs `esi-host run --config <file with text>` and returns its exit code and stderr.
fn run_with_config(text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("esi-host.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_esi-host"))
        .args(["run", "--config", path.to_str().unwrap()])
        .env_remove("ESI_ETCD")
        .env_remove("ESI_PLUGINS")
        .output()
        .expect("esi-host runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_config_file_fails_start_up_with_the_setting_named_and_status_2() {
    let plugins = std::env::temp_dir();
    let plugins = plugins.to_str().unwrap();
    let cases = [
        (
            format!("etcd = [\"http://127.0.0.1:2379\"]\nplugins = \"{plugins}\"\nconcurency = 4\n"),
            "concurency",
        ),
        (
            format!("etcd = [\"http://127.0.0.1:2379\"]\nplugins = \"{plugins}\"\nlease_ttl = \"60s\"\n"),
            "lease_ttl",
        ),
        (
            format!("etcd = [\"http://127.0.0.1:2379\"]\nplugins = \"{plugins}\"\nlease_ttl = 1\n"),
            "`lease_ttl`: 1 is not between 2 and 3600",
        ),
        // Nothing listens on port 1.
        (
            format!("etcd = [\"http://127.0.0.1:1\"]\nplugins = \"{plugins}\"\n"),
            "`etcd`: cannot reach etcd at http://127.0.0.1:1",
        ),
    ];
    for (text, named) in cases {
        let (code, stderr) = run_with_config(&text);
        assert_eq!(code, Some(2), "{text}\n{stderr}");
        assert!(stderr.contains(named), "{text}\n{stderr}");
    }
}

#[test]
fn the_systemd_unit_verifies_and_the_example_config_is_valid() {
    let unit = std::fs::read_to_string(repo().join("packaging/esi-host.service")).unwrap();
    for key in [
        "ExecStart=/usr/bin/esi-host run --config /etc/esi-host/esi-host.toml",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
    if let Ok(status) = Command::new("systemd-analyze").arg("--version").output() {
        if status.status.success() {
            // Verify a copy that runs the binary just built (the installed path does not
            // exist here).
            let dir = tempfile::tempdir().unwrap();
            let copy = dir.path().join("esi-host.service");
            std::fs::write(
                &copy,
                unit.replace("/usr/bin/esi-host", env!("CARGO_BIN_EXE_esi-host")),
            )
            .unwrap();
            let out = Command::new("systemd-analyze")
                .args(["verify", copy.to_str().unwrap()])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && !stderr.contains("esi-host.service:"),
                "systemd-analyze verify: {stderr}"
            );
        }
    }
    let text = std::fs::read_to_string(repo().join("packaging/esi-host.toml")).unwrap();
    let settings =
        esi_host::settings::RunSettings::parse("packaging/esi-host.toml", &text).unwrap();
    assert_eq!(settings.metrics_addr.as_deref(), Some("127.0.0.1:9464"));
}

#[test]
fn completions_are_generated_for_bash() {
    let (ok, stdout, stderr) = esi_host(&["completions", "bash"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("esi-host") && stdout.contains("plugins"),
        "{stdout}"
    );
}
