//! Shared helpers of the integration tests: a real etcd, real components, real hosts.
//!
//! Every test calls [`TestEnv::new`]. With `ESI_TEST_ETCD` set (as `scripts/test` does) the
//! test uses that etcd server under a namespace of its own, so tests run in parallel without
//! seeing each other's keys; without it the test starts a private etcd process. Either way the
//! server is a real etcd.

pub mod proxy;
pub mod scripted;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use esi_host::keys::{Keys, Queue, Record};
use esi_host::local_etcd::LocalEtcd;
use esi_host::protocol::{JobId, JobRecord};
use esi_host::schema::SchemaRegistry;
use esi_host::store::{Change, Store, Watch};
use esi_host::{Host, HostConfig};
use serde_json::Value;

/// One test's etcd, namespace and helpers.
pub struct TestEnv {
    _etcd: Option<LocalEtcd>,
    pub endpoint: String,
    /// Every endpoint hosts should use (one, or each member of a cluster).
    pub endpoints: Vec<String>,
    pub store: Store,
    pub schemas: SchemaRegistry,
}

impl TestEnv {
    pub async fn new() -> anyhow::Result<TestEnv> {
        init_logging();
        let (etcd, endpoint, root) = match std::env::var("ESI_TEST_ETCD") {
            Ok(endpoint) if !endpoint.is_empty() => {
                let root = format!("/esi-test/{}", uuid_like());
                (None, endpoint, root)
            }
            _ => {
                let etcd = LocalEtcd::start().await?;
                let endpoint = etcd.endpoint().to_string();
                (Some(etcd), endpoint, String::new())
            }
        };
        let store = Store::connect(std::slice::from_ref(&endpoint), Keys::new(&root)).await?;
        Ok(TestEnv {
            _etcd: etcd,
            endpoints: vec![endpoint.clone()],
            endpoint,
            store,
            schemas: SchemaRegistry::built_in(),
        })
    }

    /// An environment on an etcd cluster the test started itself (e.g. to kill members).
    pub async fn on_cluster(endpoints: &[String]) -> anyhow::Result<TestEnv> {
        init_logging();
        let store = Store::connect(endpoints, Keys::new("")).await?;
        Ok(TestEnv {
            _etcd: None,
            endpoint: endpoints[0].clone(),
            endpoints: endpoints.to_vec(),
            store,
            schemas: SchemaRegistry::built_in(),
        })
    }

    pub fn keys(&self) -> &Keys {
        self.store.keys()
    }

    /// A host configuration for this environment with a short lease.
    pub fn host_config(&self) -> HostConfig {
        let mut config = HostConfig::new(self.endpoints.clone(), plugin_dir());
        config.key_root = self.keys().root().to_string();
        config.lease_ttl = Duration::from_secs(5);
        config
    }

    pub async fn start_host(&self) -> anyhow::Result<Host> {
        Host::start(self.host_config()).await
    }

    /// The key of a per-resource record.
    pub fn key(&self, record: Record, resource_type: &str, id: &str) -> String {
        let schema = self
            .schemas
            .get(resource_type)
            .expect("known resource type");
        self.keys().record(record, schema, id)
    }

    /// Writes a resource config exactly as given.
    pub async fn put_config_raw(
        &self,
        resource_type: &str,
        id: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        self.store
            .put(&self.key(Record::Config, resource_type, id), value)
            .await?;
        Ok(())
    }

    /// Writes a resource config with the body as a JSON string, as gohan does.
    pub async fn put_config(
        &self,
        resource_type: &str,
        id: &str,
        body: &Value,
        version: u64,
    ) -> anyhow::Result<()> {
        self.put_config_raw(
            resource_type,
            id,
            &esi_host::seed::gohan_envelope(body, version),
        )
        .await
    }

    /// Loads the project's shipped templates.
    pub async fn load_shipped_templates(&self) -> anyhow::Result<()> {
        let files = esi_host::templates::read_dir(&repo_dir().join("templates"))?;
        esi_host::templates::load(&self.store, &self.schemas, &files).await
    }

    /// The seed's world: the shipped templates, and both of the seed's interfaces ACTIVE.
    pub async fn load_seed_world(&self) -> anyhow::Result<()> {
        self.load_shipped_templates().await?;
        self.put_interface_states(Some("ACTIVE"), Some("ACTIVE"))
            .await
    }

