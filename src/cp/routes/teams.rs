//! `/v1/teams` and members.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::no_content;
use crate::cp::auth::AuthUser;
use crate::cp::error::ApiError;
use crate::cp::extract::{path_id, ApiJson};
use crate::cp::pagination::PageQuery;
use crate::cp::services::input::{Email, TeamName};
use crate::cp::services::teams;
use crate::cp::state::AppState;
use crate::db::team_members::{Member, Role};
use crate::db::teams::{Team, TeamWithRole};
use crate::id::{TeamId, UserId};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameRequest {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    email: String,
}

/// Only `admin` and `member` can be assigned; ownership does not move through this endpoint.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssignableRole {
    Admin,
    Member,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRoleRequest {
    role: AssignableRole,
}

#[derive(Debug, Serialize)]
pub struct TeamView {
    id: TeamId,
    name: String,
    slug: String,
    created_at: DateTime<Utc>,
}

impl From<Team> for TeamView {
    fn from(t: Team) -> Self {
        Self {
            id: TeamId(t.id),
            name: t.name,
            slug: t.slug,
            created_at: t.created_at,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TeamWithRoleView {
    #[serde(flatten)]
    team: TeamView,
    role: Role,
}

impl From<TeamWithRole> for TeamWithRoleView {
    fn from(t: TeamWithRole) -> Self {
        Self {
            team: t.team.into(),
            role: t.role,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct MemberView {
    user_id: UserId,
    email: String,
    role: Role,
    joined_at: DateTime<Utc>,
}

impl From<Member> for MemberView {
    fn from(m: Member) -> Self {
        Self {
            user_id: UserId(m.user_id),
            email: m.email,
            role: m.role,
            joined_at: m.joined_at,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TeamDetail {
    team: TeamView,
    members: Vec<MemberView>,
}

fn team_path(raw: &str) -> Result<TeamId, ApiError> {
    path_id("id", raw)
}

pub async fn list(
    State(state): State<AppState>,
    auth: AuthUser,
    query: PageQuery,
) -> Result<Response, ApiError> {
    let page = teams::list(&state.db, &auth.caller, query.request).await?;
    Ok(query.answer(page.map(TeamWithRoleView::from)))
}

pub async fn create(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiJson(req): ApiJson<NameRequest>,
) -> Result<(StatusCode, Json<TeamWithRoleView>), ApiError> {
    let name = TeamName::parse("name", &req.name)?;
    Ok((
        StatusCode::CREATED,
        Json(teams::create(&state.db, &auth.caller, name).await?.into()),
    ))
}

pub async fn get(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<TeamDetail>, ApiError> {
    let (team, members) = teams::get(&state.db, &auth.caller, team_path(&id)?).await?;
    Ok(Json(TeamDetail {
        team: team.into(),
        members: members.into_iter().map(Into::into).collect(),
    }))
}

pub async fn rename(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<NameRequest>,
) -> Result<StatusCode, ApiError> {
    let team = team_path(&id)?;
    teams::rename(
        &state.db,
        &auth.caller,
        team,
        TeamName::parse("name", &req.name)?,
    )
    .await?;
    Ok(no_content())
}

pub async fn delete(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    teams::delete(&state.db, &auth.caller, team_path(&id)?).await?;
    Ok(no_content())
}

pub async fn members(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    query: PageQuery,
) -> Result<Response, ApiError> {
    let team = team_path(&id)?;
    let page = teams::members(&state.db, &auth.caller, team, query.request).await?;
    Ok(query.answer(page.map(MemberView::from)))
}

pub async fn add_member(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<AddMemberRequest>,
) -> Result<(StatusCode, Json<MemberView>), ApiError> {
    let team = team_path(&id)?;
    let member = teams::add_member(
        &state.db,
        &auth.caller,
        team,
        Email::parse("email", &req.email)?,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(member.into())))
}

pub async fn set_member_role(
    State(state): State<AppState>,
    auth: AuthUser,
    Path((id, uid)): Path<(String, String)>,
    ApiJson(req): ApiJson<SetRoleRequest>,
) -> Result<StatusCode, ApiError> {
    let role = match req.role {
        AssignableRole::Admin => Role::Admin,
        AssignableRole::Member => Role::Member,
    };
    teams::set_member_role(
        &state.db,
        &auth.caller,
        team_path(&id)?,
        path_id("uid", &uid)?,
        role,
    )
    .await?;
    Ok(no_content())
}

pub async fn remove_member(
    State(state): State<AppState>,
    auth: AuthUser,
    Path((id, uid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    teams::remove_member(
        &state.db,
        &auth.caller,
        team_path(&id)?,
        path_id("uid", &uid)?,
    )
    .await?;
    Ok(no_content())
}

pub async fn leave(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    teams::leave(&state.db, &auth.caller, team_path(&id)?).await?;
    Ok(no_content())
}
