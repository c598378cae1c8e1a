//! Team API keys: `wrn_` + 32 hex digits, shown once; only the SHA-256 hash and a display prefix
//! are kept.

use uuid::Uuid;

use serde_json::json;

use super::input::KeyName;
use super::{member_team, user_action, Caller, ServiceError};
use crate::cp::pagination::{Page, PageRequest};
use crate::cp::revocations::{self, Revoked};
use crate::cp::tokens::{random_hex, sha256};
use crate::db::api_keys::{self, ApiKey, NewApiKey};
use crate::db::page::Keyset;
use crate::db::{audit_logs, Db, DbError};
use crate::id::{ApiKeyId, TeamId};

pub const KEY_PREFIX: &str = "wrn_";
/// How much of a key is kept for display: `wrn_` and the first 8 hex digits.
const DISPLAY_CHARS: usize = 12;

/// Creates a key for the caller's current team; returns it with its plaintext, the only time
/// the plaintext exists outside the caller.
pub async fn create(
    db: &Db,
    caller: &Caller,
    name: KeyName,
) -> Result<(ApiKey, String), ServiceError> {
    let team = member_team(caller)?;
    let plaintext = format!("{KEY_PREFIX}{}", random_hex(16));
    let prefix = format!("{}...", &plaintext[..DISPLAY_CHARS]);
    let mut tx = db.begin().await.map_err(DbError::from)?;
    let key = api_keys::insert(
        &mut *tx,
        NewApiKey {
            id: Uuid::new_v4(),
            team_id: team.uuid(),
            name: name.as_str(),
            key_hash: &sha256(&plaintext),
            key_prefix: &prefix,
            created_by: caller.user.uuid(),
        },
    )
    .await?;
    let entry = user_action(
        caller,
        Some(team.uuid()),
        "api_key",
        ApiKeyId(key.id).to_string(),
        "create",
        json!({"name": key.name}),
    );
    audit_logs::insert(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok((key, plaintext))
}

pub async fn list(db: &Db, team: TeamId, page: PageRequest) -> Result<Page<ApiKey>, ServiceError> {
    let rows = api_keys::page(db, team.uuid(), page.after, page.fetch()).await?;
    Ok(page.page(rows, |k| Keyset::of(k.created_at, k.id)))
}

/// Owners and admins revoke any key of the team; members only keys they created.
pub async fn revoke(db: &Db, caller: &Caller, key: ApiKeyId) -> Result<(), ServiceError> {
    let team = member_team(caller)?;
    let found = api_keys::get(db, team.uuid(), key.uuid())
        .await?
        .ok_or(ServiceError::NotFound("API key"))?;
    let allowed =
        caller.role.is_some_and(|r| r.can_manage()) || found.created_by == Some(caller.user.uuid());
    if !allowed {
        return Err(ServiceError::forbidden(
            "only team owners and admins can revoke other members' keys",
        ));
    }
    let mut tx = db.begin().await.map_err(DbError::from)?;
    if !api_keys::delete(&mut *tx, team.uuid(), key.uuid()).await? {
        return Err(ServiceError::NotFound("API key"));
    }
    let entry = user_action(
        caller,
        Some(team.uuid()),
        "api_key",
        key.to_string(),
        "revoke",
        json!({"name": found.name}),
    );
    audit_logs::insert(&mut *tx, entry).await?;
    revocations::announce(&mut *tx, Revoked::ApiKey { id: key.uuid() }).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}
