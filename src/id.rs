//! Public identifiers: a kind prefix (`cl-`, `usr-`, `team-`, `key-`, `host-`, `ch-`, `log-`)
//! followed by the 16 bytes of the database UUID as one big-endian number in 25 lowercase
//! base36 digits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

const DIGITS: usize = 25;
const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("`{value}` is not a {kind} ID: it must start with `{prefix}`")]
    WrongPrefix {
        kind: &'static str,
        prefix: &'static str,
        value: String,
    },
    #[error("`{value}` is not a {kind} ID: expected {DIGITS} base36 characters after `{prefix}`")]
    WrongLength {
        kind: &'static str,
        prefix: &'static str,
        value: String,
    },
    #[error("`{value}` is not a {kind} ID: only 0-9 and a-z may follow `{prefix}`")]
    BadCharacter {
        kind: &'static str,
        prefix: &'static str,
        value: String,
    },
    #[error("`{value}` is not a {kind} ID: the number is larger than 128 bits")]
    Overflow { kind: &'static str, value: String },
}

fn encode(uuid: Uuid) -> String {
    let mut n = uuid.as_u128();
    let mut digits = [b'0'; DIGITS];
    for slot in digits.iter_mut().rev() {
        *slot = ALPHABET[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(digits.to_vec()).expect("ASCII digits")
}

fn decode(kind: &'static str, prefix: &'static str, value: &str) -> Result<Uuid, IdError> {
    let owned = || value.to_owned();
    let digits = value
        .strip_prefix(prefix)
        .ok_or_else(|| IdError::WrongPrefix {
            kind,
            prefix,
            value: owned(),
        })?;
    if digits.len() != DIGITS {
        return Err(IdError::WrongLength {
            kind,
            prefix,
            value: owned(),
        });
    }
    let mut n: u128 = 0;
    for c in digits.bytes() {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'z' => c - b'a' + 10,
            _ => {
                return Err(IdError::BadCharacter {
                    kind,
                    prefix,
                    value: owned(),
                })
            }
        };
        n = n
            .checked_mul(36)
            .and_then(|n| n.checked_add(u128::from(d)))
            .ok_or_else(|| IdError::Overflow {
                kind,
                value: owned(),
            })?;
    }
    Ok(Uuid::from_u128(n))
}

macro_rules! prefixed_id {
    ($($(#[$doc:meta])* $name:ident => $prefix:literal, $kind:literal;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Uuid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }

            pub fn uuid(self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                decode($kind, $prefix, s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, encode(self.0))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

prefixed_id! {
    /// A sandbox ("capsule" on the wire).
    SandboxId => "cl-", "capsule";
    UserId => "usr-", "user";
    TeamId => "team-", "team";
    ApiKeyId => "key-", "API key";
    HostId => "host-", "host";
    ChannelId => "ch-", "channel";
    LogId => "log-", "audit log entry";
}

/// A stored resource ID as the API shows it: capsules and hosts by their prefixed IDs, anything
/// else (a template's name) as it is.
pub fn public_resource_id(resource_type: &str, stored: &str) -> String {
    match (resource_type, stored.parse::<Uuid>()) {
        ("capsule", Ok(uuid)) => SandboxId(uuid).to_string(),
        ("host", Ok(uuid)) => HostId(uuid).to_string(),
        _ => stored.to_owned(),
    }
}

impl TeamId {
    /// The platform team owns regular hosts and platform templates.
    pub const PLATFORM: TeamId = TeamId(Uuid::nil());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads() {
        for uuid in [
            Uuid::nil(),
            Uuid::max(),
            Uuid::from_u128(35),
            Uuid::new_v4(),
        ] {
            let id = HostId(uuid);
            let text = id.to_string();
            assert_eq!(text.len(), "host-".len() + DIGITS);
            assert_eq!(text.parse::<HostId>().unwrap(), id);
        }
        assert_eq!(
            TeamId::PLATFORM.to_string(),
            format!("team-{}", "0".repeat(25))
        );
        assert_eq!(
            SandboxId(Uuid::from_u128(35)).to_string(),
            format!("cl-{}z", "0".repeat(24))
        );
        assert_eq!(
            UserId(Uuid::max()).to_string(),
            "usr-f5lxx1zz5pnorynqglhzmsp33"
        );
    }

    #[test]
    fn rejects_bad_input() {
        let ok = HostId(Uuid::new_v4()).to_string();
        let digits = &ok["host-".len()..];
        assert!(matches!(
            format!("team-{digits}").parse::<HostId>(),
            Err(IdError::WrongPrefix { .. })
        ));
        assert!(matches!(
            "host-abc".parse::<HostId>(),
            Err(IdError::WrongLength { .. })
        ));
        assert!(matches!(
            format!("host-A{}", "0".repeat(24)).parse::<HostId>(),
            Err(IdError::BadCharacter { .. })
        ));
        assert!(matches!(
            format!("host-{}", "Z".repeat(25)).parse::<HostId>(),
            Err(IdError::BadCharacter { .. })
        ));
        assert!(matches!(
            format!("host-{}", "z".repeat(25)).parse::<HostId>(),
            Err(IdError::Overflow { .. })
        ));
        assert!(matches!(
            format!("host-{}é", &digits[..23]).parse::<HostId>(),
            Err(IdError::BadCharacter { .. } | IdError::WrongLength { .. })
        ));
        let err = "nope".parse::<UserId>().unwrap_err().to_string();
        assert!(err.contains("usr-"), "{err}");
    }
}
