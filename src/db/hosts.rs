//! Queries on `hosts`: machines running the host agent, their specs and liveness.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::page::Keyset;
use super::{text_enum, DbError};

text_enum! {
    /// Regular hosts are shared by every team; BYOC hosts belong to one team.
    HostType, "hosts.type" { Regular => "regular", Byoc => "byoc" }
}

text_enum! {
    /// `pending` until the agent registers; `online` while it heartbeats; `unreachable` after
    /// the heartbeat stops, until the next one.
    HostStatus, "hosts.status" { Pending => "pending", Online => "online", Unreachable => "unreachable" }
}

#[derive(Debug, Clone)]
pub struct Host {
    pub id: Uuid,
    pub host_type: HostType,
    pub team_id: Option<Uuid>,
    pub provider: Option<String>,
    pub availability_zone: Option<String>,
    pub arch: Option<String>,
    pub cpu_cores: Option<i32>,
    pub memory_mb: Option<i64>,
    pub disk_gb: Option<i64>,
    pub address: Option<String>,
    pub status: HostStatus,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub metadata: Value,
    pub versions: Value,
    pub agent_secret_generation: i32,
    pub agent_secret_hash: Option<Vec<u8>>,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct NewHost<'a> {
    pub id: Uuid,
    pub host_type: HostType,
    pub team_id: Option<Uuid>,
    pub provider: Option<&'a str>,
    pub availability_zone: Option<&'a str>,
    pub created_by: Uuid,
}

pub async fn insert(ex: impl PgExecutor<'_>, host: NewHost<'_>) -> Result<Host, DbError> {
    Ok(sqlx::query_as!(
        Host,
        r#"INSERT INTO hosts (id, type, team_id, provider, availability_zone, created_by)
           VALUES ($1, $2, $3, $4, $5, $6)
           RETURNING id, type AS "host_type: HostType", team_id, provider, availability_zone, arch,
                     cpu_cores, memory_mb, disk_gb, address, status AS "status: HostStatus",
                     last_heartbeat_at, metadata, versions, agent_secret_generation,
                     agent_secret_hash, created_by, created_at, updated_at"#,
        host.id,
        host.host_type.as_str(),
        host.team_id,
        host.provider,
        host.availability_zone,
        host.created_by,
    )
    .fetch_one(ex)
    .await?)
}

