//! What can go wrong with a restricted spec, a bitmap or a pool.

/// Errors of the VLAN pool core. Every message names the token, pool or VLAN involved; pool
/// errors name the pool by its ha_interface id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VlanError {
    /// A token of a `restricted_vlans` spec is not an id or range from 0 to 4095.
    #[error("restricted_vlans: invalid token \"{token}\": {reason}")]
    InvalidRestricted { token: String, reason: &'static str },
    /// A `vlan_pool_state` is not standard base64 of exactly 512 bytes.
    #[error("vlan_pool_state: {0}")]
    InvalidState(String),
    /// A stored pool record is not valid JSON or breaks an invariant of the pool.
    #[error("vlan pool record of ha_interface {pool}: {reason}")]
    InvalidRecord { pool: String, reason: String },
    /// A requested VLAN is restricted, or is 0 or 4095.
    #[error(
        "ha_interface {pool}: VLAN {vlan} is restricted (restricted_vlans \"{restricted}\"; \
         VLAN 0 and 4095 are never allocated)"
    )]
    Restricted {
        pool: String,
        vlan: u16,
        restricted: String,
    },
    /// A requested VLAN is allocated to another owner (or to another item of the same job).
    #[error("ha_interface {pool}: VLAN {vlan} is already allocated to {owner}")]
    Taken {
        pool: String,
        vlan: u16,
        owner: String,
    },
    /// A requested VLAN is marked unavailable in the pool without an owner (a bit carried over
    /// from the ha_interface's own `vlan_pool_state`).
    #[error("ha_interface {pool}: VLAN {vlan} is not available (set in vlan_pool_state)")]
    Unavailable { pool: String, vlan: u16 },
    /// A requested VLAN above 4095.
    #[error("ha_interface {pool}: VLAN {vlan} is out of range (VLAN ids go from 0 to 4095)")]
    OutOfRange { pool: String, vlan: u16 },
    /// Every VLAN of the pool is restricted or allocated.
    #[error("ha_interface {pool}: no free VLAN left (every VLAN is restricted or allocated)")]
    Exhausted { pool: String },
}
