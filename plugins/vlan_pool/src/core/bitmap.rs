//! [`Pool`]: the 4096-bit `vlan_pool_state` bitmap.

use std::fmt;
use std::ops::RangeInclusive;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::{parse_restricted, VlanError, MAX_VLAN, VLAN_COUNT};

/// Bytes in a bitmap: one bit per VLAN.
pub const STATE_BYTES: usize = VLAN_COUNT / 8;

/// Which VLANs of an ha_interface are unavailable: bit `i` is VLAN `i`, most significant bit
/// first (VLAN 0 is `0x80` of byte 0), 1 = unavailable. VLAN 0 and 4095 are always set: no
/// constructor or operation can clear them.
///
/// The bitmap does not know why a VLAN is unavailable (restricted or allocated, and to whom);
/// [`VlanPool`](super::VlanPool) keeps that next to it.
///
/// # Examples
///
/// ```
/// use vlan_pool_worker::core::Pool;
///
/// let mut pool = Pool::from_restricted("0-1024,4094").unwrap();
/// assert_eq!(pool.available(), 3069);
/// assert_eq!(pool.allocate_lowest(), Some(1025));
/// assert!(!pool.is_free(1025));
/// assert!(pool.release(1025));
/// let copy = Pool::from_base64(&pool.to_base64()).unwrap();
/// assert_eq!(copy, pool);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Pool {
    bits: [u8; STATE_BYTES],
}

impl Pool {
    /// A pool in which every VLAN but 0 and 4095 is free (4094 available).
    pub fn new() -> Pool {
        Pool::from_bytes([0; STATE_BYTES])
    }

    /// A bitmap as stored, with VLAN 0 and 4095 forced unavailable.
    pub fn from_bytes(bits: [u8; STATE_BYTES]) -> Pool {
        let mut pool = Pool { bits };
        pool.set(0);
        pool.set(MAX_VLAN);
        pool
    }

    /// A pool with the VLANs of `ranges` (and 0 and 4095) unavailable.
    pub fn from_ranges(ranges: &[RangeInclusive<u16>]) -> Pool {
        let mut pool = Pool::new();
        pool.set_ranges(ranges);
        pool
    }

    /// The pool of a `restricted_vlans` spec (see [`parse_restricted`]).
    ///
    /// # Errors
    ///
    /// [`VlanError::InvalidRestricted`] naming the bad token.
    pub fn from_restricted(spec: &str) -> Result<Pool, VlanError> {
        Ok(Pool::from_ranges(&parse_restricted(spec)?))
    }

    /// Decodes a `vlan_pool_state`: standard base64 (with padding) of exactly 512 bytes. VLAN 0
    /// and 4095 come out unavailable whatever the text says.
    ///
    /// # Errors
    ///
    /// [`VlanError::InvalidState`] when the text is not base64 or not 512 bytes long.
    pub fn from_base64(state: &str) -> Result<Pool, VlanError> {
        let bytes = STANDARD
            .decode(state)
            .map_err(|error| VlanError::InvalidState(format!("not valid base64: {error}")))?;
        let bits: [u8; STATE_BYTES] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            VlanError::InvalidState(format!(
                "decodes to {} bytes, expected {STATE_BYTES}",
                bytes.len()
            ))
        })?;
        Ok(Pool::from_bytes(bits))
    }

    /// The `vlan_pool_state` text: standard base64 with padding.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.bits)
    }

    /// The bitmap bytes, MSB first.
    pub fn as_bytes(&self) -> &[u8; STATE_BYTES] {
        &self.bits
    }

    /// `vlan_ids_available`: 4096 minus the set bits.
    pub fn available(&self) -> u32 {
        let set: u32 = self.bits.iter().map(|byte| byte.count_ones()).sum();
        VLAN_COUNT as u32 - set
    }

    /// Whether `vlan` is a VLAN id (at most 4095) whose bit is clear.
    pub fn is_free(&self, vlan: u16) -> bool {
        vlan <= MAX_VLAN && self.bits[byte(vlan)] & mask(vlan) == 0
    }

    /// Marks the lowest free VLAN unavailable and returns it; `None` when the pool is full.
    pub fn allocate_lowest(&mut self) -> Option<u16> {
        let index = self.bits.iter().position(|&byte| byte != u8::MAX)?;
        // A byte with a clear bit has fewer than 8 leading ones.
        let vlan = (index * 8) as u16 + self.bits[index].leading_ones() as u16;
        self.set(vlan);
        Some(vlan)
    }

    /// Marks `vlan` unavailable if it is free; `false` (and no change) if it is not.
    #[must_use = "false means the VLAN was not free"]
    pub fn allocate(&mut self, vlan: u16) -> bool {
        if !self.is_free(vlan) {
            return false;
        }
        self.set(vlan);
        true
    }

    /// Marks `vlan` free; `false` if it already was, or is 0, 4095 or out of range, which stay
    /// as they are.
    pub fn release(&mut self, vlan: u16) -> bool {
        if vlan == 0 || vlan >= MAX_VLAN || self.is_free(vlan) {
            return false;
        }
        self.bits[byte(vlan)] &= !mask(vlan);
        true
    }

    /// The unavailable VLANs as sorted, maximal ranges.
    pub fn ranges(&self) -> Vec<RangeInclusive<u16>> {
        vlan_ranges((0..=MAX_VLAN).filter(|&vlan| !self.is_free(vlan)))
    }

    /// The free VLANs as sorted, maximal ranges.
    pub fn free_ranges(&self) -> Vec<RangeInclusive<u16>> {
        vlan_ranges((0..=MAX_VLAN).filter(|&vlan| self.is_free(vlan)))
    }

    pub(crate) fn set_ranges(&mut self, ranges: &[RangeInclusive<u16>]) {
        for range in ranges {
            for vlan in range.clone().filter(|&vlan| vlan <= MAX_VLAN) {
                self.set(vlan);
            }
        }
    }

    fn set(&mut self, vlan: u16) {
        self.bits[byte(vlan)] |= mask(vlan);
    }
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::new()
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("available", &self.available())
            .field("unavailable", &super::format_ranges(&self.ranges()))
            .finish()
    }
}

