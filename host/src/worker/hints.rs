//! Which records a handler's jobs keep reading, so that the claim can read them too.
//!
//! A monitoring job reads its heat template on every run, and the template is the same record
//! for every job of the resource type. Reading it in the claim's transaction (see
//! [`Store::claim`](crate::store::Store::claim)) saves the job a round trip, and the value is
//! as fresh as a read would be: it is read at the claim's revision, after the job was written
//! and before it can complete. Only the job's first call is served this way; a re-run (after
//! a `wait`, or a write conflict) reads etcd again.
//!
//! The host learns the keys rather than being told them: a key read by at least
//! [`MIN_SEEN`] of the handler's last [`REMEMBERED_JOBS`] jobs is prefetched. Keys that depend
//! on the resource (another resource's `/state`) drop out by themselves; a wrong guess costs
//! one extra read inside a transaction that is sent anyway.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Jobs per handler whose reads are remembered.
pub const REMEMBERED_JOBS: usize = 4;
/// How many of those jobs must have read a key for it to be prefetched.
pub const MIN_SEEN: usize = 2;
/// Keys prefetched per claim at most.
pub const MAX_KEYS: usize = 8;

/// The keys read by each handler's recent jobs.
#[derive(Default)]
pub struct ReadHints {
    recent: Mutex<HashMap<String, VecDeque<Vec<String>>>>,
}

impl ReadHints {
    /// Keys to read with the next claim of a `handler` job, most often read first.
    pub fn keys_for(&self, handler: &str) -> Vec<String> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let Some(jobs) = recent.get(handler) else {
            return Vec::new();
        };
        let mut seen: Vec<(&String, usize)> = Vec::new();
        for key in jobs.iter().flatten() {
            match seen.iter_mut().find(|(k, _)| *k == key) {
                Some((_, count)) => *count += 1,
                None => seen.push((key, 1)),
            }
        }
        seen.retain(|(_, count)| *count >= MIN_SEEN);
        seen.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
        seen.into_iter()
            .take(MAX_KEYS)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Remembers what one job of `handler` read (each key once).
    pub fn record(&self, handler: &str, mut reads: Vec<String>) {
        reads.sort_unstable();
        reads.dedup();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let jobs = recent.entry(handler.to_string()).or_default();
        if jobs.len() == REMEMBERED_JOBS {
            jobs.pop_front();
        }
        jobs.push_back(reads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str]) -> Vec<String> {
        list.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn nothing_is_prefetched_before_a_key_repeats() {
        let hints = ReadHints::default();
        assert!(hints.keys_for("monitoring_worker").is_empty());
        hints.record("monitoring_worker", keys(&["/t", "/s/1"]));
        assert!(hints.keys_for("monitoring_worker").is_empty());
    }

    #[test]
    fn keys_shared_by_jobs_are_prefetched_and_per_resource_keys_are_not() {
        let hints = ReadHints::default();
        hints.record("monitoring_worker", keys(&["/t", "/s/1", "/s/2"]));
        hints.record("monitoring_worker", keys(&["/t", "/s/3", "/s/4"]));
        assert_eq!(hints.keys_for("monitoring_worker"), keys(&["/t"]));
        assert!(hints.keys_for("vlan_pool_worker").is_empty());
    }

    #[test]
    fn a_key_no_longer_read_is_forgotten() {
        let hints = ReadHints::default();
        hints.record("h", keys(&["/old"]));
        hints.record("h", keys(&["/old"]));
        for _ in 0..REMEMBERED_JOBS - 1 {
            hints.record("h", keys(&["/new"]));
        }
        assert_eq!(hints.keys_for("h"), keys(&["/new"]));
    }

    #[test]
    fn a_key_read_twice_in_one_job_counts_once() {
        let hints = ReadHints::default();
        hints.record("h", keys(&["/k", "/k"]));
        assert!(hints.keys_for("h").is_empty());
    }

    #[test]
    fn at_most_max_keys_are_prefetched() {
        let hints = ReadHints::default();
        let many: Vec<String> = (0..MAX_KEYS + 5).map(|i| format!("/k{i}")).collect();
        hints.record("h", many.clone());
        hints.record("h", many);
        assert_eq!(hints.keys_for("h").len(), MAX_KEYS);
    }
}
