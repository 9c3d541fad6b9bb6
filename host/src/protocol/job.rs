//! Job records (`/jobs/all/<id>` = `[handler, job, attempts]`) and job ids.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::RecordError;

/// What a job (or a workflow) does to its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Modify,
    Delete,
    LogicalDelete,
}

impl Action {
    /// The spelling used in job ids and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Modify => "modify",
            Action::Delete => "delete",
            Action::LogicalDelete => "logical_delete",
        }
    }

    /// `CREATE_COMPLETED` and friends, for `/state` `worker_state`.
    pub fn completed_state(self) -> String {
        format!("{}_COMPLETED", self.as_str().to_ascii_uppercase())
    }

    /// `CREATE_FAILED` and friends.
    pub fn failed_state(self) -> String {
        format!("{}_FAILED", self.as_str().to_ascii_uppercase())
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "create" => Ok(Action::Create),
            "modify" => Ok(Action::Modify),
            "delete" => Ok(Action::Delete),
            "logical_delete" => Ok(Action::LogicalDelete),
            other => Err(format!(
                "unknown action {other:?} (expected create, modify, delete or logical_delete)"
            )),
        }
    }
}

/// What a failed job does to its workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The workflow fails (`<ACTION>_FAILED`).
    #[default]
    Fail,
    /// The job counts as finished and the workflow goes on.
    Ignore,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Fail => "fail",
            OnFailure::Ignore => "ignore",
        }
    }
}

/// A resource a parameter value depended on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceRef {
    pub resource_type: String,
    pub resource_id: String,
}

/// One resolved template parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Param {
    pub param: String,
    /// `value` or `output_key`.
    #[serde(rename = "type")]
    pub kind: String,
    pub value: Value,
    #[serde(default)]
    pub resources: Vec<ResourceRef>,
}

impl Job {
    /// The `(resource_type, resource_id)` of every resource its params name, in order.
    pub fn param_resources(&self) -> Vec<(String, String)> {
        self.params
            .iter()
            .flat_map(|p| &p.resources)
            .map(|r| (r.resource_type.clone(), r.resource_id.clone()))
            .collect()
    }
}

/// The job object (second element of the `/jobs/all` array).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub job_name: String,
    pub handler: String,
    pub action: Action,
    pub resource_type: String,
    pub resource_id: String,
    pub version: u64,
    pub is_first: bool,
    pub is_last: bool,
    #[serde(default)]
    pub dependency: Vec<String>,
    #[serde(default)]
    pub on_failure: OnFailure,
    #[serde(default)]
    pub params: Vec<Param>,
    #[serde(default)]
    pub resource_input: Map<String, Value>,
    /// The action of the whole workflow, when it differs from the job's own (a modify
    /// workflow is made of `delete` and `create` monitoring jobs). **ours**: absent in the
    /// original records, so it is only written when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_action: Option<Action>,
}

impl Job {
    /// The action `/state` `worker_state` reports for the workflow this job belongs to.
    pub fn workflow_action(&self) -> Action {
        self.workflow_action.unwrap_or(self.action)
    }
}

/// `[handler, job, attempts]`, exactly as the original job manager stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub handler: String,
    pub job: Job,
    /// Previous attempts of this job (**ours**: the original always wrote 0).
    pub attempts: u32,
}

impl JobRecord {
    /// Parses the value stored at `key`.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, RecordError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| RecordError::new(key, "", format!("not JSON: {e}")))?;
        let Value::Array(items) = value else {
            return Err(RecordError::new(
                key,
                "",
                "expected the array [handler, job, attempts]",
            ));
        };
        if items.len() != 3 {
            return Err(RecordError::new(
                key,
                "",
                format!(
                    "expected the array [handler, job, attempts], found {} elements",
                    items.len()
                ),
            ));
        }
        let mut items = items.into_iter();
        let handler = match items.next() {
            Some(Value::String(h)) => h,
            _ => return Err(RecordError::new(key, "[0]", "handler must be a string")),
        };
        let job: Job = items
            .next()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| RecordError::new(key, "[1]", e.to_string()))?
            .ok_or_else(|| RecordError::new(key, "[1]", "missing"))?;
        let attempts = items
            .next()
            .and_then(|v| v.as_u64())
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                RecordError::new(key, "[2]", "attempts must be a small non-negative integer")
            })?;
        Ok(JobRecord {
            handler,
            job,
            attempts,
        })
    }

    /// The stored JSON text.
    pub fn to_json(&self) -> String {
        let value = serde_json::json!([self.handler, self.job, self.attempts]);
        value.to_string()
    }
}

