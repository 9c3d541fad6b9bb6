//! `broken_describe_worker`: a component of the right world whose `describe()` traps.
//!
//! The host asks every component to describe itself before it serves any job; one that traps
//! there must be rejected (and a previous version of the plugin keep serving), never crash the
//! host. Tests copy it over a plugin's file to check exactly that.

/// What the panic says, so tests can find it in the rejection reason.
pub const PANIC_MESSAGE: &str = "describe() traps on purpose";

#[cfg(target_arch = "wasm32")]
mod component {
    use esi_plugin_sdk::guest::wit;

    wit_bindgen::generate!({
        path: "../../../wit",
        world: "handler",
        with: {
            "esi:worker/types@0.1.1": esi_plugin_sdk::guest::bindings::esi::worker::types,
            "esi:worker/host@0.1.1": esi_plugin_sdk::guest::bindings::esi::worker::host,
        },
    });

    struct BrokenDescribe;

    export!(BrokenDescribe);

    impl Guest for BrokenDescribe {
        fn describe() -> wit::PluginInfo {
            panic!("{}", crate::PANIC_MESSAGE)
        }

        fn handle(_: wit::Job, _: wit::RunContext) -> Result<wit::Outcome, wit::JobError> {
            Err(wit::JobError::Permanent(
                "never reached: describe() traps".into(),
            ))
        }
    }
}
