//! Queries on `channels` and `channel_deliveries`: where a team's events are sent, and the log
//! of every send. Deliveries are created by a trigger on `events` (migration 0018).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;

#[derive(Debug, Clone)]
pub struct Channel {
    pub id: Uuid,
    pub team_id: Uuid,
    pub name: String,
    pub provider: String,
    pub config_sealed: Vec<u8>,
    pub event_types: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct NewChannel<'a> {
    pub id: Uuid,
    pub team_id: Uuid,
    pub name: &'a str,
    pub provider: &'a str,
    pub config_sealed: &'a [u8],
    pub event_types: &'a [String],
}

pub async fn insert(ex: impl PgExecutor<'_>, channel: NewChannel<'_>) -> Result<Channel, DbError> {
    Ok(sqlx::query_as!(
        Channel,
        "INSERT INTO channels (id, team_id, name, provider, config_sealed, event_types)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, team_id, name, provider, config_sealed, event_types, created_at, updated_at",
        channel.id,
        channel.team_id,
        channel.name,
        channel.provider,
        channel.config_sealed,
        channel.event_types,
    )
    .fetch_one(ex)
    .await?)
}

/// The team's channels, oldest first.
pub async fn list(ex: impl PgExecutor<'_>, team: Uuid) -> Result<Vec<Channel>, DbError> {
    Ok(sqlx::query_as!(
        Channel,
        "SELECT id, team_id, name, provider, config_sealed, event_types, created_at, updated_at
         FROM channels WHERE team_id = $1 ORDER BY created_at, id",
        team,
    )
    .fetch_all(ex)
    .await?)
}

pub async fn get(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    id: Uuid,
) -> Result<Option<Channel>, DbError> {
    Ok(sqlx::query_as!(
        Channel,
        "SELECT id, team_id, name, provider, config_sealed, event_types, created_at, updated_at
         FROM channels WHERE team_id = $1 AND id = $2",
        team,
        id,
    )
    .fetch_optional(ex)
    .await?)
}

/// Renames the channel and replaces the events it carries.
pub async fn update(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    id: Uuid,
    name: &str,
    event_types: &[String],
) -> Result<Option<Channel>, DbError> {
    Ok(sqlx::query_as!(
        Channel,
        "UPDATE channels SET name = $3, event_types = $4, updated_at = now()
         WHERE team_id = $1 AND id = $2
         RETURNING id, team_id, name, provider, config_sealed, event_types, created_at, updated_at",
        team,
        id,
        name,
        event_types,
    )
    .fetch_optional(ex)
    .await?)
}

pub async fn set_config(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    id: Uuid,
    config_sealed: &[u8],
) -> Result<Option<Channel>, DbError> {
    Ok(sqlx::query_as!(
        Channel,
        "UPDATE channels SET config_sealed = $3, updated_at = now()
         WHERE team_id = $1 AND id = $2
         RETURNING id, team_id, name, provider, config_sealed, event_types, created_at, updated_at",
        team,
        id,
        config_sealed,
    )
    .fetch_optional(ex)
    .await?)
}

/// Deletes the channel with its delivery log; `false` when there was none.
pub async fn delete(ex: impl PgExecutor<'_>, team: Uuid, id: Uuid) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "DELETE FROM channels WHERE team_id = $1 AND id = $2",
        team,
        id
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A delivery claimed for one attempt, with what it needs to be sent.
#[derive(Debug, Clone)]
pub struct Due {
    pub id: i64,
    /// This attempt's number, from 1.
    pub attempts: i32,
    pub event_type: String,
    pub channel_id: Uuid,
    pub provider: String,
    pub config_sealed: Vec<u8>,
    pub event_id: i64,
    pub team_id: Uuid,
    pub resource_type: String,
    pub resource_id: String,
    pub actor_type: String,
    pub actor_id: Option<String>,
    pub actor_name: Option<String>,
    pub metadata: Value,
    pub error: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

/// Claims up to `limit` due deliveries for one attempt each: their next attempt moves `lease`
/// ahead, so a replica that dies while sending leaves them to be retried then. Rows another
/// replica holds are skipped, not waited for.
pub async fn claim_due(
    ex: impl PgExecutor<'_>,
    limit: i64,
    lease: std::time::Duration,
) -> Result<Vec<Due>, DbError> {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    Ok(sqlx::query_as!(
        Due,
        r#"WITH due AS (
               SELECT id FROM channel_deliveries
               WHERE status = 'pending' AND next_attempt_at <= now()
               ORDER BY next_attempt_at, id LIMIT $1
               FOR UPDATE SKIP LOCKED
           )
           UPDATE channel_deliveries d
           SET attempts = d.attempts + 1,
               next_attempt_at = now() + make_interval(secs => $2::bigint / 1000.0)
           FROM due, channels c, events e
           WHERE d.id = due.id AND c.id = d.channel_id AND e.id = d.event_id
           RETURNING d.id, d.attempts, d.event_type, c.id AS channel_id, c.provider,
                     c.config_sealed, e.id AS event_id, e.team_id, e.resource_type,
                     e.resource_id, e.actor_type, e.actor_id, e.actor_name, e.metadata, e.error,
                     e.created_at AS occurred_at"#,
        limit,
        lease_ms,
    )
    .fetch_all(ex)
    .await?)
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered {
        status: i32,
    },
    /// Tried again after `retry_in`; `None` gives up.
    Failed {
        status: Option<i32>,
        error: String,
        retry_in: Option<std::time::Duration>,
    },
}

/// Records attempt number `attempts` of delivery `id`, unless the delivery has been claimed
/// again since (its lease ran out and another replica took it over): that attempt's outcome
/// is the one kept.
pub async fn finish(
    ex: impl PgExecutor<'_>,
    id: i64,
    attempts: i32,
    outcome: &Attempt,
) -> Result<bool, DbError> {
    let (status, response_status, error, retry_ms) = match outcome {
        Attempt::Delivered { status } => ("delivered", Some(*status), None, None),
        Attempt::Failed {
            status,
            error,
            retry_in,
        } => (
            if retry_in.is_some() {
                "pending"
            } else {
                "failed"
            },
            *status,
            Some(error.as_str()),
            retry_in.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        ),
    };
    let done = sqlx::query!(
        "UPDATE channel_deliveries
         SET status = $3, response_status = $4, error = $5,
             next_attempt_at = CASE WHEN $6::bigint IS NULL THEN next_attempt_at
                                    ELSE now() + make_interval(secs => $6::bigint / 1000.0) END,
             finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END
         WHERE id = $1 AND attempts = $2 AND status = 'pending'",
        id,
        attempts,
        status,
        response_status,
        error,
        retry_ms,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: i64,
    pub event_id: i64,
    pub event_type: String,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub response_status: Option<i32>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Up to `limit` of the channel's deliveries before `before` (a delivery id), newest first.
pub async fn deliveries(
    ex: impl PgExecutor<'_>,
    channel: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Delivery>, DbError> {
    Ok(sqlx::query_as!(
        Delivery,
        "SELECT id, event_id, event_type, status, attempts, next_attempt_at, response_status,
                error, created_at, finished_at
         FROM channel_deliveries
         WHERE channel_id = $1 AND ($2::bigint IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
        channel,
        before,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

/// Deletes finished deliveries older than `before`; returns how many.
pub async fn prune(ex: impl PgExecutor<'_>, before: DateTime<Utc>) -> Result<u64, DbError> {
    let done = sqlx::query!(
        "DELETE FROM channel_deliveries WHERE status <> 'pending' AND finished_at < $1",
        before
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected())
}
