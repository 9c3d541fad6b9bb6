//! The `esi:worker/host` imports: record reads and logging.
//!
//! Everything a plugin can reach goes through here. A plugin names records by kind and
//! resource (never by key), the host maps them to keys with [`crate::keys`], and anything the
//! plugin is not granted is denied with an error the plugin sees and the log records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wasmtime::{ResourceLimiter, StoreLimits};

use super::bindings::esi::worker::host::Host;
use super::bindings::esi::worker::types::{
    self as wit, HostError, LogLevel, RecordKind, RecordRef, Versioned,
};
use super::manifest::Manifest;
use crate::keys::Record;
use crate::schema::SchemaRegistry;
use crate::store::Store;

/// Records one `read-many` call reads at most: one etcd transaction (its default
/// `--max-txn-ops`), at one revision. Targets past it are refused.
pub const READ_MANY_MAX: usize = 128;

/// What a running job may read.
#[derive(Clone)]
pub struct RecordAccess {
    pub store: Store,
    pub schemas: Arc<SchemaRegistry>,
    /// Records answered from memory instead of etcd, by key (`None`: the record is absent).
    /// Empty for jobs; the bench's plugin phase uses it to time a call without round trips.
    pub preloaded: Arc<HashMap<String, Option<Versioned>>>,
    /// Every key the plugin was allowed to read, in order (the worker learns from it which
    /// records to read with the next claim).
    pub read_log: Arc<Mutex<Vec<String>>>,
}

impl RecordAccess {
    /// Reads go to `store`.
    pub fn new(store: Store, schemas: Arc<SchemaRegistry>) -> Self {
        RecordAccess {
            store,
            schemas,
            preloaded: Arc::default(),
            read_log: Arc::default(),
        }
    }

    /// The keys read so far, leaving the log empty.
    pub fn take_reads(&self) -> Vec<String> {
        std::mem::take(&mut *self.read_log.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Per-instance state of one plugin call.
pub struct HostState {
    /// `None` while validating a plugin (`describe()`): no records are readable then.
    pub(crate) access: Option<RecordAccess>,
    /// What the plugin's manifest grants: reads outside `read` prefixes are denied.
    pub(crate) grants: Arc<Manifest>,
    pub(crate) limits: CallLimiter,
    pub(crate) plugin: String,
}

/// The store's memory limit, remembering whether it refused a growth: a guest whose
/// allocation failed at the limit usually aborts with a bare `unreachable` trap, and this is
/// how the host can still say "memory limit" instead of "trap".
pub struct CallLimiter {
    limits: StoreLimits,
    pub(crate) memory_refused: bool,
}

impl ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        self.memory_refused |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl HostState {
    pub fn new(
        plugin: &str,
        access: Option<RecordAccess>,
        grants: Arc<Manifest>,
        limits: StoreLimits,
    ) -> Self {
        HostState {
            access,
            grants,
            limits: CallLimiter {
                limits,
                memory_refused: false,
            },
            plugin: plugin.to_string(),
        }
    }
}

/// `key` below the key root, the form manifests grant prefixes in.
pub fn relative_key<'k>(store: &Store, key: &'k str) -> &'k str {
    key.strip_prefix(store.keys().root()).unwrap_or(key)
}

/// The key family a record kind lives in.
pub fn record_of(kind: RecordKind) -> Record {
    match kind {
        RecordKind::Config => Record::Config,
        RecordKind::State => Record::State,
        RecordKind::Monitoring => Record::Monitoring,
        RecordKind::MonitoringTarget => Record::MonitoringTarget,
        RecordKind::ResourceMapping => Record::ResourceMapping,
        RecordKind::VlanPool => Record::VlanPool,
    }
}

/// Record kinds a plugin may propose writes to. Config, state and monitoring belong to gohan,
/// the host and the collectors.
pub fn writable(kind: RecordKind) -> bool {
    matches!(
        kind,
        RecordKind::MonitoringTarget | RecordKind::ResourceMapping | RecordKind::VlanPool
    )
}

/// Maps a record reference to its etcd key.
pub fn key_of(
    store: &Store,
    schemas: &SchemaRegistry,
    r: &wit::RecordRef,
) -> Result<String, HostError> {
    let schema = schemas
        .get(&r.resource_type)
        .ok_or_else(|| HostError::UnknownType(r.resource_type.clone()))?;
    if r.resource_id.is_empty() || r.resource_id.contains('/') {
        return Err(HostError::Denied(format!(
            "resource id {:?} of {} is empty or contains '/'",
            r.resource_id, r.resource_type
        )));
    }
    Ok(store
        .keys()
        .record(record_of(r.kind), schema, &r.resource_id))
}

impl HostState {
    /// The key of a record the plugin asks for, if it may read it (refusals are logged), and
    /// what to read it with.
    fn readable(&self, target: &RecordRef) -> Result<(&RecordAccess, String), HostError> {
        let Some(access) = &self.access else {
            return Err(HostError::Denied(
                "records cannot be read outside a job".into(),
            ));
        };
        let key = key_of(&access.store, &access.schemas, target).inspect_err(|e| {
            tracing::warn!(plugin = %self.plugin, error = ?e, "plugin read refused");
        })?;
        let relative = relative_key(&access.store, &key);
        if !self.grants.may_read(relative) {
            let message = format!(
                "reading {relative} is not granted to plugin {} (its manifest's capabilities.read: {:?})",
                self.plugin, self.grants.read
            );
            tracing::warn!(plugin = %self.plugin, key = %relative, "plugin read denied: not granted");
            return Err(HostError::Denied(message));
        }
        access
            .read_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key.clone());
        Ok((access, key))
    }

