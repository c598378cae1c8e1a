//! Queries on `templates`: the images (and, later, snapshots) sandboxes start from.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::{text_enum, DbError};
use crate::id::TeamId;

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
}

/// The template `name` as `team` sees it: its own first, then the platform's.
pub async fn visible_by_name(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    name: &str,
) -> Result<Option<Template>, DbError> {
    Ok(sqlx::query_as!(
        Template,
        r#"SELECT id, team_id, name, type AS "template_type: TemplateType", vcpus, memory_mb
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
