//! The pure logic of `vlan_pool_worker` (PROTOCOL section 7), free of any WebAssembly types.
//!
//! Two layers:
//!
//! - The pool itself, which the host also uses natively (`esi-host vlan show`):
//!   [`parse_restricted`] reads a `restricted_vlans` spec, [`Pool`] is the 4096-bit
//!   `vlan_pool_state` bitmap, [`PoolRecord`] is the stored JSON of a pool and [`VlanPool`] the
//!   pool it describes, with its owners and the allocation rules.
//! - [`handle`], the job: render the heat template `<resource_type>_vlan_pool`, whose items
//!   each name a pool (an ha_interface id) and optionally a requested `vlan_id`, allocate or
//!   release the job's VLANs, and propose the new pool records.
//!
//! # Why pool writes carry a compare
//!
//! Two hosts may run jobs on one pool at once. Each reads the pool record with its mod
//! revision and proposes the new record with `expect_mod_revision` set to it (0 when the
//! record did not exist yet); the host applies it in the job's completion transaction, so only
//! one of two racing jobs commits and the other is re-run on the new pool. Safety comes from
//! that compare, never from timing, and because allocation is idempotent per owner a re-run
//! (or a retry after a crash) hands out the same VLANs again.
//!
//! # Examples
//!
//! ```
//! use vlan_pool_worker::core::{Pool, VlanPool};
//!
//! let pool = Pool::from_restricted("0-1024,4094").unwrap();
//! assert_eq!(pool.available(), 3069);
//!
//! let mut pool = VlanPool::from_restricted("372ed357", "0-1024,4094").unwrap();
//! let owner = "internet_gateway:6a7e";
//! assert_eq!(pool.allocate(owner, None, &Default::default()), Ok(1025));
//! assert_eq!(pool.allocate(owner, None, &Default::default()), Ok(1025), "idempotent");
//! assert_eq!(pool.release_owner(owner), vec![1025]);
//! ```

mod bitmap;
mod error;
mod job;
#[cfg(test)]
mod proptests;
mod record;
mod restricted;
#[cfg(test)]
mod tests;

pub use bitmap::{vlan_ranges, Pool, STATE_BYTES};
pub use error::VlanError;
pub use esi_plugin_sdk::{
    HostError, Job, JobError, LogLevel, Logger, Outcome, Param, ProposedWrite, RecordKind,
    RecordReader, RecordRef, ResourceRef, RunContext, Versioned, WriteOp,
};
pub use job::handle;
pub use record::{PoolRecord, VlanPool};
pub use restricted::{format_ranges, parse_restricted};

/// The handler name jobs carry for this plugin.
pub const HANDLER: &str = "vlan_pool_worker";

/// Number of VLAN ids, and of bits in a pool.
pub const VLAN_COUNT: usize = 4096;

/// The highest VLAN id; like VLAN 0, never allocated.
pub const MAX_VLAN: u16 = 4095;

/// Resource type of the pools: each ha_interface has one.
pub const POOL_TYPE: &str = "ha_interface";

/// The job output field holding the allocations.
pub const OUTPUT_KEY: &str = "vlan_allocation";
