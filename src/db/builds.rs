//! Queries on `template_builds` and `template_build_logs`: each build's recipe, progress and
//! outcome, and its log lines in order.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::page::Keyset;
use super::{text_enum, DbError};

text_enum! {
    /// `pending` until its control plane starts it, `running`, then one of the three ends.
    BuildStatus, "template_builds.status" {
        Pending => "pending", Running => "running", Success => "success", Failed => "error",
        Cancelled => "cancelled"
    }
}

impl BuildStatus {
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Success | Self::Failed | Self::Cancelled)
    }
}

text_enum! {
    /// What a log line is: a step starting, a step's output, or the build's own words.
    LogStream, "template_build_logs.stream" {
        Step => "step", Stdout => "stdout", Stderr => "stderr", Info => "info", Failure => "error"
    }
}

#[derive(Debug, Clone)]
pub struct Build {
    pub id: Uuid,
    pub team_id: Uuid,
    pub name: String,
    pub base_template: String,
    pub recipe: String,
    pub healthcheck: Option<String>,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub status: BuildStatus,
    pub current_step: i32,
    pub total_steps: i32,
    pub error: Option<String>,
    pub sandbox_id: Option<Uuid>,
    pub host_id: Option<Uuid>,
    pub template_id: Option<Uuid>,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

pub struct NewBuild<'a> {
    pub id: Uuid,
    pub team_id: Uuid,
    pub name: &'a str,
    pub base_template: &'a str,
    pub recipe: &'a str,
    pub healthcheck: Option<&'a str>,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub total_steps: i32,
    pub created_by: Uuid,
}

/// Inserts a `pending` build; a build of the same template already in progress is a unique
/// violation (`template_builds_one_active`).
pub async fn insert(ex: impl PgExecutor<'_>, new: NewBuild<'_>) -> Result<Build, DbError> {
    Ok(sqlx::query_as!(
        Build,
        r#"INSERT INTO template_builds (id, team_id, name, base_template, recipe, healthcheck,
                                        vcpus, memory_mb, status, total_steps, created_by)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10)
           RETURNING id, team_id, name, base_template, recipe, healthcheck, vcpus, memory_mb,
                     status AS "status: BuildStatus", current_step, total_steps, error,
                     sandbox_id, host_id, template_id, created_by, created_at, started_at,
                     completed_at"#,
        new.id,
        new.team_id,
        new.name,
        new.base_template,
        new.recipe,
        new.healthcheck,
        new.vcpus,
        new.memory_mb,
        new.total_steps,
        new.created_by,
    )
    .fetch_one(ex)
    .await?)
}

pub async fn get(ex: impl PgExecutor<'_>, team: Uuid, id: Uuid) -> Result<Option<Build>, DbError> {
    Ok(sqlx::query_as!(
        Build,
        r#"SELECT id, team_id, name, base_template, recipe, healthcheck, vcpus, memory_mb,
                  status AS "status: BuildStatus", current_step, total_steps, error,
                  sandbox_id, host_id, template_id, created_by, created_at, started_at,
                  completed_at
           FROM template_builds WHERE id = $1 AND team_id = $2"#,
        id,
        team,
    )
    .fetch_optional(ex)
    .await?)
}

/// Up to `limit` of the team's builds after `after`, oldest first.
pub async fn page(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    after: Keyset,
    limit: i64,
) -> Result<Vec<Build>, DbError> {
    Ok(sqlx::query_as!(
        Build,
        r#"SELECT id, team_id, name, base_template, recipe, healthcheck, vcpus, memory_mb,
                  status AS "status: BuildStatus", current_step, total_steps, error,
                  sandbox_id, host_id, template_id, created_by, created_at, started_at,
                  completed_at
           FROM template_builds
           WHERE team_id = $1 AND (created_at, id) > ($2, $3)
           ORDER BY created_at, id LIMIT $4"#,
        team,
        after.created_at,
        after.id,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

pub async fn status_of(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<BuildStatus>, DbError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT status AS "status: BuildStatus" FROM template_builds WHERE id = $1"#,
        id
    )
    .fetch_optional(ex)
    .await?)
}

/// `pending` → `running`.
pub async fn start(ex: impl PgExecutor<'_>, id: Uuid) -> Result<bool, DbError> {
    let updated = sqlx::query!(
        "UPDATE template_builds SET status = 'running', started_at = now(), heartbeat_at = now()
         WHERE id = $1 AND status = 'pending'",
        id
    )
    .execute(ex)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Renews the running replica's lease on the build; answers its status (a cancel shows here).
pub async fn heartbeat(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<BuildStatus>, DbError> {
    Ok(sqlx::query_scalar!(
        r#"UPDATE template_builds SET heartbeat_at = now() WHERE id = $1
           RETURNING status AS "status: BuildStatus""#,
        id
    )
    .fetch_optional(ex)
    .await?)
}

pub async fn set_capsule(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    sandbox: Uuid,
    host: Uuid,
) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE template_builds SET sandbox_id = $2, host_id = $3 WHERE id = $1",
        id,
        sandbox,
        host
    )
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn set_step(ex: impl PgExecutor<'_>, id: Uuid, step: i32) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE template_builds SET current_step = $2 WHERE id = $1",
        id,
        step
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// Ends a build that is still in progress; a build already ended (cancelled meanwhile) keeps
/// its end. Answers whether this call ended it.
pub async fn finish(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    status: BuildStatus,
    error: Option<&str>,
    template: Option<Uuid>,
) -> Result<bool, DbError> {
    let updated = sqlx::query!(
        "UPDATE template_builds
         SET status = $2, error = $3, template_id = $4, completed_at = now()
         WHERE id = $1 AND status IN ('pending', 'running')",
        id,
        status.as_str(),
        error,
        template,
    )
    .execute(ex)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// A build whose replica stopped renewing its lease, ended as `error` by another replica.
#[derive(Debug, Clone)]
pub struct Abandoned {
    pub id: Uuid,
    pub team_id: Uuid,
    pub sandbox_id: Option<Uuid>,
}

/// Ends every build in progress whose heartbeat is older than `stale_secs`.
pub async fn end_abandoned(
    ex: impl PgExecutor<'_>,
    stale_secs: f64,
) -> Result<Vec<Abandoned>, DbError> {
    Ok(sqlx::query_as!(
        Abandoned,
        "UPDATE template_builds
         SET status = 'error', completed_at = now(),
             error = 'the control plane running the build stopped; nothing was registered'
         WHERE status IN ('pending', 'running')
           AND heartbeat_at < now() - make_interval(secs => $1)
         RETURNING id, team_id, sandbox_id",
        stale_secs,
    )
    .fetch_all(ex)
    .await?)
}

#[derive(Debug, Clone)]
pub struct LogLine {
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub stream: LogStream,
    pub text: String,
}

pub async fn log(
    ex: impl PgExecutor<'_>,
    build: Uuid,
    stream: LogStream,
    text: &str,
) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO template_build_logs (build_id, stream, text) VALUES ($1, $2, $3)",
        build,
        stream.as_str(),
        text,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// Up to `limit` log lines of the build after `after`, in order.
pub async fn logs_after(
    ex: impl PgExecutor<'_>,
    build: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<LogLine>, DbError> {
    Ok(sqlx::query_as!(
        LogLine,
        r#"SELECT seq, at, stream AS "stream: LogStream", text
           FROM template_build_logs WHERE build_id = $1 AND seq > $2
           ORDER BY seq LIMIT $3"#,
        build,
        after,
        limit,
    )
    .fetch_all(ex)
    .await?)
}
