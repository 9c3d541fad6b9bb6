//! The loaded plugins, the routing from handler name to plugin, and hot reload.
//!
//! The live set of plugins sits behind an [`ArcSwap`]: a job looks its plugin up once and
//! keeps the `Arc<LoadedPlugin>` until it ends, so a swap never touches a running job, which
//! finishes on the version it started with. A new version is compiled and validated off the
//! job path (the component's world, `describe()`, its manifest) and only then swapped in; a
//! version that fails is *rejected* and the previous one keeps serving.
//!
//! [`PluginRegistry::watch`] follows the plugin directory with `notify`. One copy or rename
//! fires several events, so events are debounced per plugin and a reload whose component
//! bytes and manifest did not change is a no-op. The supported way to update a plugin is to
//! write the new file under a temporary name (anything not ending in `.wasm` or `.toml`, e.g.
//! `.monitoring_worker.wasm.tmp`) and rename it over the old one; a half-written file that is
//! picked up anyway fails validation and is retried when its last write lands.
//!
//! Each plugin's state is published for the fleet under
//! `/esi-worker/plugins/<host-id>/<plugin>`, bound to the host lease.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::cache::CompileCache;
use super::engine::{LoadedPlugin, PluginEngine, Tier};
use super::manifest::Manifest;
use crate::lease::HostLease;
use crate::metrics;
use crate::store::Store;

/// How long the directory must be quiet before a burst of events is acted on. A deploy by
/// rename is one burst; a file copied in place that is caught half-written fails validation
/// and the old version keeps serving until the copy's last write, which is acted on too.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// The plugins serving at one moment.
#[derive(Debug, Default, Clone)]
pub struct PluginSet {
    by_handler: HashMap<String, Arc<LoadedPlugin>>,
    /// By plugin name (the file stem).
    by_name: BTreeMap<String, Arc<LoadedPlugin>>,
}

/// What the fleet sees of one plugin on one host.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PluginStatus {
    pub plugin: String,
    /// The serving version (empty when none serves).
    pub version: String,
    pub sha256: String,
    pub loaded_at_unix: u64,
    pub handlers: Vec<String>,
    /// `active`, or `rejected: <why>` for the newest file (the version above still serves, if
    /// any).
    pub state: String,
    /// The serving code's compiler: `optimized` (Cranelift), or `baseline` (Winch) while a
    /// new build's optimised code compiles; empty when none serves.
    pub tier: String,
    /// Calls that failed without an answer, by kind (`trap`, `deadline`, `memory`, ...).
    pub failures: BTreeMap<String, u64>,
}

/// Where status records go, once the host has a lease.
struct Publisher {
    store: Store,
    lease: Arc<HostLease>,
    host_id: String,
    /// Set when the host drains: nothing is published any more.
    withdrawn: AtomicBool,
}

/// Handler name -> plugin, live.
pub struct PluginRegistry {
    engine: Arc<PluginEngine>,
    dir: PathBuf,
    live: ArcSwap<PluginSet>,
    status: Mutex<BTreeMap<String, PluginStatus>>,
    publisher: Mutex<Option<Arc<Publisher>>>,
    /// Bumped after every swap, so the worker looks at the ready queue again.
    changed: tokio::sync::watch::Sender<u64>,
    /// One reload at a time: each computes the next set from the current one.
    reloading: tokio::sync::Mutex<()>,
    /// Wakes the task that republishes failure counts.
    counts_changed: tokio::sync::Notify,
    /// Times a plugin's file was looked at for a change (each costs a read and a digest).
    checks: std::sync::atomic::AtomicU64,
    /// Plugins whose newest build was refused only because another plugin serves one of its
    /// handlers: tried again once that handler is free (a handler moved from one plugin to
    /// another in one deploy is freed only when the other is reloaded).
    blocked: Mutex<BTreeMap<String, Blocked>>,
}

impl std::fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRegistry")
            .field("dir", &self.dir)
            .field("handlers", &self.handlers())
            .finish()
    }
}

