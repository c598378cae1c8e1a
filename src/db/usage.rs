//! Queries on `usage_samples` and `daily_usage`: what each team reserved, sampled at fixed
//! instants, and those samples rolled up per UTC day.
//!
//! What a team reserves: capsules in any live status but `paused` and `missing` their vCPUs and
//! memory, paused ones their plan's share of their memory. A `missing` capsule's host stopped
//! answering; it is not charged until its host answers again.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

/// One team's reservation at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation {
    pub running: i64,
    pub vcpus: i64,
    pub memory_mb: i64,
}

/// Samples every team's reservation at `at` and adds `interval_secs` of it to the teams' usage
/// of `at`'s UTC day, in one statement. A team already sampled at `at` (by another replica) is
/// neither sampled nor counted again. Returns how many teams this call sampled.
pub async fn sample(
    ex: impl PgExecutor<'_>,
    at: DateTime<Utc>,
    interval_secs: f64,
) -> Result<u64, DbError> {
    let done = sqlx::query!(
        "WITH reserved AS (
             SELECT s.team_id,
                    COUNT(*) FILTER (WHERE s.status NOT IN ('paused', 'missing'))::INTEGER
                        AS running,
                    COUNT(*) FILTER (WHERE s.status = 'paused')::INTEGER AS paused,
                    COALESCE(SUM(s.vcpus) FILTER (WHERE s.status NOT IN ('paused', 'missing')),
                             0)::BIGINT AS vcpus,
                    (COALESCE(SUM(s.memory_mb)
                                  FILTER (WHERE s.status NOT IN ('paused', 'missing')), 0)
                     + COALESCE(SUM(CEIL(s.memory_mb * p.paused_memory_percent / 100.0))
                                  FILTER (WHERE s.status = 'paused'), 0))::BIGINT AS memory_mb
             FROM sandboxes s
             JOIN teams t ON t.id = s.team_id
             JOIN plans p ON p.id = t.plan_id
             WHERE s.status NOT IN ('stopped', 'error')
             GROUP BY s.team_id
         ), sampled AS (
             INSERT INTO usage_samples (team_id, sampled_at, running, paused, vcpus, memory_mb)
             SELECT team_id, $1, running, paused, vcpus, memory_mb FROM reserved
             ON CONFLICT (team_id, sampled_at) DO NOTHING
             RETURNING team_id, vcpus, memory_mb
         )
         INSERT INTO daily_usage (team_id, day, cpu_minutes, ram_mb_minutes)
         SELECT team_id, ($1 AT TIME ZONE 'UTC')::DATE, vcpus * $2::FLOAT8 / 60.0,
                memory_mb * $2::FLOAT8 / 60.0
         FROM sampled
         ON CONFLICT (team_id, day) DO UPDATE
             SET cpu_minutes = daily_usage.cpu_minutes + EXCLUDED.cpu_minutes,
                 ram_mb_minutes = daily_usage.ram_mb_minutes + EXCLUDED.ram_mb_minutes",
        at,
        interval_secs,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes the samples taken before `before`; the daily rollup keeps what they counted.
pub async fn prune(ex: impl PgExecutor<'_>, before: DateTime<Utc>) -> Result<u64, DbError> {
    let done = sqlx::query!("DELETE FROM usage_samples WHERE sampled_at < $1", before)
        .execute(ex)
        .await?;
    Ok(done.rows_affected())
}

/// What `team` reserves now, counted as a sample would count it.
pub async fn reserved_now(ex: impl PgExecutor<'_>, team: Uuid) -> Result<Reservation, DbError> {
    Ok(sqlx::query_as!(
        Reservation,
        r#"SELECT
               COUNT(*) FILTER (WHERE s.status NOT IN ('paused', 'missing')) AS "running!",
               COALESCE(SUM(s.vcpus) FILTER (WHERE s.status NOT IN ('paused', 'missing')), 0)
                   ::BIGINT AS "vcpus!",
               (COALESCE(SUM(s.memory_mb) FILTER (WHERE s.status NOT IN ('paused', 'missing')), 0)
                + COALESCE(SUM(CEIL(s.memory_mb * p.paused_memory_percent / 100.0))
                             FILTER (WHERE s.status = 'paused'), 0))::BIGINT AS "memory_mb!"
           FROM sandboxes s
           JOIN teams t ON t.id = s.team_id
           JOIN plans p ON p.id = t.plan_id
           WHERE s.team_id = $1 AND s.status NOT IN ('stopped', 'error')"#,
        team,
    )
    .fetch_one(ex)
    .await?)
}

/// The highest of each figure over `team`'s samples since `since`.
pub async fn peaks(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    since: DateTime<Utc>,
) -> Result<Reservation, DbError> {
    Ok(sqlx::query_as!(
        Reservation,
        r#"SELECT COALESCE(MAX(running), 0)::BIGINT AS "running!",
                  COALESCE(MAX(vcpus), 0)::BIGINT AS "vcpus!",
                  COALESCE(MAX(memory_mb), 0)::BIGINT AS "memory_mb!"
           FROM usage_samples WHERE team_id = $1 AND sampled_at >= $2"#,
        team,
        since,
    )
    .fetch_one(ex)
    .await?)
}

/// `team`'s samples since `since` in buckets of `bucket_secs` counted from `since`, the highest
/// of each figure per bucket; buckets without samples are absent.
pub async fn series(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    since: DateTime<Utc>,
    bucket_secs: f64,
) -> Result<Vec<(DateTime<Utc>, Reservation)>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT date_bin(make_interval(secs => $3), sampled_at, $2) AS "bucket!",
                  MAX(running)::BIGINT AS "running!",
                  MAX(vcpus)::BIGINT AS "vcpus!",
                  MAX(memory_mb)::BIGINT AS "memory_mb!"
           FROM usage_samples WHERE team_id = $1 AND sampled_at >= $2
           GROUP BY 1 ORDER BY 1"#,
        team,
        since,
        bucket_secs,
    )
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let reservation = Reservation {
                running: r.running,
                vcpus: r.vcpus,
                memory_mb: r.memory_mb,
            };
            (r.bucket, reservation)
        })
        .collect())
}

/// One day of a team's usage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DailyUsage {
    pub day: NaiveDate,
    pub cpu_minutes: f64,
    pub ram_mb_minutes: f64,
}

/// `team`'s usage on the days from `from` to `to` (both included) that have any.
pub async fn daily(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<DailyUsage>, DbError> {
    Ok(sqlx::query_as!(
        DailyUsage,
        "SELECT day, cpu_minutes, ram_mb_minutes FROM daily_usage
         WHERE team_id = $1 AND day BETWEEN $2 AND $3 ORDER BY day",
        team,
        from,
        to,
    )
    .fetch_all(ex)
    .await?)
}
