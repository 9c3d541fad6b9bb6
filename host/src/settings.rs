//! Settings of `esi-host run`: a TOML file (`--config`), flags and environment, merged.
//!
//! Precedence, highest first: a command-line flag; its environment variable (only the few
//! flags that have one: `ESI_ETCD`, `ESI_PLUGINS`, `ESI_KEY_ROOT`, `ESI_COMPILE_CACHE`); the
//! config file; the built-in default. Nothing else reads the environment (`RUST_LOG` filters
//! logs only). Every setting has the same name in the file as the flag, with `_` for `-`.
//!
//! Validation happens once, at start-up, and every error names the setting and where it came
//! from, so `esi-host run` can exit with status 2 before touching anything.
//!
//! # Examples
//!
//! ```
//! use esi_host::settings::RunSettings;
//!
//! let plugins = std::env::temp_dir(); // must exist
//! let text = format!(
//!     "etcd = [\"http://127.0.0.1:2379\"]\nplugins = {:?}\nconcurrency = 16\n",
//!     plugins.display().to_string(),
//! );
//! let file = RunSettings::parse("esi-host.toml", &text).unwrap();
//! let flags = RunSettings { concurrency: Some(32), ..RunSettings::default() };
//! let config = file.overlay(flags).into_host_config().unwrap();
//! assert_eq!(config.worker.concurrency, 32);
//! assert_eq!(config.etcd_endpoints, ["http://127.0.0.1:2379"]);
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::HostConfig;

/// A setting that cannot be used, named.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("setting `{setting}`: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

/// Every setting of `esi-host run`; `None` means "not given here".
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    pub etcd: Option<Vec<String>>,
    pub plugins: Option<PathBuf>,
    pub key_root: Option<String>,
    pub lease_ttl: Option<u64>,
    pub host_id: Option<String>,
    pub schemas: Option<PathBuf>,
    pub concurrency: Option<u64>,
    pub external_handlers: Option<Vec<String>>,
    pub drain_timeout: Option<u64>,
    pub compile_cache: Option<PathBuf>,
    pub no_compile_cache: Option<bool>,
    pub worker_only: Option<bool>,
    pub hot_reload: Option<bool>,
    pub max_attempts: Option<u32>,
    pub retry_backoff_ms: Option<u64>,
    pub retry_backoff_max_ms: Option<u64>,
    pub requeue_backoff_ms: Option<u64>,
    pub requeue_backoff_max_ms: Option<u64>,
    pub etcd_max_request_bytes: Option<u64>,
    pub claim_affinity_ms: Option<u64>,
    pub metrics_addr: Option<String>,
}

