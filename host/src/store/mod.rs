//! etcd access. Nothing outside this module talks to etcd.
//!
//! [`Store`] wraps an `etcd_client::Client` with the [`Keys`] layout. The generic half
//! (get, list, watch, leases) is here; the protocol's transactions, each of which is a safety
//! boundary, live in [`jobs`] with a comment saying what its compares guarantee.

pub mod counters;
pub mod group;
pub mod inspect;
pub mod jobs;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, TxnResponse, WatchFilterType, WatchOptions, WatchStream,
};

use crate::keys::Keys;
use counters::{Op, StoreCounters};

/// An etcd failure, with the operation and key it happened on.
#[derive(Debug, thiserror::Error)]
#[error("etcd {op} {key}: {source}")]
pub struct StoreError {
    pub op: &'static str,
    pub key: String,
    #[source]
    pub source: Failure,
}

/// What went wrong in a [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    /// A fenced store's fence key no longer holds its value: another process holds the role
    /// the fence stands for, and nothing was written.
    #[error("{key} no longer holds {expected:?}; nothing was written")]
    Fenced { key: String, expected: String },
    /// etcd answered, but not with what the request asks for.
    #[error("unexpected answer from etcd: {0}")]
    Answer(String),
}

impl StoreError {
    /// `true` when the write was refused by the store's fence.
    pub fn is_fenced(&self) -> bool {
        matches!(self.source, Failure::Fenced { .. })
    }

    /// `true` when etcd refused the request itself (over `--max-request-bytes`, more operations
    /// than `--max-txn-ops`, one key written twice): sending it again cannot succeed.
    /// "Too many requests" and "database space exceeded" share a status code with an
    /// oversized message, and "revision of auth store is old" (clusters with auth) the code
    /// of a bad request, but they pass with time, so they are not refusals.
    pub fn is_refused(&self) -> bool {
        let Failure::Etcd(etcd_client::Error::GRpcStatus(status)) = &self.source else {
            return false;
        };
        match status.code() {
            tonic::Code::InvalidArgument => !status.message().contains("auth store is old"),
            tonic::Code::ResourceExhausted => status.message().contains("larger than max"),
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A key-value pair as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

impl Kv {
    fn from_etcd(kv: &etcd_client::KeyValue) -> Self {
        Kv {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }

    /// The value as text, lossily (etcd values written by the ESI stack are UTF-8 JSON).
    pub fn value_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Kv),
    /// A deleted key, with the revision of the deletion. Watches do not ask for the value
    /// before it: nothing needs it, and etcd would read it from its backend for every event.
    Delete {
        key: String,
        revision: i64,
    },
}

/// A watch over one prefix that yields changes in revision order.
///
/// When the connection breaks (an etcd member dies, a network blip), the watch resumes by
/// itself from the revision after the last change it delivered, on whichever endpoint the
/// store has moved to, so callers see no gap and no repeat. Only what a resume cannot fix
/// reaches the caller: a compacted revision (re-list) or a cancellation.
pub struct Watch {
    store: Store,
    prefix: String,
    events: Events,
    stream: WatchStream,
    /// The revision to resume from.
    next_revision: i64,
}

/// Which changes a watch delivers. etcd leaves the others out, so they cost neither side
/// anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Events {
    All,
    Puts,
    Deletes,
}

/// Why a watch ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watch {prefix}: revision {revision} was compacted; re-list")]
    Compacted { prefix: String, revision: i64 },
    #[error("watch {prefix} was cancelled by etcd: {reason}")]
    Cancelled { prefix: String, reason: String },
}

impl Watch {
    /// The next batch of changes (one etcd watch response).
    pub async fn next(&mut self) -> Result<Vec<Change>, WatchError> {
        loop {
            let resp = match self.stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    self.resume("the stream ended").await;
                    continue;
                }
                Err(e) => {
                    self.resume(&e.to_string()).await;
                    continue;
                }
            };
            if resp.compact_revision() > 0 {
                return Err(WatchError::Compacted {
                    prefix: self.prefix.clone(),
                    revision: resp.compact_revision(),
                });
            }
            if resp.canceled() {
                return Err(WatchError::Cancelled {
                    prefix: self.prefix.clone(),
                    reason: resp.cancel_reason().to_string(),
                });
            }
            let changes: Vec<Change> = resp.events().iter().filter_map(change_of).collect();
            self.store.counters.count_watch_events(changes.len());
            if let Some(last) = changes.iter().map(Change::revision).max() {
                self.next_revision = self.next_revision.max(last + 1);
            }
            if !changes.is_empty() {
                return Ok(changes);
            }
        }
    }

    /// The next batch of changes if etcd already delivered it, without waiting; `None`
    /// otherwise. Lets a caller gather a burst that arrived as many responses into one batch.
    pub fn try_next(&mut self) -> Option<Result<Vec<Change>, WatchError>> {
        // `next` is cancel-safe: a response is either consumed and returned, or left in the
        // stream (a resume that did not finish is started again by the next call).
        let mut next = std::pin::pin!(self.next());
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match std::future::Future::poll(next.as_mut(), &mut context) {
            std::task::Poll::Ready(changes) => Some(changes),
            std::task::Poll::Pending => None,
        }
    }
}

