//! Which host tries a ready job first.
//!
//! Every host watches `/jobs/ready/` and sees every job. Without an order, each host that
//! serves a job's handler sends a claim: one wins and etcd refuses the others, but every one of
//! them is a transaction through raft. With three hosts a job cost six transactions instead
//! of four.
//!
//! Hosts now rank themselves per job: rendezvous hashing of the job id with the ids of the
//! hosts serving its handler, read from the plugin status records every host publishes under
//! its lease (`/esi-worker/plugins/<host>/<plugin>`). The host ranked first (rank 0) claims at
//! once; the host of rank n waits n × [`AFFINITY_DELAY`] (a setting) and claims only if the
//! job is still ready (it follows the ready queue's deletes while another host serves one of
//! its handlers). Hosts that see different peer sets only claim in a different order.
//!
//! Safety does not depend on any of this: the claim is still a compare that only one host can
//! win. A host that died or stalls delays the jobs ranked to it by at most that delay, until
//! its lease expires and its records go. A draining host deletes its records first
//! (`Host::shutdown`), so it delays no new job.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// How long a host waits per rank (rank 0 is first) before it claims a job nobody claimed
/// (`--claim-affinity-ms`).
pub const AFFINITY_DELAY: Duration = Duration::from_millis(50);

/// Ranks past this one wait as long as it does.
pub const MAX_RANK: u32 = 8;

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
        let serving: Serving = match serde_json::from_slice(value) {
            Ok(serving) => serving,
            Err(e) => {
                tracing::warn!(host, plugin, error = %e,
                    "plugin status record does not parse; its host counts as serving nothing here");
                Serving::default()
            }
        };
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

    /// Whether a host other than `me` serves one of `mine` (the handlers `me` serves): only
    /// then can a job here be ranked to someone else, and are the ready queue's deletes worth
    /// following.
    pub fn shares_handlers(&self, me: &str, mine: &[String]) -> bool {
        self.hosts.iter().any(|(host, plugins)| {
            host != me && plugins.values().flatten().any(|h| mine.contains(h))
        })
    }

    /// How many hosts serving `handler` rank before `me` for `job_id`: 0 means claim now.
    /// `me` always counts as serving it (its own record may not be published yet).
    pub fn rank(&self, me: &str, handler: &str, job_id: &str) -> u32 {
        let mut others = self
            .hosts
            .iter()
            .filter(|(host, plugins)| {
                host.as_str() != me && plugins.values().any(|h| h.iter().any(|h| h == handler))
            })
            .peekable();
        if others.peek().is_none() {
            return 0; // alone: no hash to compute
        }
        let mine = score(me, job_id);
        let ahead = others
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

/// Ready jobs this host may run, waiting for a slot: its own from when they arrived, jobs
/// ranked to other hosts from when their delay ran out, the oldest first across both. A job
/// another host left unclaimed therefore waits here no longer than one of this host's own
/// would, whatever the load.
#[derive(Debug)]
pub struct Backlog {
    /// Ready keys waiting here, with the revision of the put that made each ready. A key
    /// leaves it when it is taken or seen deleted; the queues below drop keys no longer in it
    /// when they reach them. Puts and deletes come by two watches, in no order between them:
    /// the revision keeps the delete of a claim from dropping the put of a later re-queue.
    waiting: HashMap<String, i64>,
    /// This host's own jobs, by arrival.
    now: VecDeque<(Instant, String, String)>,
    /// Jobs ranked to other hosts, by when they may be taken (and arrival, to keep order).
    later: BTreeMap<(Instant, u64), (String, String)>,
    /// Jobs of `later` whose time came, by that time.
    unclaimed: VecDeque<(Instant, String, String)>,
    arrivals: u64,
    /// Per rank; zero: every host claims every job at once.
    delay: Duration,
}

/// A job to start, and whether another host was ranked before this one for it.
#[derive(Debug, PartialEq, Eq)]
pub struct Next {
    pub key: String,
    pub handler: String,
    pub deferred: bool,
}

impl Backlog {
    /// An empty backlog; a job of rank n waits n × `delay` (at most 8 × `delay`).
    pub fn new(delay: Duration) -> Self {
        Backlog {
            waiting: HashMap::new(),
            now: VecDeque::new(),
            later: BTreeMap::new(),
            unclaimed: VecDeque::new(),
            arrivals: 0,
            delay,
        }
    }

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
        if rank == 0 || self.delay.is_zero() {
            self.now.push_back((at, key, handler));
        } else {
            self.arrivals += 1;
            let due = at + self.delay * rank.min(MAX_RANK);
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
            let due = entry.key().0;
            if due > at {
                break;
            }
            let (key, handler) = entry.remove();
            if self.waiting.contains_key(&key) {
                self.unclaimed.push_back((due, key, handler));
            }
        }
    }

    /// Whether [`Backlog::take`] may have a job (it may still find only stale entries).
    pub fn has_ready(&self) -> bool {
        !self.now.is_empty() || !self.unclaimed.is_empty()
    }

    /// The job that has waited longest: an own job since it arrived, another host's since
    /// its delay ran out.
    pub fn take(&mut self) -> Option<Next> {
        loop {
            let own_first = match (self.now.front(), self.unclaimed.front()) {
                (Some((arrived, ..)), Some((due, ..))) => arrived <= due,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return None,
            };
            let queue = if own_first {
                &mut self.now
            } else {
                &mut self.unclaimed
            };
            let (_, key, handler) = queue.pop_front()?;
            if self.waiting.remove(&key).is_some() {
                return Some(Next {
                    key,
                    handler,
                    deferred: !own_first,
                });
            }
        }
    }

    pub fn clear(&mut self) {
        *self = Backlog {
            arrivals: self.arrivals,
            ..Backlog::new(self.delay)
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
        let both = [
            "monitoring_worker".to_string(),
            "vlan_pool_worker".to_string(),
        ];
        assert!(
            peers.shares_handlers("a", &both),
            "b serves vlan_pool_worker"
        );
        assert!(
            !peers.shares_handlers("a", &both[..1]),
            "nobody else serves monitoring_worker"
        );
        peers.delete("b", "vlan_pool_worker");
        assert!(!peers.shares_handlers("a", &both), "c and d serve nothing");
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
    fn the_backlog_serves_jobs_by_how_long_they_waited() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut backlog = Backlog::new(AFFINITY_DELAY);
        backlog.offer("k1".into(), "h".into(), 10, 1, t0);
        backlog.offer("k2".into(), "h".into(), 11, 0, t0);
        backlog.offer("k3".into(), "h".into(), 12, 1, t0 + ms(1));
        backlog.offer("k4".into(), "h".into(), 13, 2, t0);
        backlog.offer("k2".into(), "h".into(), 11, 0, t0); // seen again (a re-list)
        assert_eq!(backlog.len(), 4);
        let next = backlog.take().unwrap();
        assert_eq!((next.key.as_str(), next.deferred), ("k2", false));
        assert!(backlog.take().is_none(), "the others are not due");
        assert!(!backlog.has_ready());
        assert_eq!(backlog.next_due(), Some(t0 + AFFINITY_DELAY));
        // An own job that arrived after the delays of k1 and k3 ran out goes after them.
        backlog.offer("k5".into(), "h".into(), 14, 0, t0 + AFFINITY_DELAY + ms(2));
        backlog.promote(t0 + AFFINITY_DELAY + ms(2));
        let next = backlog.take().unwrap();
        assert_eq!((next.key.as_str(), next.deferred), ("k1", true));
        assert_eq!(backlog.take().map(|n| n.key).as_deref(), Some("k3"));
        assert_eq!(backlog.take().map(|n| n.key).as_deref(), Some("k5"));
        assert!(backlog.take().is_none());
        backlog.gone("k4", 20);
        backlog.promote(t0 + AFFINITY_DELAY * 3);
        assert!(backlog.take().is_none(), "k4 was claimed elsewhere");
        assert!(backlog.is_empty());
        assert_eq!(backlog.next_due(), None);
    }

    #[test]
    fn a_job_left_unclaimed_is_not_starved_by_a_steady_stream_of_own_jobs() {
        let t0 = Instant::now();
        let mut backlog = Backlog::new(AFFINITY_DELAY);
        backlog.offer("theirs".into(), "h".into(), 1, 1, t0);
        let mut taken = Vec::new();
        for n in 0..100u32 {
            let at = t0 + Duration::from_millis(u64::from(n));
            backlog.offer(format!("own-{n}"), "h".into(), 2 + i64::from(n), 0, at);
            backlog.promote(at);
            taken.push(backlog.take().unwrap().key);
        }
        let position = taken.iter().position(|k| k == "theirs").unwrap();
        assert!(position <= 51, "taken {position}th, after its 50 ms delay");
    }

    #[test]
    fn a_zero_delay_claims_every_job_at_once() {
        let t0 = Instant::now();
        let mut backlog = Backlog::new(Duration::ZERO);
        backlog.offer("k".into(), "h".into(), 1, 3, t0);
        assert_eq!(backlog.next_due(), None);
        assert_eq!(backlog.take().map(|n| n.key).as_deref(), Some("k"));
    }

    #[test]
    fn a_job_claimed_elsewhere_is_skipped_and_ranks_are_capped() {
        let t0 = Instant::now();
        let mut backlog = Backlog::new(AFFINITY_DELAY);
        backlog.offer("a".into(), "h".into(), 5, 0, t0);
        backlog.offer("b".into(), "h".into(), 6, 0, t0);
        backlog.gone("a", 7);
        assert_eq!(backlog.take().map(|n| n.key).as_deref(), Some("b"));
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
        let mut backlog = Backlog::new(AFFINITY_DELAY);
        backlog.offer("k".into(), "h".into(), 10, 1, t0);
        backlog.offer("k".into(), "h".into(), 30, 1, t0);
        backlog.gone("k", 20);
        backlog.promote(t0 + AFFINITY_DELAY);
        assert_eq!(backlog.take().map(|n| n.key).as_deref(), Some("k"));
        // And the delete of the re-queued one, after its put, drops it.
        backlog.offer("k".into(), "h".into(), 40, 0, t0);
        backlog.gone("k", 41);
        assert!(backlog.take().is_none());
    }
}