impl PluginRegistry {
    /// Loads every `*.wasm` in `dir`. A file that fails is rejected with its reason and the
    /// rest still load: one bad plugin must not take the others down.
    pub async fn load_dir(engine: Arc<PluginEngine>, dir: &Path) -> anyhow::Result<Self> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("reading plugin directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| plugin_name(&p).filter(|_| p.extension() == Some("wasm".as_ref())))
            .collect();
        names.sort();
        let registry = PluginRegistry {
            engine,
            dir: dir.to_path_buf(),
            live: ArcSwap::from_pointee(PluginSet::default()),
            status: Mutex::new(BTreeMap::new()),
            publisher: Mutex::new(None),
            changed: tokio::sync::watch::channel(0).0,
            reloading: tokio::sync::Mutex::new(()),
            counts_changed: tokio::sync::Notify::new(),
            checks: std::sync::atomic::AtomicU64::new(0),
            blocked: Mutex::default(),
        };
        for name in names {
            registry.reload(&name).await;
        }
        Ok(registry)
    }

    /// The plugin serving `handler` now.
    pub fn get(&self, handler: &str) -> Option<Arc<LoadedPlugin>> {
        self.live.load().by_handler.get(handler).cloned()
    }

    /// Every handler served, sorted.
    pub fn handlers(&self) -> Vec<String> {
        let mut h: Vec<String> = self.live.load().by_handler.keys().cloned().collect();
        h.sort();
        h
    }

    /// Whether some plugin serves `handler` now.
    pub fn serves(&self, handler: &str) -> bool {
        self.live.load().by_handler.contains_key(handler)
    }

    /// The status of every plugin this host knows, by name.
    pub fn statuses(&self) -> Vec<PluginStatus> {
        lock(&self.status).values().cloned().collect()
    }

    pub fn status(&self, name: &str) -> Option<PluginStatus> {
        lock(&self.status).get(name).cloned()
    }

    /// A receiver that changes after every swap.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Counts a call of `plugin` that ended without an answer, by kind.
    pub fn count_failure(&self, plugin: &str, kind: &str) {
        if let Some(s) = lock(&self.status).get_mut(plugin) {
            *s.failures.entry(kind.to_string()).or_default() += 1;
        }
        metrics::global()
            .plugin_traps
            .get_or_create(&metrics::labels([("plugin", plugin), ("kind", kind)]))
            .inc();
        self.counts_changed.notify_one();
    }

