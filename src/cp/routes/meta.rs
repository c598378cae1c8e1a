//! `/health` and `/openapi.yaml`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::cp::state::AppState;
use crate::db;

/// Our API description: the subset of the Wrenn v1 spec we serve, plus our additions.
pub const OPENAPI_YAML: &str = include_str!("../../../docs/openapi.yaml");

pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let version = crate::version::VERSION;
    match db::ping(&state.db).await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({ "status": "ok", "version": version, "database": "ok" })),
        ),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "degraded",
                "version": version,
                "database": "unavailable",
                "detail": error.to_string(),
            })),
        ),
    }
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}
