//! `/v1/admin/users` (an addition): platform admins' management of accounts.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::no_content;
use crate::cp::auth::AdminUser;
use crate::cp::error::ApiError;
use crate::cp::extract::{path_id, ApiJson};
use crate::cp::services::users;
use crate::cp::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetActiveRequest {
    active: bool,
}

pub async fn set_active(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SetActiveRequest>,
) -> Result<StatusCode, ApiError> {
    users::set_active(&state.db, &admin.caller, path_id("id", &id)?, req.active).await?;
    Ok(no_content())
}
