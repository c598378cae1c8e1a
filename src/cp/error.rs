//! The one place errors become HTTP: every failure leaves as `{"error":{"code","message"}}` with
//! the status and code of the public API.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::agent_client::AgentError;
use super::ca::CaError;
use super::limits;
use super::scheduler::ScheduleError;
use super::services::builds::BuildError;
use super::services::capsules::CapsuleError;
use super::services::templates::{ImportError, PublishError, SnapshotTemplateError};
use super::services::ServiceError;
use crate::db::DbError;
use crate::error_code::{ErrorCode, ErrorEnvelope};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{message}")]
    Forbidden { code: ErrorCode, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{message}")]
    Conflict { code: ErrorCode, message: String },
    #[error("host still has {} active capsule(s)", .0.len())]
    HostHasSandboxes(Vec<String>),
    #[error("{0}")]
    TooLarge(String),
    /// 429 `rate_limited` with `Retry-After` (the reference API has no code for it).
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    /// 429 `pool_exhausted`: the team's plan has no room for what was asked.
    #[error("{0}")]
    PoolExhausted(String),
    #[error("the database is unavailable; try again shortly")]
    DatabaseUnavailable,
    /// 503 with `host_unavailable` or `no_hosts_available`.
    #[error("{message}")]
    Unavailable { code: ErrorCode, message: String },
    /// A host agent failed or could not be reached: 502 `agent_error`.
    #[error("{0}")]
    AgentFailed(String),
    /// 507 `insufficient_storage`: the host's disk is full.
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } | ApiError::HostHasSandboxes(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } | ApiError::PoolExhausted(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::DatabaseUnavailable | ApiError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::AgentFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::Forbidden { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::Unavailable { code, .. } => *code,
            ApiError::AgentFailed(_) => ErrorCode::AgentError,
            ApiError::InsufficientStorage(_) => ErrorCode::InsufficientStorage,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            ApiError::HostHasSandboxes(_) => ErrorCode::HostHasSandboxes,
            ApiError::TooLarge(_) => ErrorCode::TooLarge,
            ApiError::RateLimited { .. } => ErrorCode::RateLimited,
            ApiError::PoolExhausted(_) => ErrorCode::PoolExhausted,
            ApiError::DatabaseUnavailable => ErrorCode::DbUnavailable,
            ApiError::Internal => ErrorCode::InternalError,
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::Forbidden {
            code: ErrorCode::Forbidden,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::to_value(ErrorEnvelope::new(self.code(), self.to_string()))
            .expect("error envelopes serialize");
        if let ApiError::HostHasSandboxes(ids) = &self {
            body["error"]["sandbox_ids"] = json!(ids);
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let ApiError::RateLimited {
            retry_after_secs, ..
        } = &self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        response
    }
}

impl From<DbError> for ApiError {
    fn from(error: DbError) -> Self {
        match error {
            DbError::Unavailable(cause) => {
                tracing::warn!(%cause, "database unavailable");
                ApiError::DatabaseUnavailable
            }
            DbError::UniqueViolation { constraint } => ApiError::Conflict {
                code: ErrorCode::Conflict,
                message: format!("already exists ({constraint})"),
            },
            DbError::Query(cause) => {
                tracing::error!(%cause, "database query failed");
                ApiError::Internal
            }
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        let message = error.to_string();
        match error {
            ServiceError::Invalid { .. } => ApiError::InvalidRequest(message),
            ServiceError::Unauthorized(_) => ApiError::Unauthorized(message),
            ServiceError::Forbidden(_) => ApiError::forbidden(message),
            ServiceError::AccountDisabled => ApiError::Forbidden {
                code: ErrorCode::AccountDeactivated,
                message,
            },
            ServiceError::NotFound(_) => ApiError::NotFound(message),
            ServiceError::Conflict { code, .. } => ApiError::Conflict { code, message },
            ServiceError::HostHasSandboxes(ids) => {
                ApiError::HostHasSandboxes(ids.iter().map(ToString::to_string).collect())
            }
            ServiceError::Db(db) => db.into(),
            ServiceError::Certificates(CaError::Csr(_) | CaError::Sign(_)) => {
                ApiError::InvalidRequest(format!("invalid field `csr`: {message}"))
            }
            ServiceError::Certificates(CaError::Db(db)) => db.into(),
            ServiceError::Certificates(
                cause @ (CaError::Generate(_) | CaError::Stored(_) | CaError::Tls(_)),
            ) => {
                tracing::error!(%cause, "the control plane's CA failed");
                ApiError::Internal
            }
            ServiceError::PasswordHash(cause) => {
                tracing::error!(%cause, "password hashing failed");
                ApiError::Internal
            }
            ServiceError::RateLimited {
                message,
                retry_after,
            } => ApiError::RateLimited {
                message,
                retry_after_secs: retry_after.as_secs().max(1),
            },
        }
    }
}

impl From<CapsuleError> for ApiError {
    fn from(error: CapsuleError) -> Self {
        let message = error.to_string();
        match error {
            CapsuleError::Invalid { .. } => ApiError::InvalidRequest(message),
            CapsuleError::NotFound
            | CapsuleError::NoMetrics
            | CapsuleError::TemplateNotFound(_) => ApiError::NotFound(message),
            CapsuleError::NotRunning(_)
            | CapsuleError::NotPaused(_)
            | CapsuleError::Busy(_)
            | CapsuleError::Interrupted(_)
            | CapsuleError::Unsettled(..) => ApiError::Conflict {
                code: ErrorCode::InvalidState,
                message,
            },
            CapsuleError::PauseFailed {
                disk_full: true, ..
            } => ApiError::InsufficientStorage(message),
            CapsuleError::PauseFailed { .. }
            | CapsuleError::ResumeFailed { .. }
            | CapsuleError::Lost(_) => ApiError::AgentFailed(message),
            CapsuleError::ShuttingDown => ApiError::Unavailable {
                code: ErrorCode::InternalError,
                message,
            },
            CapsuleError::Schedule(ScheduleError::Db(db)) | CapsuleError::Db(db) => db.into(),
            CapsuleError::Schedule(ScheduleError::PoolExhausted(_)) => {
                ApiError::PoolExhausted(message)
            }
            CapsuleError::Schedule(ScheduleError::TeamGone) => ApiError::NotFound(message),
            CapsuleError::Schedule(_) => ApiError::Unavailable {
                code: ErrorCode::NoHostsAvailable,
                message,
            },
            CapsuleError::HostUnavailable(_) => ApiError::Unavailable {
                code: ErrorCode::HostUnavailable,
                message,
            },
            CapsuleError::Agent(agent) => agent.into(),
            CapsuleError::Store(_) => ApiError::Unavailable {
                code: ErrorCode::StoreUnavailable,
                message,
            },
            CapsuleError::TeamBusy(busy) => busy.into(),
        }
    }
}

impl From<limits::TeamBusy> for ApiError {
    fn from(busy: limits::TeamBusy) -> Self {
        ApiError::RateLimited {
            message: busy.to_string(),
            retry_after_secs: limits::RETRY_AFTER.as_secs(),
        }
    }
}

impl From<BuildError> for ApiError {
    fn from(error: BuildError) -> Self {
        let message = error.to_string();
        match error {
            BuildError::Invalid { .. } | BuildError::Recipe(_) => ApiError::InvalidRequest(message),
            BuildError::TemplateNotFound(_) => ApiError::NotFound(message),
            BuildError::NotFound => ApiError::NotFound(message),
            BuildError::Protected(_) | BuildError::NotOwner => ApiError::forbidden(message),
            BuildError::InProgress(_) | BuildError::SnapshotExists(_) | BuildError::Finished(_) => {
                ApiError::Conflict {
                    code: ErrorCode::Conflict,
                    message,
                }
            }
            BuildError::Db(db) => db.into(),
        }
    }
}

impl From<ImportError> for ApiError {
    fn from(error: ImportError) -> Self {
        let message = error.to_string();
        match error {
            ImportError::Invalid { .. } => ApiError::InvalidRequest(message),
            ImportError::Protected(_) => ApiError::forbidden(message),
            ImportError::Publish(publish) => publish.into(),
        }
    }
}

impl From<SnapshotTemplateError> for ApiError {
    fn from(error: SnapshotTemplateError) -> Self {
        let message = error.to_string();
        match error {
            SnapshotTemplateError::InvalidName(_) => ApiError::InvalidRequest(message),
            SnapshotTemplateError::Exists(_) | SnapshotTemplateError::PlatformName(_) => {
                ApiError::Conflict {
                    code: ErrorCode::Conflict,
                    message,
                }
            }
            SnapshotTemplateError::Platform(_) => ApiError::forbidden(message),
            SnapshotTemplateError::NotFound(_) => ApiError::NotFound(message),
            SnapshotTemplateError::Capsule(capsule) => capsule.into(),
            SnapshotTemplateError::Db(db) => db.into(),
        }
    }
}

impl From<PublishError> for ApiError {
    fn from(error: PublishError) -> Self {
        let message = error.to_string();
        match error {
            PublishError::TemplateNotFound(_) | PublishError::HostNotFound(_) => {
                ApiError::NotFound(message)
            }
            PublishError::NoHolder(_) | PublishError::HostUnavailable(_) => ApiError::Unavailable {
                code: ErrorCode::HostUnavailable,
                message,
            },
            PublishError::Unconfirmed { .. } => ApiError::AgentFailed(message),
            PublishError::TeamHost(_) => ApiError::InvalidRequest(message),
            PublishError::Ambiguous(_) => ApiError::Conflict {
                code: ErrorCode::Conflict,
                message,
            },
            PublishError::Agent(agent) => agent.into(),
            PublishError::Db(db) => db.into(),
        }
    }
}

/// What the agent (or the envd behind it) refused keeps its meaning; everything else about an
/// agent is a 502.
impl From<AgentError> for ApiError {
    fn from(error: AgentError) -> Self {
        match error {
            AgentError::Rejected {
                status,
                code,
                message,
            } => match status.as_u16() {
                403 => ApiError::forbidden(message),
                404 => ApiError::NotFound(message),
                409 if code == ErrorCode::InvalidState => ApiError::Conflict {
                    code: ErrorCode::InvalidState,
                    message,
                },
                409 => ApiError::Conflict {
                    code: ErrorCode::Conflict,
                    message,
                },
                413 => ApiError::TooLarge(message),
                503 => ApiError::Unavailable { code, message },
                500..=599 => ApiError::AgentFailed(message),
                _ => ApiError::InvalidRequest(message),
            },
            other => {
                tracing::warn!(error = %other, "host agent call failed");
                ApiError::AgentFailed(other.to_string())
            }
        }
    }
}
