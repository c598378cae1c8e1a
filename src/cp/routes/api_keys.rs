//! `/v1/api-keys`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::no_content;
use crate::cp::auth::{AuthTeam, AuthUser};
use crate::cp::error::ApiError;
use crate::cp::extract::{path_id, ApiJson};
use crate::cp::pagination::PageQuery;
use crate::cp::services::api_keys;
use crate::cp::services::input::KeyName;
use crate::cp::state::AppState;
use crate::db::api_keys::ApiKey;
use crate::id::{ApiKeyId, TeamId};
use crate::secret::SecretText;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    #[serde(default)]
    name: Option<String>,
}

/// `APIKeyResponse` of the spec; `key` only on creation.
#[derive(Debug, Serialize)]
pub struct ApiKeyResponse {
    id: ApiKeyId,
    team_id: TeamId,
    name: String,
    key_prefix: String,
    created_at: DateTime<Utc>,
    last_used: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<SecretText>,
}

impl ApiKeyResponse {
    fn new(key: ApiKey, plaintext: Option<String>) -> Self {
        Self {
            id: ApiKeyId(key.id),
            team_id: TeamId(key.team_id),
            name: key.name,
            key_prefix: key.key_prefix,
            created_at: key.created_at,
            last_used: key.last_used,
            key: plaintext.map(SecretText::new),
        }
    }
}

pub async fn create(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiJson(req): ApiJson<CreateApiKeyRequest>,
) -> Result<(StatusCode, Json<ApiKeyResponse>), ApiError> {
    let name = KeyName::parse("name", req.name.as_deref().unwrap_or(KeyName::DEFAULT))?;
    let (key, plaintext) = api_keys::create(&state.db, &auth.caller, name).await?;
    Ok((
        StatusCode::CREATED,
        Json(ApiKeyResponse::new(key, Some(plaintext))),
    ))
}

pub async fn list(
    State(state): State<AppState>,
    caller: AuthTeam,
    query: PageQuery,
) -> Result<Response, ApiError> {
    let page = api_keys::list(&state.db, caller.team_id, query.request).await?;
    Ok(query.answer(page.map(|k| ApiKeyResponse::new(k, None))))
}

pub async fn revoke(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    api_keys::revoke(&state.db, &auth.caller, path_id("id", &id)?).await?;
    Ok(no_content())
}