    /// Starts publishing status records under the host's lease (and publishes the current
    /// ones). Failure counts are republished by a task, at most every `DEBOUNCE`, until
    /// `shutdown`.
    pub async fn publish_status(
        self: &Arc<Self>,
        store: Store,
        lease: Arc<HostLease>,
        host_id: &str,
        shutdown: CancellationToken,
    ) {
        let publisher = Arc::new(Publisher {
            store,
            lease,
            host_id: host_id.to_string(),
            withdrawn: AtomicBool::new(false),
        });
        *lock(&self.publisher) = Some(publisher.clone());
        for status in self.statuses() {
            publish(&publisher, &status).await;
        }
        let registry = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(changed) = registry.upgrade() else {
                    return;
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = changed.counts_changed.notified() => {}
                }
                tokio::time::sleep(DEBOUNCE).await;
                // Under the reload lock, so a reload's status is never overwritten by an
                // older copy.
                let _one_at_a_time = changed.reloading.lock().await;
                for status in changed.statuses() {
                    publish(&publisher, &status).await;
                }
            }
        });
    }

    /// Loads (or removes) the plugin `name` from the directory and swaps it in, compiled by
    /// Cranelift (or taken from the compile cache).
    pub async fn reload(&self, name: &str) {
        self.reload_as(name, false, Conflicts::Report).await;
    }

    /// As [`PluginRegistry::reload`], but a build the compile cache does not know serves at
    /// once compiled by Winch, and Cranelift's code replaces it when ready (unless the file
    /// changed again meanwhile, or `shutdown`). Jobs that started on the baseline code finish
    /// on it.
    pub async fn reload_fast(self: &Arc<Self>, name: &str, shutdown: &CancellationToken) {
        self.reload_tiered(name, Conflicts::Report, shutdown).await;
    }

    async fn reload_tiered(
        self: &Arc<Self>,
        name: &str,
        conflicts: Conflicts,
        shutdown: &CancellationToken,
    ) {
        if let Some(build) = self.reload_as(name, true, conflicts).await {
            let (registry, name, shutdown) = (self.clone(), name.to_string(), shutdown.clone());
            tokio::spawn(async move { registry.optimize(&name, build, &shutdown).await });
        }
    }

    /// Returns the baseline build it swapped in, which is to be optimised.
    async fn reload_as(
        &self,
        name: &str,
        tiered: bool,
        conflicts: Conflicts,
    ) -> Option<BaselineBuild> {
        let _one_at_a_time = self.reloading.lock().await;
        let path = self.dir.join(format!("{name}.wasm"));
        if !path.exists() {
            self.checks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            lock(&self.blocked).remove(name);
            self.remove(name).await;
            return None;
        }
        let current = self.live.load_full();
        let bytes: Option<Arc<[u8]>> = tokio::fs::read(&path).await.ok().map(Into::into);
        // Counted once the file is read: from here on, this check is about those bytes.
        self.checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let digest = bytes.as_deref().map(CompileCache::digest);
        if self.unchanged(&current, name, &path, digest.as_deref()) {
            // The same bytes and manifest already serve: nothing to compile. A newer file that
            // was rejected has been put back to the serving build: no longer rejected.
            lock(&self.blocked).remove(name);
            self.clear_rejection(&current, name).await;
            return None;
        }
        let tier = match &digest {
            Some(d) if tiered && !self.engine.has_optimized(d) => Tier::Baseline,
            _ => Tier::Optimized,
        };
        let loaded = match (bytes.clone(), Manifest::load_for(&path)) {
            (Some(bytes), Ok(manifest)) => {
                self.engine
                    .load_bytes(&path, bytes, manifest.unwrap_or_default(), tier)
                    .await
            }
            // Not a second read of both files: the bytes read above are the ones optimised
            // later, and must be the ones whose digest serves. A manifest caught mid-write is
            // read again when its last write lands.
            (Some(_), Err(e)) => Err(e.into()),
            // Unreadable: the path-based load reports why.
            (None, _) => self.engine.load_tier(&path, tier).await,
        };
        let outcome = match loaded {
            Ok(plugin) => match self.swap_in(&current, name, plugin) {
                Ok(swapped) => {
                    lock(&self.blocked).remove(name);
                    Ok(swapped)
                }
                Err(conflict) => {
                    let reason = conflict.to_string();
                    let mut blocked = lock(&self.blocked);
                    // Refused again for the same reason (a catch-up, an unrelated deploy):
                    // already on record, so not logged and counted again.
                    let known = blocked
                        .get(name)
                        .is_some_and(|b| b.reported && b.conflict.to_string() == reason);
                    blocked.insert(
                        name.to_string(),
                        Blocked {
                            conflict,
                            reported: known || conflicts == Conflicts::Report,
                        },
                    );
                    drop(blocked);
                    if known || conflicts == Conflicts::Defer {
                        // The burst may free the handler yet; reported at its end if not.
                        return None;
                    }
                    Err(reason)
                }
            },
            Err(e) => {
                lock(&self.blocked).remove(name);
                Err(format!("{e:#}"))
            }
        };
        let mut to_optimize = None;
        let status = match outcome {
            Ok(None) => {
                // Same bytes and manifest: nothing to do.
                self.clear_rejection(&current, name).await;
                return None;
            }
            Ok(Some(plugin)) => {
                tracing::info!(plugin = %name, version = %plugin.version, sha256 = %plugin.sha256,
                    handlers = ?plugin.handlers, path = %path.display(), tier = plugin.tier.as_str(),
                    "plugin active");
                metrics::global()
                    .plugin_reloads
                    .get_or_create(&metrics::labels([("plugin", name)]))
                    .inc();
                if let (Tier::Baseline, Some(bytes)) = (plugin.tier, bytes) {
                    to_optimize = Some(BaselineBuild {
                        sha256: plugin.sha256.clone(),
                        bytes,
                        manifest: (*plugin.manifest).clone(),
                    });
                }
                status_of(name, Some(&plugin), "active".into(), self.failures(name))
            }
            Err(reason) => {
                self.reject(&current, name, &reason).await;
                return None;
            }
        };
        self.set_status(status).await;
        to_optimize
    }

    /// Records that the newest file of `name` was rejected for `reason`: the log, the metric
    /// and the status (which keeps showing the version that still serves, if any).
    async fn reject(&self, current: &PluginSet, name: &str, reason: &str) {
        let path = self.dir.join(format!("{name}.wasm"));
        tracing::error!(plugin = %name, path = %path.display(), %reason,
            "plugin rejected; the previous version (if any) keeps serving");
        metrics::global()
            .plugin_rejections
            .get_or_create(&metrics::labels([("plugin", name)]))
            .inc();
        let serving = current.by_name.get(name);
        let status = status_of(
            name,
            serving,
            format!("rejected: {reason}"),
            self.failures(name),
        );
        self.set_status(status).await;
    }

    /// Compiles a baseline build of `name` with Cranelift and swaps it in if that build (its
    /// bytes and its manifest) still serves. It compiles the bytes that were loaded, not the
    /// file, which may hold a newer (perhaps rejected) build by now.
    async fn optimize(&self, name: &str, build: BaselineBuild, shutdown: &CancellationToken) {
        let path = self.dir.join(format!("{name}.wasm"));
        let BaselineBuild {
            sha256,
            bytes,
            manifest,
        } = build;
        let loaded = self
            .engine
            .load_bytes(&path, bytes, manifest.clone(), Tier::Optimized)
            .await;
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.live.load_full();
        // The same bytes under a manifest replaced meanwhile are another build: its own
        // optimisation follows, and this one must not bring the old manifest back.
        let still_serving = current.by_name.get(name).is_some_and(|p| {
            p.sha256 == sha256 && p.tier == Tier::Baseline && *p.manifest == manifest
        });
        if !still_serving {
            return; // replaced or removed meanwhile
        }
        if shutdown.is_cancelled() {
            return;
        }
        let plugin = match loaded {
            Ok(plugin) => plugin,
            Err(e) => {
                tracing::warn!(plugin = %name, error = %format!("{e:#}"),
                    "Cranelift could not compile the plugin; its baseline build keeps serving");
                return;
            }
        };
        match self.swap_in(&current, name, plugin) {
            Ok(Some(plugin)) => {
                tracing::info!(plugin = %name, version = %plugin.version, sha256 = %plugin.sha256,
                    tier = plugin.tier.as_str(), "plugin's optimised code active");
                // A newer file rejected meanwhile keeps its `rejected: ...` state on record.
                let state = lock(&self.status)
                    .get(name)
                    .map(|s| s.state.clone())
                    .unwrap_or_else(|| "active".into());
                let status = status_of(name, Some(&plugin), state, self.failures(name));
                self.set_status(status).await;
            }
            Ok(None) => {}
            Err(conflict) => {
                tracing::warn!(plugin = %name, reason = %conflict, "optimised code not swapped in");
            }
        }
    }

    /// Marks `name` active again if its status says the newest file was rejected but the
    /// files now hold the serving build.
    async fn clear_rejection(&self, current: &PluginSet, name: &str) {
        let Some(serving) = current.by_name.get(name) else {
            return;
        };
        let rejected = lock(&self.status)
            .get(name)
            .is_some_and(|s| s.state != "active");
        if rejected {
            tracing::info!(plugin = %name, "the files hold the serving build again; no longer rejected");
            let status = status_of(name, Some(serving), "active".into(), self.failures(name));
            self.set_status(status).await;
        }
    }

    /// How many times a plugin's file was looked at for a change since start: the initial
    /// load, the catch-up when the watch starts, then once per burst of directory events.
    pub fn checks(&self) -> u64 {
        self.checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `name` serves exactly the component and manifest at `path` already.
    /// (`digest`: of the file's bytes, `None` if it could not be read.)
    fn unchanged(
        &self,
        current: &PluginSet,
        name: &str,
        path: &Path,
        digest: Option<&str>,
    ) -> bool {
        let Some(serving) = current.by_name.get(name) else {
            return false;
        };
        // A manifest that does not parse is a change: the load reports it.
        let Ok(manifest) = Manifest::load_for(path) else {
            return false;
        };
        digest == Some(serving.sha256.as_str()) && manifest.unwrap_or_default() == *serving.manifest
    }

    /// Swaps `plugin` in for `name`. `Ok(None)`: identical to what serves already.
    fn swap_in(
        &self,
        current: &PluginSet,
        name: &str,
        mut plugin: LoadedPlugin,
    ) -> Result<Option<Arc<LoadedPlugin>>, Conflict> {
        if let Some(old) = current.by_name.get(name) {
            if old.sha256 == plugin.sha256
                && old.manifest == plugin.manifest
                && old.tier == plugin.tier
            {
                return Ok(None);
            }
            // Jobs still running on the old version hold its slots: sharing them keeps old and
            // new together within `max_instances`. A changed limit starts afresh.
            if old.limits().max_instances == plugin.limits().max_instances {
                plugin.slots = old.slots.clone();
            }
        }
        let mut next = current.clone();
        if let Some(old) = next.by_name.remove(name) {
            next.by_handler.retain(|_, p| !Arc::ptr_eq(p, &old));
        }
        if let Some((handler, other)) = plugin
            .handlers
            .iter()
            .find_map(|h| next.by_handler.get(h).map(|p| (h, p)))
        {
            return Err(Conflict {
                handler: handler.clone(),
                served_by: other.path.clone(),
            });
        }
        let plugin = Arc::new(plugin);
        for h in &plugin.handlers {
            next.by_handler.insert(h.clone(), plugin.clone());
        }
        next.by_name.insert(name.to_string(), plugin.clone());
        self.live.store(Arc::new(next));
        self.changed.send_modify(|n| *n += 1);
        Ok(Some(plugin))
    }

    /// Stops routing to a plugin whose file is gone; its running jobs finish.
    async fn remove(&self, name: &str) {
        let current = self.live.load_full();
        if current.by_name.contains_key(name) {
            let mut next = (*current).clone();
            if let Some(old) = next.by_name.remove(name) {
                next.by_handler.retain(|_, p| !Arc::ptr_eq(p, &old));
            }
            self.live.store(Arc::new(next));
            self.changed.send_modify(|n| *n += 1);
            tracing::info!(plugin = %name, "plugin removed; its running jobs finish");
        }
        let removed = lock(&self.status).remove(name).is_some();
        let publisher = lock(&self.publisher).clone();
        if let (true, Some(p)) = (removed, publisher) {
            let key = p.store.keys().plugin_status(&p.host_id, name);
            if let Err(e) = p.lease.withdraw(&p.store, &key).await {
                tracing::warn!(%key, error = %e, "could not remove the plugin's status record");
            }
        }
    }

    fn failures(&self, name: &str) -> BTreeMap<String, u64> {
        lock(&self.status)
            .get(name)
            .map(|s| s.failures.clone())
            .unwrap_or_default()
    }

    /// Deletes this host's status records and publishes none after: a draining host serves
    /// nothing new, and other hosts stop ranking it first for jobs (`worker/affinity.rs`)
    /// instead of waiting for its lease to go. The statuses stay readable in this process.
    pub async fn withdraw_statuses(&self) {
        let Some(p) = lock(&self.publisher).clone() else {
            return;
        };
        p.withdrawn.store(true, Ordering::SeqCst);
        let keys: Vec<String> = lock(&self.status)
            .keys()
            .map(|name| p.store.keys().plugin_status(&p.host_id, name))
            .collect();
        // Retired, not just withdrawn: a publish already past the flag above finds its key
        // retired under the lease's write lock and puts nothing back.
        if let Err(e) = p.lease.retire(&p.store, &keys).await {
            tracing::warn!(error = %e, "could not withdraw the plugin status records; they go with the lease");
        }
    }

    async fn set_status(&self, status: PluginStatus) {
        lock(&self.status).insert(status.plugin.clone(), status.clone());
        let publisher = lock(&self.publisher).clone();
        if let Some(p) = publisher {
            publish(&p, &status).await;
        }
    }

    /// Follows the plugin directory until `shutdown`, reloading what changes.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        use notify::Watcher as _;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            for seen in seen_in(event) {
                let _ = tx.send(seen);
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the plugin directory; hot reload is off");
                return;
            }
        };
        if let Err(e) = watcher.watch(&self.dir, notify::RecursiveMode::NonRecursive) {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot watch the plugin directory; hot reload is off");
            return;
        }
        tracing::info!(dir = %self.dir.display(), "watching the plugin directory");
        // Catch up with anything replaced between the initial load and the watch: unchanged
        // plugins cost a read and a digest.
        self.reload_burst(self.every_name(), &shutdown).await;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                seen = rx.recv() => match seen { Some(seen) => seen, None => return },
            };
            let mut touched = std::collections::BTreeSet::new();
            let mut rescan = false;
            let mut take = |seen: Seen| match seen {
                Seen::Path(path) => touched.extend(plugin_file_name(&path)),
                Seen::Rescan => rescan = true,
            };
            take(first);
            // Debounce: gather until the directory has been quiet for a moment.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    seen = rx.recv() => match seen {
                        Some(seen) => take(seen),
                        None => return,
                    },
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                }
            }
            if rescan {
                // Events were lost (the kernel's queue overflowed): look at every plugin, as
                // at start.
                tracing::warn!(dir = %self.dir.display(), "plugin directory events were lost; looking at every plugin");
                touched.extend(self.every_name());
            }
            self.reload_burst(touched, &shutdown).await;
        }
    }

    /// Every plugin in the directory or serving.
    fn every_name(&self) -> std::collections::BTreeSet<String> {
        let mut names: std::collections::BTreeSet<String> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().and_then(|e| plugin_file_name(&e.path())))
                    .collect()
            })
            .unwrap_or_default();
        names.extend(self.live.load().by_name.keys().cloned());
        names
    }

    /// Reloads `names`, then each plugin refused because its handler was taken whose
    /// handler is free now. A refusal is reported only if the handler is still taken at the
    /// end, so a handler moved between plugins in one deploy logs no rejection whichever
    /// plugin is looked at first.
    async fn reload_burst(
        self: &Arc<Self>,
        names: std::collections::BTreeSet<String>,
        shutdown: &CancellationToken,
    ) {
        for name in &names {
            self.reload_tiered(name, Conflicts::Defer, shutdown).await;
        }
        // Each retry that succeeds may free another handler.
        loop {
            let live = self.live.load_full();
            let freed = lock(&self.blocked)
                .iter()
                .find(|(_, b)| !live.by_handler.contains_key(&b.conflict.handler))
                .map(|(name, _)| name.clone());
            let Some(name) = freed else { break };
            tracing::info!(plugin = %name, "the handler it was refused for is free now; loading it again");
            lock(&self.blocked).remove(&name);
            self.reload_tiered(&name, Conflicts::Defer, shutdown).await;
        }
        // Under the reload lock, like every other status change, so that neither an
        // optimisation swapping in nor the failure-count republisher interleaves with it.
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.live.load_full();
        let unreported: Vec<(String, String)> = lock(&self.blocked)
            .iter_mut()
            .filter_map(|(name, b)| {
                // The handler changed hands in this burst (its holder went, another plugin
                // took it): the rejection names the plugin that holds it now.
                let holder = current.by_handler.get(&b.conflict.handler);
                if let Some(holder) = holder.filter(|h| h.path != b.conflict.served_by) {
                    b.conflict.served_by = holder.path.clone();
                    b.reported = false;
                }
                (!b.reported).then(|| {
                    b.reported = true;
                    (name.clone(), b.conflict.to_string())
                })
            })
            .collect();
        for (name, reason) in unreported {
            self.reject(&current, &name, &reason).await;
        }
    }
}

