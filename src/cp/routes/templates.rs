//! `GET /v1/snapshots`: the templates a team can start capsules from (the reference calls the
//! list "snapshots"; it holds base images too); and the admins' publishing of template images.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Path, Request};
use axum::http::header;
use axum::Json;
use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio_stream::wrappers::ReceiverStream;

use crate::cp::agent_client::ImportArchive;
use crate::cp::auth::{AdminUser, AuthTeam};
use crate::cp::error::ApiError;
use crate::cp::events;
use crate::cp::extract::{parse_json, path_id, ApiJson, ApiQuery};
use crate::cp::pagination::PageQuery;
use crate::cp::services::templates::{self, ImportSettings, Imported, Published};
use crate::cp::state::AppState;
use crate::db::templates::{Template, TemplateType};
use crate::id::HostId;
use crate::template::{TemplateName, TemplateNameError};

/// `?type=`; `limit` and `cursor` are the page's (`PageQuery`).
#[derive(Debug, Deserialize)]
pub struct TemplateFilter {
    #[serde(rename = "type")]
    template_type: Option<String>,
}

/// `Template` of the spec, with the 0.3.0 SDK's `platform`, `protected` and `metadata`.
#[derive(Debug, Serialize)]
pub struct TemplateView {
    name: String,
    #[serde(rename = "type")]
    template_type: &'static str,
    vcpus: Option<i32>,
    memory_mb: Option<i32>,
    size_bytes: i64,
    created_at: DateTime<Utc>,
    platform: bool,
    protected: bool,
    metadata: BTreeMap<String, String>,
}

impl From<Template> for TemplateView {
    fn from(t: Template) -> Self {
        let platform = t.is_platform();
        // The SDK reads string values; anything else is shown as its JSON text.
        let metadata = match t.metadata {
            serde_json::Value::Object(map) => map
                .into_iter()
                .map(|(key, value)| match value {
                    serde_json::Value::String(text) => (key, text),
                    other => (key, other.to_string()),
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        Self {
            name: t.name,
            template_type: t.template_type.as_str(),
            vcpus: Some(t.vcpus),
            memory_mb: Some(t.memory_mb),
            size_bytes: t.size_bytes,
            created_at: t.created_at,
            platform,
            protected: t.protected,
            metadata,
        }
    }
}

pub async fn list(
    State(state): State<AppState>,
    auth: AuthTeam,
    ApiQuery(filter): ApiQuery<TemplateFilter>,
    query: PageQuery,
) -> Result<Response, ApiError> {
    let template_type = filter
        .template_type
        .map(|raw| {
            TemplateType::try_from(raw.clone()).map_err(|_| {
                ApiError::InvalidRequest(format!(
                    "type: `{raw}` is not a template type (base or snapshot)"
                ))
            })
        })
        .transpose()?;
    let page = templates::list(&state.db, auth.team_id, template_type, query.request).await?;
    Ok(query.answer(page.map(TemplateView::from)))
}

/// `CreateSnapshotRequest` of the spec.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    sandbox_id: String,
    name: Option<String>,
}

/// `?overwrite=true`.
#[derive(Debug, Deserialize)]
pub struct Overwrite {
    overwrite: Option<String>,
}

/// `POST /v1/snapshots`: the capsule's memory and disk as they are now become a team template
/// that capsules start from. Unlike the original (which destroyed the capsule), the capsule
/// runs on, or stays paused.
pub async fn create_snapshot(
    State(state): State<AppState>,
    auth: AuthTeam,
    ApiQuery(query): ApiQuery<Overwrite>,
    ApiJson(body): ApiJson<CreateSnapshotRequest>,
) -> Result<Response, ApiError> {
    let overwrite = match query.overwrite.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "overwrite: `{other}` is not `true` or `false`"
            )))
        }
    };
    let capsule = path_id("sandbox_id", &body.sandbox_id)?;
    let name = body.name.clone();
    let made =
        templates::create_snapshot(&state, auth.team_id, capsule, body.name, overwrite).await;
    let resource = made
        .as_ref()
        .map_or_else(|_| name.unwrap_or_default(), |t| t.name.clone());
    let mut event = events::action(
        auth.team_id.uuid(),
        "template.snapshot.create",
        ("template", resource),
        &auth.actor(),
        made.as_ref().map(drop).map_err(ToString::to_string),
    );
    event.metadata = serde_json::json!({ "sandbox_id": capsule.to_string() });
    event.sandbox_id = Some(capsule.uuid());
    events::record(&state.db, event).await;
    Ok((StatusCode::CREATED, Json(TemplateView::from(made?))).into_response())
}

