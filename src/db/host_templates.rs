//! Queries on `host_templates`: which template images each host holds, as its agent last
//! reported them to the reconciler.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Db, DbError};
use crate::agent::wire::HeldTemplate;
use crate::id::TeamId;

/// Makes `host`'s rows what its agent reported: new images added, changed ones updated, gone
/// ones removed. Rows that did not change are not rewritten. The platform template of the same
/// name takes the reported size.
pub async fn record(db: &Db, host: Uuid, held: &[HeldTemplate]) -> Result<(), DbError> {
    let names: Vec<String> = held.iter().map(|t| t.name.to_string()).collect();
    let sizes: Vec<i64> = held
        .iter()
        .map(|t| i64::try_from(t.size_bytes).unwrap_or(i64::MAX))
        .collect();
    let sums: Vec<Option<String>> = held.iter().map(|t| t.sha256.clone()).collect();
    let mut tx = db.begin().await?;
    sqlx::query!(
        "DELETE FROM host_templates WHERE host_id = $1 AND template_name <> ALL($2)",
        host,
        &names,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        r#"INSERT INTO host_templates (host_id, template_name, size_bytes, sha256)
           SELECT $1, name, size, sum
           FROM UNNEST($2::text[], $3::bigint[], $4::text[]) AS held (name, size, sum)
           ON CONFLICT (host_id, template_name) DO UPDATE
           SET size_bytes = EXCLUDED.size_bytes, sha256 = EXCLUDED.sha256
           WHERE (host_templates.size_bytes, host_templates.sha256)
                 IS DISTINCT FROM (EXCLUDED.size_bytes, EXCLUDED.sha256)"#,
        host,
        &names,
        &sizes,
        &sums as &[Option<String>],
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        r#"UPDATE templates t SET size_bytes = held.size
           FROM UNNEST($1::text[], $2::bigint[]) AS held (name, size)
           WHERE t.team_id = $3 AND t.name = held.name AND t.size_bytes <> held.size
             AND t.image_sha256 IS NULL"#,
        &names,
        &sizes,
        TeamId::PLATFORM.uuid(),
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Those of `hosts` that hold the template image `name`, in version `sha256` when given.
pub async fn holding(
    ex: impl PgExecutor<'_>,
    hosts: &[Uuid],
    name: &str,
    sha256: Option<&str>,
) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "SELECT host_id FROM host_templates
         WHERE host_id = ANY($1) AND template_name = $2 AND ($3::text IS NULL OR sha256 = $3)",
        hosts,
        name,
        sha256,
    )
    .fetch_all(ex)
    .await?)
}

/// A regular host's report of an image.
#[derive(Debug, Clone)]
pub struct Holder {
    pub host_id: Uuid,
    pub sha256: Option<String>,
}

/// The regular (platform-run) hosts that reported holding the template image `name`, most
/// recently registered first. A team's own (BYOC) hosts are left out: what they report is the
/// team's word, not the platform's.
pub async fn holders(ex: impl PgExecutor<'_>, name: &str) -> Result<Vec<Holder>, DbError> {
    Ok(sqlx::query_as!(
        Holder,
        "SELECT ht.host_id, ht.sha256 FROM host_templates ht JOIN hosts h ON h.id = ht.host_id
         WHERE ht.template_name = $1 AND h.type = 'regular' ORDER BY h.created_at DESC",
        name,
    )
    .fetch_all(ex)
    .await?)
}

/// Records that `host`'s image `name` is the store's version `sha256` (before its next report
/// says so).
pub async fn set_sha256(
    ex: impl PgExecutor<'_>,
    host: Uuid,
    name: &str,
    sha256: &str,
) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE host_templates SET sha256 = $3 WHERE host_id = $1 AND template_name = $2",
        host,
        name,
        sha256,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// Records that `host` holds image `name` now, in version `sha256` when known (before its next
/// report says so).
pub async fn add(
    ex: impl PgExecutor<'_>,
    host: Uuid,
    name: &str,
    size_bytes: i64,
    sha256: Option<&str>,
) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO host_templates (host_id, template_name, size_bytes, sha256)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (host_id, template_name)
         DO UPDATE SET size_bytes = EXCLUDED.size_bytes, sha256 = EXCLUDED.sha256",
        host,
        name,
        size_bytes,
        sha256,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// Forgets every host's image `name` but `keep`'s (all of them when `keep` is none); answers
/// the hosts that held one, whose copies are now stale.
pub async fn remove_all_but(
    ex: impl PgExecutor<'_>,
    name: &str,
    keep: Option<Uuid>,
) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "DELETE FROM host_templates
         WHERE template_name = $1 AND ($2::uuid IS NULL OR host_id <> $2)
         RETURNING host_id",
        name,
        keep,
    )
    .fetch_all(ex)
    .await?)
}
