//! The reconciler: one background task that periodically compares the database's sandboxes with
//! what each host's agent reports, and fixes the database (and removes orphans from agents).
//!
//! - Host unreachable (by heartbeat, or its agent does not answer the list call): its `running`
//!   and `paused` sandboxes become `missing`.
//! - Host answers: a `running`, `paused` or `missing` sandbox the agent does not have became
//!   `stopped` (its VM was lost: the agent's list of lost sandboxes says why, and the reason is
//!   kept in the sandbox's metadata); otherwise the sandbox takes the agent's status, `running`
//!   or `paused` (the agent pauses idle sandboxes by itself and resumes them on a call).
//! - A `pausing` or `resuming` sandbox long past the operation's timeout (the control plane died
//!   during it) takes the agent's status too.
//! - The agent runs a sandbox the database holds as `stopped`/`error` (or not at all): a destroy
//!   or a create whose outcome was unknown; the reconciler destroys it on the agent. So is one
//!   the database holds on another host (it was resumed there from the template store), once
//!   that resume has finished.
//! - A sandbox still `pending` or `starting` a minute past the create timeout (the control plane
//!   died during its create) becomes `error`, releasing its reservation.
//! - A `stopping` sandbox the agent no longer has is `stopped`; one it still runs past the
//!   request timeout (the destroy failed) is destroyed again.
//! - The template images the agent reports are recorded as the host's (`host_templates`), for
//!   the scheduler, which prefers hosts that hold a capsule's template.
//!
//! Hosts are visited concurrently, each visit with a deadline, and each reads only the sandboxes
//! that may still hold resources (a partial index leaves out the ever-growing stopped history).
//!
//! Every change is a compare-and-set from the status the pass saw, refused if the row changed
//! after the agent's list was taken, so a create or destroy racing with a pass is never undone.

use std::collections::HashMap;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::services::capsules::{agent_target, has_store_copy};
use super::state::AppState;
use crate::agent::wire::SandboxPhase;
use crate::db::host_templates;
use crate::db::hosts::{self, Host, HostStatus};
use crate::db::sandboxes::{self, SandboxStatus, Transition};
use crate::db::DbError;
use crate::id::{HostId, SandboxId};

/// What one pass changed, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub missing: Vec<SandboxId>,
    pub stopped: Vec<SandboxId>,
    pub recovered: Vec<SandboxId>,
    /// Paused by the agent on its own (idle).
    pub paused: Vec<SandboxId>,
    /// `pending` long past the create timeout: the create was abandoned.
    pub abandoned: Vec<SandboxId>,
    pub orphans_destroyed: Vec<SandboxId>,
    /// Hosts whose agent did not answer.
    pub unreachable_hosts: Vec<HostId>,
    /// Hosts whose visit overran its deadline and was cut short.
    pub overran_hosts: Vec<HostId>,
    /// Template builds whose control plane stopped running them, ended as `error`.
    pub abandoned_builds: usize,
}

/// Runs passes every `state.capsules.reconcile_interval` until `cancel` fires.
pub async fn run(state: AppState, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(state.capsules.reconcile_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            result = reconcile_once(&state) => {
                if let Err(error) = result {
                    tracing::warn!(%error, "reconciler pass failed; retrying next period");
                }
            }
        }
    }
}

impl PassReport {
    fn merge(&mut self, other: PassReport) {
        let PassReport {
            missing,
            stopped,
            recovered,
            paused,
            abandoned,
            orphans_destroyed,
            unreachable_hosts,
            overran_hosts,
            abandoned_builds,
        } = other;
        self.missing.extend(missing);
        self.stopped.extend(stopped);
        self.recovered.extend(recovered);
        self.paused.extend(paused);
        self.abandoned.extend(abandoned);
        self.orphans_destroyed.extend(orphans_destroyed);
        self.unreachable_hosts.extend(unreachable_hosts);
        self.overran_hosts.extend(overran_hosts);
        self.abandoned_builds += abandoned_builds;
    }
}

/// Hosts visited at once. Visits wait mostly on agents, so a slow or partitioned host holds up
/// one slot, not the pass.
const CONCURRENT_HOSTS: usize = 16;

