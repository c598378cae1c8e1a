//! The template registry as a team sees it: its own templates and the platform's.

use super::ServiceError;
use crate::cp::pagination::{Page, PageRequest};
use crate::db::page::Keyset;
use crate::db::templates::{self, Template, TemplateType};
use crate::db::Db;
use crate::id::TeamId;

pub async fn list(
    db: &Db,
    team: TeamId,
    template_type: Option<TemplateType>,
    page: PageRequest,
) -> Result<Page<Template>, ServiceError> {
    let rows =
        templates::page_visible(db, team.uuid(), template_type, page.after, page.fetch()).await?;
    Ok(page.page(rows, |t| Keyset::of(t.created_at, t.id)))
}
