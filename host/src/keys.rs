//! The one place that knows the etcd key layout (PROTOCOL sections 1-3).
//!
//! Every key the host reads, writes or watches is built here. A `Keys` value carries an optional
//! root namespace (empty in production, so an existing gohan deployment sees the keys it expects;
//! tests use a unique root to share one etcd server).

use crate::schema::Schema;

/// Queue a job id can be listed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    /// `/jobs/all/<id>`: the job record itself.
    All,
    /// `/jobs/ready/<id>`: claimable now.
    Ready,
    /// `/jobs/waiting/<id>`: waits for its dependencies.
    Waiting,
    /// `/jobs/working/<id>`: claimed, bound to the claimer's lease.
    Working,
    /// `/jobs/finished/<id>`: done, to be cleaned by the job manager.
    Finished,
}

impl Queue {
    fn segment(self) -> &'static str {
        match self {
            Queue::All => "all",
            Queue::Ready => "ready",
            Queue::Waiting => "waiting",
            Queue::Working => "working",
            Queue::Finished => "finished",
        }
    }
}

/// Per-resource record families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Record {
    /// `/config<prefix>/<id>`, written by gohan.
    Config,
    /// `/state<prefix>/<id>`, the worker's answer to gohan.
    State,
    /// `/monitoring<prefix>/<id>`, written by collectors.
    Monitoring,
    /// `/esi-worker/job_state<prefix>/<id>`, scratch state of one workflow.
    JobState,
    /// `/esi-worker/monitoring_targets<prefix>/<id>`.
    MonitoringTarget,
    /// `/esi-worker/resource_mappings<prefix>/<id>`.
    ResourceMapping,
    /// `/esi-worker/vlan_pools<prefix>/<id>`.
    VlanPool,
}

impl Record {
    fn base(self) -> &'static str {
        match self {
            Record::Config => "/config",
            Record::State => "/state",
            Record::Monitoring => "/monitoring",
            Record::JobState => "/esi-worker/job_state",
            Record::MonitoringTarget => "/esi-worker/monitoring_targets",
            Record::ResourceMapping => "/esi-worker/resource_mappings",
            Record::VlanPool => "/esi-worker/vlan_pools",
        }
    }
}

/// The config prefix every gohan resource and heat template lives under.
const CONFIG_WATCH: &str = "/config/v2.0/";

