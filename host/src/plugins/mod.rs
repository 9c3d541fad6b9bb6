//! Plugins: WebAssembly components built against `wit/worker.wit`.
//!
//! - [`cache`]: compiled components kept across restarts; [`compiler`]: compiles in a child
//!   process, so the compiler's memory never stays with the host.
//! - [`engine`]: the one wasmtime `Engine` (pooling allocator, epoch deadlines, memory
//!   limits) and how a job call runs: a fresh instance per job, so a trap in one job can never
//!   leave state behind for the next.
//! - [`host_api`]: the imports a plugin gets (record reads, logging), their grant checks and
//!   per-call state, kept together.
//! - [`manifest`]: `<name>.toml` beside each component: grants, limits, config.
//! - [`registry`]: the loaded plugins and the routing from handler name to plugin.

pub mod cache;
pub mod compiler;
pub mod engine;
pub mod fleet;
pub mod host_api;
pub mod manifest;
pub mod registry;

pub use engine::{CallError, Limits, LoadedPlugin, PluginEngine, Tier};
pub use registry::PluginRegistry;

/// Bindings generated from the WIT package. Imports and exports are async so that a plugin's
/// record reads go to etcd without blocking a runtime thread.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        imports: { default: async },
        exports: { default: async },
    });
}
