//! `/config/...` envelopes written by gohan, and heat templates.

use serde_json::{Map, Value};

use super::RecordError;

/// `{"body": <resource>, "version": N, "marked_for_deletion": bool}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigEnvelope {
    /// The resource body. gohan stores it as a JSON-encoded string; docs show an object. Both
    /// are accepted and it is always an object here.
    pub body: Map<String, Value>,
    pub version: u64,
    pub marked_for_deletion: bool,
}

impl ConfigEnvelope {
    /// Parses the value stored at `key`.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, RecordError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| RecordError::new(key, "", format!("not JSON: {e}")))?;
        let Value::Object(mut envelope) = value else {
            return Err(RecordError::new(key, "", "expected a JSON object"));
        };
        let body = match envelope.remove("body") {
            Some(Value::Object(body)) => body,
            Some(Value::String(text)) => parse_body_string(key, &text)?,
            Some(other) => {
                return Err(RecordError::new(
                    key,
                    "body",
                    format!(
                        "expected an object or a JSON string of one, found {}",
                        kind(&other)
                    ),
                ))
            }
            None => return Err(RecordError::new(key, "body", "missing")),
        };
        let version = match envelope.get("version") {
            Some(v) => v.as_u64().ok_or_else(|| {
                RecordError::new(
                    key,
                    "version",
                    format!("expected a non-negative integer, found {v}"),
                )
            })?,
            None => return Err(RecordError::new(key, "version", "missing")),
        };
        let marked_for_deletion = match envelope.get("marked_for_deletion") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(RecordError::new(
                    key,
                    "marked_for_deletion",
                    format!("expected true or false, found {v}"),
                ))
            }
        };
        Ok(ConfigEnvelope {
            body,
            version,
            marked_for_deletion,
        })
    }

    /// The body's `id` field, if it is a string.
    pub fn body_id(&self) -> Option<&str> {
        self.body.get("id").and_then(Value::as_str)
    }
}

fn parse_body_string(key: &str, text: &str) -> Result<Map<String, Value>, RecordError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(body)) => Ok(body),
        Ok(other) => Err(RecordError::new(
            key,
            "body",
            format!("the JSON string holds {}, expected an object", kind(&other)),
        )),
        Err(e) => Err(RecordError::new(
            key,
            "body",
            format!("string is not JSON: {e}"),
        )),
    }
}

pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A heat template body (`/config/v2.0/heat_templates/<id>`).
#[derive(Debug, Clone, PartialEq)]
pub struct HeatTemplate {
    pub id: String,
    pub handler: String,
    pub template_file: String,
    /// param name -> mapping, in template order (the order of a job's `params`).
    pub parameter_mappings: Map<String, Value>,
}

impl HeatTemplate {
    /// Reads a template from its config envelope.
    pub fn from_envelope(key: &str, envelope: &ConfigEnvelope) -> Result<Self, RecordError> {
        let text = |field: &str| -> Result<String, RecordError> {
            match envelope.body.get(field) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v) => Err(RecordError::new(
                    key,
                    &format!("body.{field}"),
                    format!("expected a string, found {}", kind(v)),
                )),
                None => Err(RecordError::new(key, &format!("body.{field}"), "missing")),
            }
        };
        let parameter_mappings = match envelope.body.get("parameter_mappings") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(v) => {
                return Err(RecordError::new(
                    key,
                    "body.parameter_mappings",
                    format!("expected an object, found {}", kind(v)),
                ))
            }
        };
        Ok(HeatTemplate {
            id: text("id")?,
            handler: text("handler")?,
            template_file: text("template_file").unwrap_or_default(),
            parameter_mappings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_may_be_an_object_or_a_json_string() {
        let object =
            br#"{"body": {"id": "a", "n": 1}, "version": 3, "marked_for_deletion": false}"#;
        let string = br#"{"body": "{\"id\": \"a\", \"n\": 1}", "version": 3}"#;
        let a = ConfigEnvelope::parse("/k", object).unwrap();
        let b = ConfigEnvelope::parse("/k", string).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.version, 3);
        assert_eq!(a.body_id(), Some("a"));
    }

    #[test]
    fn bad_body_names_key_and_field() {
        let err = ConfigEnvelope::parse("/config/v2.0/x/1", br#"{"body": "{oops", "version": 1}"#)
            .unwrap_err();
        assert_eq!(err.key, "/config/v2.0/x/1");
        assert_eq!(err.field, "body");
        let err = ConfigEnvelope::parse("/k", b"not json").unwrap_err();
        assert!(err.problem.contains("not JSON"), "{err}");
        let err = ConfigEnvelope::parse("/k", br#"{"body": {}, "version": "1"}"#).unwrap_err();
        assert_eq!(err.field, "version");
    }
}