/// `DELETE /v1/snapshots/{name}`: the team's template leaves the registry, every host and the
/// store; platform templates are refused (403).
pub async fn delete(
    State(state): State<AppState>,
    auth: AuthTeam,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let deleted = templates::delete(&state, auth.team_id, &name).await;
    let event = events::action(
        auth.team_id.uuid(),
        "template.snapshot.delete",
        ("template", name),
        &auth.actor(),
        deleted.as_ref().map(drop).map_err(ToString::to_string),
    );
    events::record(&state.db, event).await;
    deleted?;
    Ok(StatusCode::NO_CONTENT)
}

/// `?host_id=`: the host whose image to publish; by default any online host holding it.
#[derive(Debug, Deserialize)]
pub struct PublishFrom {
    host_id: Option<String>,
}

/// `POST /v1/admin/templates/{name}/publish` (addition): puts a host's image of a platform
/// template into the template store, so every other host pulls it before its first capsule.
pub async fn publish(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(name): Path<String>,
    ApiQuery(from): ApiQuery<PublishFrom>,
) -> Result<Json<Published>, ApiError> {
    let name: TemplateName = name
        .parse()
        .map_err(|e: TemplateNameError| ApiError::InvalidRequest(e.to_string()))?;
    let host = from
        .host_id
        .map(|raw| path_id::<HostId>("host_id", &raw))
        .transpose()?;
    Ok(Json(templates::publish(&state, &name, host).await?))
}

/// `POST /v1/admin/templates/{name}/import` (addition): a container image archive (`docker save`
/// or OCI layout) becomes platform template `name`. Multipart with an optional `config` part
/// (JSON [`ImportSettings`]) before the `archive` part, which streams through to the host; or
/// JSON settings naming an archive already on a host (`host_id` and `path`).
pub async fn import(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(name): Path<String>,
    request: Request,
) -> Result<Json<Imported>, ApiError> {
    let name: TemplateName = name
        .parse()
        .map_err(|e: TemplateNameError| ApiError::InvalidRequest(e.to_string()))?;
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !multipart {
        let bytes = axum::body::to_bytes(request.into_body(), 1 << 20)
            .await
            .map_err(|_| ApiError::TooLarge("the JSON body is over 1 MiB".into()))?;
        let settings: ImportSettings = parse_json(&bytes)?;
        let path = settings.path.clone().ok_or_else(|| {
            ApiError::InvalidRequest(
                "send the archive as multipart `archive`, or name one on a host with `host_id` and `path`".into(),
            )
        })?;
        let target = templates::import_target(&state, &name, &settings).await?;
        let archive = ImportArchive::OnHost(path);
        return Ok(Json(
            templates::import(&state, &name, &settings, target, archive).await?,
        ));
    }
    let mut multipart = Multipart::from_request(request, &state)
        .await
        .map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let malformed = |e: MultipartError| {
        ApiError::InvalidRequest(format!("malformed multipart body: {}", e.body_text()))
    };
    let mut settings = ImportSettings::default();
    while let Some(mut field) = multipart.next_field().await.map_err(malformed)? {
        match field.name() {
            Some("config") => {
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() > 1 << 20 {
                        return Err(ApiError::TooLarge("the `config` part is over 1 MiB".into()));
                    }
                }
                settings = parse_json(&bytes)?;
                if settings.path.is_some() {
                    return Err(ApiError::InvalidRequest(
                        "`path` names an archive on a host; with an `archive` part, leave it out"
                            .into(),
                    ));
                }
            }
            Some("archive") => {
                let target = templates::import_target(&state, &name, &settings).await?;
                let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
                let body =
                    StreamBody::new(ReceiverStream::new(rx).map_ok(Frame::data)).boxed_unsync();
                let pump = async move {
                    loop {
                        match field.chunk().await {
                            Ok(Some(chunk)) => {
                                if tx.send(Ok(chunk)).await.is_err() {
                                    return Ok(());
                                }
                            }
                            Ok(None) => return Ok(()),
                            Err(error) => {
                                let _ = tx
                                    .send(Err(std::io::Error::other("the upload broke off")))
                                    .await;
                                return Err(malformed(error));
                            }
                        }
                    }
                };
                let (imported, pumped) = tokio::join!(
                    templates::import(
                        &state,
                        &name,
                        &settings,
                        target,
                        ImportArchive::Upload(body)
                    ),
                    pump
                );
                pumped?;
                return Ok(Json(imported?));
            }
            Some(other) => {
                return Err(ApiError::InvalidRequest(format!(
                    "unexpected multipart part `{other}`; expected `config` and `archive`"
                )))
            }
            None => {
                return Err(ApiError::InvalidRequest(
                    "a multipart part has no name".into(),
                ))
            }
        }
    }
    Err(ApiError::InvalidRequest(
        "missing the `archive` part".into(),
    ))
}
