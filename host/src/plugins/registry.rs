//! The loaded plugins and the routing from handler name to plugin.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use super::engine::{LoadedPlugin, PluginEngine};

/// A plugin file that could not be loaded, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub path: PathBuf,
    pub reason: String,
}

/// Handler name -> plugin.
#[derive(Debug, Default)]
pub struct PluginRegistry {
    by_handler: HashMap<String, Arc<LoadedPlugin>>,
    rejected: Vec<Rejected>,
}

impl PluginRegistry {
    /// Loads every `*.wasm` in `dir`. A file that fails is rejected with its reason and the
    /// rest still load: one bad plugin must not take the others down.
    pub async fn load_dir(engine: &PluginEngine, dir: &Path) -> anyhow::Result<Self> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading plugin directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        entries.sort();
        let mut registry = PluginRegistry::default();
        for path in entries {
            match engine.load(&path).await {
                Ok(plugin) => registry.add(plugin),
                Err(e) => registry.reject(path, format!("{e:#}")),
            }
        }
        Ok(registry)
    }

    /// Routes the plugin's handlers to it; a handler already served by another plugin keeps
    /// its first plugin and the newcomer is rejected.
    pub fn add(&mut self, plugin: LoadedPlugin) {
        if let Some(taken) = plugin
            .info
            .handlers
            .iter()
            .find(|h| self.by_handler.contains_key(*h))
        {
            let reason = format!(
                "handler {taken:?} is already served by {}",
                self.by_handler[taken].path.display()
            );
            self.reject(plugin.path.clone(), reason);
            return;
        }
        tracing::info!(
            plugin = %plugin.info.name,
            version = %plugin.info.version,
            handlers = ?plugin.info.handlers,
            path = %plugin.path.display(),
            "plugin loaded"
        );
        let plugin = Arc::new(plugin);
        for h in &plugin.info.handlers {
            self.by_handler.insert(h.clone(), plugin.clone());
        }
    }

    fn reject(&mut self, path: PathBuf, reason: String) {
        tracing::error!(path = %path.display(), %reason, "plugin rejected");
        self.rejected.push(Rejected { path, reason });
    }

    pub fn get(&self, handler: &str) -> Option<&Arc<LoadedPlugin>> {
        self.by_handler.get(handler)
    }

    /// Every handler served, sorted.
    pub fn handlers(&self) -> Vec<String> {
        let mut h: Vec<String> = self.by_handler.keys().cloned().collect();
        h.sort();
        h
    }

    pub fn rejected(&self) -> &[Rejected] {
        &self.rejected
    }
}