pub async fn by_id(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Host>, DbError> {
    Ok(sqlx::query_as!(
        Host,
        r#"SELECT id, type AS "host_type: HostType", team_id, provider, availability_zone, arch,
                  cpu_cores, memory_mb, disk_gb, address, status AS "status: HostStatus",
                  last_heartbeat_at, metadata, versions, agent_secret_generation,
                  agent_secret_hash, created_by, created_at, updated_at
           FROM hosts WHERE id = $1"#,
        id,
    )
    .fetch_optional(ex)
    .await?)
}

/// Locks the row for the rest of the transaction.
pub async fn by_id_for_update(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Host>, DbError> {
    Ok(sqlx::query_as!(
        Host,
        r#"SELECT id, type AS "host_type: HostType", team_id, provider, availability_zone, arch,
                  cpu_cores, memory_mb, disk_gb, address, status AS "status: HostStatus",
                  last_heartbeat_at, metadata, versions, agent_secret_generation,
                  agent_secret_hash, created_by, created_at, updated_at
           FROM hosts WHERE id = $1 FOR UPDATE"#,
        id,
    )
    .fetch_optional(ex)
    .await?)
}

/// Up to `limit` hosts after `after`, oldest first.
pub async fn page_all(
    ex: impl PgExecutor<'_>,
    after: Keyset,
    limit: i64,
) -> Result<Vec<Host>, DbError> {
    Ok(sqlx::query_as!(
        Host,
        r#"SELECT id, type AS "host_type: HostType", team_id, provider, availability_zone, arch,
                  cpu_cores, memory_mb, disk_gb, address, status AS "status: HostStatus",
                  last_heartbeat_at, metadata, versions, agent_secret_generation,
                  agent_secret_hash, created_by, created_at, updated_at
           FROM hosts WHERE (created_at, id) > ($1, $2)
           ORDER BY created_at, id LIMIT $3"#,
        after.created_at,
        after.id,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

/// Up to `limit` of the team's BYOC hosts after `after`, oldest first.
pub async fn page_for_team(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    after: Keyset,
    limit: i64,
) -> Result<Vec<Host>, DbError> {
    Ok(sqlx::query_as!(
        Host,
        r#"SELECT id, type AS "host_type: HostType", team_id, provider, availability_zone, arch,
                  cpu_cores, memory_mb, disk_gb, address, status AS "status: HostStatus",
                  last_heartbeat_at, metadata, versions, agent_secret_generation,
                  agent_secret_hash, created_by, created_at, updated_at
           FROM hosts WHERE team_id = $1 AND (created_at, id) > ($2, $3)
           ORDER BY created_at, id LIMIT $4"#,
        team,
        after.created_at,
        after.id,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

/// What an agent reports about its machine when it registers.
pub struct Registration<'a> {
    pub arch: Option<&'a str>,
    pub cpu_cores: Option<i32>,
    pub memory_mb: Option<i64>,
    pub disk_gb: Option<i64>,
    pub address: &'a str,
    pub versions: Value,
    pub agent_secret_generation: i32,
    pub agent_secret_hash: &'a [u8],
}

/// Records the agent's specs and brings the host online; `None` if it still holds a live refresh
/// token. A host without one is `pending` (never registered) or lost its credentials (revoked
/// after reuse, or expired) and registers again with a new registration token.
pub async fn complete_registration(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    reg: Registration<'_>,
) -> Result<Option<Host>, DbError> {
    Ok(sqlx::query_as!(
        Host,
        r#"UPDATE hosts SET arch = $2, cpu_cores = $3, memory_mb = $4, disk_gb = $5, address = $6,
               versions = $7, agent_secret_generation = $8, agent_secret_hash = $9,
               status = 'online', last_heartbeat_at = now(), updated_at = now()
           WHERE id = $1
             AND NOT EXISTS (SELECT 1 FROM host_refresh_tokens t
                             WHERE t.host_id = $1 AND t.revoked_at IS NULL AND t.expires_at > now())
           RETURNING id, type AS "host_type: HostType", team_id, provider, availability_zone, arch,
                     cpu_cores, memory_mb, disk_gb, address, status AS "status: HostStatus",
                     last_heartbeat_at, metadata, versions, agent_secret_generation,
                     agent_secret_hash, created_by, created_at, updated_at"#,
        id,
        reg.arch,
        reg.cpu_cores,
        reg.memory_mb,
        reg.disk_gb,
        reg.address,
        reg.versions,
        reg.agent_secret_generation,
        reg.agent_secret_hash,
    )
    .fetch_optional(ex)
    .await?)
}

pub async fn set_agent_secret(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    generation: i32,
    hash: &[u8],
) -> Result<Option<Host>, DbError> {
    Ok(sqlx::query_as!(
        Host,
        r#"UPDATE hosts SET agent_secret_generation = $2, agent_secret_hash = $3, updated_at = now()
           WHERE id = $1
           RETURNING id, type AS "host_type: HostType", team_id, provider, availability_zone, arch,
                     cpu_cores, memory_mb, disk_gb, address, status AS "status: HostStatus",
                     last_heartbeat_at, metadata, versions, agent_secret_generation,
                     agent_secret_hash, created_by, created_at, updated_at"#,
        id,
        generation,
        hash,
    )
    .fetch_optional(ex)
    .await?)
}

/// Records a heartbeat; an unreachable host comes back online. Returns the new status, or
/// `None` when the host no longer exists.
pub async fn heartbeat(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<HostStatus>, DbError> {
    Ok(sqlx::query_scalar!(
        r#"UPDATE hosts SET last_heartbeat_at = now(),
               status = CASE WHEN status = 'unreachable' THEN 'online' ELSE status END,
               updated_at = CASE WHEN status = 'unreachable' THEN now() ELSE updated_at END
           WHERE id = $1 RETURNING status AS "status: HostStatus""#,
        id,
    )
    .fetch_optional(ex)
    .await?)
}

/// Takes an online host out of scheduling until it heartbeats again.
pub async fn mark_one_unreachable(ex: impl PgExecutor<'_>, id: Uuid) -> Result<bool, DbError> {
    let done = sqlx::query!(
        "UPDATE hosts SET status = 'unreachable', updated_at = now()
         WHERE id = $1 AND status = 'online'",
        id,
    )
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks online hosts silent for longer than `silence` unreachable; returns their IDs.
pub async fn mark_unreachable(
    ex: impl PgExecutor<'_>,
    silence: Duration,
) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "UPDATE hosts SET status = 'unreachable', updated_at = now()
         WHERE status = 'online' AND last_heartbeat_at < now() - make_interval(secs => $1)
         RETURNING id",
        silence.as_secs_f64(),
    )
    .fetch_all(ex)
    .await?)
}

pub async fn delete(ex: impl PgExecutor<'_>, id: Uuid) -> Result<bool, DbError> {
    let done = sqlx::query!("DELETE FROM hosts WHERE id = $1", id)
        .execute(ex)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Online hosts with an address that `team` may place sandboxes on (regular hosts and the team's
/// own BYOC hosts).
pub async fn schedulable_for_team(
    ex: impl PgExecutor<'_>,
    team: Uuid,
) -> Result<Vec<Host>, DbError> {
    Ok(sqlx::query_as!(
        Host,
        r#"SELECT id, type AS "host_type: HostType", team_id, provider, availability_zone, arch,
                  cpu_cores, memory_mb, disk_gb, address, status AS "status: HostStatus",
                  last_heartbeat_at, metadata, versions, agent_secret_generation,
                  agent_secret_hash, created_by, created_at, updated_at
           FROM hosts
           WHERE status = 'online' AND address IS NOT NULL AND (type = 'regular' OR team_id = $1)
           ORDER BY id"#,
        team,
    )
    .fetch_all(ex)
    .await?)
}

/// Host `id` if `team` may still place sandboxes on it, locked for the rest of the transaction
/// so that placements on this host queue instead of over-committing it.
pub async fn lock_schedulable(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    team: Uuid,
) -> Result<Option<Host>, DbError> {
    Ok(sqlx::query_as!(
        Host,
        r#"SELECT id, type AS "host_type: HostType", team_id, provider, availability_zone, arch,
                  cpu_cores, memory_mb, disk_gb, address, status AS "status: HostStatus",
                  last_heartbeat_at, metadata, versions, agent_secret_generation,
                  agent_secret_hash, created_by, created_at, updated_at
           FROM hosts
           WHERE id = $1 AND status = 'online' AND address IS NOT NULL
             AND (type = 'regular' OR team_id = $2)
           FOR UPDATE"#,
        id,
        team,
    )
    .fetch_optional(ex)
    .await?)
}

/// Hosts that have registered (online or unreachable), for the reconciler.
pub async fn list_registered(ex: impl PgExecutor<'_>) -> Result<Vec<Host>, DbError> {
    Ok(sqlx::query_as!(
        Host,
        r#"SELECT id, type AS "host_type: HostType", team_id, provider, availability_zone, arch,
                  cpu_cores, memory_mb, disk_gb, address, status AS "status: HostStatus",
                  last_heartbeat_at, metadata, versions, agent_secret_generation,
                  agent_secret_hash, created_by, created_at, updated_at
           FROM hosts WHERE status <> 'pending' ORDER BY created_at, id"#,
    )
    .fetch_all(ex)
    .await?)
}
