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
//! [`MIN_SEEN`] of the handler's last [`REMEMBERED_JOBS`] jobs is prefetched. A wrong guess
//! costs one extra read inside a transaction that is sent anyway.
//!
//! Keys that differ per job but follow from its params are learnt as such: a monitoring job
//! reads the `/state` of each interface its params name. The claim can only read those if it
//! knows the job's params before the job's record comes back with it; the job manager of the
//! same process tells it ([`PlannedParams`]), so on the host whose manager planned the job
//! (the elected one) the plugin's first call needs no round trip of its own. Other hosts
//! learn and prefetch every key as before: a param-named read is also remembered as its key,
//! so keys that every job reads (interfaces all resources watch) are still shared.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::keys::Record;

/// Jobs per handler whose reads are remembered.
pub const REMEMBERED_JOBS: usize = 4;
/// How many of those jobs must have read a key for it to be prefetched.
pub const MIN_SEEN: usize = 2;
/// Keys prefetched per claim at most.
pub const MAX_KEYS: usize = 8;

/// One read remembered for a handler.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Read {
    /// The same key for every job (a heat template).
    Key(String),
    /// This record family of the resources the job's params name (the interface states a
    /// monitoring job watches): other keys for each job, but known from its params.
    OfParams(RecordKind),
}

/// [`Record`] families a param-named read can be of, ordered for [`Read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum RecordKind {
    Config,
    State,
    Monitoring,
}

impl RecordKind {
    const ALL: [RecordKind; 3] = [
        RecordKind::Config,
        RecordKind::State,
        RecordKind::Monitoring,
    ];

    fn record(self) -> Record {
        match self {
            RecordKind::Config => Record::Config,
            RecordKind::State => Record::State,
            RecordKind::Monitoring => Record::Monitoring,
        }
    }
}

/// The keys of the records a job's params name: for each family a param-named read can be
/// of, the keys of that family of every resource in the job's params.
#[derive(Debug, Default, Clone)]
pub struct ParamKeys {
    by_family: Vec<(RecordKind, Vec<String>)>,
}

impl ParamKeys {
    /// `key_of(family)` gives the keys of that family of the job's param resources.
    pub fn new(key_of: impl Fn(Record) -> Vec<String>) -> ParamKeys {
        ParamKeys {
            by_family: RecordKind::ALL
                .iter()
                .map(|&kind| (kind, key_of(kind.record())))
                .collect(),
        }
    }

    fn family_of(&self, key: &str) -> Option<RecordKind> {
        self.by_family
            .iter()
            .find(|(_, keys)| keys.iter().any(|k| k == key))
            .map(|(kind, _)| *kind)
    }

    fn keys(&self, kind: RecordKind) -> &[String] {
        self.by_family
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(&[], |(_, keys)| keys.as_slice())
    }
}

/// The resources named by the params of jobs the job manager of this process planned and
/// no worker of this process claimed yet, by job id. Bounded: the oldest entries go first
/// (jobs other hosts claim are never taken out otherwise).
#[derive(Debug, Default)]
pub struct PlannedParams {
    inner: Mutex<PlannedInner>,
}

#[derive(Debug, Default)]
struct PlannedInner {
    by_job: HashMap<String, Vec<(String, String)>>,
    order: VecDeque<String>,
}

/// Jobs [`PlannedParams`] remembers at most.
pub const MAX_PLANNED: usize = 16_384;

impl PlannedParams {
    /// Remembers the `(resource_type, resource_id)` pairs the params of job `id` name.
    pub fn insert(&self, id: &str, resources: Vec<(String, String)>) {
        if resources.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.by_job.insert(id.to_string(), resources).is_none() {
            inner.order.push_back(id.to_string());
        }
        while inner.order.len() > MAX_PLANNED {
            if let Some(oldest) = inner.order.pop_front() {
                inner.by_job.remove(&oldest);
            }
        }
    }

    /// The resources job `id`'s params name (`None`: not planned by this process, or
    /// forgotten).
    pub fn get(&self, id: &str) -> Option<Vec<(String, String)>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_job.get(id).cloned()
    }

    /// Forgets job `id` (claimed, here or elsewhere).
    pub fn forget(&self, id: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // The id stays in `order` until it comes round; `by_job` is what counts.
        inner.by_job.remove(id);
    }
}

/// The reads of each handler's recent jobs.
#[derive(Default)]
pub struct ReadHints {
    recent: Mutex<HashMap<String, VecDeque<Vec<Read>>>>,
}

