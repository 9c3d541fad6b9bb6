//! Heat templates: read one's config record, render its `template_file`, parse the YAML.
//!
//! Every plugin finds its template by id (`<resource_type>_monitoring`,
//! `<resource_type>_vlan_pool`, ...) under the `heat_template` resource type, renders it with the
//! job's params and reads the top-level mapping of the result.
//!
//! Templates were written for Python's Jinja2 and PyYAML, so rendering is lenient (an undefined
//! variable renders empty instead of failing the job) and YAML merge keys (`<<: *anchor`) are
//! applied. One deliberate difference from Jinja2: `none` renders empty rather than `None`, so a
//! param that resolved to null reaches the YAML as null instead of the string `"None"`.

use std::collections::BTreeMap;
use std::fmt::Display;

use minijinja::value::{Serde, Value as JinjaValue};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::{Map, Value};

use crate::{config_body, host_error, scalar_text, Job, JobError, Param, RecordKind, RecordReader};

/// Resource type under which gohan stores heat templates.
pub const TEMPLATE_TYPE: &str = "heat_template";

/// A loaded heat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The template id; every error about the template names it.
    pub id: String,
    /// The Jinja2 source of `template_file`.
    pub source: String,
}

impl Template {
    /// Reads the heat template `id`; `Ok(None)` when it does not exist.
    ///
    /// # Errors
    ///
    /// [`JobError::Retryable`] when etcd is unavailable; [`JobError::Permanent`] for any other
    /// failed read or a record without a string `template_file`.
    pub fn read(id: &str, reader: &mut dyn RecordReader) -> Result<Option<Template>, JobError> {
        let Some(record) = reader
            .read(RecordKind::Config, TEMPLATE_TYPE, id)
            .map_err(|error| host_error(error, &format!("heat template {id}")))?
        else {
            return Ok(None);
        };
        let body = config_body(&format!("heat template {id}"), &record.value)?;
        let source = match body.get("template_file") {
            Some(Value::String(source)) => source.clone(),
            Some(_) => return Err(permanent(id, "body.template_file is not a string")),
            None => return Err(permanent(id, "body has no template_file")),
        };
        Ok(Some(Template {
            id: id.to_owned(),
            source,
        }))
    }

    /// Reads the heat template `id`, which must exist.
    ///
    /// # Errors
    ///
    /// As [`Template::read`], and [`JobError::Permanent`] `heat template <id>: does not exist`.
    pub fn load(id: &str, reader: &mut dyn RecordReader) -> Result<Template, JobError> {
        Template::read(id, reader)?.ok_or_else(|| permanent(id, "does not exist"))
    }

    /// A permanent error about this template: `heat template <id>: <message>`.
    pub fn error(&self, message: impl Display) -> JobError {
        permanent(&self.id, message)
    }

    /// Renders `template_file` for the job and parses the result into its top-level mapping, in
    /// template order. An empty document (every item inside a false `{% if %}`) is an empty map.
    ///
    /// The render context holds `resource` (the resource's config body) and each param under
    /// its name; an `output_key` param stands for that field of the job state (undefined while
    /// the field is not there).
    ///
    /// # Errors
    ///
    /// [`JobError::Permanent`] naming the template when it does not render, is not YAML or not a
    /// mapping, or naming the param when an `output_key` value is not a field name.
    pub fn render_document(&self, job: &Job) -> Result<Map<String, Value>, JobError> {
        let text = self.render(job)?;
        self.parse(&text)
    }

    /// Renders without Jinja's builtin filters, tests and functions first, and with them only
    /// if the template calls one. Most heat templates only substitute variables, and a plugin
    /// runs in a fresh instance per job, where minijinja builds its tables of builtins (about
    /// a hundred map entries, each allocated) again every time. A template that calls a
    /// builtin fails the first render on the call itself, so the second render, with every
    /// builtin, gives exactly what a single one with them would.
    fn render(&self, job: &Job) -> Result<String, JobError> {
        let context = context(job, &self.source)?;
        let first =
            configured(Environment::empty()).render_named_str(&self.id, &self.source, &context);
        let rendered = match first {
            Err(error) if needs_builtins(&error) => {
                configured(Environment::new()).render_named_str(&self.id, &self.source, &context)
            }
            other => other,
        };
        rendered.map_err(|error| self.error(format!("cannot render template_file: {error}")))
    }

