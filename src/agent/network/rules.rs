//! nftables rulesets, generated as text and loaded atomically with `nft -f -`.
//!
//! The host holds one `inet` table owned by Wrenn (named after the slot prefix). Its chains refer
//! to two named sets with one element per live slot, so creating or destroying a sandbox changes
//! set elements only; the rules themselves are loaded once, at start-up, in one transaction.
//! Each sandbox namespace holds a small `ip` table of its own for the guest's DNAT/SNAT.

use std::fmt::Write;
use std::net::Ipv4Addr;

use crate::config::{InterfaceName, Ipv4Cidr};

use super::dns::DNS_PORT;
use super::name_guard::GUARD_PORT;
use super::{GATEWAY_IP, GUEST_IP};

/// The name of the namespace-side veth, identical in every sandbox namespace.
pub(super) const NAMESPACE_UPLINK: &str = "eth0";

/// Host-side veth names of live slots.
const LINKS_SET: &str = "sandbox_links";
/// (host-side veth, namespace veth address) pairs: the only source each link may forward from.
const SOURCES_SET: &str = "sandbox_sources";

/// One slot's entries in the host sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlotElements {
    pub link: String,
    pub source: Ipv4Addr,
}

/// What the host table enforces.
pub(super) struct HostPolicy<'a> {
    pub table: &'a str,
    pub transit_range: Ipv4Cidr,
    pub egress_interface: Option<&'a InterfaceName>,
    pub egress_deny: &'a [Ipv4Cidr],
}

/// The whole host table, replacing any previous version of it in the same transaction (the
/// leading `table`/`delete table` pair makes the delete succeed whether or not it existed).
pub(super) fn host_ruleset(policy: &HostPolicy<'_>, live: &[SlotElements]) -> String {
    let table = policy.table;
    let mut out = String::new();
    let w = &mut out;
    // `write!` into a String cannot fail.
    let _ = writeln!(
        w,
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{"
    );
    let _ = writeln!(w, "  set {LINKS_SET} {{\n    type ifname;");
    if !live.is_empty() {
        let links: Vec<String> = live.iter().map(|e| format!("\"{}\"", e.link)).collect();
        let _ = writeln!(w, "    elements = {{ {} }};", links.join(", "));
    }
    let _ = writeln!(
        w,
        "  }}\n  set {SOURCES_SET} {{\n    type ifname . ipv4_addr;"
    );
    if !live.is_empty() {
        let pairs: Vec<String> = live
            .iter()
            .map(|e| format!("\"{}\" . {}", e.link, e.source))
            .collect();
        let _ = writeln!(w, "    elements = {{ {} }};", pairs.join(", "));
    }
    let _ = writeln!(
        w,
        "  }}\n  set egress_deny {{\n    type ipv4_addr; flags interval; auto-merge;"
    );
    if !policy.egress_deny.is_empty() {
        let nets: Vec<String> = policy.egress_deny.iter().map(Ipv4Cidr::to_string).collect();
        let _ = writeln!(w, "    elements = {{ {} }};", nets.join(", "));
    }
    let _ = writeln!(w, "  }}");

    // A sandbox may talk to the host only in answer to the agent's own connections: agent and
    // control-plane ports and every other host service stay closed to guests, whichever host
    // address (veth ends, LAN, addresses routed to loopback) they aim at.
    let _ = writeln!(
        w,
        "  chain input {{
    type filter hook input priority filter - 5; policy accept;
    iifname @{LINKS_SET} ct state established,related accept
    iifname @{LINKS_SET} drop
  }}"
    );
    let _ = writeln!(
        w,
        "  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
    iifname @{LINKS_SET} jump from_sandbox
    oifname @{LINKS_SET} jump to_sandbox
  }}"
    );
    // Spoofed sources, other sandboxes and denied networks are dropped before anything is
    // accepted; what is left may leave through the egress interface only.
    let egress_accept = match policy.egress_interface {
        Some(name) => format!("    oifname \"{name}\" accept\n"),
        None => String::new(),
    };
    let _ = writeln!(
        w,
        "  chain from_sandbox {{
    meta nfproto != ipv4 drop
    iifname . ip saddr != @{SOURCES_SET} drop
    oifname @{LINKS_SET} drop
    ct state established,related accept
    ip daddr @egress_deny drop
{egress_accept}    drop
  }}"
    );
    // Nobody but the host itself (whose traffic is not forwarded) opens connections into a
    // sandbox; other machines routing to the sandbox ranges through this host are refused.
    let _ = writeln!(
        w,
        "  chain to_sandbox {{
    ct state established,related accept
    drop
  }}"
    );
    let masquerade = match policy.egress_interface {
        Some(name) => {
            format!(
                "    oifname \"{name}\" ip saddr {} masquerade\n",
                policy.transit_range
            )
        }
        None => String::new(),
    };
    let _ = writeln!(
        w,
        "  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
{masquerade}  }}
}}"
    );
    out
}

