//! `/v1/admin/builds`: template builds from recipes, by platform admins (platform templates) and
//! team owners (their team's templates, signed in to that team). A build is submitted as
//! JSON, or as multipart with its JSON in a `config` part and the files its `COPY` steps use in
//! an `archive` part (tar, tar.gz or zip, streamed to disk, never held in memory).

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::cp::auth::AuthUser;
use crate::cp::error::ApiError;
use crate::cp::extract::{parse_json, path_id, ApiQuery};
use crate::cp::pagination::PageQuery;
use crate::cp::services::builds::{self, BuildView, NewBuild};
use crate::cp::state::AppState;
use crate::db::builds as build_rows;
use crate::template::archive;

/// The recipe as one text or as a list of lines (the original product's form).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RecipeText {
    Text(String),
    Lines(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildBody {
    name: String,
    #[serde(default)]
    base_template: Option<String>,
    recipe: RecipeText,
    #[serde(default)]
    healthcheck: Option<String>,
    #[serde(default)]
    vcpus: Option<u32>,
    #[serde(default)]
    memory_mb: Option<u32>,
}

impl From<BuildBody> for NewBuild {
    fn from(body: BuildBody) -> Self {
        Self {
            name: body.name,
            base_template: body.base_template,
            recipe: match body.recipe {
                RecipeText::Text(text) => text,
                RecipeText::Lines(lines) => lines.join("\n"),
            },
            healthcheck: body.healthcheck,
            vcpus: body.vcpus,
            memory_mb: body.memory_mb,
        }
    }
}

/// The JSON part of a request: small.
const CONFIG_LIMIT: usize = 1 << 20;

/// `POST /v1/admin/builds`: 202 with the build, which runs on.
pub async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    request: Request,
) -> Result<Response, ApiError> {
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    // Refused before any upload is read.
    builds::builder_team(&user.caller)?;
    let limit = state.capsules.build_context_max_bytes;
    let (body, context) = if multipart {
        let multipart = Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
        read_multipart(multipart, limit).await?
    } else {
        let bytes = axum::body::to_bytes(request.into_body(), CONFIG_LIMIT)
            .await
            .map_err(|_| {
                ApiError::TooLarge(format!("the JSON body is over {CONFIG_LIMIT} bytes"))
            })?;
        (parse_json::<BuildBody>(&bytes)?, None)
    };
    let build = builds::submit(&state, &user.caller, body.into(), context).await?;
    Ok((StatusCode::ACCEPTED, Json(BuildView::from(build))).into_response())
}

async fn read_multipart(
    mut multipart: Multipart,
    limit: u64,
) -> Result<(BuildBody, Option<tempfile::TempPath>), ApiError> {
    let malformed = |e: axum::extract::multipart::MultipartError| {
        ApiError::InvalidRequest(format!("malformed multipart body: {}", e.body_text()))
    };
    let mut config = None;
    let mut upload = None;
    while let Some(mut field) = multipart.next_field().await.map_err(malformed)? {
        match field.name() {
            Some("config") => {
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() > CONFIG_LIMIT {
                        return Err(ApiError::TooLarge("the `config` part is over 1 MiB".into()));
                    }
                }
                config = Some(parse_json::<BuildBody>(&bytes)?);
            }
            Some("archive") => {
                let file = tempfile::Builder::new()
                    .prefix("wrenn-build-upload-")
                    .tempfile()
                    .map_err(internal)?;
                let (file, path) = file.into_parts();
                let mut file = tokio::fs::File::from_std(file);
                let mut received = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    received += chunk.len() as u64;
                    if received > limit {
                        return Err(ApiError::TooLarge(format!(
                            "the archive is over the {limit}-byte limit (cp.build_context_max_bytes)"
                        )));
                    }
                    file.write_all(&chunk).await.map_err(internal)?;
                }
                file.flush().await.map_err(internal)?;
                upload = Some(path);
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
    let config =
        config.ok_or_else(|| ApiError::InvalidRequest("missing the `config` part".into()))?;
    let context = match upload {
        Some(upload) => Some(rewrite(upload, limit).await?),
        None => None,
    };
    Ok((config, context))
}

/// Checks the upload and rewrites it as the plain tar the build capsule unpacks.
async fn rewrite(upload: tempfile::TempPath, limit: u64) -> Result<tempfile::TempPath, ApiError> {
    tokio::task::spawn_blocking(move || {
        let out = tempfile::Builder::new()
            .prefix("wrenn-build-context-")
            .tempfile()
            .map_err(internal)?
            .into_temp_path();
        match archive::rewrite_as_tar(&upload, &out, limit) {
            Ok(_) => Ok(out),
            Err(archive::ArchiveError::TooLarge { limit }) => Err(ApiError::TooLarge(format!(
                "the archive unpacks to more than {limit} bytes (cp.build_context_max_bytes)"
            ))),
            Err(archive::ArchiveError::Io(error)) => Err(internal(error)),
            Err(error) => Err(ApiError::InvalidRequest(format!("archive: {error}"))),
        }
    })
    .await
    .map_err(internal)?
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    tracing::error!(%error, "build upload failed");
    ApiError::Internal
}

pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    query: PageQuery,
) -> Result<Response, ApiError> {
    let team = builds::builder_team(&user.caller)?;
    let page = builds::list(&state, team, query.request).await?;
    Ok(query.answer(page.map(BuildView::from)))
}