    fn parse(&self, text: &str) -> Result<Map<String, Value>, JobError> {
        let not_yaml = |error: serde_yaml_ng::Error| {
            self.error(format!("rendered template_file is not valid YAML: {error}"))
        };
        let mut yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(not_yaml)?;
        yaml.apply_merge().map_err(not_yaml)?;
        // serde_yaml_ng keeps mapping order and serde_json has preserve_order, so items stay in
        // template order, which decides the order of a plugin's output.
        let json = serde_json::to_value(&yaml).map_err(|error| {
            self.error(format!(
                "rendered template_file does not convert to JSON: {error}"
            ))
        })?;
        match json {
            Value::Object(document) => Ok(document),
            Value::Null => Ok(Map::new()),
            _ => Err(self.error("rendered template_file is not a YAML mapping")),
        }
    }
}

/// `env` set up to render heat templates: lenient about undefined variables, escaping
/// nothing (the output is YAML, not HTML), and `none` rendered empty.
fn configured(mut env: Environment<'_>) -> Environment<'_> {
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_formatter(|out, state, value| {
        let value = if value.is_none() {
            &JinjaValue::UNDEFINED
        } else {
            value
        };
        minijinja::escape_formatter(out, state, value)
    });
    env
}

/// Whether a render failed for want of a builtin filter, test or function.
fn needs_builtins(error: &minijinja::Error) -> bool {
    use minijinja::ErrorKind::{UnknownFilter, UnknownFunction, UnknownTest};
    matches!(error.kind(), UnknownFilter | UnknownTest | UnknownFunction)
}

fn permanent(id: &str, message: impl Display) -> JobError {
    JobError::Permanent(format!("heat template {id}: {message}"))
}

/// The render context of `source`: `resource` is the resource's config body, and each param
/// is available under its name (a param named `resource` wins, since params are what templates
/// declare).
///
/// Only the names `source` contains go in. A template looks a variable up by its name, so one
/// whose name it does not contain is never looked up (no loader is configured, so nothing is
/// included or imported), and leaving it out renders the same; only `debug()` would show the
/// difference. Converting the config body into Jinja values took a VLAN job longer than the
/// render itself, and most heat templates never name `resource`. Every param is still checked.
fn context(job: &Job, source: &str) -> Result<BTreeMap<String, JinjaValue>, JobError> {
    let mut context = BTreeMap::new();
    if source.contains("resource") {
        context.insert(
            "resource".to_owned(),
            JinjaValue::from(Serde(&job.resource_input)),
        );
    }
    for param in &job.params {
        if let Some(value) = param_value(job, param)? {
            if source.contains(param.param.as_str()) {
                context.insert(param.param.clone(), JinjaValue::from(Serde(value)));
            }
        }
    }
    Ok(context)
}

/// The value a param stands for; `None` (undefined in the template) for an `output_key` whose
/// field is not in the job state yet.
fn param_value<'a>(job: &'a Job, param: &'a Param) -> Result<Option<&'a Value>, JobError> {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{HostError, Versioned};

    /// A store holding at most one heat template.
    struct OneTemplate(Option<String>);

    impl RecordReader for OneTemplate {
        fn read(
            &mut self,
            kind: RecordKind,
            resource_type: &str,
            _: &str,
        ) -> Result<Option<Versioned>, HostError> {
            assert_eq!((kind, resource_type), (RecordKind::Config, TEMPLATE_TYPE));
            Ok(self.0.clone().map(|value| Versioned {
                value,
                mod_revision: 1,
            }))
        }
    }

    fn stored(template_file: &str) -> OneTemplate {
        let body = json!({"id": "t", "template_file": template_file});
        OneTemplate(Some(
            json!({"body": body.to_string(), "version": 1}).to_string(),
        ))
    }

    /// Whatever the template calls, rendering without builtins first changes nothing: each
    /// template here renders exactly as it does with every builtin from the start, errors
    /// included.
    #[test]
    fn templates_render_the_same_with_or_without_the_builtins_first() {
        let sources = [
            "a:\n  v: {{ resource.name }}\n",
            "a:\n  v: {{ resource.name | upper }}\n",
            "a:\n  v: {{ missing | default('fallback') }}\n",
            "{% if resource.name is defined %}a: {{ resource.name }}{% endif %}\n",
            "{% for i in range(2) %}i{{ i }}: {{ loop.index }}\n{% endfor %}",
            "{% if false %}{{ x | no_such_filter }}{% endif %}a: 1\n",
            "a: {{ x | no_such_filter }}\n",
            "a: {{ no_such_function() }}\n",
            "a: {{ resource.name ~ '-' ~ missing }}\n",
        ];
        let job = Job {
            resource_input: json!({"name": "r1"}),
            ..Job::default()
        };
        assert_each_renders_as_in_one_full_pass(&sources, &job);
    }

    /// The context as it was before names the source does not contain were left out.
    fn full_context(job: &Job) -> BTreeMap<String, JinjaValue> {
        let mut context = BTreeMap::new();
        context.insert(
            "resource".to_owned(),
            JinjaValue::from(Serde(&job.resource_input)),
        );
        for param in &job.params {
            if let Some(value) = param_value(job, param).unwrap() {
                context.insert(param.param.clone(), JinjaValue::from(Serde(value)));
            }
        }
        context
    }

    /// Leaving out of the context the names a template does not contain changes no render:
    /// each template here renders as it does with every name in the context.
    #[test]
    fn templates_render_the_same_with_only_the_names_they_contain() {
        let sources = [
            "a: {{ resource.name }}\nb: {{ port }}\n",
            "a: {{ port_id }}\nb: {{ port }}\n",
            "a: {{ resource_id }}\n",
            "a: {{ port }}\n",
            "a: fixed\n",
            "{% for k, v in resource | items %}{{ k }}: {{ v }}\n{% endfor %}",
            "{% set port = 'shadowed' %}a: {{ port }}\n",
            "a: {{ resource.name ~ '-' ~ other }}\n",
        ];
        let param = |name: &str, value: Value| Param {
            param: name.into(),
            kind: "value".into(),
            value,
            resources: vec![],
        };
        let job = Job {
            resource_input: json!({"name": "r1", "tenant_id": "t1"}),
            params: vec![param("port", json!("p1")), param("port_id", json!(7))],
            ..Job::default()
        };
        assert_each_renders_as_in_one_full_pass(&sources, &job);
    }

    /// Each source renders for `job` (errors included) exactly as it does in one pass with
    /// every builtin and every name in the context.
    fn assert_each_renders_as_in_one_full_pass(sources: &[&str], job: &Job) {
        for &source in sources {
            let template = Template {
                id: "t".into(),
                source: source.into(),
            };
            let in_one_full_pass = configured(Environment::new())
                .render_named_str("t", source, full_context(job))
                .map_err(|error| template.error(format!("cannot render template_file: {error}")));
            assert_eq!(template.render(job), in_one_full_pass, "{source}");
        }
    }

    #[test]
    fn an_unused_output_key_param_that_names_no_field_still_fails_the_job() {
        let template = Template::load("t", &mut stored("a: 1\n")).expect("the template loads");
        let job = Job {
            params: vec![Param {
                param: "unused".into(),
                kind: "output_key".into(),
                value: json!({"not": "a field name"}),
                resources: vec![],
            }],
            ..Job::default()
        };
        let error = template.render_document(&job).unwrap_err().to_string();
        assert!(error.contains("param unused"), "{error}");
    }

    #[test]
    fn a_missing_template_reads_as_none_and_fails_to_load() {
        assert_eq!(Template::read("t", &mut OneTemplate(None)), Ok(None));
        let error = Template::load("t", &mut OneTemplate(None)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "permanent: heat template t: does not exist"
        );
    }

    #[test]
    fn null_params_render_as_yaml_null_in_template_order() {
        let template = Template::load("t", &mut stored("b:\n  v: {{ x }}\na:\n  v: {{ y }}\n"))
            .expect("the template loads");
        let job = Job {
            params: vec![
                Param {
                    param: "x".into(),
                    kind: "value".into(),
                    value: Value::Null,
                    resources: vec![],
                },
                Param {
                    param: "y".into(),
                    kind: "output_key".into(),
                    value: json!("out"),
                    resources: vec![],
                },
            ],
            job_state: json!({"out": 122}),
            ..Job::default()
        };
        let document = template.render_document(&job).expect("it renders");
        assert_eq!(
            Value::Object(document.clone()),
            json!({"b": {"v": null}, "a": {"v": 122}})
        );
        assert_eq!(document.keys().collect::<Vec<_>>(), ["b", "a"]);
    }
}
