//! The heat templates the project ships (`templates/`), and loading them into etcd.
//!
//! Each file is `{"key": "/config/v2.0/heat_templates/<id>", "value": <config envelope>}`, the
//! format of the ESI fixtures. The key in the file is only checked; the key written is built
//! by [`crate::keys`] from the template id, so templates land in the configured namespace.

use std::path::Path;

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::keys::Record;
use crate::protocol::{ConfigEnvelope, HeatTemplate};
use crate::schema::{SchemaRegistry, HEAT_TEMPLATE};
use crate::store::Store;

/// A template read from a file.
#[derive(Debug, Clone)]
pub struct TemplateFile {
    pub id: String,
    /// The config envelope to store.
    pub envelope: Value,
}

/// Reads every `*.json` template in `dir`, sorted by file name.
pub fn read_dir(dir: &Path) -> anyhow::Result<Vec<TemplateFile>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading template directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths.iter().map(|p| read_file(p)).collect()
}

/// Reads and checks one template file.
pub fn read_file(path: &Path) -> anyhow::Result<TemplateFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let Some(envelope) = file.get("value").cloned() else {
        bail!("{}: field \"value\" is missing", path.display());
    };
    let origin = path.display().to_string();
    let parsed = ConfigEnvelope::parse(&origin, envelope.to_string().as_bytes())?;
    let template = HeatTemplate::from_envelope(&origin, &parsed)?;
    if let Some(key) = file.get("key").and_then(Value::as_str) {
        if !key.ends_with(&format!("/{}", template.id)) {
            bail!(
                "{}: field \"key\" {key:?} does not end with the template id {:?}",
                path.display(),
                template.id
            );
        }
    }
    Ok(TemplateFile {
        id: template.id,
        envelope,
    })
}

/// Writes templates into `/config/v2.0/heat_templates/`.
pub async fn load(
    store: &Store,
    schemas: &SchemaRegistry,
    templates: &[TemplateFile],
) -> anyhow::Result<()> {
    let Some(schema) = schemas.get(HEAT_TEMPLATE) else {
        bail!("the schema registry has no {HEAT_TEMPLATE:?} type");
    };
    for t in templates {
        let key = store.keys().record(Record::Config, schema, &t.id);
        store.put(&key, t.envelope.to_string()).await?;
        tracing::info!(%key, "template loaded");
    }
    Ok(())
}
