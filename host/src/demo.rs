//! `esi-host demo`: the seed, live. Starts a private etcd, loads the templates, runs a host,
//! creates the seed's resources as gohan would, and prints the seed's four records as they
//! stand (or stood, for the short-lived job and job state) in etcd.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::host::{Host, HostConfig};
use crate::keys::{Keys, Queue, Record};
use crate::local_etcd::LocalEtcd;
use crate::protocol::{Action, JobId};
use crate::schema::SchemaRegistry;
use crate::seed;
use crate::store::{Change, Store};
use crate::templates;

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub plugin_dir: PathBuf,
    pub template_dir: PathBuf,
    pub timeout: Duration,
    /// Compiles plugins in child processes of this executable (see [`HostConfig`]).
    pub child_compiler: Option<PathBuf>,
}

/// Runs the demo, printing to stdout. Everything it started is stopped before it returns.
pub async fn run(config: DemoConfig) -> anyhow::Result<()> {
    let etcd = LocalEtcd::start().await?;
    println!("# private etcd at {}", etcd.endpoint());
    let result = run_against(&config, etcd.endpoint()).await;
    etcd.stop().await;
    result
}

async fn run_against(config: &DemoConfig, endpoint: &str) -> anyhow::Result<()> {
    let schemas = SchemaRegistry::built_in();
    let store = Store::connect(&[endpoint.to_string()], Keys::new("")).await?;
    let shipped = templates::read_dir(&config.template_dir)?;
    templates::load(&store, &schemas, &shipped).await?;
    println!(
        "# loaded {} heat templates from {}",
        shipped.len(),
        config.template_dir.display()
    );

    let mut host_config = HostConfig::new(vec![endpoint.to_string()], config.plugin_dir.clone());
    host_config.child_compiler = config.child_compiler.clone();
    let host = Host::start(host_config).await?;
    let outcome = create_and_capture(config, &store, &schemas).await;
    host.shutdown().await;
    let captured = outcome?;
    print_records(&captured);
    Ok(())
}

/// What the demo saw of the ha_interface.
struct Captured {
    records: Vec<(String, Value)>,
}

async fn create_and_capture(
    config: &DemoConfig,
    store: &Store,
    schemas: &SchemaRegistry,
) -> anyhow::Result<Captured> {
    let keys = store.keys().clone();
    let (_, revision) = store.list(&keys.config_watch_prefix()).await?;
    let mut watch = store.watch(&keys.everything(), revision + 1).await?;
    let ha = schemas.get("ha_interface").context("ha_interface schema")?;
    let config_key = keys.record(Record::Config, ha, seed::HA_INTERFACE_ID);
    let job_state_key = keys.record(Record::JobState, ha, seed::HA_INTERFACE_ID);
    let state_key = keys.record(Record::State, ha, seed::HA_INTERFACE_ID);
    // The seed's job id without its random suffix.
    let job_id = JobId {
        action: Action::Create,
        handler: "monitoring_worker".into(),
        resource_type: "ha_interface".into(),
        resource_id: seed::HA_INTERFACE_ID.into(),
        version: 1,
        suffix: String::new(),
    };
    let job_prefix = keys.job(Queue::All, &job_id.to_string());

    for resource in seed::chain()? {
        let schema = schemas
            .get(resource.resource_type)
            .context("seed resource type")?;
        let key = keys.record(Record::Config, schema, &resource.id);
        // The ha_interface goes in exactly as seed record (1) shows it; the others as gohan
        // stores them, with the body as a JSON string.
        let envelope = if resource.id == seed::HA_INTERFACE_ID {
            seed::records()?[0].value.to_string()
        } else {
            seed::gohan_envelope(&resource.body, 1)
        };
        store.put(&key, envelope).await?;
        println!("# gohan wrote {key}");
    }

    let mut job = None;
    let mut job_state = None;
    let deadline = tokio::time::Instant::now() + config.timeout;
    loop {
        let changes = tokio::time::timeout_at(deadline, watch.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the ha_interface did not reach CREATE_COMPLETED within {:?}",
                    config.timeout
                )
            })??;
        for change in changes {
            let Change::Put(kv) = change else { continue };
            let value: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            if kv.key.starts_with(&job_prefix) {
                job = Some((kv.key.clone(), value));
            } else if kv.key == job_state_key {
                job_state = Some((kv.key.clone(), value));
            } else if kv.key == state_key {
                if value["state"]["worker_state"] == "CREATE_FAILED" {
                    bail!("the ha_interface failed: {}", value["error"]);
                }
                let config_value = store
                    .get(&config_key)
                    .await?
                    .map(|kv| kv.value)
                    .unwrap_or_default();
                let config_value = serde_json::from_slice(&config_value).unwrap_or(Value::Null);
                let mut records = vec![(config_key.clone(), config_value)];
                records.extend(job.take());
                records.extend(job_state.take());
                records.push((kv.key.clone(), value));
                return Ok(Captured { records });
            }
        }
    }
}

fn print_records(captured: &Captured) {
    let titles = [
        "(1) config",
        "(2) job for monitoring_worker",
        "(3) job state",
        "(4) state",
    ];
    println!();
    for (title, (key, value)) in titles.iter().zip(&captured.records) {
        println!(
            "### {title}\n{key}\n{}\n",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    }
}
