//! A capsule's egress policy: where its guest may connect out to. The control plane checks and
//! stores it (`PUT /v1/capsules/{id}/network`), the agent enforces it in the sandbox's network
//! namespace (`agent::network::egress`) and its DNS forwarder (`agent::network::dns`).
//!
//! A destination is refused when a `deny` rule matches it, otherwise admitted when an `allow`
//! rule matches it, otherwise treated as `default` says. A rule is a network (`198.51.100.0/24`,
//! or one address) or a domain name (`example.com`, or `*.example.com` for its subdomains); a
//! name matches the addresses the capsule's own DNS look-ups of that name returned, on every
//! port. The host's own refusals (private ranges, metadata, the platform's addresses) stay
//! whatever a policy says.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::Ipv4Cidr;

/// More rules than this in one list is a mistake, not a policy.
pub const MAX_RULES: usize = 512;
const MAX_NAME_LEN: usize = 253;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressDefault {
    #[default]
    Allow,
    Deny,
}

/// One `allow` or `deny` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EgressRule {
    Network(Ipv4CidrKey),
    Domain(DomainPattern),
}

/// [`Ipv4Cidr`] ordered, so rule lists can be kept sorted and without repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4CidrKey(u32, u8);

impl Ipv4CidrKey {
    pub fn cidr(self) -> Ipv4Cidr {
        Ipv4Cidr::new(Ipv4Addr::from(self.0), self.1).expect("checked when parsed")
    }
}

/// A domain name, lower-cased and without a trailing dot; `wildcard` matches its subdomains
/// (at any depth) but not the name itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainPattern {
    wildcard: bool,
    name: String,
}

impl DomainPattern {
    /// Whether `name` (as a DNS question carries it, any case, trailing dot or not) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        if self.wildcard {
            name.len() > self.name.len() + 1
                && name.as_bytes()[name.len() - self.name.len() - 1] == b'.'
                && name[name.len() - self.name.len()..].eq_ignore_ascii_case(&self.name)
        } else {
            name.eq_ignore_ascii_case(&self.name)
        }
    }
}

impl FromStr for DomainPattern {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let lower = raw.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, lower),
        };
        let labels_ok = name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        if name.is_empty() || name.len() > MAX_NAME_LEN || !labels_ok {
            return Err(format!("`{raw}` is neither a network nor a domain name"));
        }
        // A single label (`localhost`, `com`) names no host on the internet.
        if !name.contains('.') {
            return Err(format!("`{raw}` is not a fully qualified domain name"));
        }
        Ok(Self { wildcard, name })
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

impl FromStr for EgressRule {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if let Ok(addr) = raw.parse::<Ipv4Addr>() {
            return Ok(Self::Network(Ipv4CidrKey(u32::from(addr), 32)));
        }
        if let Some((addr, len)) = raw.split_once('/') {
            let addr: Ipv4Addr = addr
                .parse()
                .map_err(|_| format!("`{raw}` is not an IPv4 network"))?;
            let len: u8 = len
                .parse()
                .map_err(|_| format!("`{raw}` has no valid prefix length"))?;
            let cidr = Ipv4Cidr::new(addr, len)?;
            return Ok(Self::Network(Ipv4CidrKey(
                u32::from(cidr.network()),
                cidr.prefix_len(),
            )));
        }
        if raw.contains(':') {
            return Err(format!(
                "`{raw}`: capsules have no IPv6 egress, so IPv6 rules cannot apply"
            ));
        }
        raw.parse().map(Self::Domain)
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Network(key) if key.1 == 32 => write!(f, "{}", Ipv4Addr::from(key.0)),
            Self::Network(key) => write!(f, "{}", key.cidr()),
            Self::Domain(pattern) => pattern.fmt(f),
        }
    }
}

impl Serialize for EgressRule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EgressRule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

/// What the policy says about a name a guest looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameVerdict {
    /// A `deny` rule names it: the look-up is answered "no such name".
    Denied,
    /// An `allow` rule names it: the addresses of the answer are admitted for their TTL.
    Allowed,
    /// No rule names it: its addresses are judged by the network rules and the default.
    Unlisted,
}

/// A checked egress policy. The default value admits everything the host admits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    #[serde(default)]
    pub default: EgressDefault,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<EgressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<EgressRule>,
    /// At most this many connections (TCP, UDP flows) open at once from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// The guest's traffic is held to this many megabits per second in each direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbps: Option<u32>,
}

