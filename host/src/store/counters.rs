//! How many etcd round trips of each kind a [`Store`](super::Store) made.
//!
//! The cost of a job is counted in etcd round trips: a commit (a write transaction) is what
//! etcd's throughput is measured in, and every get or watch event is latency on a job's path.
//! `esi-host bench` divides these counters by the jobs it ran to report what one job costs.
//!
//! Each store (and every clone and fenced view of it) shares one [`StoreCounters`]; every
//! increment is also added to a process-wide total. The total exists because a [`Host`]
//! builds its own store inside [`Host::start`]: a benchmark running hosts in its own process
//! reads the total and subtracts what its own stores did, without reaching into the host.
//!
//! Counting is two relaxed atomic adds per operation, nothing next to a network round trip.
//!
//! [`Host`]: crate::host::Host
//! [`Host::start`]: crate::host::Host::start

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// The kinds of etcd operation a store counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    /// A range read over a prefix.
    List,
    Put,
    Delete,
    /// A transaction, including the ones a fenced store makes of its puts and deletes.
    Txn,
    /// A watch stream opened (or re-opened after a broken connection).
    WatchOpen,
    /// Lease grant, revoke, time-to-live or keep-alive.
    Lease,
}

/// Operation counts of one store (see the module docs).
#[derive(Debug, Default)]
pub struct StoreCounters {
    get: AtomicU64,
    list: AtomicU64,
    put: AtomicU64,
    delete: AtomicU64,
    txn: AtomicU64,
    txn_shared: AtomicU64,
    watch_opens: AtomicU64,
    watch_events: AtomicU64,
    lease: AtomicU64,
}

/// The sum over every store of this process.
static PROCESS_TOTALS: StoreCounters = StoreCounters::new();

impl StoreCounters {
    /// All counts zero.
    pub const fn new() -> Self {
        StoreCounters {
            get: AtomicU64::new(0),
            list: AtomicU64::new(0),
            put: AtomicU64::new(0),
            delete: AtomicU64::new(0),
            txn: AtomicU64::new(0),
            txn_shared: AtomicU64::new(0),
            watch_opens: AtomicU64::new(0),
            watch_events: AtomicU64::new(0),
            lease: AtomicU64::new(0),
        }
    }

    /// The counts summed over every store this process made.
    pub fn process_totals() -> &'static StoreCounters {
        &PROCESS_TOTALS
    }

    /// Counts one operation here and in the process totals.
    pub fn count(&self, op: Op) {
        self.add(op, 1);
        PROCESS_TOTALS.add(op, 1);
    }

    /// Counts `n` transactions sent nested in one request (a manager batch, a worker group
    /// commit): the request is one [`Op::Txn`], and `n - 1` transactions rode along with it.
    pub fn count_shared(&self, n: usize) {
        let extra = u64::try_from(n.saturating_sub(1)).unwrap_or(u64::MAX);
        self.txn_shared.fetch_add(extra, Ordering::Relaxed);
        PROCESS_TOTALS
            .txn_shared
            .fetch_add(extra, Ordering::Relaxed);
    }

    /// Counts the changes one watch response delivered.
    pub fn count_watch_events(&self, events: usize) {
        let events = u64::try_from(events).unwrap_or(u64::MAX);
        self.watch_events.fetch_add(events, Ordering::Relaxed);
        PROCESS_TOTALS
            .watch_events
            .fetch_add(events, Ordering::Relaxed);
    }

    fn add(&self, op: Op, n: u64) {
        let counter = match op {
            Op::Get => &self.get,
            Op::List => &self.list,
            Op::Put => &self.put,
            Op::Delete => &self.delete,
            Op::Txn => &self.txn,
            Op::WatchOpen => &self.watch_opens,
            Op::Lease => &self.lease,
        };
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> CounterSnapshot {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            get: read(&self.get),
            list: read(&self.list),
            put: read(&self.put),
            delete: read(&self.delete),
            txn: read(&self.txn),
            txn_shared: read(&self.txn_shared),
            watch_opens: read(&self.watch_opens),
            watch_events: read(&self.watch_events),
            lease: read(&self.lease),
        }
    }
}

/// Counts at one moment; subtract two to get what happened in between.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    pub get: u64,
    pub list: u64,
    pub put: u64,
    pub delete: u64,
    pub txn: u64,
    /// Transactions that rode in another's request (see [`StoreCounters::count_shared`]):
    /// `txn + txn_shared` is every transaction the protocol asked for.
    pub txn_shared: u64,
    pub watch_opens: u64,
    pub watch_events: u64,
    pub lease: u64,
}

impl CounterSnapshot {
    /// What was counted after `earlier` (saturating, so a mixed-up order reads as zero).
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        CounterSnapshot {
            get: self.get.saturating_sub(earlier.get),
            list: self.list.saturating_sub(earlier.list),
            put: self.put.saturating_sub(earlier.put),
            delete: self.delete.saturating_sub(earlier.delete),
            txn: self.txn.saturating_sub(earlier.txn),
            txn_shared: self.txn_shared.saturating_sub(earlier.txn_shared),
            watch_opens: self.watch_opens.saturating_sub(earlier.watch_opens),
            watch_events: self.watch_events.saturating_sub(earlier.watch_events),
            lease: self.lease.saturating_sub(earlier.lease),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_counts_its_own_operations_and_adds_them_to_the_process_totals() {
        let counters = StoreCounters::new();
        let before = StoreCounters::process_totals().snapshot();
        counters.count(Op::Txn);
        counters.count(Op::Txn);
        counters.count(Op::Get);
        counters.count_watch_events(3);
        counters.count_shared(5);
        counters.count_shared(1);
        let own = counters.snapshot();
        assert_eq!((own.txn, own.get, own.watch_events), (2, 1, 3));
        assert_eq!(
            own.txn_shared, 4,
            "a request carrying 5 carries 4 besides its own"
        );
        // Other tests run in parallel and count too: the totals grew by at least ours.
        let grown = StoreCounters::process_totals().snapshot().since(&before);
        assert!(grown.txn >= 2 && grown.get >= 1 && grown.watch_events >= 3);
    }
}
