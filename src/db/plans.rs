//! Queries on `plans` and on a team's pool: what its plan allows, and what its capsules and
//! snapshot templates hold against it.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

/// A plan: limits on what one team may hold at once (`None`: no limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: Uuid,
    pub name: String,
    pub limits: PlanLimits,
    pub is_default: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    pub vcpus: Option<i64>,
    pub memory_mb: Option<i64>,
    pub disk_mb: Option<i64>,
    pub max_capsules: Option<i64>,
    /// The share of its memory a paused capsule holds, 0-100.
    pub paused_memory_percent: i32,
}

struct PlanRow {
    id: Uuid,
    name: String,
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    disk_mb: Option<i64>,
    max_capsules: Option<i64>,
    paused_memory_percent: i32,
    is_default: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<PlanRow> for Plan {
    fn from(row: PlanRow) -> Self {
        Plan {
            id: row.id,
            name: row.name,
            limits: PlanLimits {
                vcpus: row.vcpus,
                memory_mb: row.memory_mb,
                disk_mb: row.disk_mb,
                max_capsules: row.max_capsules,
                paused_memory_percent: row.paused_memory_percent,
            },
            is_default: row.is_default,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

pub async fn list(ex: impl PgExecutor<'_>) -> Result<Vec<Plan>, DbError> {
    let rows = sqlx::query_as!(
        PlanRow,
        "SELECT id, name, vcpus, memory_mb, disk_mb, max_capsules, paused_memory_percent,
                is_default, created_at, updated_at
         FROM plans ORDER BY created_at, name"
    )
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(Plan::from).collect())
}

pub async fn by_name(ex: impl PgExecutor<'_>, name: &str) -> Result<Option<Plan>, DbError> {
    let row = sqlx::query_as!(
        PlanRow,
        "SELECT id, name, vcpus, memory_mb, disk_mb, max_capsules, paused_memory_percent,
                is_default, created_at, updated_at
         FROM plans WHERE name = $1",
        name,
    )
    .fetch_optional(ex)
    .await?;
    Ok(row.map(Plan::from))
}

/// Plan `name`, locked until the transaction ends.
pub async fn lock_by_name(ex: impl PgExecutor<'_>, name: &str) -> Result<Option<Plan>, DbError> {
    let row = sqlx::query_as!(
        PlanRow,
        "SELECT id, name, vcpus, memory_mb, disk_mb, max_capsules, paused_memory_percent,
                is_default, created_at, updated_at
         FROM plans WHERE name = $1 FOR UPDATE",
        name,
    )
    .fetch_optional(ex)
    .await?;
    Ok(row.map(Plan::from))
}

/// The plan of a live team.
pub async fn of_team(ex: impl PgExecutor<'_>, team: Uuid) -> Result<Option<Plan>, DbError> {
    let row = sqlx::query_as!(
        PlanRow,
        "SELECT p.id, p.name, p.vcpus, p.memory_mb, p.disk_mb, p.max_capsules,
                p.paused_memory_percent, p.is_default, p.created_at, p.updated_at
         FROM teams t JOIN plans p ON p.id = t.plan_id
         WHERE t.id = $1 AND t.deleted_at IS NULL",
        team,
    )
    .fetch_optional(ex)
    .await?;
    Ok(row.map(Plan::from))
}

pub async fn insert(
    ex: impl PgExecutor<'_>,
    name: &str,
    limits: &PlanLimits,
) -> Result<Plan, DbError> {
    let row = sqlx::query_as!(
        PlanRow,
        "INSERT INTO plans (id, name, vcpus, memory_mb, disk_mb, max_capsules,
                            paused_memory_percent)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         RETURNING id, name, vcpus, memory_mb, disk_mb, max_capsules, paused_memory_percent,
                   is_default, created_at, updated_at",
        Uuid::new_v4(),
        name,
        limits.vcpus,
        limits.memory_mb,
        limits.disk_mb,
        limits.max_capsules,
        limits.paused_memory_percent,
    )
    .fetch_one(ex)
    .await?;
    Ok(row.into())
}

/// Replaces the limits of plan `name`; `None` when there is no such plan. The teams on it are
/// held to the new limits from their next admission on.
pub async fn set_limits(
    ex: impl PgExecutor<'_>,
    name: &str,
    limits: &PlanLimits,
) -> Result<Option<Plan>, DbError> {
    let row = sqlx::query_as!(
        PlanRow,
        "UPDATE plans SET vcpus = $2, memory_mb = $3, disk_mb = $4, max_capsules = $5,
                          paused_memory_percent = $6, updated_at = now()
         WHERE name = $1
         RETURNING id, name, vcpus, memory_mb, disk_mb, max_capsules, paused_memory_percent,
                   is_default, created_at, updated_at",
        name,
        limits.vcpus,
        limits.memory_mb,
        limits.disk_mb,
        limits.max_capsules,
        limits.paused_memory_percent,
    )
    .fetch_optional(ex)
    .await?;
    Ok(row.map(Plan::from))
}

/// Makes plan `name` the one new teams get; false when there is no such plan. Two statements,
/// so run it in a transaction: the unique index allows one default at every instant.
pub async fn make_default(conn: &mut sqlx::PgConnection, name: &str) -> Result<bool, DbError> {
    // Two changes of the default at once: the second waits here for the first's commit.
    sqlx::query!("SELECT id FROM plans WHERE is_default FOR UPDATE")
        .fetch_all(&mut *conn)
        .await?;
    sqlx::query!(
        "UPDATE plans SET is_default = false, updated_at = now()
         WHERE is_default AND name <> $1",
        name,
    )
    .execute(&mut *conn)
    .await?;
    let done = sqlx::query!(
        "UPDATE plans SET is_default = true, updated_at = now() WHERE name = $1",
        name,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Why a plan could not be deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    Deleted,
    NotFound,
    IsDefault,
    InUse { teams: i64 },
}

/// Deletes plan `name` unless it is the default or a live team is on it; deleted teams on it
/// move to the default plan first, as they run nothing.
pub async fn delete(conn: &mut sqlx::PgConnection, name: &str) -> Result<Deletion, DbError> {
    let Some(plan) = sqlx::query!(
        "SELECT id, is_default FROM plans WHERE name = $1 FOR UPDATE",
        name
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(Deletion::NotFound);
    };
    if plan.is_default {
        return Ok(Deletion::IsDefault);
    }
    let teams = sqlx::query_scalar!(
        r#"SELECT COUNT(*) AS "count!" FROM teams WHERE plan_id = $1 AND deleted_at IS NULL"#,
        plan.id,
    )
    .fetch_one(&mut *conn)
    .await?;
    if teams > 0 {
        return Ok(Deletion::InUse { teams });
    }
    sqlx::query!(
        "UPDATE teams SET plan_id = (SELECT id FROM plans WHERE is_default) WHERE plan_id = $1",
        plan.id,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!("DELETE FROM plans WHERE id = $1", plan.id)
        .execute(&mut *conn)
        .await?;
    Ok(Deletion::Deleted)
}

/// Puts live team `team` on plan `plan`; false when either is missing.
pub async fn assign(ex: impl PgExecutor<'_>, team: Uuid, plan: Uuid) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "UPDATE teams SET plan_id = $2 WHERE id = $1 AND deleted_at IS NULL",
        team,
        plan,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// What a team's capsules and snapshot templates hold against its pool. Capsules in any live
/// status but `paused` hold their vCPUs and memory (a `missing` capsule's host may still run
/// it); paused ones hold their plan's share of their memory; all hold their disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUse {
    pub running: i64,
    pub paused: i64,
    pub vcpus: i64,
    /// Running capsules' memory plus paused capsules' share.
    pub memory_mb: i64,
    /// The paused capsules' share of `memory_mb`.
    pub paused_memory_mb: i64,
    /// Capsules' disks plus snapshot templates' size.
    pub disk_mb: i64,
    /// The snapshot templates' share of `disk_mb`; a template being made counts at the most
    /// it can take, its capsule's memory and disk (`template_reservations`).
    pub template_disk_mb: i64,
}

/// Locks team `team`'s pool until the transaction ends (admissions of one team wait for each
/// other; the row lock does not block inserts referencing the team) and answers its plan and
/// what it holds, read after the lock, so it includes every admission committed before.
pub async fn lock_pool(
    conn: &mut sqlx::PgConnection,
    team: Uuid,
) -> Result<Option<(Plan, PoolUse)>, DbError> {
    let locked = sqlx::query_scalar!(
        "SELECT id FROM teams WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
        team,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if locked.is_none() {
        return Ok(None);
    }
    let Some(plan) = of_team(&mut *conn, team).await? else {
        return Ok(None);
    };
    let used = pool_use(&mut *conn, team, plan.limits.paused_memory_percent).await?;
    Ok(Some((plan, used)))
}

/// What `team` holds, paused memory counted at `paused_memory_percent`.
pub async fn pool_use(
    conn: &mut sqlx::PgConnection,
    team: Uuid,
    paused_memory_percent: i32,
) -> Result<PoolUse, DbError> {
    let capsules = sqlx::query!(
        r#"SELECT
               COUNT(*) FILTER (WHERE status <> 'paused') AS "running!",
               COUNT(*) FILTER (WHERE status = 'paused') AS "paused!",
               COALESCE(SUM(vcpus) FILTER (WHERE status <> 'paused'), 0)::BIGINT AS "vcpus!",
               COALESCE(SUM(memory_mb) FILTER (WHERE status <> 'paused'), 0)::BIGINT
                   AS "running_memory_mb!",
               COALESCE(SUM(CEIL(memory_mb * $2::INTEGER / 100.0))
                   FILTER (WHERE status = 'paused'), 0)::BIGINT AS "paused_memory_mb!",
               COALESCE(SUM(disk_mb), 0)::BIGINT AS "disk_mb!"
           FROM sandboxes
           WHERE team_id = $1 AND status NOT IN ('stopped', 'error')"#,
        team,
        paused_memory_percent,
    )
    .fetch_one(&mut *conn)
    .await?;
    // One statement, so a template registered meanwhile is counted once: as its hold or as
    // itself.
    let template_disk_mb = sqlx::query_scalar!(
        r#"SELECT (SELECT COALESCE(SUM(CEIL(size_bytes / 1048576.0)), 0)::BIGINT
                   FROM templates WHERE team_id = $1 AND type = 'snapshot')
                + (SELECT COALESCE(SUM(disk_mb), 0)::BIGINT
                   FROM template_reservations WHERE team_id = $1 AND expires_at > now())
                AS "mb!""#,
        team,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(PoolUse {
        running: capsules.running,
        paused: capsules.paused,
        vcpus: capsules.vcpus,
        memory_mb: capsules.running_memory_mb + capsules.paused_memory_mb,
        paused_memory_mb: capsules.paused_memory_mb,
        disk_mb: capsules.disk_mb + template_disk_mb,
        template_disk_mb,
    })
}