fn byte(vlan: u16) -> usize {
    usize::from(vlan / 8)
}

fn mask(vlan: u16) -> u8 {
    0x80 >> (vlan % 8)
}

/// Groups ascending VLAN ids into maximal ranges of consecutive ids.
///
/// # Examples
///
/// ```
/// use vlan_pool_worker::core::vlan_ranges;
///
/// assert_eq!(vlan_ranges([1, 2, 3, 7, 9, 10]), vec![1..=3, 7..=7, 9..=10]);
/// ```
pub fn vlan_ranges(vlans: impl IntoIterator<Item = u16>) -> Vec<RangeInclusive<u16>> {
    let mut ranges: Vec<RangeInclusive<u16>> = Vec::new();
    for vlan in vlans {
        match ranges.last_mut() {
            Some(last) if u32::from(*last.end()) + 1 == u32::from(vlan) => {
                *last = *last.start()..=vlan;
            }
            _ => ranges.push(vlan..=vlan),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's `vlan_pool_state` (`/work/shared/seeds/000_711b0a66473f7832.txt`, the
    /// ha_interface config), whose `restricted_vlans` is `"0-1024,4094"`.
    const SEED_STATE: &str = "//////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////+AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAM=";

    #[test]
    fn seed_restricted_spec_encodes_to_the_seed_state_with_3069_available() {
        let pool = Pool::from_restricted("0-1024,4094").unwrap();
        assert_eq!(pool.to_base64(), SEED_STATE);
        assert_eq!(pool.available(), 3069);
        assert_eq!(Pool::from_base64(SEED_STATE).unwrap(), pool);
        assert_eq!(pool.ranges(), vec![0..=1024, 4094..=4095]);
    }

    #[test]
    fn empty_spec_leaves_4094_available() {
        let pool = Pool::from_restricted("").unwrap();
        assert_eq!(pool.available(), 4094);
        assert_eq!(pool.ranges(), vec![0..=0, 4095..=4095]);
        assert_eq!(pool.free_ranges(), vec![1..=4094]);
    }

    #[test]
    fn vlan_0_is_the_top_bit_of_byte_0() {
        let pool = Pool::new();
        assert_eq!(pool.as_bytes()[0], 0x80);
        assert_eq!(pool.as_bytes()[STATE_BYTES - 1], 0x01);
    }

    #[test]
    fn decoding_forces_vlan_0_and_4095_unavailable() {
        let pool = Pool::from_base64(&STANDARD.encode([0u8; STATE_BYTES])).unwrap();
        assert!(!pool.is_free(0) && !pool.is_free(4095));
        assert_eq!(pool.available(), 4094);
    }

    #[test]
    fn bad_states_are_rejected() {
        for (state, expected) in [
            ("not base64!", "not valid base64"),
            (&STANDARD.encode([0u8; 511]) as &str, "511 bytes"),
            (&STANDARD.encode([0u8; 513]), "513 bytes"),
            ("", "0 bytes"),
        ] {
            let error = Pool::from_base64(state).unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }
    }

    #[test]
    fn allocate_and_release_keep_0_and_4095() {
        let mut pool = Pool::new();
        assert!(!pool.allocate(0) && !pool.allocate(4095) && !pool.allocate(4096));
        assert!(!pool.release(0) && !pool.release(4095) && !pool.release(4096));
        assert!(pool.allocate(4094));
        assert!(!pool.allocate(4094));
        assert_eq!(pool.allocate_lowest(), Some(1));
        assert!(pool.release(4094) && !pool.release(4094));
        assert_eq!(pool.available(), 4093);
    }

    #[test]
    fn a_full_pool_allocates_nothing() {
        let mut pool = Pool::from_restricted("0-4094").unwrap();
        assert_eq!(pool.available(), 0);
        assert_eq!(pool.allocate_lowest(), None);
        let mut almost = Pool::from_restricted("0-4093").unwrap();
        assert_eq!(almost.allocate_lowest(), Some(4094));
        assert_eq!(almost.allocate_lowest(), None);
    }
}