pub async fn get(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<BuildView>, ApiError> {
    let id: Uuid = build_id(&id)?;
    let team = builds::builder_team(&user.caller)?;
    Ok(Json(builds::get(&state, team, id).await?.into()))
}

pub async fn cancel(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<BuildView>, ApiError> {
    let id: Uuid = build_id(&id)?;
    let team = builds::builder_team(&user.caller)?;
    Ok(Json(builds::cancel(&state, team, id).await?.into()))
}

fn build_id(raw: &str) -> Result<Uuid, ApiError> {
    path_id::<Uuid>("build id", raw)
}

#[derive(Debug, Deserialize)]
pub struct LogQuery {
    /// Lines after this sequence number (0: from the start).
    #[serde(default)]
    after: i64,
    /// Keep the answer open and send lines as they come until the build ends.
    #[serde(default)]
    follow: bool,
}

const LOG_POLL: Duration = Duration::from_millis(300);
const LOG_BATCH: i64 = 500;

/// `GET /v1/admin/builds/{id}/logs`: the log as NDJSON, one `{seq, at, stream, text}` object per
/// line; with `follow=true`, streamed live until the build ends. Any replica answers: the lines
/// are in the database.
pub async fn logs(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<LogQuery>,
) -> Result<Response, ApiError> {
    let id: Uuid = build_id(&id)?;
    let team = builds::builder_team(&user.caller)?;
    builds::get(&state, team, id).await?;
    let db = state.db.clone();
    let lines = futures::stream::unfold((query.after, false), move |(after, ended)| {
        let db = db.clone();
        async move {
            if ended {
                return None;
            }
            loop {
                let finished = match build_rows::status_of(&db, id).await {
                    Ok(status) => status.is_none_or(|s| s.is_finished()),
                    Err(error) => return Some((Err(std::io::Error::other(error)), (after, true))),
                };
                let batch = match build_rows::logs_after(&db, id, after, LOG_BATCH).await {
                    Ok(batch) => batch,
                    Err(error) => return Some((Err(std::io::Error::other(error)), (after, true))),
                };
                if let Some(last) = batch.last() {
                    let next = last.seq;
                    let mut text = String::new();
                    for line in batch {
                        let object = serde_json::json!({
                            "seq": line.seq,
                            "at": line.at,
                            "stream": line.stream.as_str(),
                            "text": line.text,
                        });
                        text.push_str(&object.to_string());
                        text.push('\n');
                    }
                    return Some((Ok(bytes::Bytes::from(text)), (next, false)));
                }
                if !query.follow || finished {
                    return None;
                }
                tokio::time::sleep(LOG_POLL).await;
            }
        }
    })
    .boxed();
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .map_err(internal)
}
