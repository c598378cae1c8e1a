//! Plans and team pools: platform admins define plans and put teams on them (`/v1/admin/plans`,
//! `/v1/admin/teams/{id}/plan`); a team sees its pool (`/v1/teams/{id}/pool`). Admission
//! against a pool is `cp::pool`.

use serde_json::json;
use sqlx::Acquire;

use super::input::PlanName;
use super::{user_action, Caller, ServiceError};
use crate::db::audit_logs;
use crate::db::plans::{self, Deletion, Plan, PlanLimits, PoolUse};
use crate::db::{Db, DbError};
use crate::error_code::ErrorCode;
use crate::id::TeamId;

/// The most any one limit may be: far above any host, and well inside every sum's range.
pub const MAX_LIMIT: i64 = 1 << 40;

/// Checks each limit is within 0..=[`MAX_LIMIT`] and the paused share a percentage.
pub fn check_limits(limits: &PlanLimits) -> Result<(), ServiceError> {
    for (field, value) in [
        ("vcpus", limits.vcpus),
        ("memory_mb", limits.memory_mb),
        ("disk_mb", limits.disk_mb),
        ("max_capsules", limits.max_capsules),
    ] {
        if let Some(value) = value {
            if !(0..=MAX_LIMIT).contains(&value) {
                return Err(ServiceError::invalid(
                    field,
                    format!(
                        "must be between 0 and {MAX_LIMIT} (or null for no limit), got {value}"
                    ),
                ));
            }
        }
    }
    if !(0..=100).contains(&limits.paused_memory_percent) {
        return Err(ServiceError::invalid(
            "paused_memory_percent",
            format!(
                "must be between 0 and 100, got {}",
                limits.paused_memory_percent
            ),
        ));
    }
    Ok(())
}

pub async fn list(db: &Db) -> Result<Vec<Plan>, ServiceError> {
    Ok(plans::list(db).await?)
}

pub async fn get(db: &Db, name: &PlanName) -> Result<Plan, ServiceError> {
    plans::by_name(db, name.as_str())
        .await?
        .ok_or(ServiceError::NotFound("plan"))
}

pub async fn create(
    db: &Db,
    caller: &Caller,
    name: &PlanName,
    limits: &PlanLimits,
    make_default: bool,
) -> Result<Plan, ServiceError> {
    check_limits(limits)?;
    let mut conn = db.acquire().await.map_err(DbError::from)?;
    let mut tx = conn.begin().await.map_err(DbError::from)?;
    let plan = match plans::insert(&mut *tx, name.as_str(), limits).await {
        Err(DbError::UniqueViolation { .. }) => {
            return Err(ServiceError::Conflict {
                code: ErrorCode::Conflict,
                message: format!("a plan named `{}` already exists", name.as_str()),
            })
        }
        other => other?,
    };
    if make_default {
        plans::make_default(&mut tx, name.as_str()).await?;
    }
    audit(
        &mut tx,
        caller,
        name,
        "create",
        json!({"default": make_default}),
    )
    .await?;
    let plan = plans::by_name(&mut *tx, name.as_str())
        .await?
        .unwrap_or(plan);
    tx.commit().await.map_err(DbError::from)?;
    Ok(plan)
}

/// A change to a plan: new limits and whether it becomes the default (a default plan stops
/// being one only when another becomes it).
pub async fn update(
    db: &Db,
    caller: &Caller,
    name: &PlanName,
    change: impl FnOnce(PlanLimits) -> PlanLimits,
    make_default: bool,
) -> Result<Plan, ServiceError> {
    let mut conn = db.acquire().await.map_err(DbError::from)?;
    let mut tx = conn.begin().await.map_err(DbError::from)?;
    let before = plans::lock_by_name(&mut *tx, name.as_str())
        .await?
        .ok_or(ServiceError::NotFound("plan"))?;
    let limits = change(before.limits);
    check_limits(&limits)?;
    plans::set_limits(&mut *tx, name.as_str(), &limits).await?;
    if make_default {
        plans::make_default(&mut tx, name.as_str()).await?;
    }
    audit(
        &mut tx,
        caller,
        name,
        "update",
        json!({"default": make_default}),
    )
    .await?;
    let plan = plans::by_name(&mut *tx, name.as_str())
        .await?
        .ok_or(ServiceError::NotFound("plan"))?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(plan)
}

pub async fn delete(db: &Db, caller: &Caller, name: &PlanName) -> Result<(), ServiceError> {
    let mut conn = db.acquire().await.map_err(DbError::from)?;
    let mut tx = conn.begin().await.map_err(DbError::from)?;
    let conflict = |message: String| ServiceError::Conflict {
        code: ErrorCode::Conflict,
        message,
    };
    match plans::delete(&mut tx, name.as_str()).await? {
        Deletion::Deleted => {}
        Deletion::NotFound => return Err(ServiceError::NotFound("plan")),
        Deletion::IsDefault => {
            return Err(conflict(format!(
                "`{}` is the default plan; make another plan the default first",
                name.as_str()
            )))
        }
        Deletion::InUse { teams } => {
            return Err(conflict(format!(
                "{teams} team(s) are on plan `{}`; move them to another plan first",
                name.as_str()
            )))
        }
    }
    audit(&mut tx, caller, name, "delete", json!({})).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

/// Puts `team` on plan `name`. Its capsules keep running; what it starts from now on is
/// admitted against the new plan.
pub async fn assign(
    db: &Db,
    caller: &Caller,
    team: TeamId,
    name: &PlanName,
) -> Result<Plan, ServiceError> {
    let mut conn = db.acquire().await.map_err(DbError::from)?;
    let mut tx = conn.begin().await.map_err(DbError::from)?;
    let plan = plans::by_name(&mut *tx, name.as_str())
        .await?
        .ok_or(ServiceError::NotFound("plan"))?;
    if !plans::assign(&mut *tx, team.uuid(), plan.id).await? {
        return Err(ServiceError::NotFound("team"));
    }
    let entry = user_action(
        caller,
        Some(team.uuid()),
        "team",
        team.to_string(),
        "plan.assign",
        json!({"plan": plan.name}),
    );
    audit_logs::insert(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(plan)
}

/// `team`'s plan and what it holds against it now.
pub async fn pool(db: &Db, team: TeamId) -> Result<(Plan, PoolUse), ServiceError> {
    let mut conn = db.acquire().await.map_err(DbError::from)?;
    let plan = plans::of_team(&mut *conn, team.uuid())
        .await?
        .ok_or(ServiceError::NotFound("team"))?;
    let used = plans::pool_use(&mut conn, team.uuid(), plan.limits.paused_memory_percent).await?;
    Ok((plan, used))
}

async fn audit(
    conn: &mut sqlx::PgConnection,
    caller: &Caller,
    name: &PlanName,
    action: &str,
    metadata: serde_json::Value,
) -> Result<(), DbError> {
    let entry = user_action(
        caller,
        None,
        "plan",
        name.as_str().to_owned(),
        action,
        metadata,
    );
    audit_logs::insert(conn, entry).await
}
