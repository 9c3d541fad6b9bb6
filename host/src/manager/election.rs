//! Only one job manager acts at a time (PROTOCOL 4.7).
//!
//! The leader holds `/job_manager_id` bound to its host lease; the key is created in a
//! transaction that requires it to be absent, so at most one host holds it. A standby watches
//! the key and tries again when it disappears (the leader stopped or its lease expired). The
//! leader watches the key too and stops acting the moment it is no longer its own.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{Change, Store};

/// Campaigns for the job manager role until `shutdown`. Each time leadership is won,
/// `lead(token)` runs; the token is cancelled when leadership is lost or at shutdown.
pub async fn run_elected<F, Fut>(
    store: Store,
    host_id: String,
    lease: impl Fn() -> i64,
    shutdown: CancellationToken,
    mut lead: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let key = store.keys().job_manager_election();
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        match campaign(&store, &key, &host_id, lease()).await {
            Ok(Some(revision)) => {
                backoff = Duration::from_millis(100);
                tracing::info!(%host_id, "job manager: elected");
                let term = shutdown.child_token();
                let watcher = tokio::spawn(watch_until_lost(
                    store.clone(),
                    key.clone(),
                    host_id.clone(),
                    revision,
                    term.clone(),
                ));
                lead(term.clone()).await;
                term.cancel();
                let _ = watcher.await;
                if !shutdown.is_cancelled() {
                    tracing::warn!(%host_id, "job manager: leadership lost; standing by");
                } else if let Err(e) = store.delete_if_value(&key, &host_id).await {
                    tracing::warn!(error = %e, "job manager: could not resign; the lease will free the role");
                }
            }
            Ok(None) => {
                backoff = Duration::from_millis(100);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = store.wait_for_delete(&key) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "job manager election: waiting for etcd");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// `Some(revision)` when we hold the key now (won, or already ours from before a reconnect).
async fn campaign(
    store: &Store,
    key: &str,
    host_id: &str,
    lease: i64,
) -> crate::store::Result<Option<i64>> {
    if let Some(revision) = store.create_with_lease(key, host_id, lease).await? {
        return Ok(Some(revision));
    }
    Ok(store
        .get(key)
        .await?
        .filter(|kv| kv.value == host_id.as_bytes())
        .map(|kv| kv.mod_revision))
}

/// Cancels `term` once the election key is deleted or changes hands.
async fn watch_until_lost(
    store: Store,
    key: String,
    host_id: String,
    revision: i64,
    term: CancellationToken,
) {
    let mut from = revision + 1;
    while !term.is_cancelled() {
        let mut watch = match store.watch(&key, from).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "job manager: cannot watch the election key");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            let changes = tokio::select! {
                _ = term.cancelled() => return,
                c = watch.next() => c,
            };
            let Ok(changes) = changes else { break };
            for change in changes {
                let changed = match &change {
                    Change::Put(kv) => &kv.key,
                    Change::Delete { key, .. } => key,
                };
                if *changed != key {
                    continue; // another key under the same prefix
                }
                match change {
                    Change::Put(kv) if kv.value == host_id.as_bytes() => from = kv.mod_revision + 1,
                    _ => {
                        term.cancel();
                        return;
                    }
                }
            }
        }
    }
}
