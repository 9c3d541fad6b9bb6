//! `/state/...` records: the worker's answer to gohan.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::RecordError;

/// `{"state": {...}, "version": N, "error": ""}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    /// Each job-state field as a JSON string, plus `worker_state`.
    pub state: Map<String, Value>,
    /// The config version realised (gohan ignores a state whose version it has already seen).
    pub version: u64,
    #[serde(default)]
    pub error: String,
}

impl StateRecord {
    /// The state of a completed workflow: every job-state field JSON-encoded as a string.
    pub fn completed(job_state: &Map<String, Value>, worker_state: String, version: u64) -> Self {
        let mut state: Map<String, Value> = job_state
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(python_style_json(v))))
            .collect();
        state.insert("worker_state".into(), Value::String(worker_state));
        StateRecord {
            state,
            version,
            error: String::new(),
        }
    }

    /// A state with only `worker_state` (READ_COMPLETE, *_FAILED).
    pub fn bare(worker_state: &str, version: u64, error: String) -> Self {
        let mut state = Map::new();
        state.insert(
            "worker_state".into(),
            Value::String(worker_state.to_string()),
        );
        StateRecord {
            state,
            version,
            error,
        }
    }

    /// Parses the value stored at `key`.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, RecordError> {
        serde_json::from_slice(bytes).map_err(|e| RecordError::new(key, "", e.to_string()))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|_| unreachable!("maps of JSON values always serialise"))
    }
}

/// JSON text the way the original Python worker wrote it (`json.dumps`: `", "` and `": "`
/// separators), so operators comparing records byte for byte see the seed's spelling:
/// `"{\"primary\": \"ACTIVE\", \"secondary\": \"ACTIVE\"}"`.
pub fn python_style_json(value: &Value) -> String {
    let mut out = String::new();
    write_python_style(value, &mut out);
    out
}

fn write_python_style(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_style(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_style(v, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn completed_state_matches_the_seed_record_4() {
        let job_state = json!({"state_monitoring": {"primary": "ACTIVE", "secondary": "ACTIVE"}});
        let state =
            StateRecord::completed(job_state.as_object().unwrap(), "CREATE_COMPLETED".into(), 1);
        let expected = json!({
            "state": {
                "state_monitoring": "{\"primary\": \"ACTIVE\", \"secondary\": \"ACTIVE\"}",
                "worker_state": "CREATE_COMPLETED"
            },
            "version": 1,
            "error": ""
        });
        assert_eq!(
            serde_json::from_str::<Value>(&state.to_json()).unwrap(),
            expected
        );
    }
}
