//! The schema registry: which resource types exist, their singular and plural names, the etcd
//! path prefix of each, and which fields point at other resources (`relation`).
//!
//! gohan decides all of this in its schema files, and every piece of the worker protocol depends
//! on it: config keys use the plural prefix, jobs and templates the singular id, and a job's
//! `params[].resources` list is filled from relations. The registry is built in (the real ESI
//! schema set, trimmed to the fields we use) and can be replaced with `--schemas FILE` in the
//! gohan schema-file format (`{"schemas": [{"id", "singular", "plural", "prefix", "schema":
//! {"properties": {<field>: {"relation": <id>}}}}]}`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

/// The ESI schema set shipped with the host.
const BUILT_IN_SCHEMAS: &str = include_str!("esi_schemas.json");

/// Schema id of heat templates; their config lives at `/config/v2.0/heat_templates/<id>`.
pub const HEAT_TEMPLATE: &str = "heat_template";

/// One resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    /// Schema id, used as the "singular" name in job ids, job records and template ids.
    pub id: String,
    /// Plural name, used in etcd paths.
    pub plural: String,
    /// Path prefix including the plural, e.g. `/v2.0/ha_interfaces`.
    pub prefix: String,
    /// field name -> schema id of the resource the field refers to.
    pub relations: HashMap<String, String>,
    /// gohan's `metadata` (e.g. `template_path` for the heat worker), kept for later roles.
    pub metadata: Value,
}

/// Errors reading a schema file.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read schema file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("schema file {path} is not a gohan schema file: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("schema file {path}: schema {id:?} has {problem}")]
    Invalid {
        path: String,
        id: String,
        problem: String,
    },
}

/// All known resource types, looked up by id, singular, plural or path prefix.
#[derive(Debug, Clone)]
pub struct SchemaRegistry {
    schemas: Vec<Arc<Schema>>,
    by_name: HashMap<String, usize>,
    by_prefix: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct SchemaFile {
    schemas: Vec<RawSchema>,
}

#[derive(Deserialize)]
struct RawSchema {
    id: String,
    singular: Option<String>,
    plural: Option<String>,
    prefix: Option<String>,
    #[serde(default)]
    metadata: Value,
    #[serde(default)]
    schema: RawBody,
}

#[derive(Deserialize, Default)]
struct RawBody {
    #[serde(default)]
    properties: HashMap<String, RawProperty>,
}

#[derive(Deserialize)]
struct RawProperty {
    relation: Option<String>,
}

impl SchemaRegistry {
    /// The ESI schema set built into the host.
    pub fn built_in() -> Self {
        // The built-in file is checked by the `built_in_registry_loads` test.
        Self::from_json("<built-in>", BUILT_IN_SCHEMAS).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Loads a gohan schema file.
    pub fn from_file(path: &Path) -> Result<Self, SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&path.display().to_string(), &text)
    }

    /// Parses the gohan schema-file format. `origin` names the source in errors.
    pub fn from_json(origin: &str, text: &str) -> Result<Self, SchemaError> {
        let file: SchemaFile = serde_json::from_str(text).map_err(|source| SchemaError::Parse {
            path: origin.to_string(),
            source,
        })?;
        let mut registry = SchemaRegistry {
            schemas: Vec::new(),
            by_name: HashMap::new(),
            by_prefix: HashMap::new(),
        };
        for raw in file.schemas {
            if is_metaschema(&raw.metadata) {
                continue;
            }
            registry.insert(origin, raw)?;
        }
        Ok(registry)
    }

    fn insert(&mut self, origin: &str, raw: RawSchema) -> Result<(), SchemaError> {
        let invalid = |problem: &str| SchemaError::Invalid {
            path: origin.to_string(),
            id: raw.id.clone(),
            problem: problem.to_string(),
        };
        let plural = raw
            .plural
            .clone()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| invalid("no \"plural\""))?;
        // gohan puts a schema without prefix under /v2.0/<plural> in ESI deployments.
        let prefix = match raw.prefix.as_deref() {
            Some(p) if !p.is_empty() => p.trim_end_matches('/').to_string(),
            _ => format!("/v2.0/{plural}"),
        };
        if !prefix.starts_with('/') {
            return Err(invalid("a \"prefix\" that does not start with '/'"));
        }
        let relations = raw
            .schema
            .properties
            .into_iter()
            .filter_map(|(field, p)| p.relation.map(|r| (field, r)))
            .collect();
        let index = self.schemas.len();
        let schema = Schema {
            id: raw.id.clone(),
            plural: plural.clone(),
            prefix: prefix.clone(),
            relations,
            metadata: raw.metadata,
        };
        self.schemas.push(Arc::new(schema));
        // The id wins over another schema's singular or plural of the same spelling.
        for name in [raw.singular.unwrap_or_default(), plural] {
            if !name.is_empty() {
                self.by_name.entry(name).or_insert(index);
            }
        }
        self.by_name.insert(raw.id, index);
        self.by_prefix.insert(prefix, index);
        Ok(())
    }

    /// Looks a type up by schema id, singular or plural name.
    pub fn get(&self, name: &str) -> Option<&Arc<Schema>> {
        self.by_name.get(name).map(|&i| &self.schemas[i])
    }

    /// Looks a type up by its path prefix (`/v2.0/ha_interfaces`).
    pub fn by_prefix(&self, prefix: &str) -> Option<&Arc<Schema>> {
        self.by_prefix.get(prefix).map(|&i| &self.schemas[i])
    }

    /// Every schema, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Schema>> {
        self.schemas.iter()
    }
}

fn is_metaschema(metadata: &Value) -> bool {
    metadata.get("type").and_then(Value::as_str) == Some("metaschema")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_registry_loads() {
        let r = SchemaRegistry::built_in();
        let ha = r.get("ha_interface").expect("ha_interface");
        assert_eq!(ha.plural, "ha_interfaces");
        assert_eq!(ha.prefix, "/v2.0/ha_interfaces");
        assert_eq!(
            ha.relations["primary_interface_id"],
            "er_physical_interface"
        );
        assert_eq!(
            r.get("ha_interfaces").map(|s| s.id.as_str()),
            Some("ha_interface")
        );
        assert_eq!(
            r.by_prefix("/v2.0/heat_templates").map(|s| s.id.as_str()),
            Some(HEAT_TEMPLATE)
        );
    }

    #[test]
    fn full_gohan_fixture_loads_when_present() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/esi/gohan-schemas.json");
        if !path.exists() {
            return;
        }
        let r = SchemaRegistry::from_file(&path).expect("fixture parses");
        assert_eq!(
            r.get("er_physical_interface").unwrap().relations["device_id"],
            "edge_router"
        );
        assert!(r.get("schema").is_none(), "metaschemas are skipped");
    }

    #[test]
    fn schema_without_plural_is_rejected_with_its_id() {
        let err = SchemaRegistry::from_json("f.json", r#"{"schemas":[{"id":"x"}]}"#).unwrap_err();
        assert!(err.to_string().contains("\"x\""), "{err}");
        assert!(err.to_string().contains("f.json"), "{err}");
    }
}
