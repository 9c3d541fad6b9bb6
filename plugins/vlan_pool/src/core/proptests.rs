//! Properties of the bitmap and of allocation over arbitrary inputs.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

fn set_bits(pool: &Pool) -> u32 {
    pool.as_bytes().iter().map(|byte| byte.count_ones()).sum()
}

/// One step of a random history: an owner (of a few) allocates, with or without a request, or
/// releases everything it has.
#[derive(Debug, Clone)]
enum Step {
    Allocate { owner: u8, requested: Option<u16> },
    Release { owner: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..6, proptest::option::of(0u16..4200))
            .prop_map(|(owner, requested)| Step::Allocate { owner, requested }),
        1 => (0u8..6).prop_map(|owner| Step::Release { owner }),
    ]
}

/// A restricted spec of up to three ranges, formatted like an operator would.
fn restricted_spec() -> impl Strategy<Value = String> {
    proptest::collection::vec((0u16..4096, 0u16..64), 0..3).prop_map(|ranges| {
        let ranges: Vec<_> = ranges
            .into_iter()
            .map(|(start, length)| start..=start.saturating_add(length).min(MAX_VLAN))
            .collect();
        format_ranges(&ranges)
    })
}

proptest! {
    #[test]
    fn base64_round_trips_any_bitmap(bytes in proptest::collection::vec(any::<u8>(), STATE_BYTES)) {
        let bits: [u8; STATE_BYTES] = bytes.clone().try_into().unwrap();
        let pool = Pool::from_bytes(bits);
        let text = pool.to_base64();
        let decoded = Pool::from_base64(&text).unwrap();
        prop_assert_eq!(&decoded, &pool);
        prop_assert_eq!(decoded.to_base64(), text);
        prop_assert!(!decoded.is_free(0) && !decoded.is_free(MAX_VLAN));
        // Every other bit is as given.
        for vlan in 1..MAX_VLAN {
            let given = bytes[usize::from(vlan / 8)] & (0x80 >> (vlan % 8)) != 0;
            prop_assert_eq!(decoded.is_free(vlan), !given);
        }
        prop_assert_eq!(decoded.available(), 4096 - set_bits(&decoded));
    }

    #[test]
    fn allocation_histories_keep_the_pool_consistent(
        spec in restricted_spec(),
        steps in proptest::collection::vec(step(), 0..200),
    ) {
        let mut pool = VlanPool::from_restricted("p", &spec).unwrap();
        let restricted: BTreeSet<u16> =
            pool.restricted_ranges().iter().flat_map(|range| range.clone()).collect();
        for step in steps {
            let before = pool.clone();
            match step {
                Step::Allocate { owner, requested } => {
                    let owner = format!("gw:{owner}");
                    match pool.allocate(&owner, requested, &BTreeSet::new()) {
                        Ok(vlan) => {
                            prop_assert!(vlan != 0 && vlan != MAX_VLAN && !restricted.contains(&vlan));
                            // Either the owner already had it, or it was free before.
                            let had = before.allocations().get(&vlan) == Some(&owner);
                            prop_assert!(had || before.bitmap().is_free(vlan), "VLAN {} handed out twice", vlan);
                            if let Some(requested) = requested {
                                prop_assert_eq!(vlan, requested);
                            }
                            prop_assert_eq!(pool.allocations().get(&vlan), Some(&owner));
                        }
                        Err(_) => prop_assert_eq!(&pool, &before, "a failed allocation changes nothing"),
                    }
                }
                Step::Release { owner } => {
                    let owner = format!("gw:{owner}");
                    for vlan in pool.release_owner(&owner) {
                        prop_assert!(pool.bitmap().is_free(vlan));
                    }
                    prop_assert_eq!(pool.vlans_of(&owner).count(), 0);
                }
            }
            let record = pool.to_record();
            prop_assert_eq!(record.vlan_ids_available, 4096 - set_bits(pool.bitmap()));
            for &vlan in &restricted {
                prop_assert!(!pool.bitmap().is_free(vlan), "restricted VLAN {} cleared", vlan);
            }
            prop_assert!(!pool.bitmap().is_free(0) && !pool.bitmap().is_free(MAX_VLAN));
            // The stored form reads back as the same pool, invariants checked.
            prop_assert_eq!(VlanPool::parse("p", &record.to_json()).unwrap(), pool.clone());
        }
    }
}