/// A plugin refused because another plugin serves one of its handlers.
#[derive(Debug)]
struct Blocked {
    /// The handler taken, and by which plugin.
    conflict: Conflict,
    /// Whether the rejection was logged and published yet.
    reported: bool,
}

/// Whether a reload reports a handler conflict at once or leaves it to the end of its burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conflicts {
    Report,
    Defer,
}

/// A build refused because another plugin serves one of its handlers.
#[derive(Debug)]
struct Conflict {
    handler: String,
    served_by: PathBuf,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "handler {:?} is already served by {}",
            self.handler,
            self.served_by.display()
        )
    }
}

/// What the directory watch reports to the reload loop.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// This file may have new contents.
    Path(PathBuf),
    /// Events were lost: every plugin must be looked at.
    Rescan,
}

/// What a `notify` event means for the reload loop. A queue overflow (a rescan flag) or an
/// error from the watch may hide changes, so both ask for a rescan.
fn seen_in(event: notify::Result<notify::Event>) -> Vec<Seen> {
    match event {
        Ok(event) if event.need_rescan() => vec![Seen::Rescan],
        Ok(event) if changes_contents(&event.kind) => {
            event.paths.into_iter().map(Seen::Path).collect()
        }
        Ok(_) => Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "the plugin directory watch reported an error");
            vec![Seen::Rescan]
        }
    }
}

