//! Pure workflow planning (PROTOCOL 4.1-4.3): what to do with a resource, and the jobs that do it.

use serde_json::{Map, Value};

use crate::protocol::{Action, ConfigEnvelope, Job, JobId, JobRecord, OnFailure, Param};
use crate::schema::Schema;

/// Handlers in workflow order. The heat worker is an external handler: the host plans its jobs
/// only when it is told that some worker serves it.
pub const HANDLER_ORDER: [&str; 3] = ["vlan_pool_worker", "heat_worker", "monitoring_worker"];

/// The handler whose modify is `delete` + `create` rather than one `modify` job.
pub const MONITORING: &str = "monitoring_worker";

/// The template id a handler uses for a resource type, if the handler is template-driven:
/// `<type>_monitoring` and `<type>_vlan_pool` for the built-in ones (the names ESI's templates
/// have), `<type>_<handler>` for any third-party handler. The heat worker is not driven by
/// templates here.
pub fn template_id(handler: &str, schema: &Schema) -> Option<String> {
    match handler {
        "monitoring_worker" => Some(format!("{}_monitoring", schema.id)),
        "vlan_pool_worker" => Some(format!("{}_vlan_pool", schema.id)),
        "heat_worker" => None,
        other => Some(format!("{}_{other}", schema.id)),
    }
}

/// The order handlers' jobs run in within a workflow: the built-in ones in
/// [`HANDLER_ORDER`], then every other handler served, by name.
pub fn handler_order(served: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut others: Vec<String> = served
        .into_iter()
        .filter(|h| !HANDLER_ORDER.contains(&h.as_str()))
        .collect();
    others.sort();
    others.dedup();
    HANDLER_ORDER
        .iter()
        .map(|h| h.to_string())
        .chain(others)
        .collect()
}

/// What the job manager must do for a config, given the version of its `/state` (if any).
pub fn decide(config: &ConfigEnvelope, state_version: Option<u64>) -> Option<Action> {
    match state_version {
        Some(v) if v >= config.version => None,
        _ if config.marked_for_deletion => Some(Action::LogicalDelete),
        None => Some(Action::Create),
        Some(_) => Some(Action::Modify),
    }
}

/// One handler's part of a workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub handler: String,
    pub params: Vec<Param>,
}

/// The jobs of one workflow, chained: each depends on the one before it.
pub fn plan(
    schema: &Schema,
    resource_id: &str,
    config: &ConfigEnvelope,
    action: Action,
    steps: &[Step],
) -> Vec<JobRecord> {
    let mut units: Vec<(&Step, Action, OnFailure)> = Vec::new();
    for step in steps {
        match action {
            Action::Modify if step.handler == MONITORING => {
                units.push((step, Action::Delete, OnFailure::Ignore));
                units.push((step, Action::Create, OnFailure::Fail));
            }
            _ => units.push((step, action, OnFailure::Fail)),
        }
    }
    if action == Action::LogicalDelete {
        // Tear down in the reverse order of creation.
        units.reverse();
    }
    let count = units.len();
    let mut previous: Option<String> = None;
    units
        .into_iter()
        .enumerate()
        .map(|(i, (step, job_action, on_failure))| {
            let id = JobId {
                action: job_action,
                handler: step.handler.clone(),
                resource_type: schema.id.clone(),
                resource_id: resource_id.to_string(),
                version: config.version,
                suffix: JobId::random_suffix(),
            };
            let job = Job {
                id: id.to_string(),
                job_name: id.job_name(),
                handler: step.handler.clone(),
                action: job_action,
                resource_type: schema.id.clone(),
                resource_id: resource_id.to_string(),
                version: config.version,
                is_first: i == 0,
                is_last: i + 1 == count,
                dependency: previous.iter().cloned().collect(),
                on_failure,
                params: step.params.clone(),
                resource_input: resource_input(config),
                workflow_action: (job_action != action).then_some(action),
            };
            previous = Some(job.id.clone());
            JobRecord {
                handler: step.handler.clone(),
                job,
                attempts: 0,
            }
        })
        .collect()
}

fn resource_input(config: &ConfigEnvelope) -> Map<String, Value> {
    config.body.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::SchemaRegistry;
    use serde_json::json;

    fn config(version: u64, deleted: bool) -> ConfigEnvelope {
        ConfigEnvelope {
            body: json!({"id": "r1"}).as_object().unwrap().clone(),
            version,
            marked_for_deletion: deleted,
        }
    }

    #[test]
    fn decide_follows_state_version_and_deletion_mark() {
        assert_eq!(decide(&config(1, false), None), Some(Action::Create));
        assert_eq!(decide(&config(2, false), Some(1)), Some(Action::Modify));
        assert_eq!(decide(&config(2, false), Some(2)), None);
        assert_eq!(
            decide(&config(3, true), Some(2)),
            Some(Action::LogicalDelete)
        );
        assert_eq!(decide(&config(3, true), Some(3)), None);
    }

    #[test]
    fn modify_of_a_monitored_resource_is_delete_then_create() {
        let reg = SchemaRegistry::built_in();
        let schema = reg.get("ha_interface").unwrap();
        let steps = [Step {
            handler: MONITORING.into(),
            params: vec![],
        }];
        let jobs = plan(schema, "r1", &config(2, false), Action::Modify, &steps);
        assert_eq!(jobs.len(), 2);
        let (first, last) = (&jobs[0].job, &jobs[1].job);
        assert_eq!(
            (
                first.action,
                first.on_failure,
                first.is_first,
                first.is_last
            ),
            (Action::Delete, OnFailure::Ignore, true, false)
        );
        assert_eq!(
            (last.action, last.on_failure, last.is_first, last.is_last),
            (Action::Create, OnFailure::Fail, false, true)
        );
        assert_eq!(last.dependency, vec![first.id.clone()]);
        assert_eq!(last.workflow_action(), Action::Modify);
        assert!(first
            .id
            .starts_with("delete:monitoring_worker:ha_interface:r1:2:"));
    }

    #[test]
    fn a_create_workflow_orders_handlers_and_chains_dependencies() {
        let reg = SchemaRegistry::built_in();
        let schema = reg.get("internet_gateway").unwrap();
        let steps = [
            Step {
                handler: "vlan_pool_worker".into(),
                params: vec![],
            },
            Step {
                handler: MONITORING.into(),
                params: vec![],
            },
        ];
        let jobs = plan(schema, "g", &config(1, false), Action::Create, &steps);
        assert_eq!(jobs[0].handler, "vlan_pool_worker");
        assert!(jobs[0].job.dependency.is_empty());
        assert_eq!(jobs[1].job.dependency, vec![jobs[0].job.id.clone()]);
        assert!(jobs[1].job.workflow_action.is_none());
        let deleted = plan(schema, "g", &config(2, true), Action::LogicalDelete, &steps);
        assert_eq!(
            deleted[0].handler, MONITORING,
            "teardown runs in reverse order"
        );
    }

    #[test]
    fn third_party_handlers_run_after_the_built_in_ones_by_name() {
        let served = [
            "zeta_worker",
            "monitoring_worker",
            "alpha_worker",
            "alpha_worker",
        ];
        assert_eq!(
            handler_order(served.map(String::from)),
            [
                "vlan_pool_worker",
                "heat_worker",
                "monitoring_worker",
                "alpha_worker",
                "zeta_worker"
            ]
        );
    }
}
