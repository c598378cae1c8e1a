//! `GET /v1/snapshots`: the templates a team can start capsules from (the reference calls the
//! list "snapshots"; it holds base images too).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::cp::auth::AuthTeam;
use crate::cp::error::ApiError;
use crate::cp::extract::ApiQuery;
use crate::cp::pagination::PageQuery;
use crate::cp::services::templates;
use crate::cp::state::AppState;
use crate::db::templates::{Template, TemplateType};

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
