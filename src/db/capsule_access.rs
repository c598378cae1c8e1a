//! The hot path's one read: a capsule call's credentials checked and its sandbox with its host
//! found in a single round trip. Nothing here is cached, so a revoked key, a removed member or a
//! destroyed capsule stops working on the next request, on every replica.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::hosts::HostStatus;
use super::sandboxes::{SandboxRoute, SandboxStatus};
use super::team_members::Role;
use super::users::UserStatus;
use super::DbError;

/// An API key's team and, if that team has it, the sandbox.
#[derive(Debug, Clone)]
pub struct KeyAccess {
    pub key_id: Uuid,
    pub team_id: Uuid,
    pub sandbox: Option<SandboxRoute>,
}

/// A user's standing in the token's team and, if they still belong to it, the team's sandbox.
#[derive(Debug, Clone)]
pub struct MemberAccess {
    pub user_status: UserStatus,
    pub role: Option<Role>,
    pub sandbox: Option<SandboxRoute>,
}

struct Row {
    status: Option<SandboxStatus>,
    host_id: Option<Uuid>,
    host_status: Option<HostStatus>,
    host_address: Option<String>,
    agent_secret_generation: Option<i32>,
}

impl Row {
    fn route(self) -> Option<SandboxRoute> {
        Some(SandboxRoute {
            status: self.status?,
            host_id: self.host_id,
            host_status: self.host_status,
            host_address: self.host_address,
            agent_secret_generation: self.agent_secret_generation,
        })
    }
}

/// Resolves a key hash for a live team, records its use (at most once a second, as
/// `api_keys::authenticate` does) and finds sandbox `id` of that team.
pub async fn by_api_key(
    ex: impl PgExecutor<'_>,
    key_hash: &[u8],
    id: Uuid,
) -> Result<Option<KeyAccess>, DbError> {
    let found = sqlx::query!(
        r#"WITH k AS (
               SELECT k.id, k.team_id, k.last_used FROM team_api_keys k
               JOIN teams t ON t.id = k.team_id
               WHERE k.key_hash = $1 AND t.deleted_at IS NULL
           ), touched AS (
               UPDATE team_api_keys SET last_used = now()
               WHERE id IN (SELECT id FROM k WHERE last_used IS NULL OR last_used < now() - interval '1 second')
           )
           SELECT k.id AS "key_id!", k.team_id AS "team_id!", s.status AS "status?: SandboxStatus",
                  s.host_id AS "host_id?", h.status AS "host_status?: HostStatus",
                  h.address AS "host_address?",
                  h.agent_secret_generation AS "agent_secret_generation?"
           FROM k
           LEFT JOIN sandboxes s ON s.id = $2 AND s.team_id = k.team_id
           LEFT JOIN hosts h ON h.id = s.host_id"#,
        key_hash,
        id,
    )
    .fetch_optional(ex)
    .await?;
    Ok(found.map(|r| KeyAccess {
        key_id: r.key_id,
        team_id: r.team_id,
        sandbox: Row {
            status: r.status,
            host_id: r.host_id,
            host_status: r.host_status,
            host_address: r.host_address,
            agent_secret_generation: r.agent_secret_generation,
        }
        .route(),
    }))
}

/// The user's status and role in `team` (a live team), and sandbox `id` of that team if they
/// are still a member.
pub async fn by_member(
    ex: impl PgExecutor<'_>,
    user: Uuid,
    team: Uuid,
    id: Uuid,
) -> Result<Option<MemberAccess>, DbError> {
    let found = sqlx::query!(
        r#"SELECT u.status AS "user_status: UserStatus", m.role AS "role?: Role",
                  s.status AS "status?: SandboxStatus", s.host_id AS "host_id?",
                  h.status AS "host_status?: HostStatus", h.address AS "host_address?",
                  h.agent_secret_generation AS "agent_secret_generation?"
           FROM users u
           LEFT JOIN (team_members m JOIN teams t ON t.id = m.team_id AND t.deleted_at IS NULL)
                  ON m.user_id = u.id AND m.team_id = $2
           LEFT JOIN sandboxes s ON s.id = $3 AND s.team_id = $2 AND m.role IS NOT NULL
           LEFT JOIN hosts h ON h.id = s.host_id
           WHERE u.id = $1"#,
        user,
        team,
        id,
    )
    .fetch_optional(ex)
    .await?;
    Ok(found.map(|r| MemberAccess {
        user_status: r.user_status,
        role: r.role,
        sandbox: Row {
            status: r.status,
            host_id: r.host_id,
            host_status: r.host_status,
            host_address: r.host_address,
            agent_secret_generation: r.agent_secret_generation,
        }
        .route(),
    }))
}
