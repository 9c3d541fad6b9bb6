//! Resolution of a heat template's `parameter_mappings` against a resource (PROTOCOL 4.4).
//!
//! This is a pure function: it reads related resources through [`ConfigLookup`], which
//! answers from whatever the caller has loaded. When a related config is not loaded yet the
//! resolution stops with [`ResolveError::NeedConfig`]; the caller fetches it and calls again.
//! That keeps etcd out of this module and lets the job manager fetch exactly the configs a
//! template walks through, no more.

use serde_json::{Map, Value};

use crate::protocol::{Param, ResourceRef};
use crate::schema::SchemaRegistry;

/// What the caller knows about a related resource's config.
pub enum Lookup<'a> {
    /// The config body.
    Found(&'a Map<String, Value>),
    /// The resource has no config in etcd.
    Absent,
    /// Not loaded yet: resolution asks for it with [`ResolveError::NeedConfig`].
    NotLoaded,
}

/// Related-resource configs, by schema id and resource id.
pub trait ConfigLookup {
    fn config(&self, resource_type: &str, resource_id: &str) -> Lookup<'_>;
}

/// Why a mapping could not be resolved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResolveError {
    /// Load this config and resolve again.
    #[error("config of {resource_type} {resource_id} is needed")]
    NeedConfig {
        resource_type: String,
        resource_id: String,
    },
    /// A related resource does not exist (yet): gohan may still be writing it.
    #[error("parameter {param:?}: related {resource_type} {resource_id} (via field {field:?}) has no config")]
    MissingRelated {
        param: String,
        field: String,
        resource_type: String,
        resource_id: String,
    },
    /// The template or the resource is wrong; retrying will not help.
    #[error("parameter {param:?}: {problem}")]
    Invalid { param: String, problem: String },
    /// A related resource's config, needed to resolve the parameters, does not parse; the
    /// error names its key and field.
    #[error("related config {0}")]
    BadRelated(String),
}

/// Resolves every mapping of a template, in template order.
pub fn resolve_params(
    mappings: &Map<String, Value>,
    resource_type: &str,
    body: &Map<String, Value>,
    schemas: &SchemaRegistry,
    lookup: &dyn ConfigLookup,
) -> Result<Vec<Param>, ResolveError> {
    mappings
        .iter()
        .map(|(name, mapping)| {
            let resolver = Resolver {
                param: name,
                schemas,
                lookup,
            };
            let start = Subject {
                resource_type,
                body,
            };
            if let Some(key) = mapping.get("output_key") {
                return Ok(Param {
                    param: name.clone(),
                    kind: "output_key".into(),
                    value: key.clone(),
                    resources: vec![],
                });
            }
            let resolved = resolver.eval(mapping, start)?;
            Ok(Param {
                param: name.clone(),
                kind: "value".into(),
                value: resolved.value,
                resources: resolved.resources,
            })
        })
        .collect()
}

/// The resource a mapping is evaluated against.
#[derive(Clone, Copy)]
struct Subject<'a> {
    resource_type: &'a str,
    body: &'a Map<String, Value>,
}

struct Resolved {
    value: Value,
    resources: Vec<ResourceRef>,
}

impl Resolved {
    fn plain(value: Value) -> Self {
        Resolved {
            value,
            resources: vec![],
        }
    }

    fn add(&mut self, more: Vec<ResourceRef>) {
        for r in more {
            if !self.resources.contains(&r) {
                self.resources.push(r);
            }
        }
    }
}

struct Resolver<'a> {
    param: &'a str,
    schemas: &'a SchemaRegistry,
    lookup: &'a dyn ConfigLookup,
}

impl<'a> Resolver<'a> {
    fn invalid(&self, problem: impl Into<String>) -> ResolveError {
        ResolveError::Invalid {
            param: self.param.to_string(),
            problem: problem.into(),
        }
    }