/// One pass over every registered host, [`CONCURRENT_HOSTS`] at a time, each visit cut short
/// after a deadline (every change is a compare-and-set, so a visit cut anywhere leaves nothing
/// half done; the next pass carries on). A database error on one host does not stop the others;
/// the first is returned after all were visited.
pub async fn reconcile_once(state: &AppState) -> Result<PassReport, DbError> {
    let deadline = state
        .capsules
        .reconcile_interval
        .max(state.capsules.agents.timeouts().request * 2);
    let mut visits = futures::stream::iter(hosts::list_registered(&state.db).await?)
        .map(|host| async move {
            let mut report = PassReport::default();
            match tokio::time::timeout(deadline, reconcile_host(state, &host, &mut report)).await
            {
                Ok(Ok(())) => Ok(report),
                Ok(Err(error)) => {
                    tracing::warn!(host = %HostId(host.id), %error, "reconciling a host failed");
                    Err(error)
                }
                Err(_) => {
                    tracing::warn!(host = %HostId(host.id), ?deadline, "reconciling a host overran its deadline; the next pass continues");
                    report.overran_hosts.push(HostId(host.id));
                    Ok(report)
                }
            }
        })
        .buffer_unordered(CONCURRENT_HOSTS);
    let mut report = PassReport::default();
    let mut first_error = None;
    match crate::cp::services::builds::end_abandoned(state).await {
        Ok(ended) => report.abandoned_builds = ended,
        Err(error) => {
            first_error = Some(error);
        }
    }
    crate::cp::services::templates::publish_unpublished_snapshots_later(state);
    while let Some(visit) = visits.next().await {
        match visit {
            Ok(visited) => report.merge(visited),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(report),
    }
}

/// Whether the sandbox's row is `resuming` on another host: a relocation in progress, whose
/// import still needs the store copy this host's teardown would remove.
async fn moving_elsewhere(state: &AppState, id: SandboxId) -> Result<bool, DbError> {
    Ok(sandboxes::status_of(&state.db, id.uuid()).await? == Some(SandboxStatus::Resuming))
}

async fn mark_missing(
    state: &AppState,
    host: &Host,
    report: &mut PassReport,
) -> Result<(), DbError> {
    for id in sandboxes::transition_on_host(&state.db, host.id, SandboxStatus::Missing).await? {
        tracing::warn!(sandbox = %SandboxId(id), host = %HostId(host.id), "host unreachable; sandbox missing");
        report.missing.push(SandboxId(id));
    }
    Ok(())
}

async fn reconcile_host(
    state: &AppState,
    host: &Host,
    report: &mut PassReport,
) -> Result<(), DbError> {
    let target = match (host.status, agent_target(state, host)) {
        (HostStatus::Online, Some(target)) => target,
        _ => return mark_missing(state, host, report).await,
    };
    let seen = sandboxes::db_now(&state.db).await?;
    let on_agent = match state.capsules.agents.list_sandboxes(&target).await {
        Ok(list) => list,
        Err(error) => {
            tracing::warn!(host = %target.host, %error, "agent did not list its sandboxes");
            report.unreachable_hosts.push(target.host);
            return mark_missing(state, host, report).await;
        }
    };
    host_templates::record(&state.db, host.id, &on_agent.templates).await?;
    let agent_has: HashMap<SandboxId, SandboxPhase> = on_agent
        .sandboxes
        .iter()
        .map(|s| (s.sandbox_id, s.status))
        .collect();
    let lost: HashMap<SandboxId, &str> = on_agent
        .lost
        .iter()
        .map(|l| (l.sandbox_id, l.reason.as_str()))
        .collect();
    let in_db = sandboxes::live_rows_on_host(&state.db, host.id).await?;
    let create_grace = chrono::Duration::from_std(state.capsules.agents.timeouts().create)
        .unwrap_or(chrono::Duration::MAX)
        + chrono::Duration::minutes(1);
    let destroy_grace = chrono::Duration::from_std(state.capsules.agents.timeouts().request)
        .unwrap_or(chrono::Duration::MAX);
    let mut known = HashMap::with_capacity(in_db.len());
    for row in &in_db {
        let id = SandboxId(row.id);
        known.insert(id, (row.status, seen - row.last_updated));
        if row.last_updated > seen {
            continue;
        }
        let on_agent = agent_has.get(&id).copied();
        // What the agent says the sandbox is, when it has settled there.
        let agent_settled = match on_agent {
            Some(SandboxPhase::Running) => Some(SandboxStatus::Running),
            Some(SandboxPhase::Paused) => Some(SandboxStatus::Paused),
            Some(
                SandboxPhase::Starting
                | SandboxPhase::Pausing
                | SandboxPhase::Resuming
                | SandboxPhase::Snapshotting
                | SandboxPhase::Stopping,
            )
            | None => None,
        };
        // A create or operation outlives its timeout only if the control plane died during it;
        // the row would otherwise hold its host's capacity forever. Failing it lets the next
        // pass remove any VM the agent finished building.
        let abandoned = seen - row.last_updated > create_grace;
        let next = match row.status {
            SandboxStatus::Running | SandboxStatus::Paused | SandboxStatus::Missing => {
                match (on_agent, agent_settled) {
                    (None, _) => Some(SandboxStatus::Stopped),
                    (Some(_), Some(status)) => (status != row.status).then_some(status),
                    (Some(_), None) => None,
                }
            }
            SandboxStatus::Stopping => on_agent.is_none().then_some(SandboxStatus::Stopped),
            // A relocation whose control plane died: the host never took the capsule in,
            // but the store still holds it, so it can be resumed (moved) again.
            SandboxStatus::Resuming
                if abandoned && on_agent.is_none() && has_store_copy(state, id).await =>
            {
                Some(SandboxStatus::Missing)
            }
            SandboxStatus::Pausing | SandboxStatus::Resuming | SandboxStatus::Snapshotting
                if abandoned =>
            {
                match on_agent {
                    None => Some(SandboxStatus::Stopped),
                    Some(_) => agent_settled,
                }
            }
            SandboxStatus::Pending | SandboxStatus::Starting => {
                abandoned.then_some(SandboxStatus::Failed)
            }
            // Operations in progress settle by themselves; final statuses stay final.
            SandboxStatus::Pausing
            | SandboxStatus::Resuming
            | SandboxStatus::Snapshotting
            | SandboxStatus::Stopped
            | SandboxStatus::Failed => None,
        };
        let Some(next) = next else { continue };
        let reason = match next {
            SandboxStatus::Stopped if row.status != SandboxStatus::Stopping => Some(
                lost.get(&id)
                    .copied()
                    .unwrap_or("its host no longer has it (the VM ended or the host restarted)"),
            ),
            _ => None,
        };
        let mut change = Transition {
            unchanged_since: Some(seen),
            ..Transition::to(next).from(row.status)
        };
        if let Some(reason) = reason {
            change = change.because(reason);
        }
        if sandboxes::transition(&state.db, row.id, change).await? {
            tracing::info!(sandbox = %id, from = %row.status, to = %next, reason, "reconciled with the agent");
            match next {
                SandboxStatus::Stopped => report.stopped.push(id),
                SandboxStatus::Failed => report.abandoned.push(id),
                SandboxStatus::Paused => report.paused.push(id),
                _ => report.recovered.push(id),
            }
        }
    }
    for (id, agent_status) in agent_has {
        let orphan = match known.get(&id) {
            None => true,
            Some((SandboxStatus::Stopped | SandboxStatus::Failed, _)) => true,
            Some((SandboxStatus::Stopping, age)) => *age > destroy_grace,
            Some(_) => false,
        };
        // A sandbox still starting may belong to a create the control plane gave up on; it is
        // destroyed once the agent has finished with it.
        let settled = matches!(agent_status, SandboxPhase::Running | SandboxPhase::Paused);
        if !orphan || !settled {
            continue;
        }
        if !known.contains_key(&id) && moving_elsewhere(state, id).await? {
            // Its copy is being resumed on another host; this host's copy of it is removed
            // once that has finished (the row is then live there, and this is an orphan).
            continue;
        }
        // Its copy in the store is not this host's to remove: the capsule may live on elsewhere.
        match state
            .capsules
            .agents
            .destroy_sandbox_here(&target, id)
            .await
        {
            Ok(()) => {
                tracing::info!(sandbox = %id, host = %target.host, "destroyed a sandbox the control plane no longer runs");
                report.orphans_destroyed.push(id);
            }
            Err(error) => {
                tracing::warn!(sandbox = %id, host = %target.host, %error, "could not destroy an orphaned sandbox")
            }
        }
    }
    Ok(())
}
