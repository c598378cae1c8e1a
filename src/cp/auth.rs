//! Authorization as types: a handler states who may call it by the extractor it takes, and the
//! extractor does the check (token, then the user or key re-read from the database) before the
//! handler runs.
//!
//! - [`AuthUser`]: `Authorization: Bearer <user JWT>`; the user must exist and be active.
//! - [`AdminUser`]: an [`AuthUser`] who is a platform admin.
//! - [`AuthTeam`]: `X-API-Key: wrn_...` (checked first) or a user JWT whose team the user still
//!   belongs to.
//! - [`CapsuleCall`]: an [`AuthTeam`] calling into one of its capsules, checked and the capsule
//!   found in one database round trip.
//! - [`HostAuth`]: `X-Host-Token: <host JWT>` of a refresh-token family that is still live.

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use uuid::Uuid;

use super::audit;
use super::error::ApiError;
use super::events::Actor;
use super::extract::path_id;
use super::limits::{Work, WorkPermit};
use super::revocations::Credential;
use super::services::capsules::{self, CapsuleError, RunningCapsule};
use super::services::Caller;
use super::state::AppState;
use super::tokens::sha256;
use crate::db::sandboxes::SandboxRoute;
use crate::db::users::{User, UserStatus};
use crate::db::{api_keys, capsule_access, host_refresh_tokens, users};
use crate::error_code::ErrorCode;
use crate::id::{ApiKeyId, HostId, SandboxId, TeamId};

pub const API_KEY_HEADER: &str = "x-api-key";
pub const HOST_TOKEN_HEADER: &str = "x-host-token";

fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    header_in(&parts.headers, name)
}

fn header_in<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn bearer(parts: &Parts) -> Option<&str> {
    bearer_token(&parts.headers)
}

/// The token of an `Authorization: Bearer <token>` header, whoever signed it.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = header_in(headers, "authorization")?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A signed-in user, re-read from the database on this request, and the services' view of them:
/// the team their token is scoped to and their current role there.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub user: User,
    pub caller: Caller,
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(token) = bearer(parts) else {
            let message = if header(parts, HOST_TOKEN_HEADER).is_some() {
                "host tokens cannot call user endpoints; send Authorization: Bearer <user token>"
            } else {
                "missing Authorization: Bearer <token> header"
            };
            return Err(ApiError::Unauthorized(message.into()));
        };
        let claims = state
            .tokens
            .verify_user(token)
            .map_err(|e| ApiError::Unauthorized(format!("user token rejected: {e}")))?;
        let found = users::in_team(&state.db, claims.sub.uuid(), claims.team_id.uuid())
            .await?
            .ok_or_else(|| ApiError::Unauthorized("the token's user no longer exists".into()))?;
        if found.user.status != UserStatus::Active {
            return Err(ApiError::Forbidden {
                code: ErrorCode::AccountDeactivated,
                message: "this account is deactivated".into(),
            });
        }
        audit::note(
            parts,
            Some(claims.team_id.uuid()),
            Actor {
                kind: "user",
                id: Some(claims.sub.to_string()),
                name: Some(found.user.name.clone()),
            },
        );
        Ok(AuthUser {
            caller: Caller {
                user: claims.sub,
                team: claims.team_id,
                role: found.role,
                is_admin: found.user.is_admin,
            },
            user: found.user,
        })
    }
}

/// A platform administrator.
#[derive(Debug, Clone)]
pub struct AdminUser(pub AuthUser);

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        if !user.user.is_admin {
            return Err(ApiError::forbidden("platform admin required"));
        }
        Ok(AdminUser(user))
    }
}

/// Who acts for a team.
#[derive(Debug, Clone)]
pub enum TeamActor {
    ApiKey(Uuid),
    User(Box<AuthUser>),
}

/// A caller acting for one team: an API key of that team, or a member signed in to it.
#[derive(Debug, Clone)]
pub struct AuthTeam {
    pub team_id: TeamId,
    pub actor: TeamActor,
}

impl AuthTeam {
    /// Who this caller is, for events.
    pub fn actor(&self) -> Actor {
        match &self.actor {
            TeamActor::ApiKey(id) => Actor {
                kind: "api_key",
                id: Some(ApiKeyId(*id).to_string()),
                name: None,
            },
            TeamActor::User(user) => Actor {
                kind: "user",
                id: Some(user.caller.user.to_string()),
                name: Some(user.user.name.clone()),
            },
        }
    }

    /// What this caller authenticated with, for sessions that must end when it is revoked.
    pub fn credential(&self) -> Credential {
        let team = self.team_id.uuid();
        match &self.actor {
            TeamActor::ApiKey(id) => Credential::ApiKey { id: *id, team },
            TeamActor::User(user) => Credential::Member {
                user: user.caller.user.uuid(),
                team,
            },
        }
    }
}

impl FromRequestParts<AppState> for AuthTeam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(key) = header(parts, API_KEY_HEADER) {
            let (key_id, team) = api_keys::authenticate(&state.db, &sha256(key))
                .await?
                .ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))?;
            let caller = AuthTeam {
                team_id: TeamId(team),
                actor: TeamActor::ApiKey(key_id),
            };
            audit::note(parts, Some(team), caller.actor());
            return Ok(caller);
        }
        let user = AuthUser::from_request_parts(parts, state)
            .await
            .map_err(|e| match e {
                ApiError::Unauthorized(_) if bearer(parts).is_none() => ApiError::Unauthorized(
                    "missing X-API-Key or Authorization: Bearer <token> header".into(),
                ),
                other => other,
            })?;
        if user.caller.role.is_none() {
            return Err(ApiError::forbidden(
                "you are no longer a member of this token's team",
            ));
        }
        Ok(AuthTeam {
            team_id: user.caller.team,
            actor: TeamActor::User(Box::new(user)),
        })
    }
}

