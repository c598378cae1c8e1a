//! `/v1/auth/*` and `/v1/me`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::cp::auth::AuthUser;
use crate::cp::error::ApiError;
use crate::cp::extract::{ApiJson, ClientAddr};
use crate::cp::services::accounts::{self, Session, Signup, SignupPolicy};
use crate::cp::services::input::{DisplayName, Email, Password};
use crate::cp::state::AppState;
use crate::id::{TeamId, UserId};
use crate::secret::SecretText;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    email: String,
    password: SecretText,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    email: String,
    password: SecretText,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchTeamRequest {
    team_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    name: String,
}

/// `AuthResponse` of the spec.
#[derive(Debug, Serialize)]
pub struct AuthResponse {
    token: SecretText,
    user_id: UserId,
    team_id: TeamId,
    email: String,
    name: String,
}

impl From<Session> for AuthResponse {
    fn from(s: Session) -> Self {
        Self {
            token: s.token,
            user_id: s.user_id,
            team_id: s.team_id,
            email: s.email,
            name: s.name,
        }
    }
}

/// `SignupResponse` of the spec; accounts are active at once, so it also carries the session.
#[derive(Debug, Serialize)]
pub struct SignupResponse {
    message: &'static str,
    #[serde(flatten)]
    session: AuthResponse,
}

#[derive(Debug, Serialize)]
pub struct MeResponse {
    name: String,
    email: String,
    has_password: bool,
    providers: Vec<String>,
}

pub async fn signup(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<SignupRequest>,
) -> Result<(StatusCode, Json<SignupResponse>), ApiError> {
    let signup = Signup {
        email: Email::parse("email", &req.email)?,
        password: Password::parse("password", req.password.expose())?,
        name: DisplayName::parse("name", &req.name)?,
    };
    let policy = SignupPolicy {
        mode: state.auth.signup,
        per_address: state.auth.signup_per_address,
    };
    let session = accounts::signup(
        &state.db,
        &state.tokens,
        &state.passwords,
        policy,
        signup,
        client,
    )
    .await?;
    let body = SignupResponse {
        message: "account created; you are signed in",
        session: session.into(),
    };
    Ok((StatusCode::CREATED, Json(body)))
}

pub async fn login(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Json<AuthResponse>, ApiError> {
    let limits = &state.auth.login_limits;
    let session = accounts::login(
        &state.db,
        &state.tokens,
        &state.passwords,
        limits,
        &req.email,
        req.password.expose(),
        client,
    )
    .await?;
    Ok(Json(session.into()))
}

pub async fn switch_team(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiJson(req): ApiJson<SwitchTeamRequest>,
) -> Result<Json<AuthResponse>, ApiError> {
    let team: TeamId = req
        .team_id
        .parse()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid field `team_id`: {e}")))?;
    Ok(Json(
        accounts::switch_team(&state.db, &state.tokens, &auth.user, team)
            .await?
            .into(),
    ))
}

pub async fn me(auth: AuthUser) -> Json<MeResponse> {
    Json(MeResponse {
        name: auth.user.name,
        email: auth.user.email,
        has_password: true,
        providers: Vec::new(),
    })
}

pub async fn rename_me(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiJson(req): ApiJson<RenameRequest>,
) -> Result<Json<AuthResponse>, ApiError> {
    let name = DisplayName::parse("name", &req.name)?;
    Ok(Json(
        accounts::rename(&state.db, &state.tokens, &auth.user, auth.caller.team, name)
            .await?
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_stay_out_of_debug_output() {
        const SECRET: &str = "hunter2-hunter2";
        let signup: SignupRequest = serde_json::from_value(serde_json::json!({
            "email": "a@example.com", "password": SECRET, "name": "A"
        }))
        .unwrap();
        let login: LoginRequest = serde_json::from_value(serde_json::json!({
            "email": "a@example.com", "password": SECRET
        }))
        .unwrap();
        let response = AuthResponse::from(Session {
            token: SecretText::new(SECRET),
            user_id: UserId(uuid::Uuid::nil()),
            team_id: TeamId(uuid::Uuid::nil()),
            email: "a@example.com".into(),
            name: "A".into(),
        });
        for shown in [
            format!("{signup:?}"),
            format!("{login:?}"),
            format!("{response:?}"),
        ] {
            assert!(!shown.contains(SECRET), "{shown}");
        }
        // On the wire the token is still there.
        assert_eq!(serde_json::to_value(&response).unwrap()["token"], SECRET);
    }
}
