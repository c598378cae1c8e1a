//! The template registry as a team sees it (its own templates and the platform's), and the
//! publishing of platform template images into the template store.

use serde::Serialize;

use super::{capsules, ServiceError};
use crate::agent::wire::StoredSnapshotTemplate;
use crate::cp::agent_client::{AgentError, AgentTarget, ImportArchive};
use crate::cp::pagination::{Page, PageRequest};
use crate::cp::state::AppState;
use crate::db::hosts::{self, HostStatus, HostType};
use crate::db::page::Keyset;
use crate::db::templates::{self, Template, TemplateType};
use crate::db::{host_templates, template_reservations, Db, DbError};
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
    #[error("template `{0}` is neither a platform template nor held by any host")]
    TemplateNotFound(String),
    #[error("host {0} not found")]
    HostNotFound(HostId),
    #[error("no online host holds template `{0}`; build or copy its image onto a host first")]
    NoHolder(String),
    #[error("host {0} is not online")]
    HostUnavailable(HostId),
    #[error("host {0} is a team's own host; platform templates come from platform hosts")]
    TeamHost(HostId),
    #[error(
        "hosts hold different versions of template `{0}`; name the one to publish with host_id"
    )]
    Ambiguous(String),
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
    if templates::looks_like_team_image(name.as_str()) {
        return Err(PublishError::TemplateNotFound(name.to_string()));
    }
    let template = templates::platform_by_name(&state.db, name.as_str()).await?;
    let holders = host_templates::holders(&state.db, name.as_str()).await?;
    if template.is_none() && holders.is_empty() && from.is_none() {
        return Err(PublishError::TemplateNotFound(name.to_string()));
    }
    let host = match from {
        Some(id) => {
            let host = hosts::by_id(&state.db, id.uuid())
                .await?
                .ok_or(PublishError::HostNotFound(id))?;
            if host.host_type != HostType::Regular {
                return Err(PublishError::TeamHost(id));
            }
            host
        }
        None => {
            // Hosts holding different versions: which one is meant is the admin's to say.
            let versions: std::collections::HashSet<_> =
                holders.iter().map(|h| h.sha256.clone()).collect();
            if versions.len() > 1 {
                return Err(PublishError::Ambiguous(name.to_string()));
            }
            let mut online = None;
            for holder in holders {
                match hosts::by_id(&state.db, holder.host_id).await? {
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
    match template {
        Some(template) => {
            templates::set_image(&state.db, template.id, &blob.sha256, size).await?;
        }
        // An image made on the host (`wrenn template import`) becomes a new platform template.
        None => {
            templates::upsert_built(
                &state.db,
                templates::BuiltTemplate {
                    team_id: TeamId::PLATFORM.uuid(),
                    name: name.as_str(),
                    vcpus: 1,
                    memory_mb: 512,
                    size_bytes: size,
                    image_sha256: &blob.sha256,
                    metadata: serde_json::json!({
                        "description": format!("published from host {host_id}"),
                    }),
                },
            )
            .await?;
        }
    }
    tracing::info!(template = %name, host = %host_id, sha256 = blob.sha256, "template image published");
    Ok(Published {
        template: name.to_string(),
        host_id,
        sha256: blob.sha256,
        size_bytes: blob.size_bytes,
    })
}

/// What an import asks for besides the archive.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSettings {
    /// The host to import on; by default any online host. Required for `path`.
    #[serde(default)]
    pub host_id: Option<String>,
    /// An archive already on that host.
    #[serde(default)]
    pub path: Option<std::path::PathBuf>,
    /// Start the image's entrypoint and command at every boot.
    #[serde(default)]
    pub start_entrypoint: bool,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mb: Option<u32>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("template `{0}` is protected; an import cannot replace it")]
    Protected(String),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl From<DbError> for ImportError {
    fn from(e: DbError) -> Self {
        Self::Publish(PublishError::Db(e))
    }
}

impl From<AgentError> for ImportError {
    fn from(e: AgentError) -> Self {
        Self::Publish(PublishError::Agent(e))
    }
}

/// An imported template.
#[derive(Debug, Serialize)]
pub struct Imported {
    pub template: String,
    pub host_id: HostId,
    pub sha256: String,
    pub size_bytes: u64,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub env: Vec<String>,
}

/// Reading, unpacking and checking a large image, then publishing it, takes a while.
const IMPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Checks an import before any archive byte moves: the name, the host, the sizes.
pub async fn import_target(
    state: &AppState,
    name: &TemplateName,
    settings: &ImportSettings,
) -> Result<(AgentTarget, HostId), ImportError> {
    if templates::looks_like_team_image(name.as_str()) {
        return Err(ImportError::Invalid {
            field: "name",
            message: "names ending in `.t` and 32 hex digits are reserved for team images".into(),
        });
    }
    if let Some(existing) = templates::platform_by_name(&state.db, name.as_str()).await? {
        if existing.protected {
            return Err(ImportError::Protected(name.to_string()));
        }
    }
    if settings.vcpus.is_some_and(|v| !(1..=32).contains(&v)) {
        return Err(ImportError::Invalid {
            field: "vcpus",
            message: "must be between 1 and 32".into(),
        });
    }
    if settings
        .memory_mb
        .is_some_and(|m| !(128..=65536).contains(&m))
    {
        return Err(ImportError::Invalid {
            field: "memory_mb",
            message: "must be between 128 and 65536".into(),
        });
    }
    let host = match settings.host_id.as_deref() {
        Some(raw) => {
            let id: HostId = raw
                .parse()
                .map_err(|e: crate::id::IdError| ImportError::Invalid {
                    field: "host_id",
                    message: e.to_string(),
                })?;
            let host = hosts::by_id(&state.db, id.uuid())
                .await?
                .ok_or(PublishError::HostNotFound(id))?;
            if host.host_type != HostType::Regular {
                return Err(PublishError::TeamHost(id).into());
            }
            host
        }
        None if settings.path.is_some() => {
            return Err(ImportError::Invalid {
                field: "host_id",
                message: "an archive given by path needs the host it is on".into(),
            })
        }
        None => hosts::list_registered(&state.db)
            .await?
            .into_iter()
            .find(|h| h.status == HostStatus::Online && h.host_type == HostType::Regular)
            .ok_or_else(|| PublishError::NoHolder(name.to_string()))?,
    };
    let host_id = HostId(host.id);
    if host.status != HostStatus::Online {
        return Err(PublishError::HostUnavailable(host_id).into());
    }
    let target =
        capsules::agent_target(state, &host).ok_or(PublishError::HostUnavailable(host_id))?;
    Ok((target, host_id))
}

/// Has the host import the archive as platform template `name`'s image, publish it, and
/// registers it (a new template, or a new image for an unprotected one).
pub async fn import(
    state: &AppState,
    name: &TemplateName,
    settings: &ImportSettings,
    (target, host_id): (AgentTarget, HostId),
    archive: ImportArchive,
) -> Result<Imported, ImportError> {
    let imported = state
        .capsules
        .agents
        .import_template(
            &target,
            name,
            archive,
            settings.start_entrypoint,
            IMPORT_TIMEOUT,
        )
        .await?;
    let image = &imported.image;
    let metadata = serde_json::json!({
        "description": settings
            .description
            .clone()
            .unwrap_or_else(|| format!("imported container image `{name}`")),
        "source": "oci",
        "entrypoint": imported.entrypoint.join(" "),
        "cmd": imported.cmd.join(" "),
    });
    templates::upsert_built(
        &state.db,
        templates::BuiltTemplate {
            team_id: TeamId::PLATFORM.uuid(),
            name: name.as_str(),
            vcpus: settings.vcpus.map_or(1, |v| i32::try_from(v).unwrap_or(1)),
            memory_mb: settings
                .memory_mb
                .map_or(512, |m| i32::try_from(m).unwrap_or(512)),
            size_bytes: i64::try_from(image.size_bytes).unwrap_or(i64::MAX),
            image_sha256: &image.sha256,
            metadata,
        },
    )
    .await?
    .ok_or_else(|| ImportError::Protected(name.to_string()))?;
    tracing::info!(template = %name, host = %host_id, sha256 = image.sha256, "container image imported");
    Ok(Imported {
        template: name.to_string(),
        host_id,
        sha256: image.sha256.clone(),
        size_bytes: image.size_bytes,
        entrypoint: imported.entrypoint,
        cmd: imported.cmd,
        user: imported.user,
        workdir: imported.workdir,
        env: imported.env,
    })
}

/// Why a snapshot template was not made, or a template not deleted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotTemplateError {
    #[error("name: {0}")]
    InvalidName(String),
    #[error("template `{0}` already exists; pass overwrite=true to replace it")]
    Exists(String),
    #[error("`{0}` is a platform template; a team's template cannot take its name")]
    PlatformName(String),
    #[error("template `{0}` is a platform template; only the platform's operators remove it")]
    Platform(String),
    #[error("template `{0}` not found")]
    NotFound(String),
    #[error(transparent)]
    Capsule(#[from] capsules::CapsuleError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Makes capsule `capsule`'s memory and disk, as they are now, the team's snapshot template
/// `name` (generated when absent): every capsule created from it continues from this instant.
/// The capsule stays as it was (running or paused). A name the team already uses is a conflict
/// unless `overwrite`; a platform template's name is never the team's to take.
pub async fn create_snapshot(
    state: &AppState,
    team: TeamId,
    capsule: crate::id::SandboxId,
    name: Option<String>,
    overwrite: bool,
) -> Result<Template, SnapshotTemplateError> {
    let name = name.unwrap_or_else(|| format!("snapshot-{:08x}", rand::random::<u32>()));
    let parsed: TemplateName = name
        .parse()
        .map_err(|e: crate::template::TemplateNameError| {
            SnapshotTemplateError::InvalidName(e.to_string())
        })?;
    if name.len() > templates::MAX_TEAM_TEMPLATE_NAME_LEN || templates::looks_like_team_image(&name)
    {
        return Err(SnapshotTemplateError::InvalidName(format!(
            "`{name}` must be at most {} characters and not end in `.t` and 32 hex digits",
            templates::MAX_TEAM_TEMPLATE_NAME_LEN
        )));
    }
    match templates::visible_by_name(&state.db, team.uuid(), parsed.as_str()).await? {
        Some(existing) if existing.is_platform() => {
            return Err(SnapshotTemplateError::PlatformName(name))
        }
        Some(_) if !overwrite => return Err(SnapshotTemplateError::Exists(name)),
        _ => {}
    }
    let image = templates::image_name(team, parsed.as_str());
    let made = capsules::snapshot(
        state,
        team,
        capsule,
        crate::agent::wire::SnapshotTemplate {
            template: image.clone(),
            // The registry decided above; a stale copy on the host is replaced.
            overwrite: true,
        },
    )
    .await?;
    let size_bytes = i64::try_from(made.info.size_bytes).unwrap_or(i64::MAX);
    let host = made.host;
    let registered = register_snapshot(state, team, &parsed, &image, &made, capsule).await;
    if registered.is_err() {
        if let Err(error) = template_reservations::release(&state.db, made.hold).await {
            tracing::warn!(%capsule, %error, "could not release an unregistered snapshot's place in the pool; it lapses");
        }
        // Made on the host but not in the registry: nothing would ever use or remove it.
        remove_from_hosts(state, &image, &[host]).await;
    }
    let (template, stale, replaced) = registered?;
    // Hosts that held the template this one replaced no longer hold it, nor does the store.
    remove_from_hosts(state, &image, &stale).await;
    if let Some(replaced) = replaced {
        forget_stored(state, team, &replaced).await;
    }
    tracing::info!(team = %team, template = %name, capsule = %capsule, host = %HostId(host), size_bytes, "snapshot template made");
    if state.capsules.store.is_some() {
        // Publishing copies the snapshot's memory and disk: seconds the caller need not wait.
        // Until it is done, creates of the template run on this host; the reconciler retries a
        // publish this replica did not finish.
        let (state, template, host) = (state.clone(), template.clone(), host);
        tokio::spawn(async move {
            if let Err(error) = publish_snapshot(&state, &template, host).await {
                tracing::warn!(template = %template.name, %error, "could not publish the snapshot template; its creates stay on its host");
            }
        });
    }
    Ok(template)
}

/// Has `host`, which holds snapshot template `template`, put it into the template store, and
/// points the registry at that copy: from then on a create of it may run on any host, which
/// pulls the copy first. A template overwritten or deleted meanwhile keeps nothing of it.
pub async fn publish_snapshot(
    state: &AppState,
    template: &Template,
    host: uuid::Uuid,
) -> Result<(), PublishError> {
    let Some(store) = &state.capsules.store else {
        return Ok(());
    };
    let host_id = HostId(host);
    let target = match hosts::by_id(&state.db, host).await? {
        Some(row) if row.status == HostStatus::Online => capsules::agent_target(state, &row),
        _ => None,
    }
    .ok_or(PublishError::HostUnavailable(host_id))?;
    let image = template.image_name();
    let document = state
        .capsules
        .agents
        .publish_template(&target, &image)
        .await?;
    let unconfirmed = |source| PublishError::Unconfirmed {
        host: host_id,
        sha256: document.sha256.clone(),
        source,
    };
    let bytes = store.read_bytes(&document).await.map_err(unconfirmed)?;
    let copy: StoredSnapshotTemplate = serde_json::from_slice(&bytes).map_err(|e| {
        unconfirmed(StoreError::Io {
            path: document.sha256.clone().into(),
            source: std::io::Error::other(e),
        })
    })?;
    let mut tx = state.db.begin().await.map_err(DbError::from)?;
    let current = templates::set_snapshot_document(
        &mut *tx,
        template.id,
        template.created_at,
        &document,
        &copy.base_image.sha256,
    )
    .await?;
    if current {
        host_templates::set_sha256(&mut *tx, host, image.as_str(), &document.sha256).await?;
    }
    // The host answers the copy it holds: after an overwrite, the new version's, which that
    // version's own publish may have registered already.
    let superseded = !current && !templates::version_in_use(&mut *tx, &document.sha256).await?;
    tx.commit().await.map_err(DbError::from)?;
    if superseded {
        tracing::info!(template = %template.name, "the snapshot template changed while it was published; its copy is removed");
        if let Err(error) = StoredSnapshotTemplate::remove(store, &document).await {
            tracing::warn!(template = %template.name, %error, "could not remove a stale snapshot template copy from the store");
        }
        return Ok(());
    }
    if !current {
        return Ok(());
    }
    tracing::info!(team = %TeamId(template.team_id), template = %template.name, host = %host_id, sha256 = document.sha256, "snapshot template published");
    Ok(())
}

/// How long a snapshot template may wait for the publish its create started before the
/// reconciler takes over.
const PUBLISH_GRACE: chrono::TimeDelta = chrono::TimeDelta::minutes(2);

/// The reconciler's share, started in the background (a publish may take minutes; a pass must
/// not wait for it), one at a time per control plane: publishes snapshot templates whose
/// create's publish did not finish (the replica stopped, or the host or the store was away),
/// from an online host holding them.
pub fn publish_unpublished_snapshots_later(state: &AppState) {
    static RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if state.capsules.store.is_none() || RUNNING.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        match publish_unpublished_snapshots(&state).await {
            Ok(0) => {}
            Ok(published) => {
                tracing::info!(published, "snapshot templates published by the reconciler")
            }
            Err(error) => {
                tracing::warn!(%error, "publishing waiting snapshot templates failed; the next pass retries")
            }
        }
        RUNNING.store(false, std::sync::atomic::Ordering::Release);
    });
}

async fn publish_unpublished_snapshots(state: &AppState) -> Result<usize, DbError> {
    let waiting =
        templates::unpublished_snapshots(&state.db, chrono::Utc::now() - PUBLISH_GRACE, 8).await?;
    let mut published = 0;
    for template in waiting {
        let holders = host_templates::holders(&state.db, template.image_name().as_str()).await?;
        for holder in holders {
            match publish_snapshot(state, &template, holder.host_id).await {
                Ok(()) => {
                    published += 1;
                    break;
                }
                Err(PublishError::Db(error)) => return Err(error),
                Err(error) => {
                    tracing::warn!(template = %template.name, host = %HostId(holder.host_id), %error, "publishing the snapshot template failed; the next pass retries");
                }
            }
        }
    }
    Ok(published)
}

/// Removes what the template store holds of `template`, which left the registry or was
/// replaced: a snapshot template's copy, or a built image no other template or live capsule
/// uses.
async fn forget_stored(state: &AppState, team: TeamId, template: &Template) {
    let (Some(store), Some(version)) = (&state.capsules.store, template.stored_version()) else {
        return;
    };
    let name = &template.name;
    match template.template_type {
        TemplateType::Snapshot => {
            if let Err(error) = StoredSnapshotTemplate::remove(store, &version).await {
                tracing::warn!(template = name, %error, "could not remove a snapshot template's copy from the store");
            }
        }
        TemplateType::Base => {
            match templates::blob_in_use(&state.db, &version.sha256, team.uuid(), name).await {
                Ok(false) => {
                    if let Err(error) = store.delete(&version.sha256).await {
                        tracing::warn!(template = name, sha256 = version.sha256, %error, "could not remove a template's blob from the store");
                    }
                }
                Ok(true) => {}
                Err(error) => {
                    tracing::warn!(template = name, %error, "could not tell whether a template's blob is still used; it stays")
                }
            }
        }
    }
}

/// Registers the snapshot template made on `host` and records that the host holds it;
/// answers it, the other hosts that held an image of that name (now stale), and the template it
/// replaced (read under the row's lock: a publish of it may have finished meanwhile).
async fn register_snapshot(
    state: &AppState,
    team: TeamId,
    name: &TemplateName,
    image: &TemplateName,
    made: &capsules::MadeSnapshot,
    capsule: crate::id::SandboxId,
) -> Result<(Template, Vec<uuid::Uuid>, Option<Template>), SnapshotTemplateError> {
    let (host, hold, made) = (made.host, made.hold, &made.info);
    let size_bytes = i64::try_from(made.size_bytes).unwrap_or(i64::MAX);
    let parsed = name;
    let mut tx = state.db.begin().await.map_err(DbError::from)?;
    let replaced = templates::lock_team_template(&mut *tx, team.uuid(), parsed.as_str()).await?;
    let template = templates::upsert_snapshot(
        &mut *tx,
        templates::SnapshotTemplate {
            team_id: team.uuid(),
            name: parsed.as_str(),
            vcpus: i32::try_from(made.vcpus).unwrap_or(i32::MAX),
            memory_mb: i32::try_from(made.memory_mb).unwrap_or(i32::MAX),
            size_bytes,
            metadata: serde_json::json!({ "capsule_id": capsule.to_string() }),
        },
    )
    .await?
    .ok_or_else(|| SnapshotTemplateError::PlatformName(parsed.to_string()))?;
    let stale = host_templates::remove_all_but(&mut *tx, image.as_str(), Some(host)).await?;
    host_templates::add(&mut *tx, host, image.as_str(), size_bytes, None).await?;
    // From here the template itself counts in the pool.
    template_reservations::release(&mut *tx, hold).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok((template, stale, replaced))
}

/// Removes the team's template `name` from the registry, from every host and from the template
/// store. Capsules created from it run on (each has its own copy of what it started from).
pub async fn delete(
    state: &AppState,
    team: TeamId,
    name: &str,
) -> Result<(), SnapshotTemplateError> {
    let template = templates::visible_by_name(&state.db, team.uuid(), name)
        .await?
        .ok_or_else(|| SnapshotTemplateError::NotFound(name.to_owned()))?;
    if template.is_platform() {
        return Err(SnapshotTemplateError::Platform(name.to_owned()));
    }
    let image = template.image_name();
    let mut tx = state.db.begin().await.map_err(DbError::from)?;
    let holders = host_templates::remove_all_but(&mut *tx, image.as_str(), None).await?;
    templates::delete(&mut *tx, template.id).await?;
    tx.commit().await.map_err(DbError::from)?;
    remove_from_hosts(state, &image, &holders).await;
    forget_stored(state, team, &template).await;
    tracing::info!(team = %team, template = name, hosts = holders.len(), "template deleted");
    Ok(())
}

/// Asks each of `hosts` to remove its image `image`. A host that cannot be reached keeps it
/// until it is removed there by hand or the host is; its next report lists it, and creates
/// never choose it for a template the registry no longer has.
async fn remove_from_hosts(state: &AppState, image: &TemplateName, hosts: &[uuid::Uuid]) {
    for host in hosts {
        let target = match hosts::by_id(&state.db, *host).await {
            Ok(Some(row)) if row.status == HostStatus::Online => {
                capsules::agent_target(state, &row)
            }
            _ => None,
        };
        let Some(target) = target else {
            tracing::warn!(host = %HostId(*host), template = %image, "host not online; its copy of the template stays");
            continue;
        };
        if let Err(error) = state.capsules.agents.remove_template(&target, image).await {
            tracing::warn!(host = %HostId(*host), template = %image, %error, "could not remove the template from a host");
        }
    }
}