    /// Loads only the named shipped templates (e.g. `internet_gateway_vlan_pool`).
    pub async fn load_shipped_templates_named(&self, ids: &[&str]) -> anyhow::Result<()> {
        let files: Vec<_> = esi_host::templates::read_dir(&repo_dir().join("templates"))?
            .into_iter()
            .filter(|t| ids.contains(&t.id.as_str()))
            .collect();
        if files.len() != ids.len() {
            bail!("not every template of {ids:?} is shipped in templates/");
        }
        esi_host::templates::load(&self.store, &self.schemas, &files).await
    }

    /// Writes one heat template.
    pub async fn put_template(
        &self,
        id: &str,
        handler: &str,
        template_file: &str,
        mappings: Value,
    ) -> anyhow::Result<()> {
        let body = serde_json::json!({"id": id, "handler": handler, "watch": [],
                                      "template_file": template_file, "parameter_mappings": mappings});
        self.put_config("heat_template", id, &body, 1).await
    }

    /// The shipped `ha_interface_monitoring` template with `time_between_retries` set to
    /// `seconds`, so tests that wait for a missing interface state do not wait 10 s a round.
    pub async fn put_ha_interface_template_retrying_every(
        &self,
        seconds: &str,
    ) -> anyhow::Result<()> {
        let item = |name: &str| {
            format!(
                "{name}:\n  type: etcd_reader\n  etcd_type: er_physical_interface\n  \
                 etcd_id: {{{{ {name}_interface_id }}}}\n  time_between_retries: {seconds}\n"
            )
        };
        let template = item("primary") + &item("secondary");
        let mappings = serde_json::json!({"primary_interface_id": {"field": "primary_interface_id"},
                                          "secondary_interface_id": {"field": "secondary_interface_id"}});
        self.put_template(
            "ha_interface_monitoring",
            "monitoring_worker",
            &template,
            mappings,
        )
        .await
    }

    /// Writes the `/state` of the seed's two er_physical_interfaces (`None`: leave it absent).
    pub async fn put_interface_states(
        &self,
        primary: Option<&str>,
        secondary: Option<&str>,
    ) -> anyhow::Result<()> {
        let ids = [
            esi_host::seed::PRIMARY_INTERFACE_ID,
            esi_host::seed::SECONDARY_INTERFACE_ID,
        ];
        for (id, status) in ids.into_iter().zip([primary, secondary]) {
            if let Some(status) = status {
                let monitoring = serde_json::json!({ "interface": status });
                self.put_monitoring_state("er_physical_interface", id, &monitoring)
                    .await?;
            }
        }
        Ok(())
    }

    /// Writes a completed `/state` whose `state_monitoring` is `monitoring`.
    pub async fn put_monitoring_state(
        &self,
        resource_type: &str,
        id: &str,
        monitoring: &Value,
    ) -> anyhow::Result<()> {
        let state = serde_json::json!({
            "state": {"state_monitoring": monitoring.to_string(), "worker_state": "CREATE_COMPLETED"},
            "version": 1, "error": ""});
        self.store
            .put(
                &self.key(Record::State, resource_type, id),
                state.to_string(),
            )
            .await?;
        Ok(())
    }

    pub async fn get_json(&self, key: &str) -> anyhow::Result<Option<Value>> {
        match self.store.get(key).await? {
            Some(kv) => Ok(Some(
                serde_json::from_slice(&kv.value).with_context(|| format!("{key} is not JSON"))?,
            )),
            None => Ok(None),
        }
    }

