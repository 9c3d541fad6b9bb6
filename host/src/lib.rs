//! esi-host: the worker side of an ESI-style orchestrator on etcd.
//!
//! gohan writes resource configs into etcd; the **job manager** ([`manager`]) turns them into
//! workflows of jobs; the **worker** ([`worker`]) claims each job with an etcd lease, runs it
//! in a sandboxed WebAssembly component ([`plugins`]) and publishes the result in one fenced
//! transaction, in exactly the key layout gohan and operators already read ([`keys`],
//! [`protocol`]). Only [`store`] talks to etcd.
//!
//! [`host::Host`] runs both roles in one process; `esi-host run` is a thin CLI over it.

pub mod bench;
pub mod demo;
pub mod host;
pub mod inspect;
pub mod keys;
pub mod lease;
pub mod local_etcd;
pub mod manager;
pub mod metrics;
pub mod plugins;
pub mod protocol;
pub mod retry;
pub mod schema;
pub mod seed;
pub mod settings;
pub mod store;
pub mod templates;
pub mod vlan;
pub mod worker;

pub use host::{Host, HostConfig};
