//! Group commit: independent transactions sent at about the same time share one etcd commit.
//!
//! A worker running 64 jobs at once sends 64 claims and 64 completions, each its own
//! transaction, and etcd pays a raft round and a WAL sync for each. [`GroupCommit`] sends a
//! transaction at once, from its caller's task, while fewer than [`IN_FLIGHT`] requests are
//! committing; the ones that arrive while all are busy wait and then go together: each becomes a nested transaction of one outer
//! transaction (etcd >= 3.3), so each still succeeds or fails on its own compares and its
//! caller gets its own response, exactly as if it had been sent alone. Alone is also what a
//! transaction gets when nothing else is waiting, so at low load nothing waits.
//!
//! etcd refuses an outer transaction whose nested ones write the same key (two VLAN jobs of one
//! pool), or that is too big; then the group's transactions are sent one by one. A group that
//! failed for any other reason (etcd unreachable) is also retried one by one, so each caller
//! sees the error its own transaction gets; a lost answer of a group that did commit looks to
//! each caller like a lost answer of its own transaction, which claims and completions
//! already handle.

use std::sync::Arc;

use etcd_client::{Txn, TxnOpResponse, TxnResponse};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{Result, Store};

/// Groups committing at once; the transactions arriving meanwhile form the next group.
///
/// 4 rather than 8: with 8 slots, jobs arriving one at a time (a paced load) rarely found all
/// slots busy, so most claims and completions took a commit each. At a fixed 600 configs/s
/// (five runs each) 4 slots took 0.3 commits per job instead of 0.5, p50 26-38 ms instead of
/// 29-71 ms and p99 79-110 ms instead of 84-624 ms, with the same latency at a quarter of the
/// peak (4.8-6.0 ms). 2 slots made that light-load latency worse (7.5-8.2 ms).
pub const IN_FLIGHT: usize = 4;

/// Transactions in one group at most: well below etcd's default `--max-txn-ops` (128) for
/// claims and completions of a few operations each.
pub const MAX_GROUP: usize = 16;

struct Request {
    what: String,
    txn: Txn,
    reply: oneshot::Sender<Result<TxnResponse>>,
}

/// A queue of transactions committed in groups (see the module docs). Cloning shares it.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::UnboundedSender<Request>,
    /// One permit per group (or lone transaction) committing.
    slots: Arc<Semaphore>,
}

impl GroupCommit {
    /// Starts the task that commits the groups through `store`; it ends when the last
    /// handle is dropped. Needs a tokio runtime.
    pub fn start(store: Store) -> Self {
        let (queue, requests) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(run(store, requests, slots.clone()));
        GroupCommit { queue, slots }
    }

    /// Commits `txn`, alone or with others; answers with its own response.
    pub async fn txn(&self, store: &Store, what: &str, txn: Txn) -> Result<TxnResponse> {
        // A free slot: nothing to wait for, so send it from here, without the hand-offs.
        if let Ok(_slot) = self.slots.clone().try_acquire_owned() {
            return store.txn(what, txn).await;
        }
        let (reply, answer) = oneshot::channel();
        let request = Request {
            what: what.to_string(),
            txn,
            reply,
        };
        if let Err(mpsc::error::SendError(request)) = self.queue.send(request) {
            // The committing task is gone (the runtime is shutting down): send it directly.
            return store.txn(&request.what, request.txn).await;
        }
        match answer.await {
            Ok(response) => response,
            Err(_) => Err(store.gone(what)),
        }
    }
}

async fn run(store: Store, mut requests: mpsc::UnboundedReceiver<Request>, slots: Arc<Semaphore>) {
    while let Some(first) = requests.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Whatever arrived while every slot was busy goes with the first.
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            commit(&store, group).await;
            drop(slot);
        });
    }
}

async fn commit(store: &Store, mut group: Vec<Request>) {
    if group.len() == 1 {
        if let Some(Request { what, txn, reply }) = group.pop() {
            let _ = reply.send(store.txn(&what, txn).await);
        }
        return;
    }
    let what = format!("group of {} starting with {}", group.len(), group[0].what);
    store.count_shared(group.len());
    let outer = super::jobs::nested(group.iter().map(|r| r.txn.clone()));
    match store.txn(&what, outer).await {
        Ok(response) => {
            let mut answers = response.op_responses().into_iter();
            for request in group {
                let answer = match answers.next() {
                    Some(TxnOpResponse::Txn(inner)) => Ok(inner),
                    _ => Err(store.gone(&request.what)),
                };
                let _ = request.reply.send(answer);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "group refused; sending its transactions one by one");
            let mut alone = tokio::task::JoinSet::new();
            for Request { what, txn, reply } in group {
                let store = store.clone();
                alone.spawn(async move {
                    let _ = reply.send(store.txn(&what, txn).await);
                });
            }
            alone.join_all().await;
        }
    }
}
