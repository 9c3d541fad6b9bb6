//! `monitoring_worker`: the esi-host plugin that turns a resource's monitoring heat template
//! into monitoring state (PROTOCOL section 6).
//!
//! The crate has two halves. [`core`] is the whole behaviour as plain Rust: it takes a job, a
//! run context and a record reader, and returns an outcome; native unit tests and benchmarks
//! call it directly. `component` (compiled only for `wasm32`) is the thin shell that makes it a
//! WebAssembly component of the `esi:worker@0.1.0` `handler` world: it converts WIT types to
//! core types and back, and backs the reader and logger with the `host` imports.

pub mod core;

#[cfg(target_arch = "wasm32")]
mod component;
