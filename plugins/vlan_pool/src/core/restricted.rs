//! The `restricted_vlans` spec of an ha_interface: `"0-1024,4094"`.

use std::ops::RangeInclusive;

use super::{VlanError, MAX_VLAN};

/// Parses a `restricted_vlans` spec: comma-separated VLAN ids and inclusive ranges `a-b` with
/// `0 <= a <= b <= 4095`, spaces allowed around each token. An empty (or all-space) spec
/// restricts nothing. Ranges come back in spec order, as written (overlaps are kept).
///
/// # Errors
///
/// [`VlanError::InvalidRestricted`] naming the first bad token: an empty token (`"1,,2"`), one
/// that is not digits or `digits-digits` (`"abc"`, `"-3"`, `"+5"`), an id above 4095, or a
/// range whose start is above its end (`"5-1"`).
///
/// # Examples
///
/// ```
/// use vlan_pool_worker::core::parse_restricted;
///
/// assert_eq!(parse_restricted("0-1024, 4094").unwrap(), vec![0..=1024, 4094..=4094]);
/// assert_eq!(parse_restricted("  ").unwrap(), vec![]);
/// let error = parse_restricted("1,5-1").unwrap_err();
/// assert!(error.to_string().contains("\"5-1\""));
/// ```
pub fn parse_restricted(spec: &str) -> Result<Vec<RangeInclusive<u16>>, VlanError> {
    if spec.trim().is_empty() {
        return Ok(Vec::new());
    }
    spec.split(',')
        .map(|token| parse_token(token.trim()))
        .collect()
}

fn parse_token(token: &str) -> Result<RangeInclusive<u16>, VlanError> {
    let invalid = |reason| VlanError::InvalidRestricted {
        token: token.to_owned(),
        reason,
    };
    if token.is_empty() {
        return Err(invalid(
            "empty token (two commas in a row, or one at an end?)",
        ));
    }
    let (start, end) = match token.split_once('-') {
        Some((start, end)) => (vlan_id(start), vlan_id(end)),
        None => (vlan_id(token), vlan_id(token)),
    };
    let (start, end) = match (start, end) {
        (Some(Ok(start)), Some(Ok(end))) => (start, end),
        (None, _) | (_, None) => {
            return Err(invalid("expected a VLAN id or a range a-b"));
        }
        _ => return Err(invalid("VLAN ids go from 0 to 4095")),
    };
    if start > end {
        return Err(invalid("range start is above its end"));
    }
    Ok(start..=end)
}

/// `None` unless `text` is all ASCII digits (`u16::from_str` would also take `+5`); `Some(Err)`
/// for a number above 4095.
fn vlan_id(text: &str) -> Option<Result<u16, ()>> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(match text.parse::<u32>() {
        Ok(id) if id <= u32::from(MAX_VLAN) => Ok(id as u16),
        _ => Err(()),
    })
}

/// Formats sorted ranges in the `restricted_vlans` syntax: `0-1024,4094`.
///
/// # Examples
///
/// ```
/// use vlan_pool_worker::core::format_ranges;
///
/// assert_eq!(format_ranges(&[0..=1024, 4094..=4095]), "0-1024,4094-4095");
/// assert_eq!(format_ranges(&[7..=7]), "7");
/// ```
pub fn format_ranges(ranges: &[RangeInclusive<u16>]) -> String {
    ranges
        .iter()
        .map(|range| {
            if range.start() == range.end() {
                range.start().to_string()
            } else {
                format!("{}-{}", range.start(), range.end())
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Sorts ranges and merges the ones that overlap or touch.
pub(crate) fn normalize(ranges: &[RangeInclusive<u16>]) -> Vec<RangeInclusive<u16>> {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|range| (*range.start(), *range.end()));
    let mut merged: Vec<RangeInclusive<u16>> = Vec::with_capacity(sorted.len());
    for range in sorted {
        match merged.last_mut() {
            Some(last) if u32::from(*range.start()) <= u32::from(*last.end()) + 1 => {
                *last = *last.start()..=*last.end().max(range.end());
            }
            _ => merged.push(range),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_ranges_and_spaces_parse() {
        assert_eq!(
            parse_restricted(" 1 ,3-5,  4095 ,0-0").unwrap(),
            vec![1..=1, 3..=5, 4095..=4095, 0..=0]
        );
        assert_eq!(parse_restricted("0-4095").unwrap(), vec![0..=4095]);
        assert_eq!(parse_restricted("007").unwrap(), vec![7..=7]);
    }

    #[test]
    fn empty_or_blank_spec_restricts_nothing() {
        assert_eq!(parse_restricted("").unwrap(), vec![]);
        assert_eq!(parse_restricted("   ").unwrap(), vec![]);
    }

    #[test]
    fn bad_specs_fail_naming_their_token_in_quotes() {
        for (spec, token) in [
            ("5-1", "5-1"),
            ("abc", "abc"),
            ("4096", "4096"),
            ("1,,2", ""),
            ("-3", "-3"),
            ("1, +5", "+5"),
            ("1-2-3", "1-2-3"),
            ("1 - 3", "1 - 3"),
            ("10-4096", "10-4096"),
            ("1,", ""),
            ("99999999999", "99999999999"),
        ] {
            let error = parse_restricted(spec).expect_err(spec);
            assert!(
                matches!(&error, VlanError::InvalidRestricted { token: t, .. } if t == token),
                "{spec}: {error:?}"
            );
            assert!(
                error.to_string().contains(&format!("\"{token}\"")),
                "{spec}: {error}"
            );
        }
    }

    #[test]
    fn format_ranges_round_trips_through_the_parser() {
        let ranges = vec![0..=1024, 2000..=2000, 4094..=4095];
        assert_eq!(parse_restricted(&format_ranges(&ranges)).unwrap(), ranges);
        assert_eq!(format_ranges(&[]), "");
    }

    #[test]
    fn normalize_sorts_and_merges_overlapping_and_touching_ranges() {
        assert_eq!(
            normalize(&[10..=20, 0..=5, 6..=8, 15..=30, 4095..=4095]),
            vec![0..=8, 10..=30, 4095..=4095]
        );
    }
}