impl ReadHints {
    /// Keys to read with the next claim of a `handler` job whose params name the records in
    /// `params` (empty when the claim cannot know them), most often read first.
    pub fn keys_for(&self, handler: &str, params: &ParamKeys) -> Vec<String> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let Some(jobs) = recent.get(handler) else {
            return Vec::new();
        };
        let mut seen: Vec<(&Read, usize)> = Vec::new();
        for read in jobs.iter().flatten() {
            match seen.iter_mut().find(|(r, _)| *r == read) {
                Some((_, count)) => *count += 1,
                None => seen.push((read, 1)),
            }
        }
        seen.retain(|(_, count)| *count >= MIN_SEEN);
        // Most often read first; at equal counts this job's own param-named records before
        // keys other jobs happened to share, so that those cannot crowd them out.
        seen.sort_by_key(|(read, count)| (std::cmp::Reverse(*count), matches!(read, Read::Key(_))));
        let mut keys: Vec<String> = Vec::new();
        let mut add = |key: &String| {
            if keys.len() < MAX_KEYS && !keys.contains(key) {
                keys.push(key.clone());
            }
        };
        for (read, _) in seen {
            match read {
                Read::Key(key) => add(key),
                Read::OfParams(kind) => params.keys(*kind).iter().for_each(&mut add),
            }
        }
        keys
    }

    /// Remembers what one job of `handler` read (each key once); `params` tells which of
    /// those keys its params named (remembered both ways: as that family of the params'
    /// resources, and as the key itself for claims that do not know a job's params).
    pub fn record(&self, handler: &str, reads: Vec<String>, params: &ParamKeys) {
        let mut reads: Vec<Read> = reads
            .into_iter()
            .flat_map(|key| {
                let of_params = params.family_of(&key).map(Read::OfParams);
                of_params.into_iter().chain([Read::Key(key)])
            })
            .collect();
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
        assert!(hints
            .keys_for("monitoring_worker", &ParamKeys::default())
            .is_empty());
        hints.record(
            "monitoring_worker",
            keys(&["/t", "/s/1"]),
            &ParamKeys::default(),
        );
        assert!(hints
            .keys_for("monitoring_worker", &ParamKeys::default())
            .is_empty());
    }

    #[test]
    fn keys_shared_by_jobs_are_prefetched_and_per_resource_keys_are_not() {
        let hints = ReadHints::default();
        hints.record(
            "monitoring_worker",
            keys(&["/t", "/s/1", "/s/2"]),
            &ParamKeys::default(),
        );
        hints.record(
            "monitoring_worker",
            keys(&["/t", "/s/3", "/s/4"]),
            &ParamKeys::default(),
        );
        assert_eq!(
            hints.keys_for("monitoring_worker", &ParamKeys::default()),
            keys(&["/t"])
        );
        assert!(hints
            .keys_for("vlan_pool_worker", &ParamKeys::default())
            .is_empty());
    }

    #[test]
    fn a_key_no_longer_read_is_forgotten() {
        let hints = ReadHints::default();
        hints.record("h", keys(&["/old"]), &ParamKeys::default());
        hints.record("h", keys(&["/old"]), &ParamKeys::default());
        for _ in 0..REMEMBERED_JOBS - 1 {
            hints.record("h", keys(&["/new"]), &ParamKeys::default());
        }
        assert_eq!(hints.keys_for("h", &ParamKeys::default()), keys(&["/new"]));
    }

    #[test]
    fn a_key_read_twice_in_one_job_counts_once() {
        let hints = ReadHints::default();
        hints.record("h", keys(&["/k", "/k"]), &ParamKeys::default());
        assert!(hints.keys_for("h", &ParamKeys::default()).is_empty());
    }

    /// Keys for param resources `ids`: `/<family>/<id>`.
    fn params(ids: &[&str]) -> ParamKeys {
        ParamKeys::new(|family| ids.iter().map(|id| format!("/{family:?}/{id}")).collect())
    }

    #[test]
    fn records_of_the_resources_a_jobs_params_name_are_prefetched_for_the_next_job() {
        let hints = ReadHints::default();
        let template = "/t".to_string();
        let reads = |ids: &[&str]| {
            let mut reads = vec![template.clone()];
            reads.extend(ids.iter().map(|id| format!("/State/{id}")));
            reads
        };
        hints.record("h", reads(&["a", "b"]), &params(&["a", "b"]));
        hints.record("h", reads(&["c"]), &params(&["c", "d"]));
        assert_eq!(
            hints.keys_for("h", &params(&["e", "f"])),
            keys(&["/State/e", "/State/f", "/t"])
        );
        // A claim that does not know the job's params gets the shared keys only.
        assert_eq!(hints.keys_for("h", &ParamKeys::default()), keys(&["/t"]));
    }

    #[test]
    fn param_named_keys_every_job_reads_are_still_shared_without_params() {
        let hints = ReadHints::default();
        let reads = || keys(&["/t", "/State/a"]);
        hints.record("h", reads(), &params(&["a"]));
        hints.record("h", reads(), &params(&["a"]));
        assert_eq!(
            hints.keys_for("h", &ParamKeys::default()),
            keys(&["/State/a", "/t"])
        );
        // With the params, the same key comes once.
        assert_eq!(
            hints.keys_for("h", &params(&["a"])),
            keys(&["/State/a", "/t"])
        );
    }

    #[test]
    fn at_most_max_keys_are_prefetched() {
        let hints = ReadHints::default();
        let many: Vec<String> = (0..MAX_KEYS + 5).map(|i| format!("/k{i}")).collect();
        hints.record("h", many.clone(), &ParamKeys::default());
        hints.record("h", many, &ParamKeys::default());
        let ids: Vec<String> = (0..MAX_KEYS + 5).map(|i| i.to_string()).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let reads = (0..MAX_KEYS + 5).map(|i| format!("/State/{i}")).collect();
        hints.record("p", reads, &params(&ids));
        let reads = (0..MAX_KEYS + 5).map(|i| format!("/State/{i}")).collect();
        hints.record("p", reads, &params(&ids));
        assert_eq!(hints.keys_for("p", &params(&ids)).len(), MAX_KEYS);
        assert_eq!(hints.keys_for("h", &ParamKeys::default()).len(), MAX_KEYS);
    }
}
