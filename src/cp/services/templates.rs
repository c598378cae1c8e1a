//! The template registry as a team sees it (its own templates and the platform's), and the
//! publishing of platform template images into the template store.

use serde::Serialize;

use super::{capsules, ServiceError};
use crate::cp::agent_client::AgentError;
use crate::cp::pagination::{Page, PageRequest};
use crate::cp::state::AppState;
use crate::db::hosts::{self, HostStatus};
use crate::db::page::Keyset;
use crate::db::templates::{self, Template, TemplateType};
use crate::db::{host_templates, Db, DbError};
use crate::id::{HostId, TeamId};
use crate::store::StoreError;
use crate::template::TemplateName;

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

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("template `{0}` is not a platform template")]
    TemplateNotFound(String),
    #[error("host {0} not found")]
    HostNotFound(HostId),
    #[error("no online host holds template `{0}`; build or copy its image onto a host first")]
    NoHolder(String),
    #[error("host {0} is not online")]
    HostUnavailable(HostId),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("host {host} published sha256:{sha256}, but the control plane cannot find it in the template store ({source}); do the host and the control plane name the same store?")]
    Unconfirmed {
        host: HostId,
        sha256: String,
        source: StoreError,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A template image put into the store.
#[derive(Debug, Serialize)]
pub struct Published {
    pub template: String,
    pub host_id: HostId,
    pub sha256: String,
    pub size_bytes: u64,
}

/// Has a host put its image of platform template `name` into the template store, and points the
/// registry at it: from then on every host that lacks that version pulls it before its first
/// capsule of the template. `from` chooses the host; by default any online host that reported
/// holding the template.
pub async fn publish(
    state: &AppState,
    name: &TemplateName,
    from: Option<HostId>,
) -> Result<Published, PublishError> {
    let template = templates::platform_by_name(&state.db, name.as_str())
        .await?
        .ok_or_else(|| PublishError::TemplateNotFound(name.to_string()))?;
    let host = match from {
        Some(id) => hosts::by_id(&state.db, id.uuid())
            .await?
            .ok_or(PublishError::HostNotFound(id))?,
        None => {
            let mut online = None;
            for id in host_templates::holders(&state.db, name.as_str()).await? {
                match hosts::by_id(&state.db, id).await? {
                    Some(host) if host.status == HostStatus::Online => {
                        online = Some(host);
                        break;
                    }
                    _ => {}
                }
            }
            online.ok_or_else(|| PublishError::NoHolder(name.to_string()))?
        }
    };
    let host_id = HostId(host.id);
    if host.status != HostStatus::Online {
        return Err(PublishError::HostUnavailable(host_id));
    }
    let target =
        capsules::agent_target(state, &host).ok_or(PublishError::HostUnavailable(host_id))?;
    let blob = state
        .capsules
        .agents
        .publish_template(&target, name)
        .await?;
    if let Some(store) = &state.capsules.store {
        store
            .check(&blob)
            .await
            .map_err(|source| PublishError::Unconfirmed {
                host: host_id,
                sha256: blob.sha256.clone(),
                source,
            })?;
    }
    let size = i64::try_from(blob.size_bytes).unwrap_or(i64::MAX);
    templates::set_image(&state.db, template.id, &blob.sha256, size).await?;
    tracing::info!(template = %name, host = %host_id, sha256 = blob.sha256, "template image published");
    Ok(Published {
        template: name.to_string(),
        host_id,
        sha256: blob.sha256,
        size_bytes: blob.size_bytes,
    })
}
