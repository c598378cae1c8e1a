//! Resuming a paused capsule on another host, from its copy in the template store
//! (`agent::sandbox::relocation` makes and takes in the copies). A resume moves the capsule when
//! its own host is gone (the capsule is `missing`, or its host is not online) or has no room
//! for it any more, and the store holds its copy. The copy exists only while the guest has not
//! run since its pause, so resuming it elsewhere never loses a write; without one the capsule
//! waits for its host, as before.
//!
//! The scheduler picks the new host and the row moves there `resuming` under that host's lock;
//! the host imports the copy and resumes it. If the import fails the row goes back where it
//! was. The old host, if it ever answers again, still reports the capsule: the reconciler
//! destroys it there, as a capsule its host no longer runs.

use super::{after_failed_operation, online_target, settle, CapsuleError};
use crate::agent::wire::stored_pause_key;
use crate::cp::agent_client::AgentError;
use crate::cp::scheduler::{self, Demand, Relocation};
use crate::cp::services::capsules::agent_target;
use crate::cp::state::AppState;
use crate::db::hosts;
use crate::db::sandboxes::{self, SandboxRoute, SandboxStatus};
use crate::id::{HostId, SandboxId};
use crate::store::StoreError;

/// Whether the store holds the capsule's copy; `Err` when the store cannot be asked.
async fn store_copy(state: &AppState, id: SandboxId) -> Result<bool, StoreError> {
    match &state.capsules.store {
        Some(store) => Ok(store.get_document(&stored_pause_key(id)).await?.is_some()),
        None => Ok(false),
    }
}

/// Whether the capsule could be resumed elsewhere (its store copy exists); an unreachable
/// store counts as no.
pub async fn has_store_copy(state: &AppState, id: SandboxId) -> bool {
    store_copy(state, id).await.unwrap_or(false)
}

fn demand_of(row: &sandboxes::SandboxRow) -> Demand {
    Demand {
        vcpus: i64::from(row.vcpus),
        memory_mb: i64::from(row.memory_mb),
        disk_mb: i64::from(row.disk_mb),
    }
}

/// Where a resume takes the capsule.
pub(super) enum Where {
    Home,
    /// Its host is gone and the store holds its copy.
    Elsewhere,
    /// Its host runs but has no room for it, and the store holds its copy.
    ElsewhereIfRoom,
}

/// Where a resume of the capsule must go. An unreachable store is an error only when the
/// capsule cannot resume at home either.
pub(super) async fn must_move(
    state: &AppState,
    id: SandboxId,
    route: &SandboxRoute,
) -> Result<Where, CapsuleError> {
    let home_away = online_target(state, route).is_err();
    let elsewhere_if = |copy: bool, to: Where| if copy { to } else { Where::Home };
    match route.status {
        SandboxStatus::Missing => Ok(elsewhere_if(store_copy(state, id).await?, Where::Elsewhere)),
        SandboxStatus::Paused if home_away => {
            Ok(elsewhere_if(store_copy(state, id).await?, Where::Elsewhere))
        }
        SandboxStatus::Paused => {
            let (Some(row), Some(host_id)) =
                (sandboxes::by_id(&state.db, id.uuid()).await?, route.host_id)
            else {
                return Ok(Where::Home);
            };
            let Some(host) = hosts::by_id(&state.db, host_id).await? else {
                return Ok(Where::Home);
            };
            let settings = &state.capsules.scheduler;
            if scheduler::has_room(&state.db, settings, &host, &demand_of(&row)).await? {
                return Ok(Where::Home);
            }
            let copy = store_copy(state, id).await.unwrap_or(false);
            if copy {
                tracing::info!(sandbox = %id, host = %HostId(host_id), "the capsule's host has no room for it; resuming it elsewhere if another has");
            }
            Ok(elsewhere_if(copy, Where::ElsewhereIfRoom))
        }
        _ => Ok(Where::Home),
    }
}

/// Moves the capsule to another host and resumes it there: `resuming` on the new host, then
/// `running`; if the import fails, back on its old host as it was.
pub(super) async fn resume_elsewhere(
    state: &AppState,
    id: SandboxId,
    route: SandboxRoute,
) -> Result<(), CapsuleError> {
    let row = sandboxes::by_id(&state.db, id.uuid())
        .await?
        .ok_or(CapsuleError::NotFound)?;
    let from_host = row
        .host_id
        .ok_or(CapsuleError::HostUnavailable(HostId(uuid::Uuid::nil())))?;
    // The copy holds the policy it was paused with; the capsule's own may have changed since,
    // and may not change again until the new host has it.
    let (egress, _held) = super::network::held_egress(state, id).await?;
    let relocation = Relocation {
        sandbox_id: id.uuid(),
        team_id: row.team_id,
        from_host,
        from_status: route.status,
        template_name: row.template.clone(),
        demand: demand_of(&row),
    };
    let Some(host) =
        scheduler::place_relocation(&state.db, &state.capsules.scheduler, &relocation).await?
    else {
        let now = sandboxes::status_of(&state.db, id.uuid())
            .await?
            .ok_or(CapsuleError::NotFound)?;
        return Err(CapsuleError::Busy(now));
    };
    let back = || async {
        if let Err(error) =
            sandboxes::move_back(&state.db, id.uuid(), host.id, from_host, route.status).await
        {
            tracing::error!(sandbox = %id, %error, "could not move a capsule back after a failed import; the reconciler settles it");
        }
    };
    let Some(target) = agent_target(state, &host) else {
        back().await;
        return Err(CapsuleError::HostUnavailable(HostId(host.id)));
    };
    tracing::info!(sandbox = %id, from = %HostId(from_host), to = %target.host, "resuming a paused capsule on another host");
    let agents = &state.capsules.agents;
    if let Err(error) = agents.import_sandbox(&target, id).await {
        tracing::warn!(sandbox = %id, host = %target.host, %error, "importing the capsule's store copy failed");
        back().await;
        return Err(match error {
            // The copy went meanwhile: the capsule can only resume where it was.
            AgentError::Rejected { status, .. } if status == http::StatusCode::NOT_FOUND => {
                match route.status {
                    SandboxStatus::Missing => CapsuleError::NotPaused(route.status),
                    _ => CapsuleError::HostUnavailable(HostId(from_host)),
                }
            }
            other => other.into(),
        });
    }
    match agents.resume_sandbox(&target, id, &egress).await {
        Ok(info) => settle(state, id, SandboxStatus::Resuming, &info).await,
        Err(error) => {
            match after_failed_operation(state, &target, id, SandboxStatus::Resuming, error).await?
            {
                None => Ok(()),
                Some(AgentError::Failed { message, .. }) => {
                    Err(CapsuleError::ResumeFailed { message })
                }
                Some(other) => Err(other.into()),
            }
        }
    }
}

/// Removes the capsule's copy from the store (a destroy while its host is away; a host that
/// holds the copy removes it itself). Best effort: a copy left behind is only space.
pub(super) async fn remove_store_copy(state: &AppState, id: SandboxId) {
    let Some(store) = &state.capsules.store else {
        return;
    };
    let key = stored_pause_key(id);
    let result = async {
        let Some(document) = store.get_document(&key).await? else {
            return Ok(());
        };
        if let Ok(copy) = serde_json::from_slice::<crate::agent::wire::StoredPause>(&document) {
            for part in &copy.parts {
                store.delete(&part.blob.sha256).await?;
            }
        }
        store.delete_document(&key).await
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(sandbox = %id, %error, "could not remove a destroyed capsule's copy from the template store");
    }
}