    fn eval(&self, mapping: &Value, at: Subject<'_>) -> Result<Resolved, ResolveError> {
        let Value::Object(m) = mapping else {
            // A bare string or number inside concatenate/if/path is a literal.
            return Ok(Resolved::plain(mapping.clone()));
        };
        let ignore_missing = m.get("ignore_missing").and_then(Value::as_bool) == Some(true);
        let result = if let Some(field) = m.get("field") {
            self.field(field, m.get("path"), at)
        } else if let Some(c) = m.get("constant") {
            Ok(Resolved::plain(c.clone()))
        } else if let Some(parts) = m.get("concatenate") {
            self.concatenate(parts, at)
        } else if let Some(cond) = m.get("if_mapping") {
            self.conditional(cond, m, at)
        } else if let Some(path) = m.get("nested") {
            self.nested(path, at)
        } else if let Some(field) = m.get("for_field") {
            self.for_each(field, m.get("for_mapping"), at)
        } else {
            let keys: Vec<&String> = m.keys().collect();
            Err(self.invalid(format!("unknown mapping with keys {keys:?}")))
        };
        match result {
            Err(ResolveError::Invalid { .. }) | Err(ResolveError::MissingRelated { .. })
                if ignore_missing =>
            {
                Ok(Resolved::plain(Value::Null))
            }
            other => other,
        }
    }

    fn field(
        &self,
        field: &Value,
        path: Option<&Value>,
        at: Subject<'_>,
    ) -> Result<Resolved, ResolveError> {
        let mut resolved = Resolved::plain(Value::Null);
        let mut here_type = at.resource_type.to_string();
        let mut here_body = at.body;
        for hop in path
            .map(|p| self.path_elements(p))
            .transpose()?
            .unwrap_or_default()
        {
            let step = self.eval(hop, at)?;
            let Value::String(hop_field) = step.value else {
                return Err(self.invalid(format!(
                    "path element must resolve to a string, found {}",
                    step.value
                )));
            };
            resolved.add(step.resources);
            let (target, body) = self.follow(&here_type, here_body, &hop_field)?;
            resolved.add(vec![target.clone()]);
            here_type = target.resource_type;
            here_body = body;
        }
        let name = self.eval_to_string(field, at, "field")?;
        let value = here_body
            .get(&name)
            .cloned()
            .ok_or_else(|| self.invalid(format!("{here_type} has no field {name:?}")))?;
        if let Some(target) = self.relation_target(&here_type, &name, &value) {
            resolved.add(vec![target]);
        }
        resolved.value = value;
        Ok(resolved)
    }

