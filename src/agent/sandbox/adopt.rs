//! Taking over from an earlier agent process (a restart, an upgrade, a crash or a SIGKILL, or a
//! host reboot). Each sandbox's record (`record`) says where it was when it last settled:
//!
//! - `paused`: it is registered paused again, resumable as before, as long as its snapshot is
//!   on disk. After a host reboot this is how sandboxes survive.
//! - `running`: its VMM process is adopted (`Vmm::adopt`) in its network slot and envd is asked
//!   whether it answers; the sandbox runs on without noticing (a VM frozen half way through a
//!   pause is paused to the end; a record the old agent had no time to update after a pause's
//!   snapshot was committed is taken as paused). If the VMM or its slot is gone (the host
//!   rebooted, or the VM died with the agent down), the sandbox is lost: its files are removed
//!   and the control plane learns why from the agent's list of lost sandboxes.
//!
//! Whatever no record explains is a leftover and removed: VMM processes of sandboxes without
//! a record (a create the old agent did not finish), sandbox and snapshot directories, network
//! slots, and the cgroups of VMs that are not running (an adopted VM keeps its own).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::record::{RecordedState, SandboxRecord};
use super::{Runtime, Sandbox, SandboxError, SandboxManager};
use crate::agent::wire::SandboxPhase;
use crate::envd::client::EnvdClient;
use crate::vmm::{find_leftovers, kill_leftover, Leftover, SnapshotFiles, VmStatus};

/// How long envd in an adopted VM may take to answer.
const ADOPTED_ENVD_WAIT: Duration = Duration::from_secs(10);

/// What a start-up found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Running sandboxes whose VMM was adopted.
    pub adopted: Vec<String>,
    /// Paused sandboxes registered again.
    pub paused: Vec<String>,
    /// Sandboxes that could not be taken over, with why.
    pub lost: Vec<(String, String)>,
    /// Directories without a usable record, removed.
    pub removed: Vec<String>,
}

