//! `/v1/channels`: notification channels (the reference API's seven operations), and each
//! channel's delivery log (`/v1/channels/{id}/deliveries`, an addition).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::no_content;
use crate::cp::auth::AuthUser;
use crate::cp::error::ApiError;
use crate::cp::extract::{path_id, ApiJson, ApiQuery};
use crate::cp::services::channels::{self, NewChannelInput};
use crate::cp::services::input::ChannelName;
use crate::cp::state::AppState;
use crate::db::channels::{Channel, Delivery};
use crate::id::{ChannelId, TeamId};
use crate::secret::SecretText;

/// No `Debug`: it holds the provider settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateChannelRequest {
    name: String,
    provider: String,
    config: BTreeMap<String, String>,
    events: Vec<String>,
}

/// No `Debug`: it holds the provider settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestChannelRequest {
    provider: String,
    config: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateChannelRequest {
    name: String,
    events: Vec<String>,
}

/// No `Debug`: it holds the provider settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateConfigRequest {
    config: BTreeMap<String, String>,
}

/// `ChannelResponse` of the spec; `secret` only when this call generated it.
#[derive(Debug, Serialize)]
pub struct ChannelResponse {
    id: ChannelId,
    team_id: TeamId,
    name: String,
    provider: String,
    events: Vec<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<SecretText>,
}

impl ChannelResponse {
    fn new(channel: Channel, secret: Option<String>) -> Self {
        Self {
            id: ChannelId(channel.id),
            team_id: TeamId(channel.team_id),
            name: channel.name,
            provider: channel.provider,
            events: channel.event_types,
            created_at: channel.created_at,
            updated_at: channel.updated_at,
            secret: secret.map(SecretText::new),
        }
    }
}

pub async fn create(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiJson(req): ApiJson<CreateChannelRequest>,
) -> Result<(StatusCode, Json<ChannelResponse>), ApiError> {
    let input = NewChannelInput {
        name: ChannelName::parse("name", &req.name)?,
        provider: channels::provider(&req.provider)?,
        config: req.config,
        events: &req.events,
    };
    let keys = state.tokens.seal_keys();
    let (channel, secret) = channels::create(&state.db, keys, &auth.caller, input).await?;
    Ok((
        StatusCode::CREATED,
        Json(ChannelResponse::new(channel, secret)),
    ))
}

pub async fn list(
    State(state): State<AppState>,
    auth: AuthUser,
) -> Result<Json<Vec<ChannelResponse>>, ApiError> {
    let channels = channels::list(&state.db, &auth.caller).await?;
    Ok(Json(
        channels
            .into_iter()
            .map(|c| ChannelResponse::new(c, None))
            .collect(),
    ))
}

pub async fn get(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<ChannelResponse>, ApiError> {
    let channel = channels::get(&state.db, &auth.caller, path_id("id", &id)?).await?;
    Ok(Json(ChannelResponse::new(channel, None)))
}

pub async fn update(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateChannelRequest>,
) -> Result<Json<ChannelResponse>, ApiError> {
    let id = path_id("id", &id)?;
    let name = ChannelName::parse("name", &req.name)?;
    let channel = channels::update(&state.db, &auth.caller, id, name, &req.events).await?;
    Ok(Json(ChannelResponse::new(channel, None)))
}

pub async fn rotate_config(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RotateConfigRequest>,
) -> Result<Json<ChannelResponse>, ApiError> {
    let id = path_id("id", &id)?;
    let keys = state.tokens.seal_keys();
    let (channel, secret) =
        channels::rotate_config(&state.db, keys, &auth.caller, id, req.config).await?;
    Ok(Json(ChannelResponse::new(channel, secret)))
}

pub async fn delete(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    channels::delete(&state.db, &auth.caller, path_id("id", &id)?).await?;
    Ok(no_content())
}

#[derive(Debug, Serialize)]
pub struct TestResponse {
    status: &'static str,
}

pub async fn test(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiJson(req): ApiJson<TestChannelRequest>,
) -> Result<Json<TestResponse>, ApiError> {
    let provider = channels::provider(&req.provider)?;
    let allow_private = state.capsules.channel_allow_private;
    channels::test(&auth.caller, provider, req.config, allow_private).await?;
    Ok(Json(TestResponse { status: "ok" }))
}

const DELIVERIES_DEFAULT: i64 = 50;
const DELIVERIES_MAX: i64 = 200;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    #[serde(default)]
    before: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct DeliveryView {
    id: String,
    event_id: String,
    event: String,
    status: String,
    attempts: i32,
    /// When a pending delivery is tried next.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<DateTime<Utc>>,
    response_status: Option<i32>,
    error: Option<String>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        Self {
            id: d.id.to_string(),
            event_id: d.event_id.to_string(),
            event: d.event_type,
            next_attempt_at: (d.status == "pending").then_some(d.next_attempt_at),
            status: d.status,
            attempts: d.attempts,
            response_status: d.response_status,
            error: d.error,
            created_at: d.created_at,
            finished_at: d.finished_at,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DeliveriesPage {
    items: Vec<DeliveryView>,
    /// Pass as `before` for the next (older) page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before: Option<String>,
}

pub async fn deliveries(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<DeliveriesQuery>,
) -> Result<Json<DeliveriesPage>, ApiError> {
    let id = path_id("id", &id)?;
    let limit = query.limit.unwrap_or(DELIVERIES_DEFAULT);
    if !(1..=DELIVERIES_MAX).contains(&limit) {
        return Err(ApiError::InvalidRequest(format!(
            "limit must be 1-{DELIVERIES_MAX}"
        )));
    }
    let rows = channels::deliveries(&state.db, &auth.caller, id, query.before, limit + 1).await?;
    let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > limit;
    let items: Vec<DeliveryView> = rows
        .into_iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(DeliveryView::from)
        .collect();
    let next_before = more.then(|| items.last().map(|d| d.id.clone())).flatten();
    Ok(Json(DeliveriesPage { items, next_before }))
}
