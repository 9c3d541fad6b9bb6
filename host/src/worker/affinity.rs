//! Which host tries a ready job first.
//!
//! Every host watches `/jobs/ready/` and sees every job. Without an order, each host that
//! serves a job's handler sends a claim: one wins and etcd refuses the others, but every one of
//! them is a transaction through raft. With three hosts a job cost six transactions instead
//! of four.
//!
//! Hosts now rank themselves per job: rendezvous hashing of the job id with the ids of the
//! hosts serving its handler, read from the plugin status records every host publishes under
//! its lease (`/esi-worker/plugins/<host>/<plugin>`). The first host claims at once; the n-th
//! waits n × [`AFFINITY_DELAY`] and claims only if the job is still ready (it follows the ready
//! queue's deletes while it has peers). Hosts that see different peer sets only claim in a
//! different order.
//!
//! Safety does not depend on any of this: the claim is still a compare that only one host can
//! win. A host that died, stalls or is draining delays the jobs ranked to it by at most that
//! delay, until its lease expires and its records go.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// How long the n-th ranked host waits, per rank, before it claims a job nobody claimed.
pub const AFFINITY_DELAY: Duration = Duration::from_millis(50);

/// Ranks past this one wait as long as it does.
const MAX_RANK: u32 = 8;

/// The part of a plugin status record that says what a host serves.
#[derive(Debug, Default, Deserialize)]
struct Serving {
    /// Empty when no version of the plugin serves there.
    #[serde(default)]
    version: String,
    #[serde(default)]
    handlers: Vec<String>,
}

/// The handlers each live host serves, from the plugin status records.
#[derive(Debug, Default)]
pub struct Peers {
    /// host id -> plugin -> handlers it serves there.
    hosts: HashMap<String, BTreeMap<String, Vec<String>>>,
}

impl Peers {
    /// A status record was put. A record that does not parse, or whose plugin does not serve,
    /// counts as serving nothing: the worst it can do is make this host claim first.
    pub fn put(&mut self, host: &str, plugin: &str, value: &[u8]) {
        let serving: Serving = serde_json::from_slice(value).unwrap_or_default();
        if serving.version.is_empty() || serving.handlers.is_empty() {
            self.delete(host, plugin);
            return;
        }
        self.hosts
            .entry(host.to_string())
            .or_default()
            .insert(plugin.to_string(), serving.handlers);
    }

    /// A status record was deleted (withdrawn, or its host's lease expired).
    pub fn delete(&mut self, host: &str, plugin: &str) {
        if let Some(plugins) = self.hosts.get_mut(host) {
            plugins.remove(plugin);
            if plugins.is_empty() {
                self.hosts.remove(host);
            }
        }
    }

    pub fn clear(&mut self) {
        self.hosts.clear();
    }

    /// Whether any host other than `me` serves anything: only then is there anyone to
    /// defer to, and a reason to follow the ready queue's deletes.
    pub fn has_others(&self, me: &str) -> bool {
        self.hosts.keys().any(|host| host != me)
    }

    /// How many hosts serving `handler` rank before `me` for `job_id`: 0 means claim now.
    /// `me` always counts as serving it (its own record may not be published yet).
    pub fn rank(&self, me: &str, handler: &str, job_id: &str) -> u32 {
        let mine = score(me, job_id);
        let ahead = self
            .hosts
            .iter()
            .filter(|(host, plugins)| {
                host.as_str() != me && plugins.values().any(|h| h.iter().any(|h| h == handler))
            })
            .filter(|(host, _)| score(host, job_id) > mine)
            .count();
        u32::try_from(ahead).unwrap_or(u32::MAX)
    }
}

