//! Plans (`/v1/admin/plans`, `/v1/admin/teams/{id}/plan`), a team's pool
//! (`/v1/teams/{id}/pool`), and what its capsules reserve over time (`/v1/capsules/stats`,
//! `/v1/capsules/usage`, the 0.3.0 API's shapes).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use super::no_content;
use crate::cp::auth::{AdminUser, AuthTeam, TeamActor};
use crate::cp::error::ApiError;
use crate::cp::extract::{path_id, ApiJson, ApiQuery};
use crate::cp::services::input::PlanName;
use crate::cp::services::pools;
use crate::cp::services::usage::{self, StatsRange};
use crate::cp::state::AppState;
use crate::db::plans::{Plan, PlanLimits, PoolUse};
use crate::db::usage::Reservation;
use crate::id::TeamId;

#[derive(Debug, Serialize)]
pub struct LimitsView {
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    disk_mb: Option<i64>,
    max_capsules: Option<i64>,
    paused_memory_percent: i32,
}

impl From<PlanLimits> for LimitsView {
    fn from(l: PlanLimits) -> Self {
        Self {
            vcpus: l.vcpus,
            memory_mb: l.memory_mb,
            disk_mb: l.disk_mb,
            max_capsules: l.max_capsules,
            paused_memory_percent: l.paused_memory_percent,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PlanView {
    name: String,
    #[serde(flatten)]
    limits: LimitsView,
    default: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<Plan> for PlanView {
    fn from(p: Plan) -> Self {
        Self {
            name: p.name,
            limits: p.limits.into(),
            default: p.is_default,
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}

/// Absent keeps a limit; `null` lifts it.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePlanRequest {
    name: String,
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    disk_mb: Option<i64>,
    max_capsules: Option<i64>,
    paused_memory_percent: Option<i32>,
    #[serde(default)]
    default: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdatePlanRequest {
    #[serde(default, deserialize_with = "present")]
    vcpus: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    memory_mb: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    disk_mb: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    max_capsules: Option<Option<i64>>,
    paused_memory_percent: Option<i32>,
    /// Only `true`: a plan stops being the default when another becomes it.
    default: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignPlanRequest {
    plan: String,
}

#[derive(Debug, Serialize)]
pub struct PlanList {
    plans: Vec<PlanView>,
}

/// The share of its memory a paused capsule holds when a new plan does not say.
const DEFAULT_PAUSED_MEMORY_PERCENT: i32 = 50;

fn plan_name(raw: &str) -> Result<PlanName, ApiError> {
    Ok(PlanName::parse("name", raw)?)
}

pub async fn list_plans(
    State(state): State<AppState>,
    _admin: AdminUser,
) -> Result<Json<PlanList>, ApiError> {
    let plans = pools::list(&state.db).await?;
    Ok(Json(PlanList {
        plans: plans.into_iter().map(Into::into).collect(),
    }))
}

pub async fn create_plan(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    ApiJson(body): ApiJson<CreatePlanRequest>,
) -> Result<Response, ApiError> {
    let name = plan_name(&body.name)?;
    let limits = PlanLimits {
        vcpus: body.vcpus,
        memory_mb: body.memory_mb,
        disk_mb: body.disk_mb,
        max_capsules: body.max_capsules,
        paused_memory_percent: body
            .paused_memory_percent
            .unwrap_or(DEFAULT_PAUSED_MEMORY_PERCENT),
    };
    let plan = pools::create(&state.db, &admin.caller, &name, &limits, body.default).await?;
    Ok((StatusCode::CREATED, Json(PlanView::from(plan))).into_response())
}

pub async fn get_plan(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(name): Path<String>,
) -> Result<Json<PlanView>, ApiError> {
    Ok(Json(
        pools::get(&state.db, &plan_name(&name)?).await?.into(),
    ))
}

pub async fn update_plan(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<UpdatePlanRequest>,
) -> Result<Json<PlanView>, ApiError> {
    let make_default = match body.default {
        None => false,
        Some(true) => true,
        Some(false) => {
            return Err(ApiError::InvalidRequest(
                "default: a plan stops being the default when another becomes it; set `default: true` on that one".into(),
            ))
        }
    };
    let change = |limits: PlanLimits| PlanLimits {
        vcpus: body.vcpus.unwrap_or(limits.vcpus),
        memory_mb: body.memory_mb.unwrap_or(limits.memory_mb),
        disk_mb: body.disk_mb.unwrap_or(limits.disk_mb),
        max_capsules: body.max_capsules.unwrap_or(limits.max_capsules),
        paused_memory_percent: body
            .paused_memory_percent
            .unwrap_or(limits.paused_memory_percent),
    };
    let plan = pools::update(
        &state.db,
        &admin.caller,
        &plan_name(&name)?,
        change,
        make_default,
    )
    .await?;
    Ok(Json(plan.into()))
}

pub async fn delete_plan(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    pools::delete(&state.db, &admin.caller, &plan_name(&name)?).await?;
    Ok(no_content())
}

pub async fn assign_plan(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AssignPlanRequest>,
) -> Result<Json<PlanView>, ApiError> {
    let team: TeamId = path_id("id", &id)?;
    let name = PlanName::parse("plan", &body.plan)?;
    let plan = pools::assign(&state.db, &admin.caller, team, &name).await?;
    Ok(Json(plan.into()))
}

#[derive(Debug, Serialize)]
pub struct PoolView {
    team_id: TeamId,
    plan: String,
    limits: LimitsView,
    /// What the team holds now, paused capsules at their plan's share of memory.
    used: UsedView,
    paused: PausedView,
}

#[derive(Debug, Serialize)]
pub struct UsedView {
    capsules: i64,
    vcpus: i64,
    memory_mb: i64,
    disk_mb: i64,
}

#[derive(Debug, Serialize)]
pub struct PausedView {
    capsules: i64,
    memory_mb: i64,
    /// Snapshot templates' share of `used.disk_mb` (one being made at its most).
    template_disk_mb: i64,
}

fn pool_view(team: TeamId, plan: Plan, used: PoolUse) -> PoolView {
    PoolView {
        team_id: team,
        plan: plan.name,
        limits: plan.limits.into(),
        used: UsedView {
            capsules: used.running,
            vcpus: used.vcpus,
            memory_mb: used.memory_mb,
            disk_mb: used.disk_mb,
        },
        paused: PausedView {
            capsules: used.paused,
            memory_mb: used.paused_memory_mb,
            template_disk_mb: used.template_disk_mb,
        },
    }
}

/// A team's own pool, for its API keys and members; platform admins see any team's.
pub async fn team_pool(
    State(state): State<AppState>,
    auth: AuthTeam,
    Path(id): Path<String>,
) -> Result<Json<PoolView>, ApiError> {
    let team: TeamId = path_id("id", &id)?;
    let admin = matches!(&auth.actor, TeamActor::User(user) if user.caller.is_admin);
    if team != auth.team_id && !admin {
        return Err(ApiError::forbidden(
            "these credentials are for another team",
        ));
    }
    let (plan, used) = pools::pool(&state.db, team).await?;
    Ok(Json(pool_view(team, plan, used)))
}

#[derive(Debug, Deserialize)]
pub struct StatsQuery {
    range: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StatsView {
    range: &'static str,
    current: CurrentView,
    peaks: PeaksView,
    series: SeriesView,
}

#[derive(Debug, Serialize)]
pub struct CurrentView {
    running_count: i64,
    vcpus_reserved: i64,
    memory_mb_reserved: i64,
    sampled_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
pub struct PeaksView {
    running_count: i64,
    vcpus: i64,
    memory_mb: i64,
}

#[derive(Debug, Serialize)]
pub struct SeriesView {
    labels: Vec<DateTime<Utc>>,
    running: Vec<i64>,
    vcpus: Vec<i64>,
    memory_mb: Vec<i64>,
}

impl SeriesView {
    fn of(points: &[(DateTime<Utc>, Reservation)]) -> Self {
        Self {
            labels: points.iter().map(|(at, _)| *at).collect(),
            running: points.iter().map(|(_, r)| r.running).collect(),
            vcpus: points.iter().map(|(_, r)| r.vcpus).collect(),
            memory_mb: points.iter().map(|(_, r)| r.memory_mb).collect(),
        }
    }
}

pub async fn stats(
    State(state): State<AppState>,
    auth: AuthTeam,
    ApiQuery(query): ApiQuery<StatsQuery>,
) -> Result<Json<StatsView>, ApiError> {
    let range = match query.range.as_deref() {
        None => StatsRange::OneHour,
        Some(raw) => StatsRange::parse(raw)?,
    };
    let stats = usage::stats(&state.db, auth.team_id, range).await?;
    Ok(Json(StatsView {
        range: stats.range.as_str(),
        current: CurrentView {
            running_count: stats.current.running,
            vcpus_reserved: stats.current.vcpus,
            memory_mb_reserved: stats.current.memory_mb,
            sampled_at: stats.at,
        },
        peaks: PeaksView {
            running_count: stats.peaks.running,
            vcpus: stats.peaks.vcpus,
            memory_mb: stats.peaks.memory_mb,
        },
        series: SeriesView::of(&stats.series),
    }))
}

#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct UsageView {
    from: NaiveDate,
    to: NaiveDate,
    points: Vec<UsagePoint>,
}

#[derive(Debug, Serialize)]
pub struct UsagePoint {
    date: NaiveDate,
    cpu_minutes: f64,
    ram_mb_minutes: f64,
}

pub async fn usage(
    State(state): State<AppState>,
    auth: AuthTeam,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> Result<Json<UsageView>, ApiError> {
    let day = |field, raw: Option<String>| raw.map(|raw| usage::parse_day(field, &raw)).transpose();
    let from = day("from", query.from)?;
    let to = day("to", query.to)?;
    let usage = usage::usage(&state.db, auth.team_id, from, to).await?;
    Ok(Json(UsageView {
        from: usage.from,
        to: usage.to,
        points: usage
            .points
            .into_iter()
            .map(|p| UsagePoint {
                date: p.day,
                cpu_minutes: p.cpu_minutes,
                ram_mb_minutes: p.ram_mb_minutes,
            })
            .collect(),
    }))
}
