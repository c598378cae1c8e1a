//! The error codes every Wrenn server answers with (the control plane, the host agent and envd)
//! and the one envelope they travel in, `{"error":{"code","message"}}`. The codes are the
//! reference API's; the few additions are marked.

use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    AccountDeactivated,
    NotFound,
    TemplateNotFound,
    MethodNotAllowed,
    Conflict,
    EmailTaken,
    InvalidState,
    HostHasSandboxes,
    TooLarge,
    /// Addition: the reference has no code for throttling.
    RateLimited,
    /// Addition: the team's resource pool (its plan) has no room for what was asked.
    PoolExhausted,
    /// Addition: a guest's disk is full.
    InsufficientStorage,
    /// Addition (envd): a filesystem watch broke.
    WatchFailed,
    /// Addition (port proxy): nothing in the capsule listens on the port asked for.
    PortClosed,
    DbUnavailable,
    /// Addition: the template store cannot be reached, so a template image cannot be had.
    StoreUnavailable,
    HostUnavailable,
    NoHostsAvailable,
    AgentError,
    InternalError,
    /// Anything a newer peer answers that this build does not know; never sent.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorEnvelope {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorBody {
                code,
                message: message.into(),
            },
        }
    }

    /// The error a refusal's body carries; a body that is not an envelope (a proxy's page, say)
    /// is kept, cut short, as the message of an `Unknown` code.
    pub fn body_of(body: &[u8]) -> ErrorBody {
        serde_json::from_slice::<ErrorEnvelope>(body)
            .map(|envelope| envelope.error)
            .unwrap_or_else(|_| ErrorBody {
                code: ErrorCode::Unknown,
                message: String::from_utf8_lossy(body)
                    .trim()
                    .chars()
                    .take(500)
                    .collect(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    #[test]
    fn codes_are_snake_case_and_round_trip() {
        for code in ErrorCode::iter().filter(|c| *c != ErrorCode::Unknown) {
            let wire = serde_json::to_string(&code).unwrap();
            assert_eq!(wire, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&wire).unwrap(), code);
            assert_eq!(code.as_str().parse::<ErrorCode>().unwrap(), code);
        }
        assert_eq!(ErrorCode::AgentError.as_str(), "agent_error");
        assert_eq!(ErrorCode::InternalError.as_str(), "internal_error");
    }

    #[test]
    fn unknown_codes_decode_without_failing() {
        let envelope: ErrorEnvelope =
            serde_json::from_str(r#"{"error":{"code":"brand_new","message":"m"}}"#).unwrap();
        assert_eq!(envelope.error.code, ErrorCode::Unknown);
    }
}