    fn path_elements<'v>(&self, path: &'v Value) -> Result<Vec<&'v Value>, ResolveError> {
        match path {
            Value::Array(items) => Ok(items.iter().collect()),
            Value::String(_) => Ok(vec![path]),
            other => Err(self.invalid(format!("path must be a list, found {other}"))),
        }
    }

    /// Follows relation field `field` of a resource to the related resource's config.
    fn follow<'b>(
        &'b self,
        resource_type: &str,
        body: &Map<String, Value>,
        field: &str,
    ) -> Result<(ResourceRef, &'b Map<String, Value>), ResolveError> {
        let schema = self
            .schemas
            .get(resource_type)
            .ok_or_else(|| self.invalid(format!("unknown resource type {resource_type:?}")))?;
        let target_type = schema.relations.get(field).ok_or_else(|| {
            self.invalid(format!(
                "field {field:?} of {resource_type} is not a relation in the schema"
            ))
        })?;
        let id = match body.get(field) {
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            _ => {
                return Err(self.invalid(format!(
                    "relation field {field:?} of {resource_type} is missing or empty"
                )))
            }
        };
        match self.lookup.config(target_type, &id) {
            Lookup::Found(b) => Ok((
                ResourceRef {
                    resource_type: target_type.clone(),
                    resource_id: id,
                },
                b,
            )),
            Lookup::NotLoaded => Err(ResolveError::NeedConfig {
                resource_type: target_type.clone(),
                resource_id: id,
            }),
            Lookup::Absent => Err(ResolveError::MissingRelated {
                param: self.param.to_string(),
                field: field.to_string(),
                resource_type: target_type.clone(),
                resource_id: id,
            }),
        }
    }

    fn relation_target(
        &self,
        resource_type: &str,
        field: &str,
        value: &Value,
    ) -> Option<ResourceRef> {
        let target = self.schemas.get(resource_type)?.relations.get(field)?;
        match value {
            Value::String(id) if !id.is_empty() => Some(ResourceRef {
                resource_type: target.clone(),
                resource_id: id.clone(),
            }),
            _ => None,
        }
    }

    fn eval_to_string(
        &self,
        mapping: &Value,
        at: Subject<'_>,
        what: &str,
    ) -> Result<String, ResolveError> {
        match self.eval(mapping, at)?.value {
            Value::String(s) => Ok(s),
            other => Err(self.invalid(format!("{what} must resolve to a string, found {other}"))),
        }
    }

    fn concatenate(&self, parts: &Value, at: Subject<'_>) -> Result<Resolved, ResolveError> {
        let Value::Array(parts) = parts else {
            return Err(self.invalid("concatenate must be a list"));
        };
        let mut out = Resolved::plain(Value::Null);
        let mut text = String::new();
        for part in parts {
            let r = self.eval(part, at)?;
            text.push_str(&as_text(&r.value));
            out.add(r.resources);
        }
        out.value = Value::String(text);
        Ok(out)
    }

    fn conditional(
        &self,
        cond: &Value,
        m: &Map<String, Value>,
        at: Subject<'_>,
    ) -> Result<Resolved, ResolveError> {
        let (op, operands) = match cond {
            Value::Object(c) if c.len() == 1 => c
                .iter()
                .next()
                .map(|(k, v)| (k.as_str(), v))
                .unwrap_or(("", cond)),
            _ => return Err(self.invalid("if_mapping must be {\"equal\"|\"regexp\": [a, b]}")),
        };
        let Some([a, b]) = operands.as_array().map(Vec::as_slice) else {
            return Err(self.invalid(format!("if_mapping.{op} must be a list of two mappings")));
        };
        let (a, b) = (self.eval(a, at)?, self.eval(b, at)?);
        let holds = match op {
            "equal" => a.value == b.value,
            "regexp" => {
                let pattern = as_text(&b.value);
                let re = regex::Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| self.invalid(format!("bad regexp {pattern:?}: {e}")))?;
                re.is_match(&as_text(&a.value))
            }
            other => return Err(self.invalid(format!("unknown if_mapping operator {other:?}"))),
        };
        let branch = if holds {
            "then_mapping"
        } else {
            "else_mapping"
        };
        let mut out = match m.get(branch) {
            Some(next) => self.eval(next, at)?,
            None => Resolved::plain(Value::Null),
        };
        out.add(a.resources);
        out.add(b.resources);
        Ok(out)
    }

    fn nested(&self, path: &Value, at: Subject<'_>) -> Result<Resolved, ResolveError> {
        let Value::Array(steps) = path else {
            return Err(self.invalid("nested must be a list of field names"));
        };
        let mut here = Value::Object(at.body.clone());
        for step in steps {
            let name = as_text(step);
            here = here
                .get(&name)
                .cloned()
                .ok_or_else(|| self.invalid(format!("nested field {name:?} is missing")))?;
        }
        Ok(Resolved::plain(here))
    }

    fn for_each(
        &self,
        field: &Value,
        each: Option<&Value>,
        at: Subject<'_>,
    ) -> Result<Resolved, ResolveError> {
        let name = as_text(field);
        let items = match at.body.get(&name) {
            Some(Value::Array(items)) => items,
            _ => return Err(self.invalid(format!("for_field {name:?} must be a list"))),
        };
        let each = each.ok_or_else(|| self.invalid("for_field needs a for_mapping"))?;
        let mut out = Resolved::plain(Value::Null);
        let mut values = Vec::new();
        for item in items {
            let Value::Object(item) = item else {
                values.push(item.clone());
                continue;
            };
            let r = self.eval(
                each,
                Subject {
                    resource_type: at.resource_type,
                    body: item,
                },
            )?;
            values.push(r.value);
            out.add(r.resources);
        }
        out.value = Value::Array(values);
        Ok(out)
    }
}

fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct Loaded(HashMap<(String, String), Map<String, Value>>);

    impl ConfigLookup for Loaded {
        fn config(&self, t: &str, id: &str) -> Lookup<'_> {
            match self.0.get(&(t.to_string(), id.to_string())) {
                Some(b) => Lookup::Found(b),
                None if id.starts_with("absent") => Lookup::Absent,
                None => Lookup::NotLoaded,
            }
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn field_with_relation_lists_the_related_resource() {
        let schemas = SchemaRegistry::built_in();
        let mappings = obj(json!({
            "primary_interface_id": {"field": "primary_interface_id"},
            "secondary_interface_id": {"field": "secondary_interface_id"}
        }));
        let body = obj(json!({"primary_interface_id": "p", "secondary_interface_id": "s"}));
        let params = resolve_params(
            &mappings,
            "ha_interface",
            &body,
            &schemas,
            &Loaded(HashMap::new()),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&params).unwrap(),
            json!([
                {"param": "primary_interface_id", "type": "value", "value": "p",
                 "resources": [{"resource_type": "er_physical_interface", "resource_id": "p"}]},
                {"param": "secondary_interface_id", "type": "value", "value": "s",
                 "resources": [{"resource_type": "er_physical_interface", "resource_id": "s"}]}
            ])
        );
    }

    #[test]
    fn path_follows_relations_and_asks_for_missing_configs() {
        let schemas = SchemaRegistry::built_in();
        let mappings = obj(json!({"device_ip": {"field": "ip", "path": ["device_id"]},
                                  "c": {"concatenate": [{"constant": "a"}, "_", {"field": "name"}]}}));
        let body = obj(json!({"device_id": "er1", "name": "xe-0"}));
        let mut loaded = Loaded(HashMap::new());
        let err = resolve_params(&mappings, "er_physical_interface", &body, &schemas, &loaded)
            .unwrap_err();
        assert_eq!(
            err,
            ResolveError::NeedConfig {
                resource_type: "edge_router".into(),
                resource_id: "er1".into()
            }
        );
        loaded.0.insert(
            ("edge_router".into(), "er1".into()),
            obj(json!({"ip": "10.0.0.1"})),
        );
        let params =
            resolve_params(&mappings, "er_physical_interface", &body, &schemas, &loaded).unwrap();
        assert_eq!(params[0].value, json!("10.0.0.1"));
        assert_eq!(
            params[0].resources,
            vec![ResourceRef {
                resource_type: "edge_router".into(),
                resource_id: "er1".into()
            }]
        );
        assert_eq!(params[1].value, json!("a_xe-0"));
    }

    #[test]
    fn absent_related_resource_is_reported_unless_ignored() {
        let schemas = SchemaRegistry::built_in();
        let body = obj(json!({"device_id": "absent-1"}));
        let strict = obj(json!({"ip": {"field": "ip", "path": ["device_id"]}}));
        let err = resolve_params(
            &strict,
            "er_physical_interface",
            &body,
            &schemas,
            &Loaded(HashMap::new()),
        )
        .unwrap_err();
        assert!(matches!(err, ResolveError::MissingRelated { .. }), "{err}");
        let lenient =
            obj(json!({"ip": {"field": "ip", "path": ["device_id"], "ignore_missing": true}}));
        let params = resolve_params(
            &lenient,
            "er_physical_interface",
            &body,
            &schemas,
            &Loaded(HashMap::new()),
        )
        .unwrap();
        assert_eq!(params[0].value, Value::Null);
    }

    #[test]
    fn conditionals_output_keys_and_nested_fields() {
        let schemas = SchemaRegistry::built_in();
        let mappings = obj(json!({
            "t": {"if_mapping": {"equal": [{"field": "service_type"}, "internet"]},
                  "then_mapping": {"constant": "yes"}, "else_mapping": {"constant": "no"}},
            "r": {"if_mapping": {"regexp": [{"field": "service_type"}, {"constant": "inter.*|x"}]},
                  "then_mapping": {"constant": 1}},
            "o": {"output_key": "vlan_allocation"},
            "n": {"nested": ["primary", "bgp_peer_ip"]}
        }));
        let body = obj(json!({"service_type": "internet", "primary": {"bgp_peer_ip": "1.2.3.4"}}));
        let p = resolve_params(
            &mappings,
            "gw_interface",
            &body,
            &schemas,
            &Loaded(HashMap::new()),
        )
        .unwrap();
        assert_eq!(p[0].value, json!("yes"));
        assert_eq!(p[1].value, json!(1));
        assert_eq!(
            (p[2].kind.as_str(), &p[2].value),
            ("output_key", &json!("vlan_allocation"))
        );
        assert_eq!(p[3].value, json!("1.2.3.4"));
    }

    #[test]
    fn unknown_mapping_and_missing_field_name_the_parameter() {
        let schemas = SchemaRegistry::built_in();
        let mappings = obj(json!({"x": {"bogus": 1}}));
        let err = resolve_params(
            &mappings,
            "ha_interface",
            &Map::new(),
            &schemas,
            &Loaded(HashMap::new()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"x\""), "{err}");
        let mappings = obj(json!({"y": {"field": "nope"}}));
        let err = resolve_params(
            &mappings,
            "ha_interface",
            &Map::new(),
            &schemas,
            &Loaded(HashMap::new()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
