//! `/v1/hosts`: the admin side (create, list, delete, tags) and the agent side (register,
//! heartbeat, refresh).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::no_content;
use crate::config::HostPort;
use crate::cp::auth::{AuthUser, HostAuth};
use crate::cp::error::ApiError;
use crate::cp::extract::{path_id, ApiJson, ApiQuery, ClientAddr};
use crate::cp::pagination::PageQuery;
use crate::cp::services::hosts::{self, AgentSpecs, CreateHost, HostCredentials};
use crate::cp::services::input::Tag;
use crate::cp::state::AppState;
use crate::db::hosts::{Host, HostStatus, HostType};
use crate::id::{HostId, SandboxId, TeamId, UserId};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateHostRequest {
    #[serde(rename = "type")]
    host_type: HostType,
    #[serde(default)]
    team_id: Option<TeamId>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    availability_zone: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterHostRequest {
    token: String,
    address: String,
    #[serde(default)]
    arch: Option<String>,
    #[serde(default)]
    cpu_cores: Option<u32>,
    #[serde(default)]
    memory_mb: Option<u64>,
    #[serde(default)]
    disk_gb: Option<u64>,
    /// Our addition: component versions (agent, kernel, VMM) reported by the agent.
    #[serde(default)]
    versions: Option<serde_json::Map<String, Value>>,
    /// Our addition: a PEM certificate signing request for the agent's TLS key.
    #[serde(default)]
    csr: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    refresh_token: String,
    /// Our addition: a CSR for the agent's renewed certificate.
    #[serde(default)]
    csr: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddTagRequest {
    tag: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

/// `Host` of the spec.
#[derive(Debug, Serialize)]
pub struct HostView {
    id: HostId,
    #[serde(rename = "type")]
    host_type: HostType,
    team_id: Option<TeamId>,
    provider: Option<String>,
    availability_zone: Option<String>,
    arch: Option<String>,
    cpu_cores: Option<i32>,
    memory_mb: Option<i64>,
    disk_gb: Option<i64>,
    address: Option<String>,
    status: HostStatus,
    last_heartbeat_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_by: Option<UserId>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<Host> for HostView {
    fn from(h: Host) -> Self {
        Self {
            id: HostId(h.id),
            host_type: h.host_type,
            team_id: h.team_id.map(TeamId),
            provider: h.provider,
            availability_zone: h.availability_zone,
            arch: h.arch,
            cpu_cores: h.cpu_cores,
            memory_mb: h.memory_mb,
            disk_gb: h.disk_gb,
            address: h.address,
            status: h.status,
            last_heartbeat_at: h.last_heartbeat_at,
            created_by: h.created_by.map(UserId),
            created_at: h.created_at,
            updated_at: h.updated_at,
        }
    }
}

/// No `Debug`: it carries the registration token.
#[derive(Serialize)]
pub struct CreateHostResponse {
    host: HostView,
    registration_token: String,
}

/// `RegisterHostResponse` / `RefreshHostTokenResponse` of the spec (no `Debug`: it carries
/// tokens), plus what the agent's mTLS needs: `agent_secret` (presented by the control plane on every call), the agent's
/// certificate when it sent a CSR, and the CA it pins.
#[derive(Serialize)]
pub struct HostCredentialsResponse {
    host: HostView,
    token: String,
    refresh_token: String,
    agent_secret: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_expires_at: Option<DateTime<Utc>>,
    ca_cert_pem: String,
}

impl From<HostCredentials> for HostCredentialsResponse {
    fn from(c: HostCredentials) -> Self {
        let (cert_pem, cert_expires_at) = match c.cert {
            Some(cert) => (Some(cert.pem), Some(cert.not_after)),
            None => (None, None),
        };
        Self {
            host: c.host.into(),
            token: c.token,
            refresh_token: c.refresh_token,
            agent_secret: c.agent_secret,
            cert_pem,
            cert_expires_at,
            ca_cert_pem: c.ca_cert_pem,
        }
    }
}

/// The loaded CA; only a control plane started without `cp::run` lacks it.
fn ca(state: &AppState) -> Result<&crate::cp::ca::Ca, ApiError> {
    state.ca.get().map(AsRef::as_ref).map_err(|error| {
        tracing::error!(%error, "registration without a CA");
        ApiError::Internal
    })
}

#[derive(Debug, Serialize)]
pub struct DeletePreview {
    host: HostView,
    sandbox_ids: Vec<SandboxId>,
}

fn host_path(raw: &str) -> Result<HostId, ApiError> {
    path_id("id", raw)
}

fn field<T: TryFrom<u64>>(name: &str, value: Option<u64>) -> Result<Option<T>, ApiError> {
    value
        .map(|v| {
            T::try_from(v).map_err(|_| {
                ApiError::InvalidRequest(format!("invalid field `{name}`: {v} is too large"))
            })
        })
        .transpose()
}

pub async fn create(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiJson(req): ApiJson<CreateHostRequest>,
) -> Result<(StatusCode, Json<CreateHostResponse>), ApiError> {
    let request = CreateHost {
        host_type: req.host_type,
        team_id: req.team_id,
        provider: req.provider,
        availability_zone: req.availability_zone,
    };
    let (host, token) = hosts::create(&state.db, &auth.caller, request).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreateHostResponse {
            host: host.into(),
            registration_token: token,
        }),
    ))
}

pub async fn list(
    State(state): State<AppState>,
    auth: AuthUser,
    query: PageQuery,
) -> Result<Response, ApiError> {
    let page = hosts::list(&state.db, &auth.caller, query.request).await?;
    Ok(query.answer(page.map(HostView::from)))
}

pub async fn get(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<HostView>, ApiError> {
    Ok(Json(
        hosts::get(&state.db, &auth.caller, host_path(&id)?)
            .await?
            .into(),
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    hosts::delete(&state.db, &auth.caller, host_path(&id)?, query.force).await?;
    Ok(no_content())
}

pub async fn delete_preview(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<DeletePreview>, ApiError> {
    let (host, sandbox_ids) =
        hosts::delete_preview(&state.db, &auth.caller, host_path(&id)?).await?;
    Ok(Json(DeletePreview {
        host: host.into(),
        sandbox_ids,
    }))
}

pub async fn regenerate_token(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<CreateHostResponse>), ApiError> {
    let (host, token) = hosts::regenerate_token(&state.db, &auth.caller, host_path(&id)?).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreateHostResponse {
            host: host.into(),
            registration_token: token,
        }),
    ))
}

pub async fn register(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RegisterHostRequest>,
) -> Result<(StatusCode, Json<HostCredentialsResponse>), ApiError> {
    let address: HostPort = req
        .address
        .parse()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid field `address`: {e}")))?;
    let specs = AgentSpecs {
        arch: req.arch,
        cpu_cores: field("cpu_cores", req.cpu_cores.map(u64::from))?,
        memory_mb: field("memory_mb", req.memory_mb)?,
        disk_gb: field("disk_gb", req.disk_gb)?,
        address,
        versions: Value::Object(req.versions.unwrap_or_default()),
        csr: req.csr,
    };
    let credentials = hosts::register(
        &state.db,
        &state.tokens,
        ca(&state)?,
        state.auth.host_addresses,
        &req.token,
        specs,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(credentials.into())))
}

pub async fn heartbeat(
    State(state): State<AppState>,
    caller: HostAuth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    hosts::heartbeat(&state.db, caller.host_id, host_path(&id)?).await?;
    Ok(no_content())
}

pub async fn refresh(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> Result<Json<HostCredentialsResponse>, ApiError> {
    let grace = state.auth.host_refresh_grace;
    let credentials = hosts::refresh(
        &state.db,
        &state.tokens,
        ca(&state)?,
        grace,
        &req.refresh_token,
        req.csr.as_deref(),
        client,
    )
    .await?;
    Ok(Json(credentials.into()))
}

pub async fn tags(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Vec<String>>, ApiError> {
    Ok(Json(
        hosts::tags(&state.db, &auth.caller, host_path(&id)?).await?,
    ))
}

pub async fn add_tag(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<AddTagRequest>,
) -> Result<StatusCode, ApiError> {
    let host = host_path(&id)?;
    hosts::add_tag(&state.db, &auth.caller, host, Tag::parse("tag", &req.tag)?).await?;
    Ok(no_content())
}

pub async fn remove_tag(
    State(state): State<AppState>,
    auth: AuthUser,
    Path((id, tag)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    hosts::remove_tag(&state.db, &auth.caller, host_path(&id)?, &tag).await?;
    Ok(no_content())
}
