//! HTTP handlers of the capsule API: parse, call one service function, shape the answer. Files
//! stream through in both directions; nothing here holds a whole file.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;

use super::no_content;
use crate::agent::wire::{MetricsRange, SandboxMetrics};
use crate::cp::auth::{AuthTeam, CapsuleCall};
use crate::cp::error::ApiError;
use crate::cp::events::{self, Actor};
use crate::cp::extract::{path_id, ApiJson, ApiQuery};
use crate::cp::limits::Work;
use crate::cp::pagination::PageQuery;
use crate::cp::port_proxy;
use crate::cp::services::capsules::guest::command::CommandRequest;
use crate::cp::services::capsules::guest::{
    self, ExecOutcome, KillSignal, ListDirRequest, ListDirResponse, MakeDirResponse, PathRequest,
    ProcessListResponse,
};
use crate::cp::services::capsules::network::{self, CapsuleNetwork, NetworkChange};
use crate::cp::services::capsules::{self, NewCapsule, GUEST_IP_KEY};
use crate::cp::state::AppState;
use crate::db::sandboxes::SandboxRow;
use crate::egress::EgressPolicy;
use crate::id::SandboxId;

/// `POST /v1/capsules` body; every field optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCapsuleRequest {
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub vcpus: Option<i64>,
    #[serde(default)]
    pub memory_mb: Option<i64>,
    #[serde(default)]
    pub timeout_sec: Option<i64>,
    /// Addition: ports the port proxy serves without credentials.
    #[serde(default)]
    pub public_ports: Vec<i64>,
    /// Addition: where the guest may connect out to.
    #[serde(default)]
    pub egress: EgressPolicy,
}

/// The public Capsule representation; empty optional fields are omitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capsule {
    pub id: SandboxId,
    /// A `sandboxes.status` value (`running`, `stopped`, `error`, ...).
    pub status: String,
    pub template: String,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub timeout_sec: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_at: Option<DateTime<Utc>>,
    pub last_updated: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Value>,
}

