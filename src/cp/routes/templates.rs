//! `GET /v1/snapshots`: the templates a team can start capsules from (the reference calls the
//! list "snapshots"; it holds base images too); and the admins' publishing of template images.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use axum::extract::Path;
use axum::Json;

use crate::cp::auth::{AdminUser, AuthTeam};
use crate::cp::error::ApiError;
use crate::cp::extract::{path_id, ApiQuery};
use crate::cp::pagination::PageQuery;
use crate::cp::services::templates::{self, Published};
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
