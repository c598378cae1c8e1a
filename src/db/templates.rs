//! Queries on `templates`: the images (and, later, snapshots) sandboxes start from. Platform
//! templates (the platform team's) are visible to every team; a team's own come first when
//! names clash.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::page::Keyset;
use super::{text_enum, DbError};
use crate::id::TeamId;
use crate::store::BlobRef;
use crate::template::TemplateName;

text_enum! {
    /// `base` images boot fresh; `snapshot` templates resume a saved VM with its baked size.
    TemplateType, "templates.type" { Base => "base", Snapshot => "snapshot" }
}

#[derive(Debug, Clone)]
pub struct Template {
    pub id: Uuid,
    pub team_id: Uuid,
    pub name: String,
    pub template_type: TemplateType,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub size_bytes: i64,
    pub protected: bool,
    /// The image's blob in the template store, once published.
    pub image_sha256: Option<String>,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
}

impl Template {
    pub fn is_platform(&self) -> bool {
        self.team_id == TeamId::PLATFORM.uuid()
    }

    /// The name of the template's image on hosts (`images/<name>/`) and in their reports.
    pub fn image_name(&self) -> TemplateName {
        image_name(TeamId(self.team_id), &self.name)
    }

    /// The template's version in the template store, once published: a base template's image,
    /// a snapshot template's document (`agent::wire::StoredSnapshotTemplate`).
    pub fn stored_version(&self) -> Option<BlobRef> {
        let sha256 = self.image_sha256.as_deref()?;
        let size_bytes = match self.template_type {
            TemplateType::Base => u64::try_from(self.size_bytes).ok()?,
            TemplateType::Snapshot => self.metadata[STORE_DOCUMENT_BYTES].as_u64()?,
        };
        BlobRef::new(sha256, size_bytes).ok()
    }
}

/// The metadata key of a published snapshot template's document size.
const STORE_DOCUMENT_BYTES: &str = "store_document_bytes";

/// Platform templates' images go by the template's name; a team's by its name and the team, so
/// two teams' templates of one name, or a team's `python` and the platform's, never share one.
pub fn image_name(team: TeamId, name: &str) -> TemplateName {
    let key = if team == TeamId::PLATFORM {
        name.to_owned()
    } else {
        format!("{name}.t{}", team.uuid().simple())
    };
    key.parse()
        .expect("a template name with a team suffix is still a template name")
}

