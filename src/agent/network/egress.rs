//! A sandbox's egress policy ([`EgressPolicy`]) as nftables inside its namespace: one table of
//! its own, replaced whole in one transaction on every change, beside the namespace's NAT table.
//!
//! Every forwarded guest packet passes the policy, not only a connection's first: a change cuts
//! established flows to destinations it now refuses. Addresses admitted by name live in a
//! timeout set filled by the DNS forwarder (`dns`) with each answer's TTL. A flow admitted that
//! way carries the policy's generation in its conntrack mark, so it outlives its address's pin
//! but not a policy change that no longer admits it. Refusals reset TCP and answer other
//! protocols "administratively prohibited", so a guest fails fast instead of timing out.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::egress::{EgressDefault, EgressPolicy, NameVerdict};

use super::dns::DNS_PORT;
use super::name_guard::{GUARDED_PORTS, GUARD_PORT};
use super::netns::Namespace;
use super::rules::NAMESPACE_UPLINK;
use super::{nft, SystemError};

/// A pinned address stays admitted at least this long, so that a TTL of 0 or 1 still lets the
/// guest connect after its look-up.
const MIN_PIN: Duration = Duration::from_secs(30);
/// ...and at most this long, whatever TTL an upstream claims.
const MAX_PIN: Duration = Duration::from_secs(24 * 3600);

/// The ruleset for `policy`; `pins` are the name-admitted addresses still valid under it.
pub(super) fn ruleset(
    table: &str,
    policy: &EgressPolicy,
    generation: u32,
    pins: &[(Ipv4Addr, Duration)],
) -> String {
    // The guest's side is whatever is not the uplink: `tap0` with a VM, a veth in tests.
    let up = NAMESPACE_UPLINK;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "table ip {table}\ndelete table ip {table}\ntable ip {table} {{"
    );
    for (set, rules) in [("allow_net", &policy.allow), ("deny_net", &policy.deny)] {
        let nets: Vec<String> = EgressPolicy::networks(rules)
            .map(|n| n.to_string())
            .collect();
        let _ = write!(
            w,
            "  set {set} {{\n    type ipv4_addr; flags interval; auto-merge;\n"
        );
        if !nets.is_empty() {
            let _ = writeln!(w, "    elements = {{ {} }};", nets.join(", "));
        }
        let _ = writeln!(w, "  }}");
    }
    let _ = writeln!(w, "  set allow_dns {{\n    type ipv4_addr; flags timeout;");
    if !pins.is_empty() {
        let elements: Vec<String> = pins
            .iter()
            .map(|(addr, left)| format!("{addr} timeout {}s", left.as_secs().max(1)))
            .collect();
        let _ = writeln!(w, "    elements = {{ {} }};", elements.join(", "));
    }
    let _ = writeln!(w, "  }}");
    // Every look-up goes to the forwarder, whichever resolver the guest was configured with.
    // Where only an allowed name admits an address, web connections to it go to the name guard.
    let guarded = policy.default == EgressDefault::Deny
        && policy
            .allow
            .iter()
            .any(|rule| matches!(rule, crate::egress::EgressRule::Domain(_)));
    let web_ports: Vec<String> = GUARDED_PORTS.iter().map(u16::to_string).collect();
    let web_ports = web_ports.join(", ");
    let guard = if guarded {
        format!(
            "    iifname != \"{up}\" ip daddr @allow_dns ip daddr != @allow_net tcp dport {{ {web_ports} }} redirect to :{GUARD_PORT}\n"
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        w,
        "  chain prerouting {{
    type nat hook prerouting priority dstnat - 1; policy accept;
    iifname != \"{up}\" meta l4proto {{ tcp, udp }} th dport {DNS_PORT} redirect to :{DNS_PORT}
{guard}  }}"
    );
    // Connections the agent opens to the guest (its host address, DNAT'd) are not egress.
    // The guard's own connections leave from the namespace itself: checked, counted and
    // limited like the guest's.
    let _ = writeln!(
        w,
        "  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    ct status dnat accept
    iifname != \"{up}\" jump outbound
    oifname != \"{up}\" jump inbound
  }}
  chain local_out {{
    type filter hook output priority filter - 1; policy accept;
    ct status dnat accept
    oifname \"{up}\" jump outbound
  }}
  chain local_in {{
    type filter hook input priority filter - 1; policy accept;
    ct status dnat accept
    iifname \"{up}\" jump inbound
  }}"
    );
    let limit = policy.bandwidth_mbps.map(|mbps| {
        let bytes = u64::from(mbps) * 125_000;
        // The kernel's bucket holds a second of the rate plus the burst; a little burst on top
        // keeps TCP's bursts from being cut to the bone at low rates.
        let burst = (bytes / 8).max(64 * 1024);
        format!("    limit rate over {bytes} bytes/second burst {burst} bytes drop\n")
    });
    let limit = limit.as_deref().unwrap_or("");
    let fallback = match policy.default {
        EgressDefault::Allow => "admit",
        EgressDefault::Deny => "refuse",
    };
    // The guard sees TCP only: QUIC to an address admitted only by a name would pass any name,
    // so clients fall back to TCP, where the guard checks it.
    let quic = if guarded {
        format!("    ip daddr @allow_dns ip daddr != @allow_net udp dport {{ {web_ports} }} jump refuse\n")
    } else {
        String::new()
    };
    let _ = writeln!(
        w,
        "  chain outbound {{
{limit}    ip daddr @deny_net jump refuse
    ip daddr @allow_net jump admit
{quic}    ip daddr @allow_dns ct mark set {generation} jump admit
    ct mark {generation} jump admit
    jump {fallback}
  }}"
    );
    let _ = writeln!(
        w,
        "  chain admit {{
    accept
  }}
{REFUSE_CHAIN}
  chain inbound {{
{limit}    ip saddr @deny_net drop
  }}
}}"
    );
    out
}

