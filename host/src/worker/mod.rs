//! The worker role (PROTOCOL section 5): claim ready jobs, run them in a plugin, complete them.
//!
//! Who owns what: [`Worker::run`] owns the ready-queue watch and spawns one task per claimable
//! job, bounded by a semaphore; each task owns its claim until it completes, re-queues or
//! fails the job. Safety never depends on timing: the claim is a transaction that only one
//! worker can win, and every write after it is fenced by a compare on our reservation value,
//! so a worker whose lease expired can run a job to the end but cannot publish its result.

pub mod affinity;
pub mod hints;
mod run;

pub(crate) use run::to_wit_job;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::keys::Queue;
use crate::lease::HostLease;
use crate::plugins::{PluginEngine, PluginRegistry};
use crate::schema::SchemaRegistry;
use crate::store::{Change, Events, Kv, Store, Watch, WatchError};

use affinity::{Backlog, Peers};

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at once by this host.
    pub concurrency: usize,
    /// Attempts after which a retryable failure becomes permanent.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// How long, per rank, a host waits before it claims a job other hosts rank first
    /// ([`affinity`]); zero: every host claims every job at once.
    pub claim_affinity_delay: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 64,
            max_attempts: 5,
            retry_backoff: Duration::from_millis(500),
            retry_backoff_max: Duration::from_secs(30),
            claim_affinity_delay: affinity::AFFINITY_DELAY,
        }
    }
}

/// The next changes of `watch`, or never if there is none.
async fn next_of(watch: &mut Option<Watch>) -> Result<Vec<Change>, crate::store::WatchError> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

/// Claims and runs jobs for the handlers its plugins serve.
pub struct Worker {
    pub(crate) store: Store,
    pub(crate) schemas: Arc<SchemaRegistry>,
    pub(crate) engine: Arc<PluginEngine>,
    pub(crate) plugins: Arc<PluginRegistry>,
    pub(crate) config: WorkerConfig,
    /// The host's current lease; replaced if the host had to take a new one.
    pub(crate) lease: Arc<HostLease>,
    slots: Arc<Semaphore>,
    /// Every job task, so that a drain can wait for them.
    in_flight: TaskTracker,
    /// Cancelled when a drain starts: no new claim is made.
    pub(crate) stop_claiming: CancellationToken,
    /// Cancelled when a drain runs out of time: jobs still running hand themselves back.
    pub(crate) hard_stop: CancellationToken,
    /// Records each handler's jobs keep reading, read with the claim.
    pub(crate) read_hints: hints::ReadHints,
    /// The params of jobs this process's job manager planned (see [`hints`]).
    pub(crate) planned: Arc<hints::PlannedParams>,
    /// This host's id, for its rank among the hosts serving a job's handler.
    host_id: String,
    /// The hosts serving what, from their plugin status records (see [`affinity`]).
    peers: Mutex<Peers>,
    /// Bumped when `peers` changes.
    peers_changed: watch::Sender<()>,
}

impl Worker {
    #[allow(clippy::too_many_arguments)] // one per shared part of the host; built once
    pub fn new(
        store: Store,
        schemas: Arc<SchemaRegistry>,
        engine: Arc<PluginEngine>,
        plugins: Arc<PluginRegistry>,
        config: WorkerConfig,
        lease: Arc<HostLease>,
        planned: Arc<hints::PlannedParams>,
        host_id: String,
    ) -> Arc<Self> {
        let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
        Arc::new(Worker {
            store,
            schemas,
            engine,
            plugins,
            config,
            lease,
            slots,
            in_flight: TaskTracker::new(),
            stop_claiming: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            read_hints: hints::ReadHints::default(),
            planned,
            host_id,
            peers: Mutex::new(Peers::default()),
            peers_changed: watch::Sender::new(()),
        })
    }

