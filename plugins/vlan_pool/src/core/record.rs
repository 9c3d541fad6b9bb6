//! The pool record this worker keeps per ha_interface ([`PoolRecord`], the stored JSON) and
//! the pool it describes ([`VlanPool`]: bitmap, restricted spec and owners together).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use super::restricted::normalize;
use super::{parse_restricted, Pool, VlanError, MAX_VLAN};

/// The stored pool record of one ha_interface (PROTOCOL section 7), as JSON:
///
/// ```json
/// {"vlan_pool_state": "<base64>", "vlan_ids_available": 3068,
///  "restricted_vlans": "0-1024,4094", "allocations": {"1025": "internet_gateway:<id>"}}
/// ```
///
/// This is the wire form only; [`VlanPool::from_record`] checks that its parts agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    /// The bitmap, standard base64 (see [`Pool`]).
    pub vlan_pool_state: String,
    /// 4096 minus the set bits of `vlan_pool_state`.
    pub vlan_ids_available: u32,
    /// The ha_interface's `restricted_vlans` spec at the time the pool was created.
    #[serde(default)]
    pub restricted_vlans: String,
    /// Owner of each allocated VLAN: `<singular>:<resource id>` of the resource it was
    /// allocated for. Restricted VLANs are unavailable but have no entry.
    #[serde(default)]
    pub allocations: BTreeMap<u16, String>,
}

impl PoolRecord {
    /// Parses the record's JSON text.
    ///
    /// # Errors
    ///
    /// The serde error when the text is not JSON of this shape.
    pub fn parse(text: &str) -> Result<PoolRecord, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The record's JSON text; allocations come in VLAN order.
    pub fn to_json(&self) -> String {
        // Serializing cannot fail: the fields are strings, an integer and a map with integer
        // keys, all of which serde_json writes.
        serde_json::to_string(self).expect("a pool record serializes")
    }
}

/// The pool of one ha_interface: which VLANs are unavailable, which of those are restricted, and
/// who owns the others.
///
/// Invariants, checked when a pool is read from a record and kept by every operation: each
/// restricted VLAN (and 0 and 4095) is set in the bitmap; each allocation is a set, unrestricted
/// VLAN. A set bit that is neither restricted nor allocated came with the ha_interface's own
/// `vlan_pool_state` and is left alone.
///
/// # Examples
///
/// What `esi-host vlan show` prints for one pool record:
///
/// ```
/// use vlan_pool_worker::core::{format_ranges, VlanPool};
///
/// let record = VlanPool::from_restricted("p1", "0-1024,4094").unwrap().to_record().to_json();
/// let mut pool = VlanPool::parse("p1", &record).unwrap();
/// pool.allocate("internet_gateway:a", None, &Default::default()).unwrap();
/// pool.allocate("internet_gateway:a", Some(2000), &[1025].into()).unwrap();
///
/// assert_eq!(pool.available(), 3067);
/// assert_eq!(format_ranges(pool.restricted_ranges()), "0-1024,4094");
/// assert_eq!(pool.allocated_ranges(), vec![
///     (1025..=1025, "internet_gateway:a"),
///     (2000..=2000, "internet_gateway:a"),
/// ]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanPool {
    id: String,
    bitmap: Pool,
    restricted_spec: String,
    /// `restricted_spec` parsed, sorted and merged.
    restricted: Vec<RangeInclusive<u16>>,
    allocations: BTreeMap<u16, String>,
}

impl VlanPool {
    /// A new pool for ha_interface `id`: `state` (the ha_interface's own `vlan_pool_state`) if
    /// given, else an empty bitmap; either way with the restricted VLANs set.
    ///
    /// # Errors
    ///
    /// [`VlanError::InvalidRestricted`] naming the bad token of `restricted_spec`.
    pub fn new(
        id: impl Into<String>,
        restricted_spec: &str,
        state: Option<Pool>,
    ) -> Result<VlanPool, VlanError> {
        let restricted = normalize(&parse_restricted(restricted_spec)?);
        let mut bitmap = state.unwrap_or_default();
        bitmap.set_ranges(&restricted);
        Ok(VlanPool {
            id: id.into(),
            bitmap,
            restricted_spec: restricted_spec.to_owned(),
            restricted,
            allocations: BTreeMap::new(),
        })
    }

