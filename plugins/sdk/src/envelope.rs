//! The gohan config envelope, `{"body": <resource>, "version": N, "marked_for_deletion": bool}`
//! (PROTOCOL section 3).

use serde_json::{Map, Value};

use crate::JobError;

/// The `body` of a config record's JSON text. gohan stores `body` as a JSON-encoded string while
/// documentation shows it as an object, so both are accepted.
///
/// # Errors
///
/// [`JobError::Permanent`], prefixed with `what` (e.g. `heat template x_monitoring`), when the
/// text is not JSON, has no body, or the body is not an object: a retry would read the same.
///
/// # Examples
///
/// ```
/// use esi_plugin_sdk::config_body;
///
/// let object = config_body("ha_interface x", r#"{"body": {"id": "x"}, "version": 1}"#).unwrap();
/// let string = config_body("ha_interface x", r#"{"body": "{\"id\": \"x\"}"}"#).unwrap();
/// assert_eq!(object, string);
/// let error = config_body("ha_interface x", r#"{"version": 1}"#).unwrap_err();
/// assert_eq!(error.to_string(), "permanent: ha_interface x: config record has no body");
/// ```
pub fn config_body(what: &str, text: &str) -> Result<Map<String, Value>, JobError> {
    let permanent = |message: String| JobError::Permanent(format!("{what}: {message}"));
    let envelope: Value = serde_json::from_str(text)
        .map_err(|error| permanent(format!("config record is not valid JSON: {error}")))?;
    let body = match envelope {
        Value::Object(mut fields) => fields.remove("body"),
        _ => return Err(permanent("config record is not a JSON object".to_owned())),
    };
    let body = match body {
        Some(Value::String(text)) => serde_json::from_str(&text)
            .map_err(|error| permanent(format!("body string is not valid JSON: {error}")))?,
        Some(body) => body,
        None => return Err(permanent("config record has no body".to_owned())),
    };
    match body {
        Value::Object(body) => Ok(body),
        _ => Err(permanent("body is not a JSON object".to_owned())),
    }
}