/// Whether `name` ends like a team template's image name (`.t` and 32 hex digits), which a
/// platform template must not, or it would share that team's image directory on hosts.
pub fn looks_like_team_image(name: &str) -> bool {
    name.rsplit_once(".t")
        .is_some_and(|(_, hex)| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The longest name of a team template: its image name adds the team (`.t` and 32 hex digits).
pub const MAX_TEAM_TEMPLATE_NAME_LEN: usize = crate::template::MAX_TEMPLATE_NAME_LEN - 34;

/// The template `name` as `team` sees it: its own first, then the platform's.
pub async fn visible_by_name(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    name: &str,
) -> Result<Option<Template>, DbError> {
    Ok(sqlx::query_as!(
        Template,
        r#"SELECT id, team_id, name, type AS "template_type: TemplateType", vcpus, memory_mb,
                  size_bytes, protected, image_sha256, metadata, created_at
           FROM templates
           WHERE name = $1 AND team_id IN ($2, $3)
           ORDER BY (team_id = $2) DESC LIMIT 1"#,
        name,
        team,
        TeamId::PLATFORM.uuid(),
    )
    .fetch_optional(ex)
    .await?)
}

/// Up to `limit` of the templates `team` sees (its own and the platform's) after `after`, of
/// `template_type` when given, oldest first.
pub async fn page_visible(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    template_type: Option<TemplateType>,
    after: Keyset,
    limit: i64,
) -> Result<Vec<Template>, DbError> {
    Ok(sqlx::query_as!(
        Template,
        r#"SELECT id, team_id, name, type AS "template_type: TemplateType", vcpus, memory_mb,
                  size_bytes, protected, image_sha256, metadata, created_at
           FROM templates
           WHERE team_id IN ($1, $2) AND ($3::text IS NULL OR type = $3)
             AND (created_at, id) > ($4, $5)
           ORDER BY created_at, id LIMIT $6"#,
        team,
        TeamId::PLATFORM.uuid(),
        template_type.map(|t| t.as_str()),
        after.created_at,
        after.id,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

/// The platform template `name`.
pub async fn platform_by_name(
    ex: impl PgExecutor<'_>,
    name: &str,
) -> Result<Option<Template>, DbError> {
    visible_by_name(ex, TeamId::PLATFORM.uuid(), name).await
}

/// Points template `id` at its image's blob in the template store.
pub async fn set_image(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    sha256: &str,
    size_bytes: i64,
) -> Result<bool, DbError> {
    let updated = sqlx::query!(
        "UPDATE templates SET image_sha256 = $2, size_bytes = $3 WHERE id = $1",
        id,
        sha256,
        size_bytes,
    )
    .execute(ex)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Points snapshot template `id`, as made at `made_at` (not a later overwrite), at its copy in
/// the template store, whose base image is the blob `base_image_sha256` (kept in the store while
/// the template is: see [`blob_in_use`]); false when the template is gone or another version
/// meanwhile. Setting the same copy again is a success.
pub async fn set_snapshot_document(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    made_at: DateTime<Utc>,
    document: &BlobRef,
    base_image_sha256: &str,
) -> Result<bool, DbError> {
    let updated = sqlx::query!(
        "UPDATE templates
         SET image_sha256 = $3,
             metadata = metadata || jsonb_build_object($4::text, $5::bigint,
                                                       'base_image_sha256', $6::text)
         WHERE id = $1 AND type = 'snapshot' AND created_at = $2
           AND (image_sha256 IS NULL OR image_sha256 = $3)",
        id,
        made_at,
        document.sha256,
        STORE_DOCUMENT_BYTES,
        i64::try_from(document.size_bytes).unwrap_or(i64::MAX),
        base_image_sha256,
    )
    .execute(ex)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Snapshot templates made before `before`, not yet in the template store, and held by an
/// online host, oldest first.
pub async fn unpublished_snapshots(
    ex: impl PgExecutor<'_>,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Template>, DbError> {
    // The image name on hosts, as `image_name` makes it (snapshot templates are teams').
    Ok(sqlx::query_as!(
        Template,
        r#"SELECT id, team_id, name, type AS "template_type: TemplateType", vcpus, memory_mb,
                  size_bytes, protected, image_sha256, metadata, created_at
           FROM templates t
           WHERE type = 'snapshot' AND image_sha256 IS NULL AND created_at < $1
             AND EXISTS (SELECT 1 FROM host_templates ht JOIN hosts h ON h.id = ht.host_id
                         WHERE h.status = 'online'
                           AND ht.template_name = t.name || '.t' || replace(t.team_id::text, '-', ''))
           ORDER BY created_at LIMIT $2"#,
        before,
        limit,
    )
    .fetch_all(ex)
    .await?)
}

/// Whether a template's version in the store is `sha256`.
pub async fn version_in_use(ex: impl PgExecutor<'_>, sha256: &str) -> Result<bool, DbError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM templates WHERE image_sha256 = $1) AS "used!""#,
        sha256,
    )
    .fetch_one(ex)
    .await?)
}

/// The team's own template `name`, locked until the transaction ends.
pub async fn lock_team_template(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    name: &str,
) -> Result<Option<Template>, DbError> {
    Ok(sqlx::query_as!(
        Template,
        r#"SELECT id, team_id, name, type AS "template_type: TemplateType", vcpus, memory_mb,
                  size_bytes, protected, image_sha256, metadata, created_at
           FROM templates WHERE team_id = $1 AND name = $2 FOR UPDATE"#,
        team,
        name,
    )
    .fetch_optional(ex)
    .await?)
}

/// A template a build made.
pub struct BuiltTemplate<'a> {
    pub team_id: Uuid,
    pub name: &'a str,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub size_bytes: i64,
    pub image_sha256: &'a str,
    pub metadata: Value,
}

/// Registers a built template, or points an existing unprotected one at the new image; answers
/// its ID, or none when a protected template has the name.
pub async fn upsert_built(
    ex: impl PgExecutor<'_>,
    built: BuiltTemplate<'_>,
) -> Result<Option<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        r#"INSERT INTO templates (id, team_id, name, type, vcpus, memory_mb, size_bytes,
                                  image_sha256, metadata)
           VALUES ($1, $2, $3, 'base', $4, $5, $6, $7, $8)
           ON CONFLICT (team_id, name) DO UPDATE
           SET type = 'base', vcpus = EXCLUDED.vcpus, memory_mb = EXCLUDED.memory_mb,
               size_bytes = EXCLUDED.size_bytes, image_sha256 = EXCLUDED.image_sha256,
               metadata = EXCLUDED.metadata
           WHERE NOT templates.protected AND templates.type = 'base'
           RETURNING id"#,
        Uuid::new_v4(),
        built.team_id,
        built.name,
        built.vcpus,
        built.memory_mb,
        built.size_bytes,
        built.image_sha256,
        built.metadata,
    )
    .fetch_optional(ex)
    .await?)
}

