//! The heat template: read its config record, render `template_file`, parse the YAML.
//!
//! Templates were written for Python's Jinja2 and PyYAML, so rendering is lenient (an undefined
//! variable renders empty instead of failing the job) and YAML merge keys (`<<: *anchor`) are
//! applied. One deliberate difference from Jinja2: `none` renders empty rather than `None`, so a
//! param that resolved to null reaches the YAML as null instead of the string `"None"`.

use std::collections::BTreeMap;

use minijinja::value::{Serde, Value as JinjaValue};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::{Map, Value};

use super::{host_error, scalar_text, Job, JobError, RecordKind, RecordReader};

/// Resource type under which gohan stores heat templates.
const TEMPLATE_TYPE: &str = "heat_template";

/// A loaded heat template.
pub(crate) struct Template {
    /// `<resource_type>_monitoring`; every error about the template names it.
    pub(crate) id: String,
    /// The Jinja2 source of `template_file`.
    pub(crate) source: String,
}

impl Template {
    fn error(&self, message: impl std::fmt::Display) -> JobError {
        permanent(&self.id, message)
    }
}

fn permanent(id: &str, message: impl std::fmt::Display) -> JobError {
    JobError::Permanent(format!("heat template {id}: {message}"))
}

/// Reads the monitoring template of the job's resource type.
pub(crate) fn load(job: &Job, reader: &mut dyn RecordReader) -> Result<Template, JobError> {
    let id = format!("{}_monitoring", job.resource_type);
    let record = reader
        .read(RecordKind::Config, TEMPLATE_TYPE, &id)
        .map_err(|error| host_error(error, &format!("heat template {id}")))?
        .ok_or_else(|| permanent(&id, "does not exist"))?;
    let envelope: Value = serde_json::from_str(&record.value)
        .map_err(|error| permanent(&id, format!("config record is not valid JSON: {error}")))?;
    let body = envelope_body(&id, envelope)?;
    let source = match body.get("template_file") {
        Some(Value::String(source)) => source.clone(),
        Some(_) => return Err(permanent(&id, "body.template_file is not a string")),
        None => return Err(permanent(&id, "body has no template_file")),
    };
    Ok(Template { id, source })
}

/// The `body` of a gohan config envelope, which gohan stores as a JSON-encoded string and
/// documentation shows as an object.
fn envelope_body(id: &str, envelope: Value) -> Result<Map<String, Value>, JobError> {
    let body = match envelope {
        Value::Object(mut fields) => fields.remove("body"),
        _ => return Err(permanent(id, "config record is not a JSON object")),
    };
    let body = match body {
        Some(Value::String(text)) => serde_json::from_str(&text)
            .map_err(|error| permanent(id, format!("body string is not valid JSON: {error}")))?,
        Some(body) => body,
        None => return Err(permanent(id, "config record has no body")),
    };
    match body {
        Value::Object(body) => Ok(body),
        _ => Err(permanent(id, "body is not a JSON object")),
    }
}

/// Renders `template_file` for the job and parses the result into its top-level mapping, in
/// template order.
pub(crate) fn render_document(
    template: &Template,
    job: &Job,
) -> Result<Map<String, Value>, JobError> {
    let text = render(template, job)?;
    parse(template, &text)
}

fn render(template: &Template, job: &Job) -> Result<String, JobError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    // The output is YAML, not HTML: nothing may be escaped.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_formatter(|out, state, value| {
        let value = if value.is_none() {
            &JinjaValue::UNDEFINED
        } else {
            value
        };
        minijinja::escape_formatter(out, state, value)
    });
    env.render_named_str(&template.id, &template.source, context(job)?)
        .map_err(|error| template.error(format!("cannot render template_file: {error}")))
}

/// The render context: `resource` is the resource's config body, and each param is available
/// under its name (a param named `resource` wins, since params are what templates declare).
fn context(job: &Job) -> Result<BTreeMap<String, JinjaValue>, JobError> {
    let mut context = BTreeMap::new();
    context.insert(
        "resource".to_owned(),
        JinjaValue::from(Serde(&job.resource_input)),
    );
    for param in &job.params {
        if let Some(value) = param_value(job, param)? {
            context.insert(param.param.clone(), JinjaValue::from(Serde(value)));
        }
    }
    Ok(context)
}

/// The value a param stands for; `None` (undefined in the template) for an `output_key` whose
/// field is not in the job state yet.
fn param_value<'a>(job: &'a Job, param: &'a super::Param) -> Result<Option<&'a Value>, JobError> {
    if param.kind != "output_key" {
        return Ok(Some(&param.value));
    }
    let key = scalar_text(&param.value).ok_or_else(|| {
        JobError::Permanent(format!(
            "job {}: param {}: an output_key value must name a job_state field, got {}",
            job.id, param.param, param.value
        ))
    })?;
    Ok(job.job_state.get(&key))
}

/// Parses rendered YAML into its top-level mapping. An empty document (every item inside a
/// false `{% if %}`) has no items.
fn parse(template: &Template, text: &str) -> Result<Map<String, Value>, JobError> {
    let mut yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|error| {
        template.error(format!("rendered template_file is not valid YAML: {error}"))
    })?;
    yaml.apply_merge().map_err(|error| {
        template.error(format!("rendered template_file is not valid YAML: {error}"))
    })?;
    // serde_yaml_ng keeps mapping order and serde_json has preserve_order, so items stay in
    // template order, which decides the order of `state_monitoring`.
    let json = serde_json::to_value(&yaml).map_err(|error| {
        template.error(format!(
            "rendered template_file does not convert to JSON: {error}"
        ))
    })?;
    match json {
        Value::Object(document) => Ok(document),
        Value::Null => Ok(Map::new()),
        _ => Err(template.error("rendered template_file is not a YAML mapping")),
    }
}