impl SandboxManager {
    /// Takes over what an earlier agent process left on this host, before serving. Called
    /// when this process owns no sandbox yet.
    pub async fn recover(&self) -> Result<Recovery, SandboxError> {
        let mut recovery = Recovery::default();
        let mut vmms = find_leftovers(&self.layout);
        let mut keep_slots = Vec::new();
        let dir = self.layout.sandboxes_dir();
        let entries = std::fs::read_dir(&dir).map_err(|source| SandboxError::Io {
            what: format!("reading {}", dir.display()),
            source,
        })?;
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let record_path = self.layout.sandbox_record(&id);
            if !record_path.exists() {
                // A create that never finished: nothing was promised to anyone.
                self.remove_leftover(&id, &mut vmms).await;
                recovery.removed.push(id);
                continue;
            }
            let outcome = match SandboxRecord::load(&record_path) {
                Ok(record) if record.request.sandbox_id.to_string() == id => {
                    self.take_over(record, &mut vmms).await
                }
                Ok(record) => Err(format!(
                    "its record names another sandbox, {}",
                    record.request.sandbox_id
                )),
                Err(reason) => Err(format!("its record is unusable: {reason}")),
            };
            match outcome {
                Ok(Taken::Running { slot }) => {
                    keep_slots.push(slot);
                    recovery.adopted.push(id);
                }
                Ok(Taken::Paused) => recovery.paused.push(id),
                Err(reason) => {
                    tracing::warn!(sandbox = %id, %reason, "sandbox lost across the agent restart");
                    self.remove_leftover(&id, &mut vmms).await;
                    if let Ok(sandbox_id) = id.parse() {
                        self.remember(sandbox_id, &reason);
                    }
                    recovery.lost.push((id, reason));
                }
            }
        }
        // VMMs whose sandbox directory is gone entirely.
        for leftover in vmms {
            tracing::info!(sandbox = %leftover.sandbox_id, pid = leftover.pid, "killing a VMM without a sandbox");
            kill_leftover(&leftover).await;
        }
        self.remove_orphan_snapshots();
        self.collect_boot_snapshots();
        self.collect_snapshot_template_leftovers();
        self.remove_leftover_confinement(&recovery.adopted).await;
        let slots = self.network.cleanup_leftovers(&keep_slots).await?;
        tracing::info!(
            adopted = recovery.adopted.len(),
            paused = recovery.paused.len(),
            lost = recovery.lost.len(),
            removed = recovery.removed.len(),
            slots_cleaned = ?slots,
            "took over from the previous agent process"
        );
        Ok(recovery)
    }

    /// Registers the sandbox `record` describes, adopting its VMM if it was running.
    async fn take_over(
        &self,
        record: SandboxRecord,
        vmms: &mut Vec<Leftover>,
    ) -> Result<Taken, String> {
        let id = record.request.sandbox_id.to_string();
        match record.state {
            RecordedState::Paused => {
                if !self.layout.snapshot_meta(&id).is_file() {
                    return Err("it was paused, but its snapshot is not on disk".into());
                }
                if let Some(i) = vmms.iter().position(|l| l.sandbox_id == id) {
                    // A VMM of a paused sandbox can only be one restoring it when the old agent
                    // died: the snapshot's guest may have run, so neither is trustworthy.
                    kill_leftover(&vmms.remove(i)).await;
                    return Err("the previous agent died while resuming it".into());
                }
                self.register(Sandbox::recovered(record, SandboxPhase::Paused), None);
                Ok(Taken::Paused)
            }
            RecordedState::Running { .. } if self.layout.snapshot_meta(&id).is_file() => {
                // The old agent died between committing a pause's snapshot and recording it:
                // the snapshot is whole (a restore retires it before the guest runs), so the
                // sandbox is paused, and any VMM left of it is stale.
                while let Some(i) = vmms.iter().position(|l| l.sandbox_id == id) {
                    kill_leftover(&vmms.remove(i)).await;
                }
                self.register(Sandbox::recovered(record, SandboxPhase::Paused), None);
                Ok(Taken::Paused)
            }
            RecordedState::Running { vmm_pid, slot } => {
                let Some(i) = vmms
                    .iter()
                    .position(|l| l.sandbox_id == id && l.pid == vmm_pid)
                else {
                    return Err(
                        "its VM stopped while no agent ran (the host restarted, or the VMM died)"
                            .into(),
                    );
                };
                let network = self
                    .network
                    .adopt(slot, &id, &record.request.egress)
                    .await
                    .map_err(|e| format!("its network could not be taken over: {e}"))?;
                let image = self.base_image(&record.request);
                let spec = self.vm_spec(&record.request, &image, &network);
                let envd = EnvdClient::new(&format!("http://{}", network.envd_addr()))
                    .expect("a socket address is a valid envd base")
                    .with_token(record.access_token.expose());
                let mut vm = self
                    .vmm
                    .adopt(&spec, vmm_pid)
                    .await
                    .map_err(|e| format!("its VMM could not be adopted: {e}"))?;
                vmms.remove(i);
                if let Ok(VmStatus::Paused) = vm.status().await {
                    // Frozen half way through a pause when the old agent died: finish it.
                    let snapshot = SnapshotFiles::for_sandbox(&self.layout, &id);
                    if let Err(error) = vm.pause_to(&snapshot).await {
                        let _ = vm.kill().await;
                        return Err(format!(
                            "the previous agent died while pausing it, and the pause could not be finished: {error}"
                        ));
                    }
                    self.register(Sandbox::recovered(record, SandboxPhase::Paused), None);
                    return Ok(Taken::Paused);
                }
                if let Err(reason) = self.await_envd(&id, &envd, ADOPTED_ENVD_WAIT).await {
                    // The VM runs: killing it would lose the sandbox for good.
                    tracing::warn!(sandbox = %id, %reason, "adopted, but envd does not answer yet; keeping the running VM");
                }
                let sandbox = Sandbox::recovered(record, SandboxPhase::Running);
                *sandbox.guest_addr.lock().expect("addr lock") =
                    Some(network.envd_addr().ip().to_string());
                self.register(sandbox, Some(Runtime { network, vm, envd }));
                Ok(Taken::Running { slot })
            }
        }
    }

    fn register(&self, sandbox: Sandbox, runtime: Option<Runtime>) {
        sandbox.lifecycle().runtime = runtime;
        let sandbox = Arc::new(sandbox);
        tracing::info!(sandbox = %sandbox.id(), phase = %sandbox.phase(), "sandbox taken over");
        self.registry().insert(sandbox.id(), sandbox);
    }

    /// Kills the sandbox's VMM if one runs and removes its directories.
    async fn remove_leftover(&self, id: &str, vmms: &mut Vec<Leftover>) {
        let mut i = 0;
        while i < vmms.len() {
            if vmms[i].sandbox_id == id {
                let leftover = vmms.remove(i);
                tracing::info!(sandbox = id, pid = leftover.pid, "killing a leftover VMM");
                kill_leftover(&leftover).await;
            } else {
                i += 1;
            }
        }
        for dir in [self.layout.sandbox_dir(id), self.layout.snapshot_dir(id)] {
            if let Err(error) = std::fs::remove_dir_all(&dir) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %dir.display(), %error, "could not remove a leftover");
                }
            }
        }
    }

    /// Cgroups and Firecracker jails of VMs that no longer run: a VMM that died, or was killed
    /// above, while no agent watched it. Whatever still runs in a cgroup is killed first.
    async fn remove_leftover_confinement(&self, adopted: &[String]) {
        let jails = std::fs::read_dir(self.layout.jails_dir())
            .into_iter()
            .flatten()
            .flatten();
        for exec in jails {
            for jail in std::fs::read_dir(exec.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if adopted.iter().any(|id| jail.file_name() == id.as_str()) {
                    continue;
                }
                tracing::info!(path = %jail.path().display(), "removing a leftover jail");
                if let Err(error) = std::fs::remove_dir_all(jail.path()) {
                    tracing::warn!(path = %jail.path().display(), %error, "could not remove a leftover jail");
                }
            }
        }
        let cgroups = &self.confinement.cgroups;
        for id in cgroups.existing() {
            if adopted.contains(&id) {
                continue;
            }
            tracing::info!(sandbox = %id, "removing a leftover cgroup");
            if let Err(error) = cgroups.vm(&id).kill_and_remove().await {
                tracing::warn!(sandbox = %id, %error, "could not remove a leftover cgroup");
            }
        }
    }

    /// Snapshot directories whose sandbox directory (and record) is gone: a destroy that
    /// crashed half way.
    fn remove_orphan_snapshots(&self) {
        let known: HashSet<String> = self.registry().keys().cloned().collect();
        let Ok(entries) = std::fs::read_dir(self.layout.snapshots_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.path() == self.layout.boot_snapshots_dir() {
                continue;
            }
            // No fork outlives the agent that made it: what one left is removed whole.
            let id = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&id) {
                if let Err(error) = std::fs::remove_dir_all(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), %error, "could not remove a leftover snapshot");
                }
            }
        }
    }
}

/// A sandbox taken over, and in what state.
enum Taken {
    Running { slot: u32 },
    Paused,
}