/// `<action>:<handler>:<singular>:<resource_id>:<version>:<5 random [a-z0-9]>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobId {
    pub action: Action,
    pub handler: String,
    pub resource_type: String,
    pub resource_id: String,
    pub version: u64,
    pub suffix: String,
}

impl JobId {
    /// `<singular>:<resource_id>:<version>`.
    pub fn job_name(&self) -> String {
        format!(
            "{}:{}:{}",
            self.resource_type, self.resource_id, self.version
        )
    }

    /// A fresh random 5-character suffix.
    pub fn random_suffix() -> String {
        use rand::Rng;
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::rng();
        (0..5)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}:{}:{}",
            self.action,
            self.handler,
            self.resource_type,
            self.resource_id,
            self.version,
            self.suffix
        )
    }
}

impl FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let [action, handler, resource_type, resource_id, version, suffix] = parts[..] else {
            return Err(format!(
                "job id {s:?} does not have the form action:handler:type:resource_id:version:suffix"
            ));
        };
        let version = version
            .parse()
            .map_err(|_| format!("job id {s:?}: version {version:?} is not a number"))?;
        Ok(JobId {
            action: action.parse().map_err(|e| format!("job id {s:?}: {e}"))?,
            handler: handler.to_string(),
            resource_type: resource_type.to_string(),
            resource_id: resource_id.to_string(),
            version,
            suffix: suffix.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_round_trips() {
        let s =
            "create:monitoring_worker:ha_interface:372ed357-e622-41fb-a613-076d332838e2:1:zv0bv";
        let id: JobId = s.parse().unwrap();
        assert_eq!(id.action, Action::Create);
        assert_eq!(
            id.job_name(),
            "ha_interface:372ed357-e622-41fb-a613-076d332838e2:1"
        );
        assert_eq!(id.to_string(), s);
        assert!("create:x".parse::<JobId>().is_err());
        assert!("explode:h:t:i:1:abcde".parse::<JobId>().is_err());
    }

    #[test]
    fn random_suffix_is_five_lowercase_alphanumerics() {
        let s = JobId::random_suffix();
        assert_eq!(s.len(), 5);
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    }

    #[test]
    fn job_record_with_a_missing_field_names_it() {
        let err = JobRecord::parse("/jobs/all/x", br#"["h", {"id": "x"}, 0]"#).unwrap_err();
        assert_eq!(err.field, "[1]");
        assert!(err.problem.contains("missing field"), "{err}");
        let err = JobRecord::parse("/jobs/all/x", br#"["h", {}]"#).unwrap_err();
        assert!(err.problem.contains("2 elements"), "{err}");
    }

    #[test]
    fn workflow_action_is_only_written_when_it_differs() {
        let job = Job {
            id: "i".into(),
            job_name: "n".into(),
            handler: "h".into(),
            action: Action::Create,
            resource_type: "t".into(),
            resource_id: "r".into(),
            version: 1,
            is_first: true,
            is_last: true,
            dependency: vec![],
            on_failure: OnFailure::Fail,
            params: vec![],
            resource_input: Map::new(),
            workflow_action: None,
        };
        let record = JobRecord {
            handler: "h".into(),
            job,
            attempts: 0,
        };
        let text = record.to_json();
        assert!(!text.contains("workflow_action"));
        assert_eq!(JobRecord::parse("/k", text.as_bytes()).unwrap(), record);
    }
}