/// Adds one slot's set elements in one transaction.
pub(super) fn add_slot(table: &str, slot: &SlotElements) -> String {
    format!(
        "add element inet {table} {LINKS_SET} {{ \"{link}\" }}\n\
         add element inet {table} {SOURCES_SET} {{ \"{link}\" . {source} }}\n",
        link = slot.link,
        source = slot.source,
    )
}

/// Removes one slot's set elements whether or not they are present: nft 1.0.6 has no
/// `destroy element`, but adding an existing element is a no-op, so add-then-delete in one
/// transaction is idempotent without a racy list-then-delete.
pub(super) fn remove_slot(table: &str, slot: &SlotElements) -> String {
    let add = add_slot(table, slot);
    let delete = add.replace("add element", "delete element");
    add + &delete
}

/// Extracts the host-side link names of live slots from `nft -j list set ... sandbox_links`.
pub(super) fn parse_links_set(json: &str) -> Result<Vec<String>, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let items = value["nftables"].as_array().ok_or("no `nftables` array")?;
    let mut links = Vec::new();
    for item in items {
        if let Some(elems) = item["set"]["elem"].as_array() {
            links.extend(elems.iter().filter_map(|e| e.as_str().map(str::to_owned)));
        }
    }
    Ok(links)
}

pub(super) const LINKS_SET_NAME: &str = LINKS_SET;

/// The table inside a sandbox namespace: the host address of the slot is DNAT'd to the guest,
/// guest egress is SNAT'd to the namespace's veth address, and nothing but the guest's own
/// address may be forwarded out of the guest-facing device (the TAP in production).
/// The guest reaches the namespace itself only for the DNS forwarder and the name guard on its
/// gateway.
pub(super) fn namespace_ruleset(
    table: &str,
    host_addr: Ipv4Addr,
    namespace_addr: Ipv4Addr,
) -> String {
    let up = NAMESPACE_UPLINK;
    format!(
        "table ip {table}
delete table ip {table}
table ip {table} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{up}\" ip daddr {host_addr} dnat to {GUEST_IP}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{up}\" ip saddr {GUEST_IP} snat to {namespace_addr}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"{up}\" ip daddr {GUEST_IP} ct status dnat accept
    iifname != \"{up}\" oifname \"{up}\" ip saddr {GUEST_IP} accept
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname != \"{up}\" ip daddr {GATEWAY_IP} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept
    iifname != \"{up}\" ip daddr {GATEWAY_IP} tcp dport {GUARD_PORT} accept
    iifname != {{ \"{up}\", \"lo\" }} ct state new drop
  }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_is_add_then_delete_of_the_same_elements() {
        let slot = SlotElements {
            link: "wrenn-3".into(),
            source: Ipv4Addr::new(10, 12, 0, 7),
        };
        let text = remove_slot("wrenn", &slot);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("add element inet wrenn sandbox_links"));
        assert!(lines[3].starts_with("delete element inet wrenn sandbox_sources"));
        assert!(lines[3].ends_with("{ \"wrenn-3\" . 10.12.0.7 }"));
    }

    #[test]
    fn ruleset_omits_egress_when_no_interface_is_known() {
        let policy = HostPolicy {
            table: "wrenn",
            transit_range: "10.12.0.0/16".parse().unwrap(),
            egress_interface: None,
            egress_deny: &[],
        };
        let text = host_ruleset(&policy, &[]);
        assert!(!text.contains("masquerade"));
        assert!(!text.contains("elements"));
        let uplink: InterfaceName = "eth9".parse().unwrap();
        let policy = HostPolicy {
            egress_interface: Some(&uplink),
            ..policy
        };
        let text = host_ruleset(&policy, &[]);
        assert!(
            text.contains("oifname \"eth9\" ip saddr 10.12.0.0/16 masquerade"),
            "{text}"
        );
    }

    #[test]
    fn links_set_json_is_parsed() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet", "name": "sandbox_links", "table": "wrenn", "type": "ifname", "handle": 3, "elem": ["wrenn-1", "wrenn-9"]}}]}"#;
        assert_eq!(parse_links_set(json).unwrap(), vec!["wrenn-1", "wrenn-9"]);
        let empty = r#"{"nftables": [{"metainfo": {}}, {"set": {"name": "sandbox_links"}}]}"#;
        assert!(parse_links_set(empty).unwrap().is_empty());
        assert!(parse_links_set("not json").is_err());
    }
}