impl From<SandboxRow> for Capsule {
    fn from(row: SandboxRow) -> Self {
        let mut metadata: BTreeMap<String, Value> = match row.metadata {
            Value::Object(map) => map.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        let guest_ip = match metadata.remove(GUEST_IP_KEY) {
            Some(Value::String(ip)) => Some(ip),
            _ => None,
        };
        let host_ip = row.host_address.as_deref().map(|address| {
            address
                .rsplit_once(':')
                .map_or(address, |(host, _)| host)
                .trim_matches(|c| c == '[' || c == ']')
                .to_owned()
        });
        Self {
            id: SandboxId(row.id),
            status: row.status.as_str().to_owned(),
            template: row.template,
            vcpus: row.vcpus,
            memory_mb: row.memory_mb,
            timeout_sec: row.timeout_sec,
            guest_ip,
            host_ip,
            created_at: row.created_at,
            started_at: row.started_at,
            last_active_at: row.last_active_at,
            last_updated: row.last_updated,
            metadata,
        }
    }
}

fn capsule_id(raw: &str) -> Result<SandboxId, ApiError> {
    path_id("id", raw)
}

/// Answers 201 with the capsule and a `Server-Timing: agent;dur=<ms>` header, the time the host
/// agent took, so clients and benchmarks can tell the control plane's share from the boot.
pub async fn create(
    State(state): State<AppState>,
    auth: AuthTeam,
    ApiJson(body): ApiJson<CreateCapsuleRequest>,
) -> Result<Response, ApiError> {
    let new = NewCapsule {
        egress: network::checked_egress(body.egress)?,
        ..NewCapsule::parse(
            body.template.as_deref(),
            body.vcpus,
            body.memory_mb,
            body.timeout_sec,
            &body.public_ports,
        )?
    };
    let created = capsules::create(&state, auth.team_id, new).await;
    let resource = created
        .as_ref()
        .map_or(String::new(), |c| c.sandbox.id.to_string());
    let outcome = created.as_ref().map(drop).map_err(ToString::to_string);
    let event = events::action(
        auth.team_id.uuid(),
        "capsule.create",
        ("capsule", resource),
        &auth.actor(),
        outcome,
    );
    events::record(&state.db, event).await;
    let created = created?;
    let timing = format!("agent;dur={:.3}", created.agent_time.as_secs_f64() * 1000.0);
    let mut response = (StatusCode::CREATED, Json(Capsule::from(created.sandbox))).into_response();
    if let Ok(value) = HeaderValue::from_str(&timing) {
        response.headers_mut().insert("server-timing", value);
    }
    Ok(response)
}

/// Records what an API call did to a capsule, as an event.
async fn record_action<T, E: std::fmt::Display>(
    state: &AppState,
    team: crate::id::TeamId,
    kind: &'static str,
    id: SandboxId,
    actor: &Actor,
    outcome: &Result<T, E>,
) {
    let outcome = outcome.as_ref().map(drop).map_err(ToString::to_string);
    let event = events::action(
        team.uuid(),
        kind,
        ("capsule", id.uuid().to_string()),
        actor,
        outcome,
    );
    events::record(&state.db, event).await;
}

pub async fn list(
    State(state): State<AppState>,
    auth: AuthTeam,
    query: PageQuery,
) -> Result<Response, ApiError> {
    let page = capsules::list(&state, auth.team_id, query.request).await?;
    Ok(query.answer(page.map(Capsule::from)))
}

pub async fn get(
    State(state): State<AppState>,
    auth: AuthTeam,
    Path(id): Path<String>,
) -> Result<Json<Capsule>, ApiError> {
    let row = capsules::get(&state, auth.team_id, capsule_id(&id)?).await?;
    Ok(Json(row.into()))
}

pub async fn destroy(
    State(state): State<AppState>,
    auth: AuthTeam,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = capsule_id(&id)?;
    let destroyed = capsules::destroy(&state, auth.team_id, id).await;
    record_action(
        &state,
        auth.team_id,
        "capsule.destroy",
        id,
        &auth.actor(),
        &destroyed,
    )
    .await;
    destroyed?;
    Ok(no_content())
}

/// `POST /v1/capsules/{id}/pause`: 200 with the capsule `paused`.
pub async fn pause(
    State(state): State<AppState>,
    call: CapsuleCall,
) -> Result<Json<Capsule>, ApiError> {
    let (team, actor) = (call.team_id, call.actor.clone());
    let paused = capsules::pause(&state, call.id, call.sandbox).await;
    record_action(&state, team, "capsule.pause", call.id, &actor, &paused).await;
    paused?;
    Ok(Json(capsules::get(&state, team, call.id).await?.into()))
}

/// `POST /v1/capsules/{id}/resume`: 200 with the capsule `running`.
pub async fn resume(
    State(state): State<AppState>,
    call: CapsuleCall,
) -> Result<Json<Capsule>, ApiError> {
    let (team, actor) = (call.team_id, call.actor.clone());
    let resumed = capsules::resume(&state, call.id, call.sandbox).await;
    record_action(&state, team, "capsule.resume", call.id, &actor, &resumed).await;
    resumed?;
    Ok(Json(capsules::get(&state, team, call.id).await?.into()))
}

/// `POST /v1/capsules/{id}/fork` body (addition).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many children; 1 when absent.
    count: Option<i64>,
}

/// `POST /v1/capsules/{id}/fork` (addition): 201 with the new capsules, each continuing this
/// one's memory and disk of one instant; this one runs on (or stays paused).
pub async fn fork(
    State(state): State<AppState>,
    call: CapsuleCall,
    ApiJson(body): ApiJson<ForkRequest>,
) -> Result<Response, ApiError> {
    let count = body.count.unwrap_or(1);
    let count = u32::try_from(count).map_err(|_| {
        ApiError::InvalidRequest(format!(
            "count: must be between 1 and {}, got {count}",
            capsules::MAX_FORK_CHILDREN
        ))
    })?;
    let children = capsules::fork(&state, call.team_id, call.id, count).await?;
    let children: Vec<Capsule> = children.into_iter().map(Capsule::from).collect();
    Ok((StatusCode::CREATED, Json(children)).into_response())
}

pub async fn ping(
    State(state): State<AppState>,
    call: CapsuleCall,
) -> Result<StatusCode, ApiError> {
    capsules::ping(&state, &call.reach(&state)?).await?;
    Ok(no_content())
}

