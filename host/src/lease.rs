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

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::store::Store;

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

/// The host's current lease, shared by every role.
#[derive(Debug)]
pub struct HostLease {
    current: Mutex<LeaseTerm>,
}

impl HostLease {
    pub fn new(id: i64) -> Self {
        HostLease {
            current: Mutex::new(LeaseTerm {
                id,
                lost: CancellationToken::new(),
            }),
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

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseTerm> {
        // A poisoned lock only means a panic elsewhere; the term inside is still whole.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
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
                    tracing::warn!(lease = term.id, error = %e, "lease keep-alive failed")
                }
                Err(_) => tracing::warn!(lease = term.id, "lease keep-alive timed out"),
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
async fn replace_lost(store: &Store, lease: &HostLease, lost: &LeaseTerm, ttl: Duration) {
    let seconds = i64::try_from(ttl.as_secs()).unwrap_or(60).max(1);
    match store.grant_lease(seconds).await {
        Ok(new) => {
            let _ = store.revoke_lease(lost.id).await;
            lease.replace(new);
            tracing::warn!(old = lost.id, new, "continuing with a new lease");
        }
        Err(e) => tracing::warn!(error = %e, "cannot take a new lease yet; waiting for etcd"),
    }
}
