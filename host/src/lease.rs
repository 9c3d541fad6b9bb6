//! The host's etcd lease, and what losing it means.
//!
//! Every claim (`/jobs/working/<id>`) and the job manager's election key are bound to one lease
//! per host. [`keep`] renews it at a third of its TTL. The lease counts as lost when etcd says
//! it expired, or when no renewal was confirmed for a whole TTL (etcd may have expired it
//! already; we cannot tell, so we assume the worst). Losing it ends a [`LeaseTerm`]: its
//! token is cancelled, which interrupts the plugin calls of jobs claimed under it (epoch
//! interruption, see `plugins::engine`) and makes those jobs hand themselves back. Safety does
//! not depend on this: every write after a claim is fenced by the claim's reservation value,
//! so a job that finishes before the loss is noticed is refused by etcd. Interrupting only
//! stops work that can no longer be published.
//!
//! A lost lease is replaced by a new one (and the old one revoked, in case it was merely
//! unconfirmed), so the host goes on claiming.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::store::{self, Store};

/// One lease id and the token cancelled when it is lost.
#[derive(Debug, Clone)]
pub struct LeaseTerm {
    pub id: i64,
    lost: CancellationToken,
}

impl LeaseTerm {
    /// Cancelled when this lease is lost.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }
}

/// The host's current lease, shared by every role, and the records bound to it.
#[derive(Debug)]
pub struct HostLease {
    current: Mutex<LeaseTerm>,
    /// Records that live as long as the host (its host record, plugin status): re-put under
    /// a new lease when the old one was lost.
    bound: Mutex<BTreeMap<String, String>>,
    /// Held across each publish, withdraw, retire and republish, so a republish never puts
    /// back a value replaced or withdrawn while it ran.
    writing: tokio::sync::Mutex<()>,
    /// Keys withdrawn for good ([`HostLease::retire`]): publishing or republishing them does
    /// nothing. Marked (with `bound`, locked first) before `writing` is awaited, so a retire
    /// that never gets the write lock still keeps them from coming back.
    retired: Mutex<BTreeSet<String>>,
}

impl HostLease {
    pub fn new(id: i64) -> Self {
        HostLease {
            current: Mutex::new(LeaseTerm {
                id,
                lost: CancellationToken::new(),
            }),
            bound: Mutex::new(BTreeMap::new()),
            writing: tokio::sync::Mutex::new(()),
            retired: Mutex::new(BTreeSet::new()),
        }
    }

    /// Puts `key` bound to the lease, and keeps it there across lease changes. A retired
    /// key is left alone (and this answers `Ok`).
    pub async fn publish(&self, store: &Store, key: &str, value: String) -> store::Result<()> {
        let _writing = self.writing.lock().await;
        {
            let mut bound = lock(&self.bound);
            if lock(&self.retired).contains(key) {
                return Ok(());
            }
            bound.insert(key.to_string(), value.clone());
        }
        store.put_with_lease(key, value, self.id()).await
    }

    /// Deletes a record put by [`HostLease::publish`].
    pub async fn withdraw(&self, store: &Store, key: &str) -> store::Result<()> {
        let _writing = self.writing.lock().await;
        lock(&self.bound).remove(key);
        store.delete(key).await
    }

    /// Deletes records put by [`HostLease::publish`] and refuses to publish them again.
    /// They are marked before anything is awaited, so a caller that gives up waiting (etcd
    /// may be gone, or a republish may hold the write lock) leaves them to go with the lease
    /// and no republish puts them back. Every key is tried; the first error is returned.
    pub async fn retire(&self, store: &Store, keys: &[String]) -> store::Result<()> {
        {
            let mut bound = lock(&self.bound);
            let mut retired = lock(&self.retired);
            for key in keys {
                bound.remove(key);
                retired.insert(key.clone());
            }
        }
        let _writing = self.writing.lock().await;
        let mut first_error = None;
        for key in keys {
            if let Err(e) = store.delete(key).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn republish(&self, store: &Store) {
        let _writing = self.writing.lock().await;
        let records: Vec<(String, String)> = lock(&self.bound)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let id = self.id();
        for (key, value) in records {
            if lock(&self.retired).contains(&key) {
                continue; // retired while this republish ran
            }
            if let Err(e) = store.put_with_lease(&key, value, id).await {
                tracing::warn!(%key, error = %e, "could not restore a lease-bound record");
            }
        }
    }

    /// The lease to bind new keys to.
    pub fn id(&self) -> i64 {
        self.term().id
    }

    /// The current term; a job keeps the term it was claimed under.
    pub fn term(&self) -> LeaseTerm {
        self.lock().clone()
    }

    /// Ends the current term: jobs claimed under it stop.
    fn mark_lost(&self) {
        self.lock().lost.cancel();
    }

    fn replace(&self, id: i64) {
        let mut current = self.lock();
        current.lost.cancel();
        *current = LeaseTerm {
            id,
            lost: CancellationToken::new(),
        };
    }

    fn lock(&self) -> MutexGuard<'_, LeaseTerm> {
        lock(&self.current)
    }
}

/// A poisoned lock only means a panic elsewhere; the values inside are still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Renews `lease` every third of `ttl` until `shutdown`; on loss, ends the term and takes a
/// new lease.
pub async fn keep(store: Store, lease: Arc<HostLease>, ttl: Duration, shutdown: CancellationToken) {
    let interval = (ttl / 3).max(Duration::from_millis(500));
    let mut confirmed = Instant::now();
    loop {
        let term = lease.term();
        if !term.lost.is_cancelled() {
            let renewal = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(interval, store.renew_lease(term.id)) => r,
            };
            match renewal {
                Ok(Ok(true)) => confirmed = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!(
                        lease = term.id,
                        "etcd says our lease expired: stopping the jobs claimed under it"
                    );
                    lease.mark_lost();
                }
                Ok(Err(e)) => {
                    crate::metrics::global().lease_keepalive_failures.inc();
                    tracing::warn!(lease = term.id, error = %e, "lease keep-alive failed")
                }
                Err(_) => {
                    crate::metrics::global().lease_keepalive_failures.inc();
                    tracing::warn!(lease = term.id, "lease keep-alive timed out")
                }
            }
            if !term.lost.is_cancelled() && confirmed.elapsed() >= ttl {
                tracing::error!(lease = term.id, unconfirmed_for = ?confirmed.elapsed(),
                    "no keep-alive confirmed for a whole TTL: assuming the lease is lost and stopping the jobs claimed under it");
                lease.mark_lost();
            }
        }
        if term.lost.is_cancelled() {
            replace_lost(&store, &lease, &term, ttl).await;
            if lease.id() != term.id {
                confirmed = Instant::now();
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Takes a new lease after `lost`, and revokes `lost` in case etcd still had it, so that no
/// claim of the old term outlives the jobs we stopped.
async fn replace_lost(store: &Store, lease: &Arc<HostLease>, lost: &LeaseTerm, ttl: Duration) {
    let seconds = i64::try_from(ttl.as_secs()).unwrap_or(60).max(1);
    match store.grant_lease(seconds).await {
        Ok(new) => {
            let _ = store.revoke_lease(lost.id).await;
            lease.replace(new);
            tracing::warn!(old = lost.id, new, "continuing with a new lease");
            // In its own task: the puts (after any publish in flight) must not hold up the
            // renewal of the new lease.
            let (store, lease) = (store.clone(), lease.clone());
            tokio::spawn(async move { lease.republish(&store).await });
        }
        Err(e) => tracing::warn!(error = %e, "cannot take a new lease yet; waiting for etcd"),
    }
}