/// A build serving baseline code, as it was loaded.
struct BaselineBuild {
    sha256: String,
    bytes: Arc<[u8]>,
    manifest: Manifest,
}

/// Whether a directory event can mean new contents. Opening, reading and closing a file
/// without writing are not: the registry reads the files itself, and acting on those events
/// would re-read every plugin after each check, forever.
fn changes_contents(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

async fn publish(p: &Publisher, status: &PluginStatus) {
    if p.withdrawn.load(Ordering::SeqCst) {
        return;
    }
    let key = p.store.keys().plugin_status(&p.host_id, &status.plugin);
    let value = serde_json::to_string(status).unwrap_or_default();
    if let Err(e) = p.lease.publish(&p.store, &key, value).await {
        tracing::warn!(%key, error = %e, "could not publish the plugin's status");
    }
}

fn status_of(
    name: &str,
    serving: Option<&Arc<LoadedPlugin>>,
    state: String,
    failures: BTreeMap<String, u64>,
) -> PluginStatus {
    PluginStatus {
        plugin: name.to_string(),
        version: serving.map(|p| p.version.clone()).unwrap_or_default(),
        sha256: serving.map(|p| p.sha256.clone()).unwrap_or_default(),
        loaded_at_unix: serving.map(|p| p.loaded_at_unix).unwrap_or(0),
        handlers: serving.map(|p| p.handlers.clone()).unwrap_or_default(),
        state,
        tier: serving
            .map(|p| p.tier.as_str().to_string())
            .unwrap_or_default(),
        failures,
    }
}

/// The plugin name of a component path (its file stem), for names a plugin may have.
fn plugin_name(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    (!stem.is_empty() && !stem.starts_with('.') && !stem.contains('.')).then(|| stem.to_string())
}

/// The plugin a changed file belongs to: `<name>.wasm` or `<name>.toml`; temporary files
/// (any other name) are ignored until renamed.
fn plugin_file_name(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_str()?;
    matches!(ext, "wasm" | "toml")
        .then(|| plugin_name(path))
        .flatten()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_events_and_watch_errors_ask_for_a_rescan_and_reads_ask_for_nothing() {
        use notify::event::{AccessKind, AccessMode, CreateKind, Event, EventKind, Flag};
        let overflow = Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert_eq!(seen_in(Ok(overflow)), [Seen::Rescan]);
        let error = notify::Error::generic("inotify read failed");
        assert_eq!(seen_in(Err(error)), [Seen::Rescan]);
        let read = Event::new(EventKind::Access(AccessKind::Close(AccessMode::Read)))
            .add_path("/p/a.wasm".into());
        assert_eq!(seen_in(Ok(read)), []);
        let created = Event::new(EventKind::Create(CreateKind::File))
            .add_path("/p/a.wasm".into())
            .add_path("/p/a.toml".into());
        assert_eq!(
            seen_in(Ok(created)),
            [
                Seen::Path("/p/a.wasm".into()),
                Seen::Path("/p/a.toml".into())
            ]
        );
    }

    #[test]
    fn only_components_and_manifests_name_a_plugin() {
        let name = |p: &str| plugin_file_name(Path::new(p));
        assert_eq!(
            name("/p/monitoring_worker.wasm").as_deref(),
            Some("monitoring_worker")
        );
        assert_eq!(
            name("/p/monitoring_worker.toml").as_deref(),
            Some("monitoring_worker")
        );
        assert_eq!(name("/p/.monitoring_worker.wasm.tmp"), None);
        assert_eq!(name("/p/monitoring_worker.wasm.tmp"), None);
        assert_eq!(name("/p/.hidden.wasm"), None);
        assert_eq!(name("/p/notes.txt"), None);
    }
}