/// Builds and parses etcd keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys under `root` (`""` for the real layout, or e.g. `/t/abc` for an isolated namespace).
    pub fn new(root: &str) -> Self {
        Keys {
            root: root.trim_end_matches('/').to_string(),
        }
    }

    /// The root namespace (empty in production).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// A per-resource record key.
    pub fn record(&self, record: Record, schema: &Schema, id: &str) -> String {
        format!("{}{}{}/{}", self.root, record.base(), schema.prefix, id)
    }

    /// Every key of one record family, e.g. `/state/` (for listing and watching).
    pub fn record_family(&self, record: Record) -> String {
        format!("{}{}/", self.root, record.base())
    }

    /// Prefix watched by the job manager for resource configs and heat templates.
    pub fn config_watch_prefix(&self) -> String {
        format!("{}{}", self.root, CONFIG_WATCH)
    }

    /// Splits a config key into (schema prefix, resource id), e.g.
    /// `/config/v2.0/ha_interfaces/x` -> (`/v2.0/ha_interfaces`, `x`).
    pub fn parse_config_key<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key
            .strip_prefix(self.root.as_str())?
            .strip_prefix(Record::Config.base())?;
        let (prefix, id) = rest.rsplit_once('/')?;
        (!prefix.is_empty() && !id.is_empty()).then_some((prefix, id))
    }

    /// `/jobs/<queue>/<job_id>`.
    pub fn job(&self, queue: Queue, job_id: &str) -> String {
        format!("{}/jobs/{}/{}", self.root, queue.segment(), job_id)
    }

    /// `/jobs/<queue>/`, for listing and watching a queue.
    pub fn queue_prefix(&self, queue: Queue) -> String {
        format!("{}/jobs/{}/", self.root, queue.segment())
    }

    /// `/jobs/`, every queue.
    pub fn jobs_prefix(&self) -> String {
        format!("{}/jobs/", self.root)
    }

    /// The job id at the end of a queue key.
    pub fn parse_job_key<'k>(&self, queue: Queue, key: &'k str) -> Option<&'k str> {
        let rest = key
            .strip_prefix(self.root.as_str())?
            .strip_prefix("/jobs/")?;
        let id = rest.strip_prefix(queue.segment())?.strip_prefix('/')?;
        (!id.is_empty()).then_some(id)
    }

    /// `/esi-worker/dead_jobs/<job_id>`: a job that failed for good, kept for inspection.
    pub fn dead_job(&self, job_id: &str) -> String {
        format!("{}{}", self.dead_jobs_prefix(), job_id)
    }

    /// `/esi-worker/dead_jobs/`, for listing every dead job.
    pub fn dead_jobs_prefix(&self) -> String {
        format!("{}/esi-worker/dead_jobs/", self.root)
    }

    /// The job id at the end of a dead-job key.
    pub fn parse_dead_job_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        let id = key.strip_prefix(self.dead_jobs_prefix().as_str())?;
        (!id.is_empty()).then_some(id)
    }

    /// `/esi-worker/hosts/<host_id>`: a running host (bound to its lease), so that tools can
    /// tell which host owns a claim: a claim's lease is the lease of this key.
    pub fn host(&self, host_id: &str) -> String {
        format!("{}{}", self.hosts_prefix(), host_id)
    }

    /// `/esi-worker/hosts/`, every host record.
    pub fn hosts_prefix(&self) -> String {
        format!("{}/esi-worker/hosts/", self.root)
    }

    /// `/esi-worker/plugins/<host_id>/<plugin>`: a plugin as one host loaded it.
    pub fn plugin_status(&self, host_id: &str, plugin: &str) -> String {
        format!("{}{}/{}", self.plugin_status_prefix(), host_id, plugin)
    }

    /// `/esi-worker/plugins/`, every host's plugin status records.
    pub fn plugin_status_prefix(&self) -> String {
        format!("{}/esi-worker/plugins/", self.root)
    }

    /// The host and plugin of a plugin status key.
    pub fn parse_plugin_status_key<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(self.plugin_status_prefix().as_str())?;
        let (host, plugin) = rest.split_once('/')?;
        (!host.is_empty() && !plugin.is_empty() && !plugin.contains('/')).then_some((host, plugin))
    }

    /// `/job_manager_id`: the job manager election key (PROTOCOL 4.7).
    pub fn job_manager_election(&self) -> String {
        format!("{}/job_manager_id", self.root)
    }

    /// The whole namespace, for tests and tools that clear it.
    pub fn everything(&self) -> String {
        if self.root.is_empty() {
            "/".to_string()
        } else {
            format!("{}/", self.root)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::SchemaRegistry;

    #[test]
    fn record_keys_follow_the_seed_layout() {
        let reg = SchemaRegistry::built_in();
        let ha = reg.get("ha_interface").unwrap();
        let k = Keys::new("");
        let id = "372ed357-e622-41fb-a613-076d332838e2";
        assert_eq!(
            k.record(Record::Config, ha, id),
            format!("/config/v2.0/ha_interfaces/{id}")
        );
        assert_eq!(
            k.record(Record::State, ha, id),
            format!("/state/v2.0/ha_interfaces/{id}")
        );
        assert_eq!(
            k.record(Record::JobState, ha, id),
            format!("/esi-worker/job_state/v2.0/ha_interfaces/{id}")
        );
        assert_eq!(k.job(Queue::Ready, "a:b"), "/jobs/ready/a:b");
    }

    #[test]
    fn keys_round_trip_under_a_root() {
        let k = Keys::new("/t/1/");
        assert_eq!(
            k.parse_config_key("/t/1/config/v2.0/ha_interfaces/x"),
            Some(("/v2.0/ha_interfaces", "x"))
        );
        assert_eq!(k.parse_config_key("/config/v2.0/ha_interfaces/x"), None);
        assert_eq!(
            k.parse_job_key(Queue::Ready, "/t/1/jobs/ready/j1"),
            Some("j1")
        );
        assert_eq!(k.parse_job_key(Queue::Ready, "/t/1/jobs/readyx/j1"), None);
        assert_eq!(k.parse_job_key(Queue::All, "/t/1/jobs/ready/j1"), None);
        assert_eq!(k.parse_dead_job_key(&k.dead_job("j1")), Some("j1"));
        assert!(k.dead_job("j1").starts_with(&k.dead_jobs_prefix()));
        assert_eq!(k.parse_dead_job_key("/t/1/esi-worker/dead_jobs/"), None);
        assert_eq!(k.parse_dead_job_key("/esi-worker/dead_jobs/j1"), None);
    }
}