    /// A new pool computed from a `restricted_vlans` spec alone.
    ///
    /// # Errors
    ///
    /// As [`VlanPool::new`].
    pub fn from_restricted(
        id: impl Into<String>,
        restricted_spec: &str,
    ) -> Result<VlanPool, VlanError> {
        VlanPool::new(id, restricted_spec, None)
    }

    /// Parses the stored record of ha_interface `id` and checks it (see [`VlanPool::from_record`]).
    ///
    /// # Errors
    ///
    /// [`VlanError::InvalidRecord`] naming the pool and what is wrong.
    pub fn parse(id: &str, text: &str) -> Result<VlanPool, VlanError> {
        let record = PoolRecord::parse(text).map_err(|error| VlanError::InvalidRecord {
            pool: id.to_owned(),
            reason: format!("not a valid pool record: {error}"),
        })?;
        VlanPool::from_record(id, &record)
    }

    /// The pool a record describes.
    ///
    /// # Errors
    ///
    /// [`VlanError::InvalidRecord`] naming the pool when the state or restricted spec does not
    /// parse, a restricted VLAN is marked free, an allocation is restricted or marked free, or
    /// `vlan_ids_available` does not match the bitmap.
    pub fn from_record(id: &str, record: &PoolRecord) -> Result<VlanPool, VlanError> {
        let invalid = |reason: String| VlanError::InvalidRecord {
            pool: id.to_owned(),
            reason,
        };
        let bitmap = Pool::from_base64(&record.vlan_pool_state)
            .map_err(|error| invalid(error.to_string()))?;
        let pool = VlanPool {
            restricted: normalize(
                &parse_restricted(&record.restricted_vlans)
                    .map_err(|error| invalid(error.to_string()))?,
            ),
            id: id.to_owned(),
            bitmap,
            restricted_spec: record.restricted_vlans.clone(),
            allocations: record.allocations.clone(),
        };
        pool.check().map_err(invalid)?;
        if record.vlan_ids_available != pool.available() {
            return Err(invalid(format!(
                "vlan_ids_available is {} but vlan_pool_state has {} free VLANs",
                record.vlan_ids_available,
                pool.available()
            )));
        }
        Ok(pool)
    }

    fn check(&self) -> Result<(), String> {
        let mut restricted = self.restricted.iter().flat_map(|range| range.clone());
        if let Some(vlan) = restricted.find(|&vlan| self.bitmap.is_free(vlan)) {
            return Err(format!(
                "restricted VLAN {vlan} is marked free in vlan_pool_state"
            ));
        }
        for (&vlan, owner) in &self.allocations {
            if self.is_restricted(vlan) {
                return Err(format!("VLAN {vlan} of {owner} is restricted"));
            }
            if self.bitmap.is_free(vlan) {
                return Err(format!(
                    "VLAN {vlan} of {owner} is marked free in vlan_pool_state"
                ));
            }
        }
        Ok(())
    }

    /// The record to store.
    pub fn to_record(&self) -> PoolRecord {
        PoolRecord {
            vlan_pool_state: self.bitmap.to_base64(),
            vlan_ids_available: self.available(),
            restricted_vlans: self.restricted_spec.clone(),
            allocations: self.allocations.clone(),
        }
    }

    /// The ha_interface id of the pool.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bitmap.
    pub fn bitmap(&self) -> &Pool {
        &self.bitmap
    }

    /// `vlan_ids_available`.
    pub fn available(&self) -> u32 {
        self.bitmap.available()
    }

    /// The `restricted_vlans` spec as stored.
    pub fn restricted_spec(&self) -> &str {
        &self.restricted_spec
    }

    /// The restricted VLANs, sorted and merged (0 and 4095 only if the spec names them).
    pub fn restricted_ranges(&self) -> &[RangeInclusive<u16>] {
        &self.restricted
    }