    /// Waits until the resource's `/state` satisfies `done`, returning it.
    pub async fn wait_for_state(
        &self,
        resource_type: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let key = self.key(Record::State, resource_type, id);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // etcd may be failing over (tests kill members): an error is retried to the deadline.
            let current = match self.get_json(&key).await {
                Ok(current) => current,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(state) = &current {
                if done(state) {
                    return Ok(state.clone());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{key} did not reach the expected state within {timeout:?}; it is {current:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for `worker_state == CREATE_COMPLETED` (or any `*_FAILED`, which fails the wait).
    pub async fn wait_completed(&self, resource_type: &str, id: &str) -> anyhow::Result<Value> {
        let state = self
            .wait_for_state(resource_type, id, Duration::from_secs(60), |s| {
                let ws = s["state"]["worker_state"].as_str().unwrap_or("");
                ws.ends_with("_COMPLETED") || ws.ends_with("_FAILED")
            })
            .await?;
        let ws = state["state"]["worker_state"].as_str().unwrap_or("");
        if ws.ends_with("_FAILED") {
            bail!("{resource_type} {id} failed: {state}");
        }
        Ok(state)
    }

    /// Every key under `/jobs/` in this namespace.
    pub async fn job_keys(&self) -> anyhow::Result<Vec<String>> {
        let (kvs, _) = self.store.list(&self.keys().jobs_prefix()).await?;
        Ok(kvs.into_iter().map(|kv| kv.key).collect())
    }

    /// Waits until no `/jobs/` key is left (the manager cleans finished jobs asynchronously).
    pub async fn wait_jobs_drained(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = match self.job_keys().await {
                Ok(left) => left,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("job keys left behind: {left:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts recording every change in this namespace from now on.
    pub async fn record_changes(&self) -> anyhow::Result<Recorder> {
        let prefix = self.keys().everything();
        let (_, revision) = self.store.list(&self.keys().jobs_prefix()).await?;
        let watch = self.store.watch(&prefix, revision + 1).await?;
        Ok(Recorder {
            watch,
            seen: Vec::new(),
        })
    }

    /// The ready-queue key of a job id.
    pub fn job_key(&self, queue: Queue, id: &str) -> String {
        self.keys().job(queue, id)
    }
}

/// Collects watch events.
pub struct Recorder {
    watch: Watch,
    seen: Vec<Change>,
}

impl Recorder {
    /// Reads events until `until` holds for one of them or `timeout` passes; returns all seen.
    pub async fn until(
        &mut self,
        timeout: Duration,
        until: impl Fn(&Change) -> bool,
    ) -> anyhow::Result<&[Change]> {
        if self.seen.iter().any(&until) {
            return Ok(&self.seen);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let batch = tokio::time::timeout_at(deadline, self.watch.next())
                .await
                .context("timed out waiting for a watch event")??;
            let hit = batch.iter().any(&until);
            self.seen.extend(batch);
            if hit {
                return Ok(&self.seen);
            }
        }
    }

    /// Reads whatever arrives within `period`; returns all seen.
    pub async fn for_a_while(&mut self, period: Duration) -> &[Change] {
        let deadline = tokio::time::Instant::now() + period;
        while let Ok(Ok(batch)) = tokio::time::timeout_at(deadline, self.watch.next()).await {
            self.seen.extend(batch);
        }
        &self.seen
    }

    /// Reads events until `key` has been put; returns all seen.
    pub async fn until_put(&mut self, key: &str, timeout: Duration) -> anyhow::Result<&[Change]> {
        self.until(timeout, |c| matches!(c, Change::Put(kv) if kv.key == key))
            .await
    }

    /// The values put at keys starting with `prefix`, in order.
    pub fn puts_under(&self, prefix: &str) -> Vec<(String, Value)> {
        self.seen
            .iter()
            .filter_map(|c| match c {
                Change::Put(kv) if kv.key.starts_with(prefix) => Some((
                    kv.key.clone(),
                    serde_json::from_slice(&kv.value).unwrap_or(Value::Null),
                )),
                _ => None,
            })
            .collect()
    }
}

/// The seed's ha_interface body (seed record 1) with another id.
pub fn seed_ha_interface_body(id: &str) -> Value {
    let mut body = esi_host::seed::records().expect("the seed parses")[0].value["body"].clone();
    body["id"] = Value::String(id.to_string());
    body
}

impl TestEnv {
    /// The fleet status record of plugin `name` on host `host_id`, if there is one.
    pub async fn plugin_status(&self, host_id: &str, name: &str) -> anyhow::Result<Option<Value>> {
        let key = self.keys().plugin_status(host_id, name);
        Ok(match self.store.get(&key).await? {
            Some(kv) => Some(serde_json::from_slice(&kv.value)?),
            None => None,
        })
    }

    /// Waits until plugin `name`'s status on `host_id` satisfies `until`; returns it.
    pub async fn wait_plugin_status(
        &self,
        host_id: &str,
        name: &str,
        timeout: Duration,
        until: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let status = self.plugin_status(host_id, name).await?;
            if let Some(status) = status.as_ref().filter(|s| until(s)) {
                return Ok(status.clone());
            }
            if std::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "plugin {name} on {host_id}: status still {status:?} after {timeout:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every PUT ever made under `/state/` in this namespace, counted per key, read with a
    /// watch from revision 1: the exactly-once check of the chaos tests.
    pub async fn state_put_counts(
        &self,
    ) -> anyhow::Result<std::collections::HashMap<String, usize>> {
        let prefix = self.keys().record_family(Record::State);
        let (_, now) = self.store.list(&prefix).await?;
        let mut watch = self.store.watch(&prefix, 1).await?;
        let mut counts = std::collections::HashMap::new();
        let mut newest = 0;
        while newest < now {
            // No event for 2 s: nothing newer than the listing is coming.
            let Ok(changes) = tokio::time::timeout(Duration::from_secs(2), watch.next()).await
            else {
                break;
            };
            for change in changes? {
                if let Change::Put(kv) = change {
                    newest = newest.max(kv.mod_revision);
                    *counts.entry(kv.key).or_default() += 1;
                }
            }
        }
        Ok(counts)
    }
}

impl TestEnv {
    /// A host that only runs the job manager: it loads no plugin and is told that some other
    /// worker serves `monitoring_worker`, so the test controls which host runs each job.
    pub async fn start_manager_only(&self) -> anyhow::Result<Host> {
        let mut config = self.host_config();
        config.plugin_dir = std::env::temp_dir().join(format!("esi-no-plugins-{}", uuid_like()));
        std::fs::create_dir_all(&config.plugin_dir)?;
        config.external_handlers = vec!["monitoring_worker".into()];
        Host::start(config).await
    }

    /// A host configuration without the job manager role.
    pub fn worker_only_config(&self) -> HostConfig {
        let mut config = self.host_config();
        config.run_manager = false;
        config
    }
}

impl Recorder {
    /// Reads events until some job has been claimed (a `/jobs/working/` key put).
    pub async fn until_claimed(
        &mut self,
        keys: &Keys,
        timeout: Duration,
    ) -> anyhow::Result<&[Change]> {
        let working = keys.queue_prefix(Queue::Working);
        self.until(
            timeout,
            |c| matches!(c, Change::Put(kv) if kv.key.starts_with(&working)),
        )
        .await
    }
}

/// Components compiled for `tier` in `process` ("child" or "host") so far in this test
/// binary (`esi_plugin_compiles_total`).
pub fn plugin_compiles(tier: esi_host::plugins::Tier, process: &str) -> u64 {
    let labels = esi_host::metrics::labels([("tier", tier.as_str()), ("process", process)]);
    esi_host::metrics::global()
        .plugin_compiles
        .get_or_create(&labels)
        .get()
}

/// The `esi-host` binary built next to this test binary (`cargo build -p esi-host`, which
/// scripts/test runs, puts it there).
pub fn host_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in <target>/<profile>/deps")
        .join("esi-host");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p esi-host` (scripts/test does)",
        bin.display()
    );
    bin
}

/// The repository root.
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the built plugin components are (`ESI_PLUGIN_DIR`, else `target/plugins`).
pub fn plugin_dir() -> PathBuf {
    let dir = std::env::var_os("ESI_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target/plugins"));
    assert!(
        dir.join("monitoring_worker.wasm").exists(),
        "{} has no monitoring_worker.wasm: build the plugins first with `cargo xtask build-plugins` \
         (scripts/test does)",
        dir.display()
    );
    dir
}

fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Where the built test guests are (`ESI_TEST_PLUGIN_DIR`, else `target/test-plugins`).
pub fn test_plugin_dir() -> PathBuf {
    let dir = std::env::var_os("ESI_TEST_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target/test-plugins"));
    assert!(
        dir.join("scripted_worker.wasm").exists(),
        "{} has no scripted_worker.wasm: build the test guests first with \
         `cargo xtask build-plugins` (scripts/test does)",
        dir.display()
    );
    dir
}

/// Where the example plugins are (`ESI_EXAMPLE_PLUGIN_DIR`, else `target/example-plugins`).
pub fn example_plugin_dir() -> PathBuf {
    let dir = std::env::var_os("ESI_EXAMPLE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target/example-plugins"));
    assert!(
        dir.join("example_echo_worker.wasm").exists(),
        "{} has no example_echo_worker.wasm: build it first with `cargo xtask build-plugins` \
         (scripts/test does)",
        dir.display()
    );
    dir
}

/// A fresh directory (one per call) holding *copies* of the named plugins (`<name>.wasm` and,
/// if there is one, `<name>.toml`) found in `sources`: a directory a test may rename new
/// versions into without touching the shared build output.
pub fn plugin_dir_with_copies(sources: &[PathBuf], names: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("esi-test-plugins-{}", uuid_like()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating plugin directory {}: {e}", dir.display()));
    for name in names {
        let source = sources
            .iter()
            .find(|s| s.join(format!("{name}.wasm")).exists())
            .unwrap_or_else(|| panic!("no {name}.wasm in {sources:?}"));
        for ext in ["wasm", "toml"] {
            let from = source.join(format!("{name}.{ext}"));
            if from.exists() {
                let to = dir.join(format!("{name}.{ext}"));
                std::fs::copy(&from, &to).unwrap_or_else(|e| {
                    panic!("copying {} to {}: {e}", from.display(), to.display())
                });
            }
        }
    }
    dir
}

/// Writes `bytes` to `path` the supported way for a live plugin directory: a temporary file
/// in the same directory, then a rename over the old one.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("plugin")
    ));
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), path.display()));
}

/// A component with a custom section appended: the same code under a different sha256, as a
/// rebuilt plugin would be.
pub fn component_variant(component: &[u8], build: u32) -> Vec<u8> {
    let name = b"esi-test-build";
    let payload = build.to_le_bytes();
    let mut section = Vec::new();
    leb128(&mut section, name.len());
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    let mut out = component.to_vec();
    out.push(0); // custom section id
    leb128(&mut out, section.len());
    out.extend_from_slice(&section);
    out
}

fn leb128(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A fresh directory (one per call) holding symlinks to every component (and manifest) of
/// [`plugin_dir`] and [`test_plugin_dir`] except the deliberately broken ones (`broken_*`), for a host that should serve the real plugins and the test guests.
/// Test guests never sit in the real plugin directory, which the demo and production load.
pub fn plugin_dir_with_test_guests() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("esi-test-plugins-{}", uuid_like()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating plugin directory {}: {e}", dir.display()));
    for source in [plugin_dir(), test_plugin_dir()] {
        let source = std::fs::canonicalize(&source)
            .unwrap_or_else(|e| panic!("resolving {}: {e}", source.display()));
        let entries = std::fs::read_dir(&source)
            .unwrap_or_else(|e| panic!("reading {}: {e}", source.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("reading {}: {e}", source.display()))
                .path();
            let broken = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("broken_"));
            if !broken && path.extension().is_some_and(|x| x == "wasm" || x == "toml") {
                let link = dir.join(path.file_name().expect("a directory entry has a name"));
                std::os::unix::fs::symlink(&path, &link).unwrap_or_else(|e| {
                    panic!("linking {} to {}: {e}", link.display(), path.display())
                });
            }
        }
    }
    dir
}

impl TestEnv {
    /// Writes a job record the way the job manager does: `/jobs/all/<id>`, then
    /// `/jobs/ready/<id>` (`ready`) or `/jobs/waiting/<id>` holding the record's handler.
    ///
    /// The manager learns of jobs it did not write only when it (re)builds its index from
    /// etcd, so jobs whose release or cancellation a test expects must be written before the
    /// host starts; a job without dependencies or dependants can be written at any time.
    pub async fn put_job(&self, id: &str, record: &Value, ready: bool) -> anyhow::Result<()> {
        let handler = record
            .get(0)
            .and_then(Value::as_str)
            .with_context(|| format!("job record {id} does not start with a handler: {record}"))?;
        let queue = if ready { Queue::Ready } else { Queue::Waiting };
        self.store
            .put(&self.job_key(Queue::All, id), record.to_string())
            .await?;
        self.store.put(&self.job_key(queue, id), handler).await?;
        Ok(())
    }
}

/// A `/jobs/all` record `[handler, job, 0]` shaped like seed record (2), with a fresh valid id
/// `<action>:<handler>:<resource_type>:<resource_id>:<version>:<5 chars>`. Returns the id and
/// the record; write both with [`TestEnv::put_job`].
///
/// # Panics
///
/// On an unknown `action` or `on_failure`, or a `resource_input` that is not an object: the
/// record is checked against the host's own parser.
#[allow(clippy::too_many_arguments)] // one argument per field of the job object
pub fn job_record(
    handler: &str,
    action: &str,
    resource_type: &str,
    resource_id: &str,
    version: u64,
    is_first: bool,
    is_last: bool,
    dependency: &[String],
    on_failure: &str,
    resource_input: Value,
) -> (String, Value) {
    let id = JobId {
        action: action.parse().unwrap_or_else(|e| panic!("{e}")),
        handler: handler.to_string(),
        resource_type: resource_type.to_string(),
        resource_id: resource_id.to_string(),
        version,
        suffix: JobId::random_suffix(),
    };
    let job = serde_json::json!({
        "id": id.to_string(),
        "job_name": id.job_name(),
        "handler": handler,
        "action": action,
        "resource_type": resource_type,
        "resource_id": resource_id,
        "version": version,
        "is_first": is_first,
        "is_last": is_last,
        "dependency": dependency,
        "on_failure": on_failure,
        "params": [],
        "resource_input": resource_input,
    });
    let record = serde_json::json!([handler, job, 0]);
    if let Err(e) = JobRecord::parse(&id.to_string(), record.to_string().as_bytes()) {
        panic!("job_record built a record the host cannot read: {e}");
    }
    (id.to_string(), record)
}
