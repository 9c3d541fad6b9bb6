//! `esi_plugin_sdk`: the guest code every esi-host plugin shares.
//!
//! A plugin is two halves (see `plugins/monitoring`): a pure `core` module that takes a [`Job`],
//! a [`RunContext`], a [`RecordReader`] and a [`Logger`] and returns an [`Outcome`], and a thin
//! WebAssembly shell that makes it a component of the `esi:worker@0.1.1` `handler` world. This
//! crate holds what would otherwise be written once per plugin:
//!
//! - the plain-Rust mirrors of the WIT types ([`Job`], [`Outcome`], [`ProposedWrite`], ...), so
//!   cores and their native tests never see generated bindings;
//! - [`Template`]: reading a heat template by id, rendering it with the job's params (Jinja2
//!   semantics) and parsing the YAML;
//! - [`config_body`]: the body of a gohan config envelope, object or JSON string;
//! - the shell itself, compiled only for `wasm32`: WIT <-> core conversions, the host-backed
//!   reader and logger, and [`export_plugin!`], which turns a core's `handle` into a component;
//! - with the default `job-arena` feature, the plugin's allocator: blocks that fit in what is
//!   left of an [`ARENA_BYTES`] arena in the module's zeroed memory come from it by a pointer
//!   bump, the rest from the system allocator (`src/arena.rs` says why, what it costs in
//!   initial memory, and how to bring your own).

// The job arena (feature `job-arena`): its logic is plain Rust, tested natively; the global
// allocator around it exists only in `wasm32` builds.
#[cfg_attr(
    not(all(target_arch = "wasm32", feature = "job-arena")),
    allow(dead_code)
)]
mod arena;
mod envelope;
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest;
mod template;
mod types;

pub use arena::ARENA_BYTES;
pub use envelope::config_body;
pub use template::{Template, TEMPLATE_TYPE};
pub use types::{
    host_error, scalar_text, HostError, Job, JobError, LogLevel, Logger, Outcome, Param,
    ProposedWrite, RecordKind, RecordReader, RecordRef, ResourceRef, RunContext, Versioned,
    WriteOp,
};

/// Makes a plugin crate a component of the `handler` world whose one handler is `$name` (also
/// the plugin's name) and whose jobs go to `$handle`, a core function with the signature of
/// `monitoring_worker::core::handle`. The version is the plugin crate's `CARGO_PKG_VERSION`.
///
/// Use it once, in a `wasm32`-only module of a crate at `plugins/<name>/` (the WIT path is
/// relative to the invoking crate's manifest) that depends on `wit-bindgen` for `wasm32`:
///
/// ```text
/// esi_plugin_sdk::export_plugin!(VlanPoolWorker, crate::core::HANDLER, crate::core::handle);
/// ```
///
/// The world's exports are generated in the plugin crate, so that its component-type section
/// describes them; the `types` and `host` interfaces are taken from this crate's bindings.
///
/// A crate elsewhere (an outside author's, or `plugins/examples/<name>/`) names the directory
/// holding `worker.wit`, relative to its own manifest:
///
/// ```text
/// esi_plugin_sdk::export_plugin!(EchoWorker, crate::HANDLER, crate::handle, wit = "../../../wit");
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($component:ident, $name:expr, $handle:path) => {
        $crate::export_plugin!($component, $name, $handle, wit = "../../wit");
    };
    ($component:ident, $name:expr, $handle:path, wit = $wit:literal) => {
        wit_bindgen::generate!({
            path: $wit,
            world: "handler",
            with: {
                "esi:worker/types@0.1.1": esi_plugin_sdk::guest::bindings::esi::worker::types,
                "esi:worker/host@0.1.1": esi_plugin_sdk::guest::bindings::esi::worker::host,
            },
        });

        /// The exported component.
        struct $component;

        export!($component);

        impl Guest for $component {
            fn describe() -> $crate::guest::wit::PluginInfo {
                $crate::guest::describe($name, env!("CARGO_PKG_VERSION"))
            }

            fn handle(
                job: $crate::guest::wit::Job,
                context: $crate::guest::wit::RunContext,
            ) -> Result<$crate::guest::wit::Outcome, $crate::guest::wit::JobError> {
                $crate::guest::handle(job, context, $handle)
            }
        }
    };
}