/// `PUT /v1/capsules/{id}/network` body (an addition): what is left out stays as it is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    #[serde(default)]
    pub public_ports: Option<Vec<i64>>,
    #[serde(default)]
    pub egress: Option<EgressPolicy>,
}

#[derive(Debug, Deserialize)]
pub struct MetricsQuery {
    range: Option<String>,
}

pub async fn metrics(
    State(state): State<AppState>,
    auth: AuthTeam,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<MetricsQuery>,
) -> Result<Json<SandboxMetrics>, ApiError> {
    let id = capsule_id(&id)?;
    let range = match query.range.as_deref() {
        None => MetricsRange::TenMinutes,
        Some(raw) => raw.parse().map_err(|_| {
            ApiError::InvalidRequest(format!(
                "range: `{raw}` is not one of 5m, 10m, 1h, 2h, 6h, 12h, 24h"
            ))
        })?,
    };
    Ok(Json(
        capsules::metrics(&state, auth.team_id, id, range).await?,
    ))
}

pub async fn network(
    State(state): State<AppState>,
    auth: AuthTeam,
    Path(id): Path<String>,
) -> Result<Json<CapsuleNetwork>, ApiError> {
    let id = capsule_id(&id)?;
    Ok(Json(network::network(&state, auth.team_id, id).await?))
}

pub async fn set_network(
    State(state): State<AppState>,
    auth: AuthTeam,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<NetworkRequest>,
) -> Result<Json<CapsuleNetwork>, ApiError> {
    let id = capsule_id(&id)?;
    let change = NetworkChange {
        public_ports: body
            .public_ports
            .as_deref()
            .map(network::PublicPorts::parse)
            .transpose()?,
        egress: body.egress.map(network::checked_egress).transpose()?,
    };
    Ok(Json(
        network::set_network(&state, auth.team_id, id, change).await?,
    ))
}

/// `POST /v1/capsules/{id}/traffic-token` body (an addition); the body may be left out.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficTokenRequest {
    #[serde(default)]
    pub expires_in: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrafficToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

pub async fn traffic_token(
    State(state): State<AppState>,
    auth: AuthTeam,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<TrafficToken>), ApiError> {
    let id = capsule_id(&id)?;
    let request: TrafficTokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TrafficTokenRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))?
    };
    let ttl = port_proxy::traffic_token_ttl(request.expires_in)?;
    capsules::get(&state, auth.team_id, id).await?;
    let (token, exp) = state.tokens.issue_traffic(id, ttl);
    let expires_at =
        DateTime::from_timestamp(i64::try_from(exp).unwrap_or(i64::MAX), 0).unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(TrafficToken { token, expires_at }),
    ))
}

pub async fn exec(
    State(state): State<AppState>,
    call: CapsuleCall,
    ApiJson(body): ApiJson<CommandRequest>,
) -> Result<Response, ApiError> {
    let (capsule, _exec) = call.ready_for(&state, Work::Exec).await?;
    Ok(match guest::exec(&state, &capsule, body).await? {
        ExecOutcome::Finished(done) => (StatusCode::OK, Json(done)).into_response(),
        ExecOutcome::Started(started) => (StatusCode::ACCEPTED, Json(started)).into_response(),
    })
}

