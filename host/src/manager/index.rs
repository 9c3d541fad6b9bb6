//! The job manager's in-memory index of unfinished jobs: a cache of `/jobs/all` and
//! `/jobs/waiting`, rebuilt from etcd whenever the manager (re)starts.

use std::collections::{HashMap, HashSet};

use crate::protocol::{Job, JobId, JobRecord};

/// (schema id, resource id).
pub type ResourceKey = (String, String);

#[derive(Debug, Clone)]
pub struct Entry {
    pub resource: ResourceKey,
    pub handler: String,
    pub dependency: Vec<String>,
    pub is_last: bool,
    pub waiting: bool,
}

#[derive(Debug, Default)]
pub struct JobIndex {
    jobs: HashMap<String, Entry>,
    by_resource: HashMap<ResourceKey, HashSet<String>>,
    /// dependency id -> jobs that wait for it.
    dependants: HashMap<String, HashSet<String>>,
}

impl JobIndex {
    pub fn insert(&mut self, job: &Job, ready: bool) {
        let entry = Entry {
            resource: (job.resource_type.clone(), job.resource_id.clone()),
            handler: job.handler.clone(),
            dependency: job.dependency.clone(),
            is_last: job.is_last,
            waiting: !ready,
        };
        self.insert_entry(job.id.clone(), entry);
    }

    /// Indexes a `/jobs/all` record found on start-up. An unreadable record is still indexed
    /// from its id, so that its resource counts as busy until a worker fails it.
    pub fn insert_record(&mut self, id: &str, key: &str, value: &[u8]) {
        match JobRecord::parse(key, value) {
            Ok(record) => self.insert(&record.job, true),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable job record kept in the index by its id");
                if let Ok(parsed) = id.parse::<JobId>() {
                    let entry = Entry {
                        resource: (parsed.resource_type, parsed.resource_id),
                        handler: parsed.handler,
                        dependency: vec![],
                        is_last: false,
                        waiting: false,
                    };
                    self.insert_entry(id.to_string(), entry);
                }
            }
        }
    }

    fn insert_entry(&mut self, id: String, entry: Entry) {
        self.by_resource
            .entry(entry.resource.clone())
            .or_default()
            .insert(id.clone());
        for dep in &entry.dependency {
            self.dependants
                .entry(dep.clone())
                .or_default()
                .insert(id.clone());
        }
        self.jobs.insert(id, entry);
    }

    pub fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.jobs.remove(id)?;
        if let Some(set) = self.by_resource.get_mut(&entry.resource) {
            set.remove(id);
            if set.is_empty() {
                self.by_resource.remove(&entry.resource);
            }
        }
        for dep in &entry.dependency {
            if let Some(set) = self.dependants.get_mut(dep) {
                set.remove(id);
                if set.is_empty() {
                    self.dependants.remove(dep);
                }
            }
        }
        Some(entry)
    }

    pub fn mark_waiting(&mut self, id: &str) {
        if let Some(e) = self.jobs.get_mut(id) {
            e.waiting = true;
        }
    }

    pub fn mark_ready(&mut self, id: &str) {
        if let Some(e) = self.jobs.get_mut(id) {
            e.waiting = false;
        }
    }

    /// Every indexed job id, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.jobs.keys().cloned().collect();
        v.sort();
        v
    }

    /// The ids of the jobs of `resource`, sorted.
    pub fn ids_of(&self, resource: &ResourceKey) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_resource
            .get(resource)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn has_jobs(&self, resource: &ResourceKey) -> bool {
        self.by_resource.contains_key(resource)
    }

    pub fn handler_of(&self, id: &str) -> Option<String> {
        self.jobs.get(id).map(|e| e.handler.clone())
    }

    /// Jobs that list `id` as a dependency.
    pub fn dependants(&self, id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .dependants
            .get(id)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// A waiting job whose dependencies have all finished (left the index).
    pub fn is_releasable(&self, id: &str) -> bool {
        self.jobs
            .get(id)
            .is_some_and(|e| e.waiting && e.dependency.iter().all(|d| !self.jobs.contains_key(d)))
    }

    /// Every releasable job.
    pub fn releasable(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .jobs
            .keys()
            .filter(|id| self.is_releasable(id))
            .cloned()
            .collect();
        v.sort();
        v
    }
}
