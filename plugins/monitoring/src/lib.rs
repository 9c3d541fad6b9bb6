//! `monitoring_worker`: the esi-host plugin that turns a resource's monitoring heat template
//! into monitoring state (PROTOCOL section 6).
//!
//! The crate has two halves. [`core`] is the whole behaviour as plain Rust: it takes a job, a
//! run context and a record reader, and returns an outcome; native unit tests and benchmarks
//! call it directly. `component` (compiled only for `wasm32`) is the thin shell that makes it a
//! WebAssembly component of the `esi:worker@0.1.1` `handler` world; the conversions between WIT
//! and core types, and the reader and logger backed by the `host` imports, are
//! `esi_plugin_sdk`'s.

pub mod core;

#[cfg(target_arch = "wasm32")]
mod component;