    /// Whether `vlan` can never be allocated: restricted, 0, 4095, or above 4095.
    pub fn is_restricted(&self, vlan: u16) -> bool {
        vlan == 0 || vlan >= MAX_VLAN || self.restricted.iter().any(|range| range.contains(&vlan))
    }

    /// Owner of every allocated VLAN, in VLAN order.
    pub fn allocations(&self) -> &BTreeMap<u16, String> {
        &self.allocations
    }

    /// The allocated VLANs as maximal ranges of consecutive VLANs with one owner, in VLAN order.
    pub fn allocated_ranges(&self) -> Vec<(RangeInclusive<u16>, &str)> {
        let mut ranges: Vec<(RangeInclusive<u16>, &str)> = Vec::new();
        for (&vlan, owner) in &self.allocations {
            match ranges.last_mut() {
                Some((range, last_owner))
                    if *last_owner == owner.as_str()
                        && u32::from(*range.end()) + 1 == u32::from(vlan) =>
                {
                    *range = *range.start()..=vlan;
                }
                _ => ranges.push((vlan..=vlan, owner.as_str())),
            }
        }
        ranges
    }

    /// Unavailable VLANs that are neither restricted nor allocated (carried over from the
    /// ha_interface's own `vlan_pool_state`), as sorted ranges.
    pub fn unowned_ranges(&self) -> Vec<RangeInclusive<u16>> {
        super::vlan_ranges((0..=MAX_VLAN).filter(|&vlan| {
            !self.bitmap.is_free(vlan)
                && !self.is_restricted(vlan)
                && !self.allocations.contains_key(&vlan)
        }))
    }

    /// The VLANs allocated to `owner`, ascending.
    pub fn vlans_of<'a>(&'a self, owner: &'a str) -> impl Iterator<Item = u16> + 'a {
        self.allocations
            .iter()
            .filter(move |(_, allocated_to)| allocated_to.as_str() == owner)
            .map(|(&vlan, _)| vlan)
    }

    /// Allocates a VLAN to `owner`, idempotently: running the same allocations again for the
    /// same owner returns the same VLANs.
    ///
    /// With `requested`, that VLAN: reused if `owner` already has it, else it must be free and
    /// not restricted. Without, the lowest VLAN `owner` already has, else the lowest free one.
    /// `exclude` lists VLANs this owner's other items already got in this pool, which are not
    /// reused for another item; allocate the requested items of a job first, so that an
    /// unrequested item does not take a VLAN a requested one holds.
    ///
    /// # Errors
    ///
    /// [`VlanError::Restricted`], [`VlanError::Taken`], [`VlanError::Unavailable`] or
    /// [`VlanError::OutOfRange`] for a requested VLAN, [`VlanError::Exhausted`] when nothing is
    /// free; each names the pool and the VLAN. The pool is unchanged on error.
    pub fn allocate(
        &mut self,
        owner: &str,
        requested: Option<u16>,
        exclude: &BTreeSet<u16>,
    ) -> Result<u16, VlanError> {
        match requested {
            Some(vlan) => self.allocate_requested(owner, vlan, exclude),
            None => self.allocate_any(owner, exclude),
        }
    }

    fn allocate_requested(
        &mut self,
        owner: &str,
        vlan: u16,
        exclude: &BTreeSet<u16>,
    ) -> Result<u16, VlanError> {
        let pool = self.id.clone();
        if vlan > MAX_VLAN {
            return Err(VlanError::OutOfRange { pool, vlan });
        }
        if self.is_restricted(vlan) {
            let restricted = self.restricted_spec.clone();
            return Err(VlanError::Restricted {
                pool,
                vlan,
                restricted,
            });
        }
        match self.allocations.get(&vlan) {
            Some(holder) if holder == owner && !exclude.contains(&vlan) => Ok(vlan),
            Some(holder) => Err(VlanError::Taken {
                pool,
                vlan,
                owner: holder.clone(),
            }),
            None if self.bitmap.allocate(vlan) => {
                self.allocations.insert(vlan, owner.to_owned());
                Ok(vlan)
            }
            None => Err(VlanError::Unavailable { pool, vlan }),
        }
    }