impl EgressPolicy {
    /// Sorts and deduplicates the rule lists and checks their sizes and limits; the policy the
    /// agent enforces is always a normalised one.
    pub fn normalised(mut self) -> Result<Self, String> {
        for (field, rules) in [("allow", &mut self.allow), ("deny", &mut self.deny)] {
            if rules.len() > MAX_RULES {
                return Err(format!("`{field}` holds more than {MAX_RULES} rules"));
            }
            rules.sort();
            rules.dedup();
        }
        if self.max_connections == Some(0) {
            return Err("`max_connections` must be at least 1".into());
        }
        if let Some(mbps) = self.bandwidth_mbps {
            if !(1..=100_000).contains(&mbps) {
                return Err("`bandwidth_mbps` must be between 1 and 100000".into());
            }
        }
        Ok(self)
    }

    /// Whether the policy adds nothing to what the host enforces.
    pub fn is_open(&self) -> bool {
        *self == Self::default()
    }

    pub fn name_verdict(&self, name: &str) -> NameVerdict {
        let names = |rules: &[EgressRule]| {
            rules
                .iter()
                .any(|rule| matches!(rule, EgressRule::Domain(p) if p.matches(name)))
        };
        if names(&self.deny) {
            NameVerdict::Denied
        } else if names(&self.allow) {
            NameVerdict::Allowed
        } else {
            NameVerdict::Unlisted
        }
    }

    pub fn networks<'a>(rules: &'a [EgressRule]) -> impl Iterator<Item = Ipv4Cidr> + 'a {
        rules.iter().filter_map(|rule| match rule {
            EgressRule::Network(key) => Some(key.cidr()),
            EgressRule::Domain(_) => None,
        })
    }

    /// Whether a `deny` network rule covers `addr`.
    pub fn denies_address(&self, addr: Ipv4Addr) -> bool {
        Self::networks(&self.deny).any(|net| net.index_of(addr).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_print_and_normalise() {
        let policy: EgressPolicy = serde_json::from_value(serde_json::json!({
            "default": "deny",
            "allow": ["198.51.100.0/24", "Example.COM.", "*.pypi.org", "203.0.113.9", "example.com"],
            "deny": ["10.0.0.0/8"],
            "max_connections": 64,
        }))
        .unwrap();
        let policy = policy.normalised().unwrap();
        let shown: Vec<String> = policy.allow.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "198.51.100.0/24",
                "203.0.113.9",
                "example.com",
                "*.pypi.org"
            ]
        );
        let back: EgressPolicy =
            serde_json::from_value(serde_json::to_value(&policy).unwrap()).unwrap();
        assert_eq!(back, policy);
        assert!(EgressPolicy::default().is_open() && !policy.is_open());
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "::1",
            "2001:db8::/32",
            "localhost",
            "exa mple.com",
            "-a.com",
            "*",
            "",
        ] {
            assert!(bad.parse::<EgressRule>().is_err(), "{bad}");
        }
        let zero = EgressPolicy {
            max_connections: Some(0),
            ..Default::default()
        };
        assert!(zero.normalised().is_err());
        let unknown = serde_json::json!({ "defualt": "deny" });
        assert!(serde_json::from_value::<EgressPolicy>(unknown).is_err());
    }

    #[test]
    fn names_are_judged_deny_first_and_wildcards_need_a_subdomain() {
        let policy = EgressPolicy {
            allow: vec![
                "*.example.com".parse().unwrap(),
                "api.test".parse().unwrap(),
            ],
            deny: vec!["bad.example.com".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(policy.name_verdict("a.example.com."), NameVerdict::Allowed);
        assert_eq!(policy.name_verdict("x.y.EXAMPLE.com"), NameVerdict::Allowed);
        assert_eq!(policy.name_verdict("example.com"), NameVerdict::Unlisted);
        assert_eq!(policy.name_verdict("badexample.com"), NameVerdict::Unlisted);
        assert_eq!(policy.name_verdict("bad.example.com"), NameVerdict::Denied);
        assert_eq!(policy.name_verdict("API.test."), NameVerdict::Allowed);
        assert_eq!(policy.name_verdict("v1.api.test"), NameVerdict::Unlisted);
    }
}