impl Watch {
    /// Re-opens the watch from `next_revision`, retrying with backoff until etcd answers.
    async fn resume(&mut self, why: &str) {
        let mut backoff = Duration::from_millis(100);
        loop {
            tracing::warn!(prefix = %self.prefix, from = self.next_revision, %why, "watch broken; resuming");
            match self
                .store
                .open_watch(&self.prefix, self.next_revision, self.events)
                .await
            {
                Ok(stream) => {
                    self.stream = stream;
                    return;
                }
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, error = %e, retry_in = ?backoff, "watch: waiting for etcd");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl Change {
    /// The revision the change happened at.
    pub fn revision(&self) -> i64 {
        match self {
            Change::Put(kv) => kv.mod_revision,
            Change::Delete { revision, .. } => *revision,
        }
    }
}

fn change_of(event: &etcd_client::Event) -> Option<Change> {
    let kv = event.kv()?;
    Some(match event.event_type() {
        EventType::Put => Change::Put(Kv::from_etcd(kv)),
        EventType::Delete => Change::Delete {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            revision: kv.mod_revision(),
        },
    })
}

/// etcd access with the protocol's key layout.
///
/// One client per endpoint, used one at a time: etcd-client's balanced channel fails every
/// request while any one endpoint is down, so the store fails over itself. An error moves the
/// store to the next endpoint; callers retry (every role does), and the retry goes to a member
/// that may be alive.
///
/// A store made by [`Store::fenced_by`] writes only while a fence key holds a given value: every
/// write becomes a transaction that compares it first. The job manager writes through one, with
/// the election key as the fence, so a deposed manager cannot write even before it notices.
#[derive(Clone)]
pub struct Store {
    clients: Arc<[(String, Client)]>,
    current: Arc<AtomicUsize>,
    keys: Keys,
    fence: Option<Arc<(String, String)>>,
    /// Round trips made, shared by every clone and fenced view (see [`counters`]).
    counters: Arc<StoreCounters>,
    /// Where claims and completions go to share commits ([`Store::grouped`]); `None`: each
    /// is sent alone.
    group: Option<group::GroupCommit>,
}

impl Store {
    /// Connects to `endpoints` (e.g. `http://127.0.0.1:2379`). Connections are made lazily, so
    /// this succeeds while some members are down; it fails only for a malformed endpoint.
    pub async fn connect(endpoints: &[String], keys: Keys) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let mut clients = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let client = Client::connect([endpoint.as_str()], Some(options.clone()))
                .await
                .map_err(|source| err("connect", endpoint, source))?;
            clients.push((endpoint.clone(), client));
        }
        if clients.is_empty() {
            return Err(err(
                "connect",
                "",
                etcd_client::Error::InvalidArgs("no etcd endpoint given".into()),
            ));
        }
        Ok(Store {
            clients: clients.into(),
            current: Arc::new(AtomicUsize::new(0)),
            keys,
            fence: None,
            counters: Arc::new(StoreCounters::new()),
            group: None,
        })
    }

    /// The same store, writing only while `key` holds `value` (see [`Store`]).
    pub fn fenced_by(&self, key: impl Into<String>, value: impl Into<String>) -> Store {
        Store {
            fence: Some(Arc::new((key.into(), value.into()))),
            ..self.clone()
        }
    }

    /// The same store, with claims and completions committed in groups when several are
    /// sent at once (see [`group`]). Needs a tokio runtime.
    pub fn grouped(&self) -> Store {
        let plain = Store {
            group: None,
            ..self.clone()
        };
        Store {
            group: Some(group::GroupCommit::start(plain)),
            ..self.clone()
        }
    }

    /// Runs `txn` through the store's group commit if it has one, else alone.
    pub(crate) async fn group_txn(&self, what: &str, txn: Txn) -> Result<TxnResponse> {
        match &self.group {
            Some(group) => group.txn(self, what, txn).await,
            None => self.txn(what, txn).await,
        }
    }

    /// Counts `n` transactions sent nested in one request.
    pub(crate) fn count_shared(&self, n: usize) {
        self.counters.count_shared(n);
    }

    /// The error of a transaction whose answer did not come back from a group commit.
    fn gone(&self, what: &str) -> StoreError {
        StoreError {
            op: "txn",
            key: what.to_string(),
            source: Failure::Answer("the transaction's answer was lost in a group commit".into()),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The round trips this store (and its clones) made so far.
    pub fn counters(&self) -> &Arc<StoreCounters> {
        &self.counters
    }

    /// A handle on the endpoint in use; cloning is cheap and shares the connection.
    fn client(&self) -> Client {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        self.clients[i].1.clone()
    }

    /// Maps an etcd error and moves to the next endpoint, so the caller's retry goes elsewhere.
    fn fail(&self, op: &'static str, key: &str, source: etcd_client::Error) -> StoreError {
        if self.clients.len() > 1 {
            let from = self.current.fetch_add(1, Ordering::Relaxed) % self.clients.len();
            let to = (from + 1) % self.clients.len();
            tracing::debug!(from = %self.clients[from].0, to = %self.clients[to].0, error = %source, "etcd: switching endpoint");
        }
        crate::metrics::global()
            .etcd_errors
            .get_or_create(&crate::metrics::labels([("op", op)]))
            .inc();
        err(op, key, source)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Kv>> {
        let started = std::time::Instant::now();
        let found = self.get_untimed(key).await;
        observe("get", started);
        found
    }

    async fn get_untimed(&self, key: &str) -> Result<Option<Kv>> {
        self.counters.count(Op::Get);
        let resp = self
            .client()
            .get(key, None)
            .await
            .map_err(|source| self.fail("get", key, source))?;
        Ok(resp.kvs().first().map(Kv::from_etcd))
    }

    /// Several keys read in one round trip (a transaction of reads, at one revision), in the
    /// order of `keys`.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Kv>>> {
        let started = std::time::Instant::now();
        let mut found = Vec::with_capacity(keys.len());
        // etcd's default limit of operations in one transaction (--max-txn-ops).
        for chunk in keys.chunks(128) {
            self.counters.count(Op::Get);
            let txn = Txn::new().and_then(
                chunk
                    .iter()
                    .map(|k| TxnOp::get(k.as_str(), None))
                    .collect::<Vec<_>>(),
            );
            let resp = self
                .client()
                .txn(txn)
                .await
                .map_err(|source| self.fail("get", &chunk[0], source))?;
            for op in resp.op_responses() {
                if let TxnOpResponse::Get(get) = op {
                    found.push(get.kvs().first().map(Kv::from_etcd));
                }
            }
        }
        observe("get", started);
        if found.len() != keys.len() {
            return Err(StoreError {
                op: "get",
                key: keys.first().cloned().unwrap_or_default(),
                source: Failure::Answer(format!(
                    "{} of {} reads answered in one transaction",
                    found.len(),
                    keys.len()
                )),
            });
        }
        Ok(found)
    }

    /// Every key under `prefix`, and the revision the listing was taken at.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64)> {
        self.counters.count(Op::List);
        // A listing of every config or job can pass gRPC's default 4 MiB answer limit (about
        // 2,800 seed-sized resources); the limit protects against nothing here.
        let resp = self
            .client()
            .kv_client()
            .max_decoding_message_size(LIST_ANSWER_LIMIT)
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|source| self.fail("list", prefix, source))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((resp.kvs().iter().map(Kv::from_etcd).collect(), revision))
    }

    /// How many keys are under `prefix` (etcd counts; no values travel).
    pub async fn count(&self, prefix: &str) -> Result<i64> {
        self.counters.count(Op::List);
        let resp = self
            .client()
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(|source| self.fail("count", prefix, source))?;
        Ok(resp.count())
    }

    pub async fn put(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<()> {
        if self.fence.is_some() {
            let put = TxnOp::put(key, value, None);
            return self.txn(key, Txn::new().and_then([put])).await.map(drop);
        }
        self.counters.count(Op::Put);
        self.client()
            .put(key, value, None)
            .await
            .map_err(|source| self.fail("put", key, source))?;
        Ok(())
    }

    /// Puts a key bound to a lease: it vanishes when the lease does.
    pub async fn put_with_lease(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<()> {
        self.counters.count(Op::Put);
        self.client()
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(|source| self.fail("put", key, source))?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        if self.fence.is_some() {
            let delete = TxnOp::delete(key, None);
            return self.txn(key, Txn::new().and_then([delete])).await.map(drop);
        }
        self.counters.count(Op::Delete);
        self.client()
            .delete(key, None)
            .await
            .map_err(|source| self.fail("delete", key, source))?;
        Ok(())
    }

    /// Deletes every key under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        if self.fence.is_some() {
            let delete = TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix()));
            return self
                .txn(prefix, Txn::new().and_then([delete]))
                .await
                .map(drop);
        }
        self.counters.count(Op::Delete);
        self.client()
            .delete(prefix, Some(DeleteOptions::new().with_prefix()))
            .await
            .map_err(|source| self.fail("delete", prefix, source))?;
        Ok(())
    }

    /// Runs a transaction; `what` names it in errors. A fenced store nests it in one that
    /// first compares the fence, and answers with the nested transaction's response.
    pub async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse> {
        let started = std::time::Instant::now();
        let response = self.txn_untimed(what, txn).await;
        observe("txn", started);
        response
    }

    async fn txn_untimed(&self, what: &str, txn: Txn) -> Result<TxnResponse> {
        self.counters.count(Op::Txn);
        let Some(fence) = &self.fence else {
            return self
                .client()
                .txn(txn)
                .await
                .map_err(|source| self.fail("txn", what, source));
        };
        let (key, value) = (&fence.0, &fence.1);
        let fenced = Txn::new()
            .when([Compare::value(
                key.as_str(),
                CompareOp::Equal,
                value.as_str(),
            )])
            .and_then([TxnOp::txn(txn)]);
        let response = self
            .client()
            .txn(fenced)
            .await
            .map_err(|source| self.fail("txn", what, source))?;
        let refused = || StoreError {
            op: "txn",
            key: what.to_string(),
            source: Failure::Fenced {
                key: key.clone(),
                expected: value.clone(),
            },
        };
        if !response.succeeded() {
            return Err(refused());
        }
        match response.op_responses().into_iter().next() {
            Some(TxnOpResponse::Txn(inner)) => Ok(inner),
            _ => Err(refused()),
        }
    }

    /// Watches `prefix` from `start_revision` (inclusive).
    pub async fn watch(&self, prefix: &str, start_revision: i64) -> Result<Watch> {
        self.watch_events(prefix, start_revision, Events::All).await
    }

    /// As [`Store::watch`], delivering only `events`.
    pub async fn watch_events(
        &self,
        prefix: &str,
        start_revision: i64,
        events: Events,
    ) -> Result<Watch> {
        let stream = self.open_watch(prefix, start_revision, events).await?;
        Ok(Watch {
            store: self.clone(),
            prefix: prefix.to_string(),
            events,
            stream,
            next_revision: start_revision,
        })
    }

    async fn open_watch(
        &self,
        prefix: &str,
        start_revision: i64,
        events: Events,
    ) -> Result<WatchStream> {
        self.counters.count(Op::WatchOpen);
        let mut options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision);
        options = match events {
            Events::All => options,
            Events::Puts => options.with_filters([WatchFilterType::NoDelete]),
            Events::Deletes => options.with_filters([WatchFilterType::NoPut]),
        };
        self.client()
            .watch(prefix, Some(options))
            .await
            .map_err(|source| self.fail("watch", prefix, source))
    }

    /// Creates `key` bound to `lease` if it does not exist. Returns the revision it was
    /// created at, or `None` when someone else holds it.
    pub async fn create_with_lease(
        &self,
        key: &str,
        value: &str,
        lease: i64,
    ) -> Result<Option<i64>> {
        let txn = Txn::new()
            .when([Compare::version(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = self.txn(key, txn).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
    }

    /// Deletes `key` only if it still holds `value`.
    pub async fn delete_if_value(&self, key: &str, value: &str) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, value)])
            .and_then([TxnOp::delete(key, None)]);
        Ok(self.txn(key, txn).await?.succeeded())
    }

    /// Returns once `key` does not exist (at once if it is absent now).
    pub async fn wait_for_delete(&self, key: &str) -> Result<()> {
        self.counters.count(Op::Get);
        let resp = self
            .client()
            .get(key, None)
            .await
            .map_err(|source| self.fail("get", key, source))?;
        if resp.kvs().is_empty() {
            return Ok(());
        }
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut watch = self.watch(key, revision + 1).await?;
        loop {
            match watch.next().await {
                Ok(changes) => {
                    if changes
                        .iter()
                        .any(|c| matches!(c, Change::Delete { key: k, .. } if k == key))
                    {
                        return Ok(());
                    }
                }
                // A broken watch: let the caller campaign again, which re-reads the key.
                Err(_) => return Ok(()),
            }
        }
    }

    /// Grants a lease of `ttl` seconds.
    pub async fn grant_lease(&self, ttl: i64) -> Result<i64> {
        self.counters.count(Op::Lease);
        let resp = self
            .client()
            .lease_grant(ttl, None)
            .await
            .map_err(|source| self.fail("lease grant", "-", source))?;
        Ok(resp.id())
    }

    /// Revokes a lease: every key bound to it is deleted.
    pub async fn revoke_lease(&self, lease: i64) -> Result<()> {
        self.counters.count(Op::Lease);
        self.client()
            .lease_revoke(lease)
            .await
            .map_err(|source| self.fail("lease revoke", &lease.to_string(), source))?;
        Ok(())
    }

    /// Remaining TTL of a lease in seconds; `<= 0` when etcd no longer knows it.
    pub async fn lease_ttl(&self, lease: i64) -> Result<i64> {
        self.counters.count(Op::Lease);
        let resp = self
            .client()
            .lease_time_to_live(lease, None)
            .await
            .map_err(|source| self.fail("lease ttl", &lease.to_string(), source))?;
        Ok(resp.ttl())
    }

    /// Renews `lease` once. `Ok(false)` when etcd says the lease is gone (expired or revoked).
    pub async fn renew_lease(&self, lease: i64) -> Result<bool> {
        self.counters.count(Op::Lease);
        // Opening the keep-alive stream sends the first renewal and checks its answer.
        match self.client().lease_keep_alive(lease).await {
            Ok(_) => Ok(true),
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found" => Ok(false),
            Err(source) => Err(self.fail("lease keep-alive", &lease.to_string(), source)),
        }
    }
}