pub async fn list_processes(
    State(state): State<AppState>,
    call: CapsuleCall,
) -> Result<Json<ProcessListResponse>, ApiError> {
    let capsule = call.ready(&state).await?;
    Ok(Json(guest::list_processes(&state, &capsule).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillQuery {
    #[serde(default)]
    signal: Option<KillSignal>,
}

pub async fn kill_process(
    State(state): State<AppState>,
    call: CapsuleCall,
    Path((_, selector)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<KillQuery>,
) -> Result<StatusCode, ApiError> {
    let capsule = call.ready(&state).await?;
    let signal = query.signal.unwrap_or(KillSignal::Kill);
    guest::kill_process(&state, &capsule, &selector, signal).await?;
    Ok(no_content())
}

pub async fn list_dir(
    State(state): State<AppState>,
    call: CapsuleCall,
    ApiJson(body): ApiJson<ListDirRequest>,
) -> Result<Json<ListDirResponse>, ApiError> {
    let (capsule, _transfer) = call.ready_for(&state, Work::Transfer).await?;
    Ok(Json(guest::list_dir(&state, &capsule, body).await?))
}

pub async fn mkdir(
    State(state): State<AppState>,
    call: CapsuleCall,
    ApiJson(body): ApiJson<PathRequest>,
) -> Result<Json<MakeDirResponse>, ApiError> {
    let capsule = call.ready(&state).await?;
    Ok(Json(guest::mkdir(&state, &capsule, body).await?))
}

pub async fn remove(
    State(state): State<AppState>,
    call: CapsuleCall,
    ApiJson(body): ApiJson<PathRequest>,
) -> Result<StatusCode, ApiError> {
    let capsule = call.ready(&state).await?;
    guest::remove(&state, &capsule, body).await?;
    Ok(no_content())
}

async fn download(
    state: AppState,
    call: CapsuleCall,
    path: &str,
    chunked: bool,
) -> Result<Response, ApiError> {
    let (capsule, transfer) = call.ready_for(&state, Work::Transfer).await?;
    let download = guest::download(&state, &capsule, path).await?;
    // The transfer lasts until its last chunk is sent (or the client leaves).
    let body = download.body.map(move |chunk| {
        let _ = &transfer;
        chunk
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let (false, Some(length)) = (chunked, download.size) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Ok(response)
}

/// `files/read`: the file with its length.
pub async fn read_file(
    State(state): State<AppState>,
    call: CapsuleCall,
    ApiJson(body): ApiJson<PathRequest>,
) -> Result<Response, ApiError> {
    download(state, call, &body.path, false).await
}

/// `files/stream/read`: the file in chunked transfer encoding.
pub async fn stream_read_file(
    State(state): State<AppState>,
    call: CapsuleCall,
    ApiJson(body): ApiJson<PathRequest>,
) -> Result<Response, ApiError> {
    download(state, call, &body.path, true).await
}

fn multipart_error(error: MultipartError) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(error.body_text())
    } else {
        ApiError::InvalidRequest(format!("malformed multipart body: {}", error.body_text()))
    }
}

/// The `path` part: small text.
async fn path_field(mut field: Field<'_>) -> Result<String, ApiError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > 4096 {
            return Err(ApiError::InvalidRequest(
                "the `path` field is longer than 4096 bytes".into(),
            ));
        }
    }
    String::from_utf8(bytes)
        .map_err(|_| ApiError::InvalidRequest("the `path` field is not UTF-8".into()))
}

/// Forwards the `file` part chunk by chunk; a broken client body aborts the upload to envd so
/// no truncated file is reported as written.
async fn pump(
    mut field: Field<'_>,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<(), ApiError> {
    loop {
        match field.chunk().await {
            Ok(Some(chunk)) => {
                if tx.send(Ok(chunk)).await.is_err() {
                    // The upload ended early; its own error explains why.
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Err(error) => {
                let broke_off = std::io::Error::other("the client's upload broke off");
                let _ = tx.send(Err(broke_off)).await;
                return Err(multipart_error(error));
            }
        }
    }
}

/// `files/write` and `files/stream/write`: multipart `path` then `file`, streamed to envd.
pub async fn write_file(
    State(state): State<AppState>,
    call: CapsuleCall,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<StatusCode, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::InvalidRequest(format!(
            "expected a multipart/form-data body: {}",
            e.body_text()
        ))
    })?;
    let (capsule, _transfer) = call.ready_for(&state, Work::Transfer).await?;
    let mut path = None;
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name() {
            Some("path") => path = Some(path_field(field).await?),
            Some("file") => {
                let path = path.take().ok_or_else(|| {
                    ApiError::InvalidRequest("the `path` field must come before `file`".into())
                })?;
                guest::check_path(&path)?;
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                let (uploaded, pumped) = tokio::join!(
                    guest::upload(&state, &capsule, &path, ReceiverStream::new(rx)),
                    pump(field, tx)
                );
                pumped?;
                uploaded?;
                return Ok(no_content());
            }
            Some(other) => {
                return Err(ApiError::InvalidRequest(format!(
                    "unexpected multipart field `{other}`; expected `path` and `file`"
                )))
            }
            None => {
                return Err(ApiError::InvalidRequest(
                    "a multipart field has no name".into(),
                ))
            }
        }
    }
    Err(ApiError::InvalidRequest("missing the `file` field".into()))
}
