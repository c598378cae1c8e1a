//! Business rules of the control plane. Services take the database and typed inputs, never raw
//! HTTP, so they can be used and tested without a server.

pub mod accounts;
pub mod api_keys;
pub mod audit_logs;
pub mod builds;
pub mod capsules;
pub mod channels;
pub mod hosts;
pub mod login_limits;
pub mod passwords;
pub mod pools;
pub mod teams;
pub mod templates;
pub mod usage;
pub mod users;

use serde_json::Value;
use uuid::Uuid;

use crate::db::audit_logs::Entry;
use crate::db::team_members::Role;
use crate::db::DbError;
use crate::error_code::ErrorCode;
use crate::id::{SandboxId, TeamId, UserId};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("this account is deactivated")]
    AccountDisabled,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{message}")]
    Conflict { code: ErrorCode, message: String },
    #[error("host still has {} active capsule(s)", .0.len())]
    HostHasSandboxes(Vec<SandboxId>),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Certificates(#[from] crate::cp::ca::CaError),
    #[error("password hashing failed: {0}")]
    PasswordHash(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: std::time::Duration,
    },
}

impl ServiceError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ServiceError::Invalid {
            field,
            message: message.into(),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ServiceError::Forbidden(message.into())
    }
}

/// Who calls a service: a signed-in user as the database knows them on this request, and the
/// team their token is scoped to. The web layer builds it from the request's credentials;
/// services never see HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user: UserId,
    pub team: TeamId,
    /// The user's role in `team`; `None` once they no longer belong to it.
    pub role: Option<Role>,
    pub is_admin: bool,
}

/// An audit-log entry for something a signed-in user did.
/// The caller's team, while they still belong to it.
pub(crate) fn member_team(caller: &Caller) -> Result<TeamId, ServiceError> {
    caller
        .role
        .map(|_| caller.team)
        .ok_or_else(|| ServiceError::forbidden("you are no longer a member of this token's team"))
}

pub(crate) fn user_action<'a>(
    caller: &Caller,
    team: Option<Uuid>,
    resource_type: &'a str,
    resource_id: String,
    action: &'a str,
    metadata: Value,
) -> Entry<'a> {
    Entry {
        team_id: team,
        actor_type: "user",
        actor_id: Some(caller.user.to_string()),
        resource_type,
        resource_id: Some(resource_id),
        action,
        metadata,
    }
}

/// Checked input values: each constructor is the only way to make one, so services receive
/// only valid names, emails and passwords.
pub mod input {
    use super::ServiceError;
    use crate::secret::SecretText;

