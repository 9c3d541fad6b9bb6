//! The manifest next to each component: `<name>.toml` beside `<name>.wasm`.
//!
//! A component says what it *is* through `describe()`; the manifest says what the operator
//! *grants* it: which handlers it may serve, which key prefixes it may read and propose writes
//! to, how long a call may run, how much memory it may grow, how many instances may run at
//! once, and free-form configuration handed to every call. Keeping grants outside the
//! component means a third-party plugin cannot grant itself anything, and an operator can
//! tighten a plugin without rebuilding it.
//!
//! Everything not granted is denied: a plugin without a manifest may serve only the handlers
//! it describes, reads nothing and writes nothing, under the host's default limits.
//!
//! # Examples
//!
//! ```
//! use esi_host::plugins::manifest::Manifest;
//!
//! let manifest = Manifest::parse("monitoring_worker.toml", r#"
//!     [plugin]
//!     version = "0.1.0"
//!     handlers = ["monitoring_worker"]
//!
//!     [capabilities]
//!     read = ["/state/"]
//!     write = ["/esi-worker/monitoring_targets/"]
//!
//!     [limits]
//!     deadline_ms = 5000
//! "#).unwrap();
//! assert!(manifest.may_read("/state/v2.0/ha_interfaces/x"));
//! assert!(!manifest.may_read("/config/v2.0/ha_interfaces/x"));
//! assert!(manifest.may_write("/esi-worker/monitoring_targets/v2.0/ha_interfaces/x"));
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a manifest cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A parsed, validated manifest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifest {
    /// The version operators see in status records and logs (default: `describe()`'s).
    pub version: Option<String>,
    /// Handlers the plugin may serve; `None`: the ones it describes.
    pub handlers: Option<Vec<String>>,
    /// Key prefixes (below the key root) the plugin may read.
    pub read: Vec<String>,
    /// Key prefixes (below the key root) the plugin's proposed writes may touch.
    pub write: Vec<String>,
    pub limits: PluginLimits,
    /// Free-form configuration, passed to every call as JSON (`run-context.config`).
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// Per-plugin limits; `None` fields take the host's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginLimits {
    pub deadline: Option<Duration>,
    pub memory_bytes: Option<usize>,
    pub max_instances: Option<u32>,
    pub max_output_bytes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    plugin: PluginSection,
    #[serde(default)]
    capabilities: CapabilitiesSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    config: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PluginSection {
    version: Option<String>,
    handlers: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CapabilitiesSection {
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    deadline_ms: Option<u64>,
    memory_mib: Option<u64>,
    max_instances: Option<u32>,
    max_output_kib: Option<u64>,
}

/// The longest call deadline a manifest may ask for.
const MAX_DEADLINE: Duration = Duration::from_secs(600);

impl Manifest {
    /// The manifest path of a component: `<dir>/<name>.toml` for `<dir>/<name>.wasm`.
    pub fn path_for(component: &Path) -> PathBuf {
        component.with_extension("toml")
    }

    /// Reads the manifest of `component` if it has one.
    pub fn load_for(component: &Path) -> Result<Option<Manifest>, ManifestError> {
        let path = Manifest::path_for(component);
        match std::fs::read_to_string(&path) {
            Ok(text) => Manifest::parse(&path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ManifestError::Read { path, source }),
        }
    }

    /// Parses and validates a manifest; errors name the file and the setting.
    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Manifest, ManifestError> {
        let path = path.as_ref();
        let invalid = |message: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: File = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if let Some(handlers) = &file.plugin.handlers {
            if handlers.is_empty() {
                return Err(invalid(
                    "plugin.handlers: empty; omit it to serve the handlers the component describes"
                        .into(),
                ));
            }
        }
        for (field, prefixes) in [
            ("capabilities.read", &file.capabilities.read),
            ("capabilities.write", &file.capabilities.write),
        ] {
            if let Some(bad) = prefixes.iter().find(|p| !p.starts_with('/')) {
                return Err(invalid(format!(
                    "{field}: prefix {bad:?} does not start with '/'"
                )));
            }
        }
        let limits = &file.limits;
        let deadline = limits.deadline_ms.map(Duration::from_millis);
        if let Some(d) = deadline {
            if d.is_zero() || d > MAX_DEADLINE {
                return Err(invalid(format!(
                    "limits.deadline_ms: {} is not between 1 and {}",
                    d.as_millis(),
                    MAX_DEADLINE.as_millis()
                )));
            }
        }
        let mib = |field: &str, value: Option<u64>, unit: u64| {
            value
                .map(|v| {
                    v.checked_mul(unit)
                        .and_then(|b| usize::try_from(b).ok())
                        .filter(|b| *b > 0)
                        .ok_or_else(|| invalid(format!("{field}: {v} is zero or too large")))
                })
                .transpose()
        };
        let memory_bytes = mib("limits.memory_mib", limits.memory_mib, 1 << 20)?;
        let max_output_bytes = mib("limits.max_output_kib", limits.max_output_kib, 1 << 10)?;
        if limits.max_instances == Some(0) {
            return Err(invalid("limits.max_instances: must be at least 1".into()));
        }
        let config =
            serde_json::to_value(&file.config).map_err(|e| invalid(format!("config: {e}")))?;
        let serde_json::Value::Object(config) = config else {
            return Err(invalid("config: not a table".into()));
        };
        Ok(Manifest {
            version: file.plugin.version,
            handlers: file.plugin.handlers,
            read: file.capabilities.read,
            write: file.capabilities.write,
            limits: PluginLimits {
                deadline,
                memory_bytes,
                max_instances: limits.max_instances,
                max_output_bytes,
            },
            config,
        })
    }

    /// Whether a read of `key` (relative to the key root) is granted.
    pub fn may_read(&self, key: &str) -> bool {
        self.read.iter().any(|p| key.starts_with(p.as_str()))
    }

    /// Whether a proposed write to `key` (relative to the key root) is granted.
    pub fn may_write(&self, key: &str) -> bool {
        self.write.iter().any(|p| key.starts_with(p.as_str()))
    }

    /// Checks the manifest against what the component describes: the handlers it grants must
    /// be ones the component serves.
    pub fn check_handlers(&self, described: &[String]) -> Result<(), String> {
        let Some(granted) = &self.handlers else {
            return Ok(());
        };
        match granted.iter().find(|h| !described.contains(h)) {
            Some(h) => Err(format!(
                "plugin.handlers: {h:?} is not among the handlers the component describes ({described:?})"
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, String> {
        Manifest::parse("p.toml", text).map_err(|e| e.to_string())
    }

    #[test]
    fn an_empty_manifest_grants_nothing() {
        let m = parse("").unwrap();
        assert_eq!(m, Manifest::default());
        assert!(!m.may_read("/state/x"));
        assert!(!m.may_write("/esi-worker/vlan_pools/x"));
    }

    #[test]
    fn unknown_settings_are_named() {
        let e = parse("[limits]\ndeadline = 5\n").unwrap_err();
        assert!(e.contains("p.toml") && e.contains("deadline"), "{e}");
        let e = parse("[capabilites]\nread = []\n").unwrap_err();
        assert!(e.contains("capabilites"), "{e}");
    }

    #[test]
    fn wrong_types_and_values_are_named() {
        let e = parse("[limits]\ndeadline_ms = \"5s\"\n").unwrap_err();
        assert!(e.contains("deadline_ms"), "{e}");
        let e = parse("[limits]\ndeadline_ms = 0\n").unwrap_err();
        assert!(e.contains("limits.deadline_ms"), "{e}");
        let e = parse("[capabilities]\nread = [\"state/\"]\n").unwrap_err();
        assert!(
            e.contains("capabilities.read") && e.contains("state/"),
            "{e}"
        );
        let e = parse("[limits]\nmax_instances = 0\n").unwrap_err();
        assert!(e.contains("limits.max_instances"), "{e}");
        let e = parse("[plugin]\nhandlers = []\n").unwrap_err();
        assert!(e.contains("plugin.handlers"), "{e}");
    }

    #[test]
    fn limits_and_config_are_read() {
        let m = parse(
            "[limits]\ndeadline_ms = 250\nmemory_mib = 16\nmax_instances = 4\nmax_output_kib = 64\n\
             [config]\nregion = \"east\"\nretries = 3\n",
        )
        .unwrap();
        assert_eq!(m.limits.deadline, Some(Duration::from_millis(250)));
        assert_eq!(m.limits.memory_bytes, Some(16 << 20));
        assert_eq!(m.limits.max_instances, Some(4));
        assert_eq!(m.limits.max_output_bytes, Some(64 << 10));
        assert_eq!(
            serde_json::Value::Object(m.config),
            serde_json::json!({"region": "east", "retries": 3})
        );
    }

    #[test]
    fn granted_handlers_must_be_described() {
        let m = parse("[plugin]\nhandlers = [\"a\", \"b\"]\n").unwrap();
        assert!(m
            .check_handlers(&["a".into(), "b".into(), "c".into()])
            .is_ok());
        let e = m.check_handlers(&["a".into()]).unwrap_err();
        assert!(e.contains("\"b\""), "{e}");
    }
}
