//! `esi-host plugins list` and `esi-host plugins check`: the fleet's plugins as etcd shows
//! them, and a component validated offline exactly as a host would load it.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;

use super::engine::{Limits, PluginEngine};
use super::manifest::Manifest;
use super::registry::PluginStatus;
use crate::store::Store;

/// One plugin on one host.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FleetEntry {
    pub host: String,
    #[serde(flatten)]
    pub status: PluginStatus,
}

/// Every plugin status record under `/esi-worker/plugins/`, sorted by host then plugin.
/// Records that do not parse are reported as such rather than hidden.
pub async fn list(store: &Store) -> anyhow::Result<Vec<FleetEntry>> {
    let prefix = store.keys().plugin_status_prefix();
    let (kvs, _) = store
        .list(&prefix)
        .await
        .context("listing plugin status records")?;
    let mut entries = Vec::with_capacity(kvs.len());
    for kv in kvs {
        let Some((host, plugin)) = store.keys().parse_plugin_status_key(&kv.key) else {
            continue;
        };
        let status = serde_json::from_slice::<serde_json::Value>(&kv.value)
            .ok()
            .and_then(|v| status_from(plugin, &v))
            .unwrap_or_else(|| unreadable(plugin, &kv.key));
        entries.push(FleetEntry {
            host: host.to_string(),
            status,
        });
    }
    entries.sort_by(|a, b| (&a.host, &a.status.plugin).cmp(&(&b.host, &b.status.plugin)));
    Ok(entries)
}

fn status_from(plugin: &str, v: &serde_json::Value) -> Option<PluginStatus> {
    let text = |field: &str| v.get(field).and_then(|x| x.as_str()).map(str::to_string);
    Some(PluginStatus {
        plugin: text("plugin").unwrap_or_else(|| plugin.to_string()),
        version: text("version").unwrap_or_default(),
        sha256: text("sha256").unwrap_or_default(),
        loaded_at_unix: v
            .get("loaded_at_unix")
            .and_then(|x| x.as_u64())
            .unwrap_or(0),
        handlers: serde_json::from_value(v.get("handlers")?.clone()).ok()?,
        state: text("state")?,
        tier: text("tier").unwrap_or_default(),
        failures: v
            .get("failures")
            .and_then(|f| serde_json::from_value(f.clone()).ok())
            .unwrap_or_default(),
    })
}

fn unreadable(plugin: &str, key: &str) -> PluginStatus {
    PluginStatus {
        plugin: plugin.to_string(),
        version: String::new(),
        sha256: String::new(),
        loaded_at_unix: 0,
        handlers: Vec::new(),
        state: format!("unreadable status record {key}"),
        tier: String::new(),
        failures: Default::default(),
    }
}

/// A human table of [`list`]'s entries.
pub fn render(entries: &[FleetEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let s = &e.status;
            let failures = s
                .failures
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                e.host.clone(),
                s.plugin.clone(),
                s.version.clone(),
                s.sha256.chars().take(12).collect(),
                s.handlers.join(","),
                if failures.is_empty() {
                    "-".into()
                } else {
                    failures
                },
                if s.tier.is_empty() || s.state != "active" {
                    s.state.clone()
                } else {
                    format!("active ({})", s.tier)
                },
            ]
        })
        .collect();
    crate::inspect::table(
        &[
            "HOST", "PLUGIN", "VERSION", "SHA256", "HANDLERS", "FAILURES", "STATE",
        ],
        &rows,
    )
}

/// What `plugins check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub path: String,
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub handlers: Vec<String>,
    pub manifest: Option<String>,
    pub read: Vec<String>,
    pub write: Vec<String>,
    pub deadline_ms: u128,
    pub memory_mib: usize,
    pub max_instances: u32,
    pub max_output_bytes: usize,
}

/// Loads `component` (and its manifest) the way a host does, with the host's default limits
/// and no compile cache: the world must match, `describe()` must answer, the manifest must
/// parse and agree with it.
pub async fn check(component: &Path) -> anyhow::Result<CheckReport> {
    let engine = Arc::new(PluginEngine::new(Limits::default(), None)?);
    let plugin = engine.load(component).await?;
    let manifest_path = Manifest::path_for(component);
    let limits = plugin.limits();
    Ok(CheckReport {
        path: component.display().to_string(),
        name: plugin.name.clone(),
        version: plugin.version.clone(),
        sha256: plugin.sha256.clone(),
        handlers: plugin.handlers.clone(),
        manifest: manifest_path
            .exists()
            .then(|| manifest_path.display().to_string()),
        read: plugin.manifest.read.clone(),
        write: plugin.manifest.write.clone(),
        deadline_ms: limits.call_deadline.as_millis(),
        memory_mib: limits.max_memory_bytes >> 20,
        max_instances: limits.max_instances,
        max_output_bytes: plugin.max_output_bytes(),
    })
}

impl CheckReport {
    pub fn render(&self) -> String {
        let list = |v: &[String]| {
            if v.is_empty() {
                "(nothing)".to_string()
            } else {
                v.join(", ")
            }
        };
        format!(
            "{path}: ok\n  plugin      {name} {version}\n  sha256      {sha}\n  handlers    {handlers}\n  \
             manifest    {manifest}\n  may read    {read}\n  may write   {write}\n  \
             limits      deadline {deadline} ms, memory {memory} MiB, {instances} instances, \
             output {output} bytes\n",
            path = self.path,
            name = self.name,
            version = self.version,
            sha = self.sha256,
            handlers = self.handlers.join(", "),
            manifest = self
                .manifest
                .as_deref()
                .unwrap_or("none: nothing is granted"),
            read = list(&self.read),
            write = list(&self.write),
            deadline = self.deadline_ms,
            memory = self.memory_mib,
            instances = self.max_instances,
            output = self.max_output_bytes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up_and_shows_failures() {
        let entry = |host: &str, state: &str| FleetEntry {
            host: host.into(),
            status: PluginStatus {
                plugin: "monitoring_worker".into(),
                version: "0.1.0".into(),
                sha256: "0123456789abcdef0123".into(),
                loaded_at_unix: 1,
                handlers: vec!["monitoring_worker".into()],
                state: state.into(),
                tier: "baseline".into(),
                failures: [("trap".to_string(), 2)].into_iter().collect(),
            },
        };
        let table = render(&[entry("host-a", "active"), entry("h-b", "rejected: corrupt")]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("HOST    PLUGIN"), "{table}");
        assert!(
            lines[1].contains("0123456789ab ") && lines[1].contains("trap=2"),
            "{table}"
        );
        assert!(lines[1].ends_with("active (baseline)"), "{table}");
        assert!(lines[2].ends_with("rejected: corrupt"), "{table}");
    }
}