    macro_rules! checked_string {
        ($(#[$doc:meta])* $name:ident) => {
            $(#[$doc])*
            #[derive(Debug, Clone, PartialEq, Eq)]
            pub struct $name(String);

            impl $name {
                pub fn as_str(&self) -> &str {
                    &self.0
                }
            }
        };
    }

    checked_string!(
        /// An email address: trimmed, 3-254 characters, one `@` with text on both sides.
        Email
    );
    checked_string!(
        /// A person's display name: 1-100 characters after trimming.
        DisplayName
    );
    checked_string!(
        /// A team name: 1-128 characters of A-Z a-z 0-9 space and `_`.
        TeamName
    );
    checked_string!(
        /// An API key label: 1-100 characters after trimming.
        KeyName
    );
    checked_string!(
        /// A host tag: 1-64 characters, `[A-Za-z0-9][A-Za-z0-9._-]*`.
        Tag
    );

    impl Email {
        pub fn parse(field: &'static str, raw: &str) -> Result<Self, ServiceError> {
            let email = raw.trim();
            let valid = (3..=254).contains(&email.len())
                && email.split_once('@').is_some_and(|(local, domain)| {
                    !local.is_empty() && !domain.is_empty() && !domain.contains('@')
                })
                && !email.chars().any(char::is_whitespace);
            if valid {
                Ok(Self(email.to_owned()))
            } else {
                Err(ServiceError::invalid(
                    field,
                    format!("`{email}` is not an email address"),
                ))
            }
        }
    }

    /// A password of 8-1024 bytes.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Password(SecretText);

    impl Password {
        pub fn as_str(&self) -> &str {
            self.0.expose()
        }

        pub fn parse(field: &'static str, raw: &str) -> Result<Self, ServiceError> {
            match raw.len() {
                0..=7 => Err(ServiceError::invalid(
                    field,
                    "must be at least 8 characters",
                )),
                8..=1024 => Ok(Self(SecretText::new(raw))),
                _ => Err(ServiceError::invalid(field, "must be at most 1024 bytes")),
            }
        }
    }

    impl DisplayName {
        pub fn parse(field: &'static str, raw: &str) -> Result<Self, ServiceError> {
            let name = raw.trim();
            match name.chars().count() {
                0 => Err(ServiceError::invalid(field, "must not be empty")),
                1..=100 => Ok(Self(name.to_owned())),
                _ => Err(ServiceError::invalid(
                    field,
                    "must be at most 100 characters",
                )),
            }
        }
    }

    impl TeamName {
        pub fn parse(field: &'static str, raw: &str) -> Result<Self, ServiceError> {
            let name = raw.trim();
            if name.is_empty() || name.len() > 128 {
                return Err(ServiceError::invalid(field, "must be 1-128 characters"));
            }
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '_')
            {
                return Err(ServiceError::invalid(
                    field,
                    "may contain only A-Z, a-z, 0-9, space and _",
                ));
            }
            Ok(Self(name.to_owned()))
        }
    }

    impl KeyName {
        pub const DEFAULT: &'static str = "Unnamed API Key";

        pub fn parse(field: &'static str, raw: &str) -> Result<Self, ServiceError> {
            let name = raw.trim();
            match name.chars().count() {
                0 => Err(ServiceError::invalid(field, "must not be empty")),
                1..=100 => Ok(Self(name.to_owned())),
                _ => Err(ServiceError::invalid(
                    field,
                    "must be at most 100 characters",
                )),
            }
        }
    }

    checked_string!(
        /// A plan name: as a tag.
        PlanName
    );
    checked_string!(
        /// A notification channel's name, unique in its team: 1-100 characters after trimming.
        ChannelName
    );

    impl ChannelName {
        pub fn parse(field: &'static str, raw: &str) -> Result<Self, ServiceError> {
            let name = raw.trim();
            if name.chars().any(char::is_control) {
                return Err(ServiceError::invalid(
                    field,
                    "must not contain control characters",
                ));
            }
            match name.chars().count() {
                0 => Err(ServiceError::invalid(field, "must not be empty")),
                1..=100 => Ok(Self(name.to_owned())),
                _ => Err(ServiceError::invalid(
                    field,
                    "must be at most 100 characters",
                )),
            }
        }
    }

    /// 1-64 characters, `[A-Za-z0-9][A-Za-z0-9._-]*`.
    fn safe_name(field: &'static str, raw: &str) -> Result<String, ServiceError> {
        let mut chars = raw.chars();
        let valid = raw.len() <= 64
            && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if valid {
            Ok(raw.to_owned())
        } else {
            Err(ServiceError::invalid(
                field,
                format!("`{raw}` must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"),
            ))
        }
    }

    impl Tag {
        pub fn parse(field: &'static str, raw: &str) -> Result<Self, ServiceError> {
            safe_name(field, raw).map(Self)
        }
    }

    impl PlanName {
        pub fn parse(field: &'static str, raw: &str) -> Result<Self, ServiceError> {
            safe_name(field, raw).map(Self)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn checked_inputs() {
            assert!(Email::parse("email", " a@b ").is_ok());
            for bad in ["", "ab", "a@", "@b", "a b@c", "a@b@c"] {
                assert!(Email::parse("email", bad).is_err(), "{bad}");
            }
            assert!(Password::parse("password", "1234567").is_err());
            assert!(Password::parse("password", "12345678").is_ok());
            assert!(TeamName::parse("name", "My team_1").is_ok());
            assert!(TeamName::parse("name", "bad-name").is_err());
            assert!(Tag::parse("tag", "gpu.a100-x_1").is_ok());
            assert!(Tag::parse("tag", "-x").is_err());
            assert!(Tag::parse("tag", "").is_err());
            assert!(DisplayName::parse("name", &"x".repeat(101)).is_err());
        }
    }
}