impl RunSettings {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<RunSettings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        RunSettings::parse(path, &text)
    }

    /// Parses config file text; unknown settings and wrong types are errors naming them.
    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<RunSettings, SettingsError> {
        toml::from_str(text).map_err(|e| SettingsError::File {
            path: path.as_ref().to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// `self` with every setting `over` gives replaced (flags over a file).
    pub fn overlay(self, over: RunSettings) -> RunSettings {
        macro_rules! pick {
            ($($field:ident),*) => { RunSettings { $($field: over.$field.or(self.$field)),* } };
        }
        pick!(
            etcd,
            plugins,
            key_root,
            lease_ttl,
            host_id,
            schemas,
            concurrency,
            external_handlers,
            drain_timeout,
            compile_cache,
            no_compile_cache,
            worker_only,
            hot_reload,
            max_attempts,
            retry_backoff_ms,
            retry_backoff_max_ms,
            requeue_backoff_ms,
            requeue_backoff_max_ms,
            etcd_max_request_bytes,
            claim_affinity_ms,
            metrics_addr
        )
    }

    /// Validates the merged settings into a host configuration.
    pub fn into_host_config(self) -> Result<HostConfig, SettingsError> {
        let invalid = |setting, message: String| SettingsError::Invalid { setting, message };
        let etcd = self.etcd.filter(|e| !e.is_empty()).ok_or_else(|| {
            invalid(
                "etcd",
                "no etcd endpoint given (--etcd, ESI_ETCD or `etcd` in the config file)".into(),
            )
        })?;
        if let Some(bad) = etcd
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return Err(invalid(
                "etcd",
                format!("{bad:?} is not an http:// or https:// URL"),
            ));
        }
        let plugins = self.plugins.ok_or_else(|| {
            invalid(
                "plugins",
                "no plugin directory given (--plugins, ESI_PLUGINS or `plugins` in the config file)"
                    .into(),
            )
        })?;
        if !plugins.is_dir() {
            return Err(invalid(
                "plugins",
                format!("{} is not a directory", plugins.display()),
            ));
        }
        let in_range = |setting, value: Option<u64>, default: u64, min: u64, max: u64| {
            let v = value.unwrap_or(default);
            if (min..=max).contains(&v) {
                Ok(v)
            } else {
                Err(invalid(
                    setting,
                    format!("{v} is not between {min} and {max}"),
                ))
            }
        };
        let mut config = HostConfig::new(etcd, plugins);
        config.key_root = self.key_root.unwrap_or_default();
        config.lease_ttl = Duration::from_secs(in_range("lease_ttl", self.lease_ttl, 60, 2, 3600)?);
        if let Some(id) = self.host_id {
            if id.is_empty() || id.contains('/') {
                return Err(invalid(
                    "host_id",
                    format!("{id:?} is empty or contains '/'"),
                ));
            }
            config.host_id = id;
        }
        config.schemas = self.schemas;
        config.external_handlers = self.external_handlers.unwrap_or_default();
        config.run_manager = !self.worker_only.unwrap_or(false);
        config.hot_reload = self.hot_reload.unwrap_or(true);
        config.drain_timeout =
            Duration::from_secs(in_range("drain_timeout", self.drain_timeout, 25, 0, 3600)?);
        if self.no_compile_cache.unwrap_or(false) {
            config.compile_cache = None;
        } else if let Some(dir) = self.compile_cache {
            config.compile_cache = Some(dir);
        }
        let concurrency = in_range("concurrency", self.concurrency, 64, 1, 4096)?;
        config.worker.concurrency = usize::try_from(concurrency).unwrap_or(64);
        config.worker.max_attempts =
            in_range("max_attempts", self.max_attempts.map(u64::from), 5, 1, 1000)? as u32;
        let millis = |setting, value, default| {
            in_range(setting, value, default, 1, 3_600_000).map(Duration::from_millis)
        };
        config.worker.retry_backoff = millis("retry_backoff_ms", self.retry_backoff_ms, 500)?;
        config.worker.retry_backoff_max =
            millis("retry_backoff_max_ms", self.retry_backoff_max_ms, 30_000)?;
        config.requeue_backoff = millis("requeue_backoff_ms", self.requeue_backoff_ms, 500)?;
        config.requeue_backoff_max = millis(
            "requeue_backoff_max_ms",
            self.requeue_backoff_max_ms,
            30_000,
        )?;
        let default_request = crate::store::jobs::ETCD_DEFAULT_MAX_REQUEST_BYTES as u64;
        let request_bytes = in_range(
            "etcd_max_request_bytes",
            self.etcd_max_request_bytes,
            default_request,
            65_536,
            1 << 30,
        )?;
        config.etcd_max_request_bytes = usize::try_from(request_bytes).unwrap_or(usize::MAX);
        let affinity_default = crate::worker::affinity::AFFINITY_DELAY.as_millis() as u64;
        config.worker.claim_affinity_delay = Duration::from_millis(in_range(
            "claim_affinity_ms",
            self.claim_affinity_ms,
            affinity_default,
            0,
            10_000,
        )?);
        if let Some(addr) = self.metrics_addr {
            let parsed: SocketAddr = addr.parse().map_err(|e| {
                invalid(
                    "metrics_addr",
                    format!("{addr:?} is not an address:port: {e}"),
                )
            })?;
            config.metrics_addr = Some(parsed);
        }
        Ok(config)
    }
}

/// Fails unless at least one of `endpoints` answers within `timeout`: a host pointed at the
/// wrong etcd should say so at start-up, not retry forever.
pub async fn check_etcd_reachable(
    endpoints: &[String],
    timeout: Duration,
) -> Result<(), SettingsError> {
    let store = crate::store::Store::connect(endpoints, crate::keys::Keys::new(""))
        .await
        .map_err(|e| SettingsError::Invalid {
            setting: "etcd",
            message: e.to_string(),
        })?;
    let mut last = String::from("no answer");
    for _ in endpoints {
        match tokio::time::timeout(timeout, store.get("/job_manager_id")).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("no answer within {timeout:?}"),
        }
    }
    Err(SettingsError::Invalid {
        setting: "etcd",
        message: format!("cannot reach etcd at {}: {last}", endpoints.join(",")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RunSettings, String> {
        RunSettings::parse("esi-host.toml", text).map_err(|e| e.to_string())
    }

    fn base() -> RunSettings {
        RunSettings {
            etcd: Some(vec!["http://127.0.0.1:2379".into()]),
            plugins: Some(std::env::temp_dir()),
            ..RunSettings::default()
        }
    }

    #[test]
    fn the_shipped_example_config_parses_with_every_setting_known() {
        let text = include_str!("../../packaging/esi-host.toml");
        let file = parse(text).unwrap();
        assert_eq!(file.etcd_max_request_bytes, Some(1_572_864));
        assert_eq!(file.claim_affinity_ms, Some(50));
    }

    #[test]
    fn unknown_settings_and_wrong_types_are_named_with_the_file() {
        let e = parse("concurency = 4\n").unwrap_err();
        assert!(
            e.contains("esi-host.toml") && e.contains("concurency"),
            "{e}"
        );
        let e = parse("lease_ttl = \"60s\"\n").unwrap_err();
        assert!(e.contains("lease_ttl"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let file = RunSettings {
            concurrency: Some(8),
            lease_ttl: Some(30),
            ..base()
        };
        let flags = RunSettings {
            concurrency: Some(2),
            ..RunSettings::default()
        };
        let config = file.overlay(flags).into_host_config().unwrap();
        assert_eq!(config.worker.concurrency, 2);
        assert_eq!(config.lease_ttl, Duration::from_secs(30));
        assert_eq!(config.drain_timeout, Duration::from_secs(25));
        assert!(config.hot_reload);
        assert_eq!(
            config.etcd_max_request_bytes, 1_572_864,
            "etcd's own default"
        );
        let file = RunSettings {
            etcd_max_request_bytes: Some(10 << 20),
            ..base()
        };
        let config = file.into_host_config().unwrap();
        assert_eq!(config.etcd_max_request_bytes, 10 << 20);
        assert_eq!(
            config.worker.claim_affinity_delay,
            Duration::from_millis(50)
        );
        let flags = RunSettings {
            claim_affinity_ms: Some(0),
            ..RunSettings::default()
        };
        let config = base().overlay(flags).into_host_config().unwrap();
        assert_eq!(config.worker.claim_affinity_delay, Duration::ZERO);
    }

    #[test]
    fn out_of_range_and_malformed_values_name_the_setting() {
        let cases = [
            (
                RunSettings {
                    lease_ttl: Some(1),
                    ..base()
                },
                "`lease_ttl`",
            ),
            (
                RunSettings {
                    concurrency: Some(0),
                    ..base()
                },
                "`concurrency`",
            ),
            (
                RunSettings {
                    metrics_addr: Some("localhost".into()),
                    ..base()
                },
                "`metrics_addr`",
            ),
            (
                RunSettings {
                    etcd_max_request_bytes: Some(1000),
                    ..base()
                },
                "`etcd_max_request_bytes`",
            ),
            (
                RunSettings {
                    claim_affinity_ms: Some(60_000),
                    ..base()
                },
                "`claim_affinity_ms`",
            ),
            (
                RunSettings {
                    etcd: Some(vec!["127.0.0.1:2379".into()]),
                    ..base()
                },
                "`etcd`",
            ),
            (
                RunSettings {
                    etcd: None,
                    ..base()
                },
                "`etcd`",
            ),
            (
                RunSettings {
                    plugins: Some("/no/such/dir".into()),
                    ..base()
                },
                "`plugins`",
            ),
        ];
        for (settings, named) in cases {
            let e = settings.into_host_config().unwrap_err().to_string();
            assert!(e.contains(named), "{e}");
        }
    }
}