const REFUSE_CHAIN: &str = "  chain refuse {
    meta l4proto tcp reject with tcp reset
    reject with icmp type admin-prohibited
  }";

/// The table counting the guest's open connections (`max_connections`), apart from the policy's
/// table so that the count survives every change but one of the limit itself. One counting rule
/// serves the guest's own connections and the name guard's, so both count against one limit.
/// A connection the policy then refuses is never confirmed, and leaves the count.
pub(super) fn limits_ruleset(table: &str, max_connections: Option<u32>) -> String {
    let up = NAMESPACE_UPLINK;
    let count = max_connections
        .map(|n| format!("    ct count over {n} jump refuse\n"))
        .unwrap_or_default();
    format!(
        "table ip {table}
delete table ip {table}
table ip {table} {{
  chain forward {{
    type filter hook forward priority filter - 2; policy accept;
    ct status dnat accept
    iifname != \"{up}\" ct state new jump count
  }}
  chain local_out {{
    type filter hook output priority filter - 2; policy accept;
    ct status dnat accept
    oifname \"{up}\" ct state new jump count
  }}
  chain count {{
{count}  }}
{REFUSE_CHAIN}
}}
"
    )
}

/// Adds or extends pins in one transaction. An existing element keeps its timeout on `add`, so
/// each is added, deleted and added again with the new one.
fn pin_transaction(table: &str, pins: &[(Ipv4Addr, Duration)]) -> String {
    let mut out = String::new();
    for (addr, ttl) in pins {
        let _ = writeln!(
            out,
            "add element ip {table} allow_dns {{ {addr} timeout 1s }}\n\
             delete element ip {table} allow_dns {{ {addr} }}\n\
             add element ip {table} allow_dns {{ {addr} timeout {}s }}",
            ttl.as_secs().max(1)
        );
    }
    out
}

/// Whether an address may be pinned for an allowed name. A name that resolves to loopback,
/// link-local (the guest's own network, metadata services) or a network the host
/// (`agent.egress_deny`) or the policy refuses is a rebinding attempt.
pub(super) fn pinnable(
    addr: Ipv4Addr,
    host_deny: &[crate::config::Ipv4Cidr],
    policy: &EgressPolicy,
) -> bool {
    !(addr.is_loopback()
        || addr.is_unspecified()
        || addr.is_link_local()
        || addr.is_multicast()
        || addr.is_broadcast()
        || host_deny.iter().any(|net| net.index_of(addr).is_some())
        || policy.denies_address(addr))
}

/// At most this many addresses pinned per sandbox, and names per address: a guest looking up
/// endless names under an allowed wildcard must not grow the agent without bound.
const MAX_PINNED_ADDRS: usize = 4096;
const MAX_NAMES_PER_ADDR: usize = 64;

/// The conntrack mark of flows admitted by name under `policy`: derived from its name rules
/// alone, so a change that keeps them (or an agent that restarts and reloads the same policy)
/// leaves those flows running, and one that changes them cuts the ones it no longer admits.
fn name_generation(policy: &EgressPolicy) -> u32 {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for (list, rules) in [("allow", &policy.allow), ("deny", &policy.deny)] {
        for rule in rules {
            if let crate::egress::EgressRule::Domain(pattern) = rule {
                digest.update(format!("{list} {pattern}\n"));
            }
        }
    }
    let bytes = digest.finalize();
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) | 1
}