/// The rendezvous score of `host` for `job_id`: a stable hash, so that hosts of different
/// builds agree on the order.
fn score(host: &str, job_id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(host.as_bytes())
        .chain_update([0u8])
        .chain_update(job_id.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Ready jobs this host may run, waiting for a slot: its own first (in arrival order), then
/// jobs ranked to other hosts that nobody claimed within their delay. Those are taken newest
/// first, from the other end than their own host takes them, so the two rarely race.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Ready keys waiting here, with the revision of the put that made each ready. A key
    /// leaves it when it is taken or seen deleted; the queues below drop keys no longer in it
    /// when they reach them. Puts and deletes come by two watches, in no order between them:
    /// the revision keeps the delete of a claim from dropping the put of a later re-queue.
    waiting: HashMap<String, i64>,
    now: VecDeque<(String, String)>,
    /// Deferred jobs by when they may be taken (and arrival, to keep the order).
    later: BTreeMap<(Instant, u64), (String, String)>,
    unclaimed: VecDeque<(String, String)>,
    arrivals: u64,
}

impl Backlog {
    /// Adds a ready job `(key, handler)`, made ready at `revision` and ranked `rank` for this
    /// host, unless it waits here already.
    pub fn offer(&mut self, key: String, handler: String, revision: i64, rank: u32, at: Instant) {
        match self.waiting.get_mut(&key) {
            Some(seen) => {
                *seen = (*seen).max(revision);
                return;
            }
            None => self.waiting.insert(key.clone(), revision),
        };
        if rank == 0 {
            self.now.push_back((key, handler));
        } else {
            self.arrivals += 1;
            let due = at + AFFINITY_DELAY * rank.min(MAX_RANK);
            self.later.insert((due, self.arrivals), (key, handler));
        }
    }

    /// The ready key was deleted at `revision`: another host claimed the job (or it was
    /// cancelled). A put after that revision made it ready again, and it stays.
    pub fn gone(&mut self, key: &str, revision: i64) {
        if self.waiting.get(key).is_some_and(|&put| put < revision) {
            self.waiting.remove(key);
        }
    }

    /// When the next deferred job may be taken.
    pub fn next_due(&self) -> Option<Instant> {
        self.later.keys().next().map(|(due, _)| *due)
    }

    /// Moves the deferred jobs due by `at` to those that may be taken.
    pub fn promote(&mut self, at: Instant) {
        while let Some(entry) = self.later.first_entry() {
            if entry.key().0 > at {
                break;
            }
            let (key, handler) = entry.remove();
            if self.waiting.contains_key(&key) {
                self.unclaimed.push_back((key, handler));
            }
        }
    }

    /// Whether [`Backlog::take`] may have a job (it may still find only stale entries).
    pub fn has_ready(&self) -> bool {
        !self.now.is_empty() || !self.unclaimed.is_empty()
    }

    /// The next job to start: this host's own first, then the newest unclaimed one.
    pub fn take(&mut self) -> Option<(String, String)> {
        while let Some((key, handler)) = self.now.pop_front().or_else(|| self.unclaimed.pop_back())
        {
            if self.waiting.remove(&key).is_some() {
                return Some((key, handler));
            }
        }
        None
    }

    pub fn clear(&mut self) {
        *self = Backlog {
            arrivals: self.arrivals,
            ..Backlog::default()
        };
    }

    /// Jobs waiting here.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(handlers: &[&str]) -> Vec<u8> {
        serde_json::json!({"plugin": "p", "version": "1.0.0", "handlers": handlers})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn exactly_one_serving_host_ranks_first_for_each_job() {
        let mut peers = Peers::default();
        for host in ["a", "b", "c"] {
            peers.put(host, "monitoring_worker", &status(&["monitoring_worker"]));
        }
        let mut firsts = HashMap::new();
        for n in 0..3000 {
            let job = format!("job-{n}");
            let ranks: Vec<u32> = ["a", "b", "c"]
                .iter()
                .map(|me| peers.rank(me, "monitoring_worker", &job))
                .collect();
            let mut sorted = ranks.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2], "{job}: {ranks:?}");
            let first = ranks.iter().position(|&r| r == 0).unwrap();
            *firsts.entry(first).or_insert(0) += 1;
        }
        for host in 0..3 {
            let share = firsts[&host];
            assert!(
                (800..1200).contains(&share),
                "host {host} first for {share} of 3000"
            );
        }
    }

    #[test]
    fn hosts_that_do_not_serve_the_handler_do_not_count() {
        let mut peers = Peers::default();
        peers.put("a", "monitoring_worker", &status(&["monitoring_worker"]));
        peers.put("b", "vlan_pool_worker", &status(&["vlan_pool_worker"]));
        // No version serving: a plugin rejected before it ever served.
        let rejected = serde_json::json!({"version": "", "handlers": ["monitoring_worker"]});
        peers.put("c", "monitoring_worker", rejected.to_string().as_bytes());
        peers.put("d", "broken", b"not json");
        for n in 0..200 {
            let job = format!("job-{n}");
            assert_eq!(peers.rank("a", "monitoring_worker", &job), 0);
            assert_eq!(peers.rank("b", "vlan_pool_worker", &job), 0);
        }
        assert!(peers.has_others("a"));
        peers.delete("b", "vlan_pool_worker");
        assert!(!peers.has_others("a"), "c and d serve nothing");
        assert!(
            Peers::default().rank("a", "x", "job") == 0,
            "alone: always first"
        );
    }

    #[test]
    fn a_host_that_leaves_stops_counting() {
        let mut peers = Peers::default();
        peers.put("a", "m", &status(&["m"]));
        peers.put("b", "m", &status(&["m"]));
        let behind: Vec<String> = (0..100)
            .map(|n| format!("job-{n}"))
            .filter(|job| peers.rank("a", "m", job) == 1)
            .collect();
        assert!(!behind.is_empty());
        peers.delete("b", "m");
        assert!(behind.iter().all(|job| peers.rank("a", "m", job) == 0));
    }

    #[test]
    fn the_backlog_serves_own_jobs_first_then_unclaimed_ones_newest_first() {
        let t0 = Instant::now();
        let mut backlog = Backlog::default();
        backlog.offer("k1".into(), "h".into(), 10, 1, t0);
        backlog.offer("k2".into(), "h".into(), 11, 0, t0);
        backlog.offer(
            "k3".into(),
            "h".into(),
            12,
            1,
            t0 + Duration::from_millis(1),
        );
        backlog.offer("k4".into(), "h".into(), 13, 2, t0);
        backlog.offer("k2".into(), "h".into(), 11, 0, t0); // seen again (a re-list)
        assert_eq!(backlog.len(), 4);
        assert_eq!(backlog.take().map(|(k, _)| k).as_deref(), Some("k2"));
        assert!(backlog.take().is_none(), "the others are not due");
        assert!(!backlog.has_ready());
        assert_eq!(backlog.next_due(), Some(t0 + AFFINITY_DELAY));
        backlog.promote(t0 + AFFINITY_DELAY + Duration::from_millis(1));
        assert_eq!(backlog.take().map(|(k, _)| k).as_deref(), Some("k3"));
        assert_eq!(backlog.take().map(|(k, _)| k).as_deref(), Some("k1"));
        assert!(backlog.take().is_none());
        backlog.gone("k4", 20);
        backlog.promote(t0 + AFFINITY_DELAY * 3);
        assert!(backlog.take().is_none(), "k4 was claimed elsewhere");
        assert!(backlog.is_empty());
        assert_eq!(backlog.next_due(), None);
    }

    #[test]
    fn a_job_claimed_elsewhere_is_skipped_and_ranks_are_capped() {
        let t0 = Instant::now();
        let mut backlog = Backlog::default();
        backlog.offer("a".into(), "h".into(), 5, 0, t0);
        backlog.offer("b".into(), "h".into(), 6, 0, t0);
        backlog.gone("a", 7);
        assert_eq!(backlog.take().map(|(k, _)| k).as_deref(), Some("b"));
        backlog.offer("c".into(), "h".into(), 8, 1000, t0);
        assert_eq!(backlog.next_due(), Some(t0 + AFFINITY_DELAY * MAX_RANK));
        backlog.clear();
        assert!(backlog.is_empty() && backlog.next_due().is_none());
    }

    #[test]
    fn a_re_queue_seen_before_the_claims_delete_stays() {
        // Claimed elsewhere at 20 (the ready key deleted), failed and re-queued at 30; the
        // puts' watch delivers 30 before the deletes' watch delivers 20.
        let t0 = Instant::now();
        let mut backlog = Backlog::default();
        backlog.offer("k".into(), "h".into(), 10, 1, t0);
        backlog.offer("k".into(), "h".into(), 30, 1, t0);
        backlog.gone("k", 20);
        backlog.promote(t0 + AFFINITY_DELAY);
        assert_eq!(backlog.take().map(|(k, _)| k).as_deref(), Some("k"));
        // And the delete of the re-queued one, after its put, drops it.
        backlog.offer("k".into(), "h".into(), 40, 0, t0);
        backlog.gone("k", 41);
        assert!(backlog.take().is_none());
    }
}