/// The largest listing answer accepted: etcd's own default request limit is far below, but a
/// listing is an answer, bounded only by what the prefix holds.
const LIST_ANSWER_LIMIT: usize = 1 << 30;

/// Records how long an etcd request took.
fn observe(op: &'static str, started: std::time::Instant) {
    crate::metrics::global()
        .etcd_op
        .get_or_create(&crate::metrics::labels([("op", op)]))
        .observe(started.elapsed().as_secs_f64());
}

fn err(op: &'static str, key: &str, source: etcd_client::Error) -> StoreError {
    StoreError {
        op,
        key: key.to_string(),
        source: source.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::{Failure, StoreError};
    use tonic::{Code, Status};

    fn error(code: Code, message: &str) -> StoreError {
        StoreError {
            op: "txn",
            key: "/jobs/working/j".into(),
            source: Failure::Etcd(etcd_client::Error::GRpcStatus(Status::new(code, message))),
        }
    }

    #[test]
    fn requests_etcd_can_never_take_are_refusals() {
        for (code, message) in [
            (
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
            ),
            (
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
            ),
            (Code::InvalidArgument, "etcdserver: request is too large"),
            (
                Code::ResourceExhausted,
                "grpc: received message larger than max (3146000 vs. 2097152)",
            ),
        ] {
            assert!(error(code, message).is_refused(), "{message}");
        }
    }

    #[test]
    fn failures_that_pass_with_time_are_not_refusals() {
        for (code, message) in [
            (Code::ResourceExhausted, "etcdserver: too many requests"),
            (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
            ),
            (
                Code::InvalidArgument,
                "etcdserver: revision of auth store is old",
            ),
            (Code::Unavailable, "etcdserver: leader changed"),
            (Code::DeadlineExceeded, "etcdserver: request timed out"),
        ] {
            assert!(!error(code, message).is_refused(), "{message}");
        }
        let fenced = StoreError {
            op: "txn",
            key: "/leader".into(),
            source: Failure::Fenced {
                key: "/leader".into(),
                expected: "me".into(),
            },
        };
        assert!(!fenced.is_refused());
    }
}
