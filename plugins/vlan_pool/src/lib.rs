//! `vlan_pool_worker`: the esi-host plugin that allocates VLANs from ha_interface pools
//! (PROTOCOL section 7).
//!
//! The crate has two halves. [`core`] is the whole behaviour as plain Rust: the bitmap, the
//! pool record and its allocation rules, and the job handler; native unit tests and the host
//! (`esi-host vlan show`) call it directly. `component` (compiled only for `wasm32`) is the thin
//! shell that makes it a WebAssembly component of the `esi:worker@0.1.1` `handler` world, with
//! `esi_plugin_sdk`'s glue.

pub mod core;

#[cfg(target_arch = "wasm32")]
mod component;