/// What a snapshot template was made of.
pub struct SnapshotTemplate<'a> {
    pub team_id: Uuid,
    pub name: &'a str,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub size_bytes: i64,
    pub metadata: Value,
}

/// Registers a team's snapshot template, or makes the team's unprotected template of that name
/// this one (an overwrite; the caller has decided it may); answers it, or none when a protected
/// template has the name.
pub async fn upsert_snapshot(
    ex: impl PgExecutor<'_>,
    snapshot: SnapshotTemplate<'_>,
) -> Result<Option<Template>, DbError> {
    Ok(sqlx::query_as!(
        Template,
        r#"INSERT INTO templates (id, team_id, name, type, vcpus, memory_mb, size_bytes,
                                  image_sha256, metadata)
           VALUES ($1, $2, $3, 'snapshot', $4, $5, $6, NULL, $7)
           ON CONFLICT (team_id, name) DO UPDATE
           SET type = 'snapshot', vcpus = EXCLUDED.vcpus, memory_mb = EXCLUDED.memory_mb,
               size_bytes = EXCLUDED.size_bytes, image_sha256 = NULL,
               metadata = EXCLUDED.metadata, created_at = now()
           WHERE NOT templates.protected
           RETURNING id, team_id, name, type AS "template_type: TemplateType", vcpus, memory_mb,
                     size_bytes, protected, image_sha256, metadata, created_at"#,
        Uuid::new_v4(),
        snapshot.team_id,
        snapshot.name,
        snapshot.vcpus,
        snapshot.memory_mb,
        snapshot.size_bytes,
        snapshot.metadata,
    )
    .fetch_optional(ex)
    .await?)
}

/// Removes template `id` from the registry.
pub async fn delete(ex: impl PgExecutor<'_>, id: Uuid) -> Result<bool, DbError> {
    let deleted = sqlx::query!("DELETE FROM templates WHERE id = $1", id)
        .execute(ex)
        .await?;
    Ok(deleted.rows_affected() == 1)
}

/// Whether the store's blob `sha256` is still needed: another template's image, the base image
/// of a published snapshot template, or the image under live capsules of the team's template
/// `name` (deleted, their rows keep its name).
pub async fn blob_in_use(
    ex: impl PgExecutor<'_>,
    sha256: &str,
    team: Uuid,
    name: &str,
) -> Result<bool, DbError> {
    // Live capsules of the deleted template may have paused copies in the store whose disk
    // lies over this image (`agent::sandbox::relocation`): without it they could not move.
    Ok(sqlx::query_scalar!(
        r#"SELECT (EXISTS (SELECT 1 FROM templates
                           WHERE image_sha256 = $1 OR metadata->>'base_image_sha256' = $1)
                   OR EXISTS (SELECT 1 FROM sandboxes
                              WHERE team_id = $2 AND template_name = $3
                                AND status NOT IN ('stopped', 'error'))) AS "used!""#,
        sha256,
        team,
        name,
    )
    .fetch_one(ex)
    .await?)
}
