//! Slot arithmetic: which names and addresses belong to network slot N. Every sandbox namespace
//! is identical inside (same guest IP and MAC); only these host-facing values differ per slot.

use std::net::Ipv4Addr;

use crate::config::Ipv4Cidr;

use super::{guest_network, NetworkError};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

/// Maps slots to names and addresses. Slot N (1-based) owns:
/// the host address `host_range[N]`, and the veth /31 `transit_range[2N]` (host side) ↔
/// `transit_range[2N+1]` (namespace side). The namespace and the host veth are both named
/// `<prefix>-<N>`, so leftovers are recognisable after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlotPlan {
    prefix: String,
    host_range: Ipv4Cidr,
    transit_range: Ipv4Cidr,
    capacity: u32,
}

impl SlotPlan {
    pub(super) fn new(
        prefix: &str,
        host_range: Ipv4Cidr,
        transit_range: Ipv4Cidr,
    ) -> Result<Self, NetworkError> {
        let invalid = |detail: String| NetworkError::InvalidSettings(detail);
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(invalid(format!(
                "name prefix `{prefix}` must be non-empty lowercase letters and digits"
            )));
        }
        if host_range.overlaps(&transit_range) {
            return Err(invalid(format!(
                "sandbox host range {host_range} overlaps transit range {transit_range}"
            )));
        }
        for range in [host_range, transit_range] {
            if range.overlaps(&guest_network()) {
                return Err(invalid(format!(
                    "range {range} overlaps the guest network {} present in every sandbox",
                    guest_network()
                )));
            }
        }
        // Slot 0 and the host range's last address are never used, which keeps the network and
        // broadcast addresses out of play; slot N needs transit addresses 2N and 2N+1.
        let by_host = host_range.size().saturating_sub(2);
        let by_transit = (transit_range.size() / 2).saturating_sub(1);
        let capacity = u32::try_from(by_host.min(by_transit)).unwrap_or(u32::MAX);
        if capacity == 0 {
            return Err(invalid(format!(
                "ranges {host_range} and {transit_range} leave no usable slot"
            )));
        }
        let longest = prefix.len() + 1 + capacity.to_string().len();
        if longest > MAX_IFNAME_LEN {
            return Err(invalid(format!(
                "interface names `{prefix}-{capacity}` would exceed {MAX_IFNAME_LEN} characters"
            )));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            host_range,
            transit_range,
            capacity,
        })
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn capacity(&self) -> u32 {
        self.capacity
    }

    pub(super) fn transit_range(&self) -> Ipv4Cidr {
        self.transit_range
    }

    fn nth(range: Ipv4Cidr, index: u64) -> Ipv4Addr {
        range
            .nth(index)
            .expect("slot within capacity maps inside its range")
    }

    /// The address the agent dials to reach the guest of this slot.
    pub(super) fn host_addr(&self, slot: u32) -> Ipv4Addr {
        Self::nth(self.host_range, u64::from(slot))
    }

    /// The host end of the slot's veth pair.
    pub(super) fn host_veth_addr(&self, slot: u32) -> Ipv4Addr {
        Self::nth(self.transit_range, 2 * u64::from(slot))
    }

    /// The namespace end of the slot's veth pair; guest egress is SNAT'd to it.
    pub(super) fn namespace_veth_addr(&self, slot: u32) -> Ipv4Addr {
        Self::nth(self.transit_range, 2 * u64::from(slot) + 1)
    }

    /// Name of both the slot's network namespace and its host-side veth.
    pub(super) fn name(&self, slot: u32) -> String {
        format!("{}-{slot}", self.prefix)
    }

    /// The slot a namespace or link name belongs to, if it is one of ours and in range.
    pub(super) fn slot_of(&self, name: &str) -> Option<u32> {
        let digits = name.strip_prefix(&self.prefix)?.strip_prefix('-')?;
        if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let slot: u32 = digits.parse().ok()?;
        (1..=self.capacity).contains(&slot).then_some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(host: &str, transit: &str) -> Result<SlotPlan, NetworkError> {
        SlotPlan::new("wrenn", host.parse().unwrap(), transit.parse().unwrap())
    }

    #[test]
    fn default_ranges_give_32767_slots_without_overflow() {
        let plan = plan("10.11.0.0/16", "10.12.0.0/16").unwrap();
        assert_eq!(plan.capacity(), 32767);
        assert_eq!(plan.host_addr(1), Ipv4Addr::new(10, 11, 0, 1));
        assert_eq!(plan.host_veth_addr(1), Ipv4Addr::new(10, 12, 0, 2));
        assert_eq!(plan.namespace_veth_addr(1), Ipv4Addr::new(10, 12, 0, 3));
        assert_eq!(plan.host_addr(300), Ipv4Addr::new(10, 11, 1, 44));
        assert_eq!(plan.host_veth_addr(300), Ipv4Addr::new(10, 12, 2, 88));
        assert_eq!(
            plan.namespace_veth_addr(32767),
            Ipv4Addr::new(10, 12, 255, 255)
        );
        assert_eq!(plan.host_addr(32767), Ipv4Addr::new(10, 11, 127, 255));
        assert_eq!(plan.name(32767), "wrenn-32767");
    }

    #[test]
    fn every_slot_has_distinct_addresses() {
        let plan = plan("10.11.0.0/22", "10.12.0.0/20").unwrap();
        assert_eq!(plan.capacity(), 1022);
        let mut seen = std::collections::HashSet::new();
        for slot in 1..=plan.capacity() {
            for addr in [
                plan.host_addr(slot),
                plan.host_veth_addr(slot),
                plan.namespace_veth_addr(slot),
            ] {
                assert!(seen.insert(addr), "{addr} reused at slot {slot}");
            }
        }
    }

    #[test]
    fn names_round_trip_and_foreign_names_are_ignored() {
        let plan = plan("10.11.0.0/16", "10.12.0.0/16").unwrap();
        assert_eq!(plan.slot_of("wrenn-7"), Some(7));
        assert_eq!(plan.slot_of(&plan.name(32767)), Some(32767));
        for foreign in [
            "wrenn-0",
            "wrenn-07",
            "wrenn-32768",
            "wrenn-",
            "wrenn-x",
            "wrennx-1",
            "eth0",
            "wrenn-1a",
        ] {
            assert_eq!(plan.slot_of(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let cases = [
            (plan("10.11.0.0/16", "10.11.0.0/17"), "overlaps"),
            (plan("169.254.0.0/16", "10.12.0.0/16"), "guest network"),
            (plan("10.11.0.0/31", "10.12.0.0/16"), "no usable slot"),
            (plan("10.11.0.0/16", "10.12.0.0/31"), "no usable slot"),
            (
                SlotPlan::new(
                    "wrennlongname",
                    "10.11.0.0/16".parse().unwrap(),
                    "10.12.0.0/16".parse().unwrap(),
                ),
                "exceed",
            ),
            (
                SlotPlan::new(
                    "Wrenn",
                    "10.11.0.0/16".parse().unwrap(),
                    "10.12.0.0/16".parse().unwrap(),
                ),
                "prefix",
            ),
        ];
        for (result, needle) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(needle), "`{needle}` missing from: {err}");
        }
    }
}
