//! `scripted_worker`: a test guest whose every run does what the job tells it to.
//!
//! Integration tests need a plugin that fails on cue: retryably a given number of times,
//! permanently, by trapping, or by never returning. Real plugins only fail when their inputs
//! are broken, which makes those paths of the host awkward to reach. This guest reads a
//! [`Script`] from the job's `resource_input` (the resource's config body) and follows it, so
//! a test writes the script into the job record and watches what the host does.
//!
//! It is built like any plugin by `cargo xtask build-plugins`, but into `target/test-plugins`
//! (never `target/plugins`, which the demo and production load), and tests load it from a
//! directory that also holds the real plugins (`esi_tests::plugin_dir_with_test_guests`).
//!
//! The crate has the two halves of every plugin: [`core`] is plain Rust that native unit tests
//! call, `component` (only for `wasm32`) makes it a component of the `handler` world.

pub mod core;

#[cfg(target_arch = "wasm32")]
mod component;