    fn allocate_any(&mut self, owner: &str, exclude: &BTreeSet<u16>) -> Result<u16, VlanError> {
        if let Some(vlan) = self.vlans_of(owner).find(|vlan| !exclude.contains(vlan)) {
            return Ok(vlan);
        }
        let vlan = self
            .bitmap
            .allocate_lowest()
            .ok_or_else(|| VlanError::Exhausted {
                pool: self.id.clone(),
            })?;
        self.allocations.insert(vlan, owner.to_owned());
        Ok(vlan)
    }

    /// Releases every VLAN of `owner` except those in `keep`, and returns them, ascending.
    /// Restricted VLANs, 0 and 4095 are never cleared.
    pub fn release_except(&mut self, owner: &str, keep: &BTreeSet<u16>) -> Vec<u16> {
        let released: Vec<u16> = self
            .vlans_of(owner)
            .filter(|vlan| !keep.contains(vlan))
            .collect();
        for vlan in &released {
            self.allocations.remove(vlan);
            if !self.is_restricted(*vlan) {
                self.bitmap.release(*vlan);
            }
        }
        released
    }

    /// Releases every VLAN of `owner` and returns them, ascending.
    pub fn release_owner(&mut self, owner: &str) -> Vec<u16> {
        self.release_except(owner, &BTreeSet::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "internet_gateway:a";

    fn seed_pool() -> VlanPool {
        VlanPool::from_restricted("p1", "0-1024,4094").unwrap()
    }

    fn none() -> BTreeSet<u16> {
        BTreeSet::new()
    }

    #[test]
    fn record_json_has_the_documented_shape() {
        let mut pool = seed_pool();
        pool.allocate(OWNER, None, &none()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&pool.to_record().to_json()).unwrap();
        assert_eq!(json["vlan_ids_available"], 3068);
        assert_eq!(json["restricted_vlans"], "0-1024,4094");
        assert_eq!(json["allocations"], serde_json::json!({"1025": OWNER}));
        assert!(json["vlan_pool_state"].is_string());
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        let expected = [
            "vlan_pool_state",
            "vlan_ids_available",
            "restricted_vlans",
            "allocations",
        ];
        assert_eq!(keys, expected);
    }

    #[test]
    fn a_record_round_trips() {
        let mut pool = seed_pool();
        pool.allocate(OWNER, Some(2000), &none()).unwrap();
        pool.allocate("vpn_gateway:b", None, &none()).unwrap();
        let text = pool.to_record().to_json();
        assert_eq!(VlanPool::parse("p1", &text).unwrap(), pool);
    }

    #[test]
    fn inconsistent_records_are_rejected_naming_the_pool() {
        let good = seed_pool().to_record();
        let mut wrong_count = good.clone();
        wrong_count.vlan_ids_available = 4000;
        let mut free_owner = good.clone();
        free_owner.allocations.insert(1030, OWNER.to_owned());
        let mut restricted_owner = good.clone();
        restricted_owner.allocations.insert(5, OWNER.to_owned());
        let mut bad_spec = good.clone();
        bad_spec.restricted_vlans = "0-1024,abc".to_owned();
        let mut free_restricted = good.clone();
        free_restricted.restricted_vlans = "0-2000".to_owned();
        for (record, expected) in [
            (wrong_count, "vlan_ids_available is 4000"),
            (free_owner, "VLAN 1030 of internet_gateway:a is marked free"),
            (
                restricted_owner,
                "VLAN 5 of internet_gateway:a is restricted",
            ),
            (bad_spec, "\"abc\""),
            (free_restricted, "restricted VLAN 1025 is marked free"),
        ] {
            let error = VlanPool::from_record("p1", &record)
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with("vlan pool record of ha_interface p1: "),
                "{error}"
            );
            assert!(error.contains(expected), "{error}");
        }
        let error = VlanPool::parse("p1", "{\"vlan_pool_state\": 1}").unwrap_err();
        assert!(
            error.to_string().contains("not a valid pool record"),
            "{error}"
        );
    }

    #[test]
    fn a_state_from_config_keeps_its_bits_and_gains_the_restricted_ones() {
        let mut state = Pool::new();
        assert!(state.allocate(3000));
        let pool = VlanPool::new("p1", "0-1024,4094", Some(state)).unwrap();
        assert_eq!(pool.available(), 3068);
        assert_eq!(pool.unowned_ranges(), vec![3000..=3000]);
        assert_eq!(pool.restricted_ranges(), [0..=1024, 4094..=4094]);
    }

    #[test]
    fn requests_are_checked_against_restricted_taken_and_unowned_vlans() {
        let mut state = Pool::new();
        assert!(state.allocate(3000));
        let mut pool = VlanPool::new("p1", "0-1024,4094", Some(state)).unwrap();
        pool.allocate("other:x", Some(2000), &none()).unwrap();
        let before = pool.clone();
        let cases = [
            (5, "VLAN 5 is restricted"),
            (0, "VLAN 0 is restricted"),
            (4095, "VLAN 4095 is restricted"),
            (4096, "VLAN 4096 is out of range"),
            (2000, "VLAN 2000 is already allocated to other:x"),
            (3000, "VLAN 3000 is not available"),
        ];
        for (vlan, expected) in cases {
            let error = pool.allocate(OWNER, Some(vlan), &none()).unwrap_err();
            let message = error.to_string();
            assert!(message.starts_with("ha_interface p1: "), "{message}");
            assert!(message.contains(expected), "{message}");
        }
        assert_eq!(pool, before, "a refused request changes nothing");
    }

    #[test]
    fn an_owner_gets_the_same_vlans_again() {
        let mut pool = seed_pool();
        let uplink = pool.allocate(OWNER, Some(2000), &none()).unwrap();
        let downlink = pool.allocate(OWNER, None, &[uplink].into()).unwrap();
        assert_eq!((uplink, downlink), (2000, 1025));
        let again = pool.clone();
        assert_eq!(pool.allocate(OWNER, Some(2000), &none()), Ok(2000));
        assert_eq!(pool.allocate(OWNER, None, &[2000].into()), Ok(1025));
        assert_eq!(pool, again);
        // The same VLAN cannot serve two items of one job.
        let error = pool
            .allocate(OWNER, Some(2000), &[2000].into())
            .unwrap_err();
        assert!(
            matches!(error, VlanError::Taken { vlan: 2000, .. }),
            "{error}"
        );
    }

    #[test]
    fn release_frees_only_the_owners_vlans() {
        let mut pool = seed_pool();
        pool.allocate(OWNER, None, &none()).unwrap();
        pool.allocate("other:x", None, &none()).unwrap();
        pool.allocate(OWNER, Some(3000), &[1025].into()).unwrap();
        assert_eq!(
            pool.allocated_ranges(),
            vec![
                (1025..=1025, OWNER),
                (1026..=1026, "other:x"),
                (3000..=3000, OWNER),
            ]
        );
        assert_eq!(pool.release_except(OWNER, &[1025].into()), vec![3000]);
        assert_eq!(pool.release_owner(OWNER), vec![1025]);
        assert_eq!(pool.release_owner(OWNER), Vec::<u16>::new());
        assert_eq!(pool.available(), 3068);
        assert_eq!(pool.allocate("new:y", None, &none()), Ok(1025));
    }

    #[test]
    fn an_exhausted_pool_names_itself() {
        let mut pool = VlanPool::from_restricted("p1", "0-4093").unwrap();
        assert_eq!(pool.allocate(OWNER, None, &none()), Ok(4094));
        let error = pool.allocate("other:x", None, &none()).unwrap_err();
        assert_eq!(
            error,
            VlanError::Exhausted {
                pool: "p1".to_owned()
            }
        );
        assert!(error.to_string().contains("ha_interface p1"), "{error}");
    }
}