/// An address pinned into the kernel's set, and the names whose answers gave it.
struct Pinned {
    /// When the kernel's element expires.
    until: Instant,
    names: HashMap<String, Instant>,
}

/// One sandbox's egress: its table, policy and pins. Shared with its DNS forwarder and name
/// guard.
pub(super) struct SlotEgress {
    namespace: Namespace,
    table: String,
    policy: RwLock<Arc<EgressPolicy>>,
    /// Serialises table loads and pin changes, so a reload never drops a pin made meanwhile.
    pins: tokio::sync::Mutex<HashMap<Ipv4Addr, Pinned>>,
}

impl SlotEgress {
    /// Loads `policy`'s table into `namespace`.
    pub(super) async fn load(
        namespace: Namespace,
        table: String,
        policy: EgressPolicy,
    ) -> Result<Arc<Self>, SystemError> {
        let mut text = ruleset(&table, &policy, name_generation(&policy), &[]);
        text.push_str(&limits_ruleset(
            &format!("{table}_limits"),
            policy.max_connections,
        ));
        nft::apply(&text, Some(&namespace)).await?;
        Ok(Arc::new(Self {
            namespace,
            table,
            policy: RwLock::new(Arc::new(policy)),
            pins: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    pub(super) fn policy(&self) -> Arc<EgressPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the policy. Pins of names it still allows are kept; flows it no longer admits
    /// are cut by their next packet.
    pub(super) async fn set(&self, policy: EgressPolicy) -> Result<(), SystemError> {
        let mut pins = self.pins.lock().await;
        let now = Instant::now();
        let allowed = |name: &str| policy.name_verdict(name) == NameVerdict::Allowed;
        let mut kept: HashMap<Ipv4Addr, Pinned> = HashMap::new();
        for (addr, pinned) in pins.iter() {
            if policy.denies_address(*addr) {
                continue;
            }
            let names: HashMap<String, Instant> = pinned
                .names
                .iter()
                .filter(|(name, until)| **until > now && allowed(name))
                .map(|(name, until)| (name.clone(), *until))
                .collect();
            if let Some(until) = names.values().max().copied() {
                kept.insert(*addr, Pinned { until, names });
            }
        }
        let elements: Vec<(Ipv4Addr, Duration)> = kept
            .iter()
            .map(|(addr, pinned)| (*addr, pinned.until - now))
            .collect();
        let mut text = ruleset(&self.table, &policy, name_generation(&policy), &elements);
        if policy.max_connections != self.policy().max_connections {
            let limits = format!("{}_limits", self.table);
            text.push_str(&limits_ruleset(&limits, policy.max_connections));
        }
        nft::apply(&text, Some(&self.namespace)).await?;
        *pins = kept;
        *self
            .policy
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(policy);
        Ok(())
    }

    /// Whether this sandbox's look-up of `name` answered `addr`, and its pin still holds.
    pub(super) async fn resolved(&self, name: &str, addr: Ipv4Addr) -> bool {
        let pins = self.pins.lock().await;
        pins.get(&addr)
            .and_then(|pinned| pinned.names.get(name))
            .is_some_and(|until| *until > Instant::now())
    }

    /// Opens a TCP connection from inside the sandbox's namespace, as the guest's would leave.
    pub(super) async fn connect_out(
        &self,
        to: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<tokio::net::TcpStream, SystemError> {
        let stream = self
            .namespace
            .run(move || {
                let failed = |e| SystemError::io(format!("connecting to {to}"), e);
                let stream = std::net::TcpStream::connect_timeout(&to, timeout).map_err(failed)?;
                stream.set_nonblocking(true).map_err(failed)?;
                Ok(stream)
            })
            .await?;
        tokio::net::TcpStream::from_std(stream)
            .map_err(|e| SystemError::io("handing a connection to the runtime", e))
    }

    /// Admits `addrs`, answered for `name`, for `ttl` (bounded to a sane range). Done before
    /// the answer reaches the guest, so its first connection finds them admitted. `false` when
    /// nothing was pinned because the policy in force (it may have changed while upstream
    /// answered) no longer allows the name or refuses an address, or the sandbox holds as many
    /// pins as it may.
    pub(super) async fn pin(
        &self,
        name: &str,
        addrs: &[Ipv4Addr],
        ttl: Duration,
    ) -> Result<bool, SystemError> {
        let ttl = ttl.clamp(MIN_PIN, MAX_PIN);
        let mut pins = self.pins.lock().await;
        let policy = self.policy();
        if policy.name_verdict(name) != NameVerdict::Allowed
            || addrs.iter().any(|addr| policy.denies_address(*addr))
        {
            return Ok(false);
        }
        let now = Instant::now();
        pins.retain(|_, pinned| {
            pinned.names.retain(|_, until| *until > now);
            pinned.until > now && !pinned.names.is_empty()
        });
        let new_addrs = addrs.iter().filter(|a| !pins.contains_key(a)).count();
        let crowded = addrs.iter().any(|addr| {
            pins.get(addr)
                .is_some_and(|p| p.names.len() >= MAX_NAMES_PER_ADDR && !p.names.contains_key(name))
        });
        if pins.len() + new_addrs > MAX_PINNED_ADDRS || crowded {
            tracing::warn!(
                name,
                "the sandbox holds as many DNS pins as it may; not pinning"
            );
            return Ok(false);
        }
        // The guest may use the answer until `horizon`. Pins are made for twice as long, so that
        // a guest looking the name up again and again (few cache answers) rarely costs a kernel
        // change: only when the address's pin would end before the new answer's horizon.
        let horizon = now + ttl;
        let until = now + (ttl * 2).min(MAX_PIN);
        let needed: Vec<(Ipv4Addr, Duration)> = addrs
            .iter()
            .filter(|addr| pins.get(addr).is_none_or(|p| p.until < horizon))
            .map(|addr| (*addr, until - now))
            .collect();
        if !needed.is_empty() {
            nft::apply(
                &pin_transaction(&self.table, &needed),
                Some(&self.namespace),
            )
            .await?;
        }
        for addr in addrs {
            let pinned = pins.entry(*addr).or_insert_with(|| Pinned {
                until,
                names: HashMap::new(),
            });
            if needed.iter().any(|(a, _)| a == addr) {
                pinned.until = pinned.until.max(until);
            }
            let kernel_until = pinned.until;
            let expires = pinned.names.entry(name.to_owned()).or_insert(kernel_until);
            *expires = (*expires).max(kernel_until);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_follows_the_policy() {
        let open = ruleset("w_egress", &EgressPolicy::default(), 7, &[]);
        assert!(open.contains("jump admit\n  }"), "{open}");
        assert!(!open.contains("limit rate") && !open.contains("ct count"));
        assert!(open.contains("th dport 53 redirect to :53"));
        let policy = EgressPolicy {
            default: EgressDefault::Deny,
            allow: vec![
                "198.51.100.0/24".parse().unwrap(),
                "a.test".parse().unwrap(),
            ],
            deny: vec!["198.51.100.9".parse().unwrap()],
            max_connections: Some(8),
            bandwidth_mbps: Some(10),
        };
        let pins = [(Ipv4Addr::new(203, 0, 113, 5), Duration::from_secs(90))];
        let text = ruleset("w_egress", &policy, 9, &pins);
        assert!(text.contains("elements = { 198.51.100.0/24 }"), "{text}");
        assert!(text.contains("elements = { 198.51.100.9/32 }"), "{text}");
        assert!(text.contains("203.0.113.5 timeout 90s"), "{text}");
        assert!(text.contains("ct mark set 9 jump admit"));
        assert!(!text.contains("ct count"));
        let limits = limits_ruleset("w_egress_limits", Some(8));
        assert!(limits.contains("ct count over 8 jump refuse"), "{limits}");
        assert!(!limits_ruleset("w_egress_limits", None).contains("ct count"));
        assert!(text.contains("limit rate over 1250000 bytes/second"));
        assert!(text.contains("jump refuse\n  }"));
    }

    #[test]
    fn rebinding_answers_are_not_pinned() {
        let policy = EgressPolicy {
            deny: vec!["203.0.113.0/24".parse().unwrap()],
            ..Default::default()
        };
        let host_deny = [
            "10.0.0.0/8".parse().unwrap(),
            "100.64.0.0/10".parse().unwrap(),
        ];
        for addr in [
            "127.0.0.1",
            "0.0.0.0",
            "169.254.169.254",
            "10.1.2.3",
            "100.64.0.1",
            "203.0.113.4",
            "224.0.0.1",
        ] {
            assert!(
                !pinnable(addr.parse().unwrap(), &host_deny, &policy),
                "{addr}"
            );
        }
        assert!(pinnable(
            "198.51.100.7".parse().unwrap(),
            &host_deny,
            &policy
        ));
    }
}
