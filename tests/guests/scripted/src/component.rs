//! The WebAssembly shell around [`crate::core`].
//!
//! This is what `esi_plugin_sdk::export_plugin!` expands to, written out because the macro's
//! WIT path (`../../wit`) is relative to the invoking crate and holds only for crates at
//! `plugins/<name>/`; this one lives at `tests/guests/scripted/`. All conversion between WIT and
//! core types is still the SDK's.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "handler",
    with: {
        "esi:worker/types@0.1.1": esi_plugin_sdk::guest::bindings::esi::worker::types,
        "esi:worker/host@0.1.1": esi_plugin_sdk::guest::bindings::esi::worker::host,
    },
});

/// The exported component.
struct ScriptedWorker;

export!(ScriptedWorker);

impl Guest for ScriptedWorker {
    fn describe() -> esi_plugin_sdk::guest::wit::PluginInfo {
        esi_plugin_sdk::guest::describe(crate::core::HANDLER, env!("CARGO_PKG_VERSION"))
    }

    fn handle(
        job: esi_plugin_sdk::guest::wit::Job,
        context: esi_plugin_sdk::guest::wit::RunContext,
    ) -> Result<esi_plugin_sdk::guest::wit::Outcome, esi_plugin_sdk::guest::wit::JobError> {
        esi_plugin_sdk::guest::handle(job, context, crate::core::handle)
    }
}