/// A call into the capsule named by the path's `{id}`, by a caller acting for its team (as
/// [`AuthTeam`]). The credentials are checked and the capsule and its host read in one query:
/// the whole database cost of a call into a running capsule.
#[derive(Debug, Clone)]
pub struct CapsuleCall {
    pub team_id: TeamId,
    /// Who calls, for events.
    pub actor: Actor,
    pub id: SandboxId,
    pub sandbox: SandboxRoute,
}

impl CapsuleCall {
    /// The capsule, if it is running and its host online; never resumes it.
    pub fn reach(self, state: &AppState) -> Result<RunningCapsule, CapsuleError> {
        capsules::reach(state, self.id, self.sandbox)
    }

    /// The capsule, running and its host online: a paused one is resumed first.
    pub async fn ready(self, state: &AppState) -> Result<RunningCapsule, CapsuleError> {
        capsules::ready(state, self.id, self.sandbox).await
    }

    /// [`CapsuleCall::ready`] for `work` counted against the team's limit (checked first, so
    /// a refused call resumes nothing); the work lasts as long as the permit.
    pub async fn ready_for(
        self,
        state: &AppState,
        work: Work,
    ) -> Result<(RunningCapsule, WorkPermit), CapsuleError> {
        let permit = state.team_limits.acquire(self.team_id, work)?;
        Ok((self.ready(state).await?, permit))
    }
}

impl FromRequestParts<AppState> for CapsuleCall {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
        let raw_id = params
            .iter()
            .find_map(|(name, value)| (name == "id").then_some(value))
            .unwrap_or_default();
        let id: SandboxId = match path_id("id", raw_id) {
            Ok(id) => id,
            Err(bad_id) => {
                // Who may not call is told so before what they got wrong.
                AuthTeam::from_request_parts(parts, state).await?;
                return Err(bad_id);
            }
        };
        let (team_id, sandbox, actor) = if let Some(key) = header(parts, API_KEY_HEADER) {
            let access = capsule_access::by_api_key(&state.db, &sha256(key), id.uuid())
                .await?
                .ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))?;
            let actor = Actor {
                kind: "api_key",
                id: Some(ApiKeyId(access.key_id).to_string()),
                name: None,
            };
            (TeamId(access.team_id), access.sandbox, actor)
        } else {
            let Some(token) = bearer(parts) else {
                return Err(ApiError::Unauthorized(
                    "missing X-API-Key or Authorization: Bearer <token> header".into(),
                ));
            };
            let claims = state
                .tokens
                .verify_user(token)
                .map_err(|e| ApiError::Unauthorized(format!("user token rejected: {e}")))?;
            let access = capsule_access::by_member(
                &state.db,
                claims.sub.uuid(),
                claims.team_id.uuid(),
                id.uuid(),
            )
            .await?
            .ok_or_else(|| ApiError::Unauthorized("the token's user no longer exists".into()))?;
            if access.user_status != UserStatus::Active {
                return Err(ApiError::Forbidden {
                    code: ErrorCode::AccountDeactivated,
                    message: "this account is deactivated".into(),
                });
            }
            if access.role.is_none() {
                return Err(ApiError::forbidden(
                    "you are no longer a member of this token's team",
                ));
            }
            let actor = Actor {
                kind: "user",
                id: Some(claims.sub.to_string()),
                name: Some(claims.name.clone()),
            };
            (claims.team_id, access.sandbox, actor)
        };
        audit::note(parts, Some(team_id.uuid()), actor.clone());
        let sandbox = sandbox.ok_or(ApiError::from(CapsuleError::NotFound))?;
        Ok(CapsuleCall {
            team_id,
            actor,
            id,
            sandbox,
        })
    }
}

/// A host agent, by its host JWT, which must belong to a refresh-token family that is still live
/// (not revoked after reuse, not replaced by a new registration): a dead family's JWT is a 401,
/// so the agent tries its refresh token and learns that it must register again. Whether the
/// host still exists is the handler's question (a deleted host is a 404 the agent acts on).
#[derive(Debug, Clone, Copy)]
pub struct HostAuth {
    pub host_id: HostId,
}

impl FromRequestParts<AppState> for HostAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(token) = header(parts, HOST_TOKEN_HEADER) else {
            return Err(ApiError::Unauthorized("missing X-Host-Token header".into()));
        };
        let claims = state
            .tokens
            .verify_host(token)
            .map_err(|e| ApiError::Unauthorized(format!("host token rejected: {e}")))?;
        let standing =
            host_refresh_tokens::family_standing(&state.db, claims.sub.uuid(), claims.family)
                .await?;
        if standing.host_exists && !standing.family_live {
            return Err(ApiError::Unauthorized(
                "host token rejected: the credentials it was issued with are revoked or \
                 replaced"
                    .into(),
            ));
        }
        Ok(HostAuth {
            host_id: claims.sub,
        })
    }
}