    /// Watches the ready queue until `shutdown`, re-listing after any watch failure so that no
    /// ready job is missed.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let peers = tokio::spawn(self.clone().follow_peers(shutdown.clone()));
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.clone().follow_ready_queue(&shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    crate::metrics::global().worker_restarts.inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "worker: waiting for etcd");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let _ = peers.await;
    }

    async fn follow_ready_queue(
        self: Arc<Self>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let prefix = self.store.keys().queue_prefix(Queue::Ready);
        let (ready, revision) = self.store.list(&prefix).await?;
        // Ready jobs this host may run, waiting for a slot. A job's task starts only once it
        // has a slot, so a backlog of thousands costs a key and a handler name each.
        let mut backlog = Backlog::new(self.config.claim_affinity_delay);
        for kv in ready {
            self.offer(&mut backlog, kv);
        }
        // The deletes watch, when peers make it worth opening, starts after what was seen.
        let mut seen_revision = revision;
        // The revision of the last listing: a put at or before it that the puts watch still
        // delivers is in the backlog already, or was claimed before the listing.
        let mut listed_at = revision;
        // Only new ready keys matter; a claim's delete of one would be an event for nothing,
        // unless other hosts serve too: then jobs ranked to them wait here, and their deletes
        // say which ones they claimed.
        let mut watch = self
            .store
            .watch_events(&prefix, revision + 1, Events::Puts)
            .await?;
        let mut deletes: Option<Watch> = None;
        let mut plugins_changed = self.plugins.subscribe();
        let mut peers_changed = self.peers_changed.subscribe();
        peers_changed.mark_changed();
        loop {
            let due = backlog.next_due();
            let changes = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changes = watch.next() => changes?,
                slot = self.slots.clone().acquire_owned(), if backlog.has_ready() => {
                    if let (Ok(slot), Some(next)) = (slot, backlog.take()) {
                        if next.deferred {
                            crate::metrics::global()
                                .claims_deferred
                                .get_or_create(&crate::metrics::labels([(
                                    "handler",
                                    &next.handler,
                                )]))
                                .inc();
                        }
                        self.start(&next.key, &next.handler, slot);
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)),
                    if due.is_some() => {
                    backlog.promote(Instant::now());
                    continue;
                }
                gone = next_of(&mut deletes) => {
                    match gone {
                        Ok(gone) => {
                            for change in gone {
                                if let Change::Delete { key, revision, .. } = change {
                                    backlog.gone(&key, revision);
                                }
                            }
                        }
                        // It opened at the revision after the last ready job seen, which etcd
                        // compacts once the queue has been quiet for long (a peer arriving
                        // after a quiet night): what it missed, a listing says.
                        Err(WatchError::Compacted { revision, .. }) => {
                            tracing::info!(
                                compacted = revision,
                                "worker: the ready deletes watch started before etcd's \
                                 compaction; listing the ready queue again"
                            );
                            deletes = None;
                            listed_at = self.relist(&prefix, &mut backlog, "compacted").await?;
                            seen_revision = seen_revision.max(listed_at);
                            self.follow_deletes_if_shared(&mut deletes, &prefix, seen_revision)
                                .await?;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    continue;
                }
                Ok(()) = peers_changed.changed() => {
                    self.follow_deletes_if_shared(&mut deletes, &prefix, seen_revision)
                        .await?;
                    continue;
                }
                Ok(()) = plugins_changed.changed() => {
                    // A plugin came or went: jobs already waiting may be ours to run now.
                    // What a later deletes watch must see starts after this listing.
                    listed_at = self.relist(&prefix, &mut backlog, "plugins_changed").await?;
                    seen_revision = seen_revision.max(listed_at);
                    self.follow_deletes_if_shared(&mut deletes, &prefix, seen_revision)
                        .await?;
                    continue;
                }
            };
            for change in changes {
                if let Change::Put(kv) = change {
                    if kv.mod_revision <= listed_at {
                        continue;
                    }
                    seen_revision = seen_revision.max(kv.mod_revision);
                    self.offer(&mut backlog, kv);
                }
            }
        }
    }

    /// Fills the backlog again from a listing of the ready queue; returns its revision.
    /// `reason` labels the count of re-lists.
    async fn relist(
        &self,
        prefix: &str,
        backlog: &mut Backlog,
        reason: &str,
    ) -> anyhow::Result<i64> {
        crate::metrics::global()
            .worker_relists
            .get_or_create(&crate::metrics::labels([("reason", reason)]))
            .inc();
        let (ready, listed) = self.store.list(prefix).await?;
        backlog.clear();
        for kv in ready {
            self.offer(backlog, kv);
        }
        Ok(listed)
    }

    /// Opens the watch of ready deletes while another host serves one of this host's
    /// handlers (their claims of jobs waiting here), and drops it otherwise.
    async fn follow_deletes_if_shared(
        &self,
        deletes: &mut Option<Watch>,
        prefix: &str,
        seen_revision: i64,
    ) -> anyhow::Result<()> {
        let shared = self
            .peers()
            .shares_handlers(&self.host_id, &self.plugins.handlers());
        if shared && deletes.is_none() {
            let from = seen_revision + 1;
            *deletes = Some(
                self.store
                    .watch_events(prefix, from, Events::Deletes)
                    .await?,
            );
        } else if !shared {
            *deletes = None;
        }
        Ok(())
    }

    /// Adds a ready job to the backlog if one of our plugins serves its handler, ranked among
    /// the hosts that serve it.
    fn offer(&self, backlog: &mut Backlog, kv: Kv) {
        let handler = kv.value_str().into_owned();
        if !self.plugins.serves(&handler) {
            tracing::debug!(key = %kv.key, %handler, "no plugin here serves this handler; leaving it");
            return;
        }
        let job_id = self
            .store
            .keys()
            .parse_job_key(Queue::Ready, &kv.key)
            .unwrap_or_default();
        let rank = self.peers().rank(&self.host_id, &handler, job_id);
        backlog.offer(kv.key, handler, kv.mod_revision, rank, Instant::now());
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Follows the plugin status records of every host until `shutdown`, re-listing after a
    /// watch failure (the peers last seen count meanwhile; a host that left only delays its
    /// jobs by the affinity delay).
    async fn follow_peers(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let Err(e) = self.follow_peers_once(&shutdown).await else {
                return;
            };
            tracing::debug!(error = %e, retry_in = ?backoff, "worker: re-reading the peer hosts");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn follow_peers_once(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let keys = self.store.keys().clone();
        let prefix = keys.plugin_status_prefix();
        let (records, revision) = self.store.list(&prefix).await?;
        {
            let mut peers = self.peers();
            peers.clear();
            for kv in &records {
                if let Some((host, plugin)) = keys.parse_plugin_status_key(&kv.key) {
                    peers.put(host, plugin, &kv.value);
                }
            }
        }
        self.peers_changed.send_replace(());
        let mut watch = self
            .store
            .watch_events(&prefix, revision + 1, Events::All)
            .await?;
        loop {
            let changes = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changes = watch.next() => changes?,
            };
            {
                let mut peers = self.peers();
                for change in changes {
                    match change {
                        Change::Put(kv) => {
                            if let Some((host, plugin)) = keys.parse_plugin_status_key(&kv.key) {
                                peers.put(host, plugin, &kv.value);
                            }
                        }
                        Change::Delete { key, .. } => {
                            if let Some((host, plugin)) = keys.parse_plugin_status_key(&key) {
                                peers.delete(host, plugin);
                            }
                        }
                    }
                }
            }
            self.peers_changed.send_replace(());
        }
    }

    /// Waits for in-flight jobs (call after [`Worker::run`] returned, so no new job starts).
    /// Jobs still running after `timeout` are stopped and handed back to the ready queue at
    /// once, so that other hosts need not wait for this host's lease to expire.
    pub async fn drain(&self, timeout: Duration) {
        self.stop_claiming.cancel();
        self.in_flight.close();
        let running = self.in_flight.len();
        if running > 0 {
            tracing::info!(running, ?timeout, "draining: waiting for in-flight jobs");
        }
        if tokio::time::timeout(timeout, self.in_flight.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.in_flight.len(),
                "drain timed out; handing the rest back"
            );
            self.hard_stop.cancel();
            self.in_flight.wait().await;
        }
    }

    /// Starts a task for a ready job, holding one of the worker's slots, if one of our plugins
    /// serves its handler.
    fn start(self: &Arc<Self>, key: &str, handler: &str, slot: OwnedSemaphorePermit) {
        let Some(job_id) = self.store.keys().parse_job_key(Queue::Ready, key) else {
            return;
        };
        let Some(plugin) = self.plugins.get(handler) else {
            tracing::debug!(
                job_id,
                handler,
                "no plugin here serves this handler; leaving it"
            );
            return;
        };
        let (job_id, handler) = (job_id.to_string(), handler.to_string());
        let span = tracing::info_span!(
            "job",
            job_id = %job_id,
            handler = %handler,
            resource = tracing::field::Empty
        );
        let worker = self.clone();
        self.in_flight.spawn(
            async move {
                let _slot = slot;
                // The plugin's own bound (limits.max_instances), taken before the claim so a
                // job never holds a claim while it waits for an instance.
                let plugin_slot = tokio::select! {
                    slot = plugin.slots.clone().acquire_owned() => slot,
                    _ = worker.stop_claiming.cancelled() => return,
                };
                let Ok(_plugin_slot) = plugin_slot else { return };
                if !worker.plugins.serves(&handler) {
                    return; // its plugin was removed while the job waited for a slot
                }
                // An etcd error before the claim would otherwise leave the job in ready with
                // nobody offering it again; retry until it is claimed, by us or someone else.
                let mut backoff = Duration::from_millis(200);
                let reservation = uuid::Uuid::new_v4().to_string();
                while let Err(e) = worker.run_job(&job_id, &handler, &reservation).await {
                    if worker.hard_stop.is_cancelled() {
                        return;
                    }
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "could not claim the job yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            .instrument(span),
        );
    }
}