    fn unavailable(&self, error: &crate::store::StoreError) -> HostError {
        tracing::warn!(plugin = %self.plugin, error = %error, "plugin read failed");
        HostError::Unavailable(error.to_string())
    }
}

/// A record read by the host, as a plugin's `read` answers it.
pub(crate) fn versioned(kv: crate::store::Kv) -> Versioned {
    Versioned {
        value: kv.value_str().into_owned(),
        mod_revision: kv.mod_revision,
    }
}

impl Host for HostState {
    async fn read(&mut self, target: RecordRef) -> Result<Option<Versioned>, HostError> {
        let (access, key) = self.readable(&target)?;
        if let Some(found) = access.preloaded.get(&key) {
            return Ok(found.clone());
        }
        match access.store.get(&key).await {
            Ok(found) => Ok(found.map(versioned)),
            Err(e) => Err(self.unavailable(&e)),
        }
    }

    async fn read_many(
        &mut self,
        targets: Vec<RecordRef>,
    ) -> Vec<Result<Option<Versioned>, HostError>> {
        // A host call is out of reach of the call's deadline (only guest code is), so one
        // call reads at most one transaction's worth of records.
        if targets.len() > READ_MANY_MAX {
            tracing::warn!(
                plugin = %self.plugin,
                targets = targets.len(),
                "read-many over its limit; the targets past it are refused"
            );
        }
        let keys: Vec<Result<String, HostError>> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if i >= READ_MANY_MAX {
                    return Err(HostError::Denied(format!(
                        "read-many reads at most {READ_MANY_MAX} records per call; \
                         target {i} was not read"
                    )));
                }
                self.readable(t).map(|(_, key)| key)
            })
            .collect();
        let Some(access) = &self.access else {
            return keys.into_iter().map(|k| k.map(|_| None)).collect();
        };
        // What memory does not answer is read in one transaction.
        let unread: Vec<String> = keys
            .iter()
            .filter_map(|k| k.as_ref().ok())
            .filter(|k| !access.preloaded.contains_key(*k))
            .cloned()
            .collect();
        let mut fetched: HashMap<String, Option<Versioned>> = HashMap::new();
        let mut failure = None;
        if !unread.is_empty() {
            match access.store.get_many(&unread).await {
                Ok(found) => {
                    fetched = unread
                        .into_iter()
                        .zip(found)
                        .map(|(key, kv)| (key, kv.map(versioned)))
                        .collect();
                }
                Err(e) => failure = Some(self.unavailable(&e)),
            }
        }
        keys.into_iter()
            .map(|key| {
                let key = key?;
                if let Some(found) = access.preloaded.get(&key).or(fetched.get(&key)) {
                    return Ok(found.clone());
                }
                Err(failure
                    .clone()
                    .unwrap_or_else(|| HostError::Unavailable(format!("{key} was not answered"))))
            })
            .collect()
    }

    async fn log(&mut self, level: LogLevel, message: String) {
        let plugin = self.plugin.as_str();
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

impl super::bindings::esi::worker::types::Host for HostState {}
