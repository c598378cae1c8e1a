//! Pausing a sandbox to disk and resuming it. A pause writes the VM's whole state into
//! `snapshots/<id>/` (the writable disk stays in the sandbox directory), ends the VMM process
//! and releases the network slot: a paused sandbox holds no CPU, no RAM and no slot. A resume
//! restores the state into a new VMM process in any free slot (the guest's address is the same
//! in every slot), records it running, waits for envd and sends it its access token again with
//! the host's clock.
//!
//! Both are idempotent on the agent (pausing a paused sandbox answers it paused, resuming a
//! running one answers it running) and wait for another task's pause or resume in progress, so
//! the idle reaper, the envd proxy and the control plane never trip over each other. Whether
//! the public API calls that a conflict is the control plane's decision.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::record::RecordedState;
use super::{Runtime, Sandbox, SandboxError, SandboxManager};
use crate::agent::wire::{SandboxInfo, SandboxPhase};
use crate::envd::api::InitRequest;
use crate::envd::client::EnvdClient;
use crate::vmm::{AfterFailedPause, SnapshotFiles, VmStatus, VmmError};

/// How long envd in a restored guest may take to answer: it was running when the guest was
/// paused, so anything longer means the guest is not coming back.
const RESUMED_ENVD_WAIT: Duration = Duration::from_secs(20);
/// One readiness probe: a probe that hangs (a lost packet) is retried on a new connection.
pub(super) const ENVD_ATTEMPT: Duration = Duration::from_secs(2);

/// What a failed restore left: whether the snapshot can still be loaded.
pub(super) struct RestoreFailure {
    pub snapshot_intact: bool,
    pub reason: String,
}

impl SandboxManager {
    /// Pauses a running sandbox to disk; answers once the snapshot is durable and the VMM gone.
    /// The pause runs in its own task: a caller that goes away (an HTTP client that gave up)
    /// never leaves it half done.
    pub async fn pause(self: &Arc<Self>, id: &str) -> Result<SandboxInfo, SandboxError> {
        let this = self.clone();
        let owned = id.to_owned();
        let info = self
            .run_to_end(async move { this.pause_now(&owned, None).await })
            .await?;
        if info.status == SandboxPhase::Paused {
            self.copy_to_store_later(id);
        }
        Ok(info)
    }

    /// Pauses a running sandbox if it is still idle for longer than `timeout` when the pause
    /// begins (decided under the lifecycle lock, where a call takes its activity lease): the
    /// idle reaper's pause.
    pub async fn pause_if_idle(
        self: &Arc<Self>,
        id: &str,
        timeout: Duration,
    ) -> Result<SandboxInfo, SandboxError> {
        let this = self.clone();
        let owned = id.to_owned();
        let info = self
            .run_to_end(async move { this.pause_now(&owned, Some(timeout)).await })
            .await?;
        if info.status == SandboxPhase::Paused {
            self.copy_to_store_later(id);
        }
        Ok(info)
    }

    /// Resumes a paused sandbox; answers once envd in the restored guest answers. Runs in its
    /// own task, like [`pause`](Self::pause).
    pub async fn resume(self: &Arc<Self>, id: &str) -> Result<SandboxInfo, SandboxError> {
        let this = self.clone();
        let id = id.to_owned();
        self.run_to_end(async move { this.resume_now(&id).await })
            .await
    }

    async fn pause_now(
        &self,
        id: &str,
        only_if_idle_for: Option<Duration>,
    ) -> Result<SandboxInfo, SandboxError> {
        let sandbox = self.get(id)?;
        let mut runtime = loop {
            let phase = {
                let mut lifecycle = sandbox.lifecycle();
                match lifecycle.phase {
                    SandboxPhase::Running => {
                        if only_if_idle_for.is_some_and(|timeout| sandbox.idle_for() <= timeout) {
                            drop(lifecycle);
                            return Ok(sandbox.info());
                        }
                        lifecycle.transition(id, SandboxPhase::Pausing)?;
                        break lifecycle
                            .runtime
                            .take()
                            .expect("a running sandbox holds its runtime");
                    }
                    phase => phase,
                }
            };
            match phase {
                SandboxPhase::Paused => return Ok(sandbox.info()),
                SandboxPhase::Starting
                | SandboxPhase::Pausing
                | SandboxPhase::Resuming
                | SandboxPhase::Snapshotting => sandbox.settled_from(phase).await?,
                SandboxPhase::Running | SandboxPhase::Stopping => {
                    return Err(SandboxError::NotRunning {
                        id: id.to_owned(),
                        state: phase,
                    })
                }
            }
        };
        let started = Instant::now();
        let snapshot = SnapshotFiles::for_sandbox(&self.layout, id);
        match runtime.vm.pause_to(&snapshot).await {
            Ok(_) => self.paused(&sandbox, runtime, &snapshot, started).await,
            Err(error) if snapshot.meta.is_file() => {
                // The state is on disk and committed; only ending the VMM went wrong.
                tracing::warn!(sandbox = id, %error, "the VMM did not end cleanly after its snapshot; killing it");
                if let Err(error) = runtime.vm.kill().await {
                    tracing::warn!(sandbox = id, %error, "killing the VMM of a paused sandbox");
                }
                self.paused(&sandbox, runtime, &snapshot, started).await
            }
            Err(error) => {
                let disk_full = error.is_disk_full();
                let reason = error.to_string();
                match error {
                    VmmError::PauseFailed {
                        after: AfterFailedPause::Running | AfterFailedPause::Paused,
                        ..
                    } => {
                        tracing::warn!(sandbox = id, %reason, "pause failed; the sandbox runs on");
                        self.settle(&sandbox, SandboxPhase::Running, Some(runtime))
                            .await?;
                        Err(SandboxError::PauseFailed {
                            id: id.to_owned(),
                            reason,
                            disk_full,
                        })
                    }
                    _ => Err(self.lose(&sandbox, Some(runtime), reason).await),
                }
            }
        }
    }

    /// Ends a pause whose snapshot is on disk: the slot goes back to the pool, the record says
    /// paused, the phase too.
    async fn paused(
        &self,
        sandbox: &Sandbox,
        runtime: Runtime,
        snapshot: &SnapshotFiles,
        started: Instant,
    ) -> Result<SandboxInfo, SandboxError> {
        let id = sandbox.id();
        // A slot that cannot be fully removed stays reserved and is cleaned up by the next
        // agent start.
        if let Err(error) = self.network.destroy(&runtime.network).await {
            tracing::warn!(sandbox = %id, %error, "could not release the network of a paused sandbox");
        }
        drop(runtime);
        {
            let mut metadata = sandbox.metadata.lock().expect("metadata lock");
            metadata.insert("pause_ms".into(), started.elapsed().as_millis().to_string());
            metadata.insert(
                "snapshot_bytes".into(),
                snapshot.allocated_bytes().to_string(),
            );
        }
        // Should this fail, the record still says running; a restarted agent finds the
        // committed snapshot and takes the sandbox over as paused anyway.
        if let Err(error) = sandbox.record(RecordedState::Paused).save(&self.layout) {
            tracing::error!(sandbox = %id, %error, "could not record the pause");
        }
        self.settle(sandbox, SandboxPhase::Paused, None).await?;
        tracing::info!(sandbox = %id, elapsed = ?started.elapsed(), "sandbox paused");
        Ok(sandbox.info())
    }

    async fn resume_now(&self, id: &str) -> Result<SandboxInfo, SandboxError> {
        let sandbox = self.get(id)?;
        loop {
            let phase = {
                let mut lifecycle = sandbox.lifecycle();
                match lifecycle.phase {
                    SandboxPhase::Paused => {
                        lifecycle.transition(id, SandboxPhase::Resuming)?;
                        break;
                    }
                    phase => phase,
                }
            };
            match phase {
                SandboxPhase::Running => return Ok(sandbox.info()),
                SandboxPhase::Starting
                | SandboxPhase::Pausing
                | SandboxPhase::Resuming
                | SandboxPhase::Snapshotting => sandbox.settled_from(phase).await?,
                SandboxPhase::Paused | SandboxPhase::Stopping => {
                    return Err(SandboxError::NotRunning {
                        id: id.to_owned(),
                        state: phase,
                    })
                }
            }
        }
        let started = Instant::now();
        // The store's copy goes before the guest runs: from then on it would be older than the
        // guest, and a host importing it would lose what the guest wrote.
        if let Err(error) = self.drop_store_copy(&sandbox).await {
            tracing::warn!(sandbox = id, %error, "could not remove the paused sandbox's copy from the template store; resuming anyway, so another host must not import it");
        }
        match self.restore(&sandbox).await {
            Ok(runtime) => {
                *sandbox.guest_addr.lock().expect("addr lock") =
                    Some(runtime.network.envd_addr().ip().to_string());
                sandbox.metadata.lock().expect("metadata lock").insert(
                    "resume_ms".into(),
                    started.elapsed().as_millis().to_string(),
                );
                self.settle(&sandbox, SandboxPhase::Running, Some(runtime))
                    .await?;
                sandbox.touch();
                tracing::info!(sandbox = id, elapsed = ?started.elapsed(), "sandbox resumed");
                Ok(sandbox.info())
            }
            Err(RestoreFailure {
                snapshot_intact: true,
                reason,
            }) => {
                tracing::warn!(sandbox = id, %reason, "resume failed; the sandbox stays paused");
                self.settle(&sandbox, SandboxPhase::Paused, None).await?;
                Err(SandboxError::ResumeFailed {
                    id: id.to_owned(),
                    reason,
                })
            }
            Err(RestoreFailure {
                snapshot_intact: false,
                reason,
            }) => Err(self.lose(&sandbox, None, reason).await),
        }
    }

    /// Starts a new VMM from the sandbox's snapshot in a fresh network slot and brings envd
    /// back; on failure nothing of it is left running.
    pub(super) async fn restore(&self, sandbox: &Sandbox) -> Result<Runtime, RestoreFailure> {
        let id = sandbox.id();
        let snapshot = SnapshotFiles::for_sandbox(&self.layout, &id);
        let intact = |reason: String| RestoreFailure {
            snapshot_intact: snapshot.meta.is_file(),
            reason,
        };
        let image = self.base_image(&sandbox.request);
        let network = self
            .network
            .create(&id, &sandbox.egress())
            .await
            .map_err(|e| intact(format!("creating the network: {e}")))?;
        let undo_network = || async {
            if let Err(error) = self.network.destroy(&network).await {
                tracing::error!(sandbox = %id, %error, "could not remove the network of a failed resume");
            }
        };
        let spec = self.vm_spec(&sandbox.request, &image, &network);
        let mut vm = match self.vmm.restore(&spec, &snapshot).await {
            Ok(vm) => vm,
            Err(error) => {
                undo_network().await;
                return Err(intact(format!("restoring the VM: {error}")));
            }
        };
        // The guest runs again and its snapshot is retired: from here on the sandbox is this
        // VM, and a restarted agent must adopt it, so it is recorded before anything else.
        let recorded = RecordedState::Running {
            vmm_pid: vm.pid(),
            slot: network.slot,
        };
        if let Err(error) = sandbox.record(recorded).save(&self.layout) {
            tracing::error!(sandbox = %id, %error, "could not record the resume; a restarted agent will not adopt this sandbox");
        }
        let address = format!("http://{}", network.envd_addr());
        let envd = EnvdClient::new(&address)
            .expect("a socket address is a valid envd base")
            .with_token(sandbox.access_token().into_exposed());
        // Killing a guest that runs would lose the sandbox for good; one whose envd is slow to
        // answer is kept, and its next call tells whether it recovered.
        match self.await_envd(&id, &envd, RESUMED_ENVD_WAIT).await {
            Ok(()) => {
                // The same token again (it never left the guest's memory, and a crash between
                // here and a record of a new one could not lose it), and the host's clock: the
                // guest's wall clock stood still while it was paused.
                let init = InitRequest {
                    access_token: Some(sandbox.access_token()),
                    wall_clock_unix_ms: Some(chrono::Utc::now().timestamp_millis()),
                    ..InitRequest::default()
                };
                match tokio::time::timeout(RESUMED_ENVD_WAIT, envd.init(&init)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(sandbox = %id, %error, "re-initialising envd after the resume failed; its clock may be behind")
                    }
                    Err(_) => {
                        tracing::warn!(sandbox = %id, "re-initialising envd after the resume timed out; its clock may be behind")
                    }
                }
            }
            Err(reason) if matches!(vm.status().await, Ok(VmStatus::Running)) => {
                tracing::warn!(sandbox = %id, %reason, "resumed, but envd does not answer yet; keeping the running VM");
            }
            Err(reason) => {
                if let Err(error) = vm.kill().await {
                    tracing::error!(sandbox = %id, %error, "could not kill a restored VM that failed");
                }
                undo_network().await;
                return Err(intact(reason));
            }
        }
        Ok(Runtime { network, vm, envd })
    }

    /// Waits up to `within` for envd in a guest that was running (a restored or an adopted
    /// one), retrying probes that hang; the error says why, with the console's last lines.
    pub(super) async fn await_envd(
        &self,
        id: &str,
        envd: &EnvdClient,
        within: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let error = match tokio::time::timeout(ENVD_ATTEMPT, envd.health()).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {ENVD_ATTEMPT:?}"),
            };
            if Instant::now() > deadline {
                return Err(format!(
                    "envd did not answer within {within:?}: {error}; console: {}",
                    self.console_tail(id)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends an operation: moves to `phase` (with `runtime` when it is `Running`). If a destroy
    /// arrived meanwhile (the sandbox is `Stopping`), tears the sandbox down instead and says so.
    pub(super) async fn settle(
        &self,
        sandbox: &Sandbox,
        phase: SandboxPhase,
        runtime: Option<Runtime>,
    ) -> Result<(), SandboxError> {
        let id = sandbox.id();
        let refused = {
            let mut lifecycle = sandbox.lifecycle();
            match lifecycle.transition(&id, phase) {
                Ok(()) => {
                    lifecycle.runtime = runtime;
                    return Ok(());
                }
                Err(_) => runtime,
            }
        };
        tracing::info!(sandbox = %id, %phase, "destroyed during an operation; tearing down");
        let _ = self.teardown(sandbox, refused).await;
        Err(SandboxError::DestroyedBefore { id, phase })
    }

    /// Removes a sandbox whose VM is gone and remembers why, for the control plane.
    pub(super) async fn lose(
        &self,
        sandbox: &Sandbox,
        runtime: Option<Runtime>,
        reason: String,
    ) -> SandboxError {
        let id = sandbox.id();
        tracing::error!(sandbox = %id, %reason, "sandbox lost");
        let runtime = {
            let mut lifecycle = sandbox.lifecycle();
            // Refused only when a destroy already made it `Stopping`; that destroy waits for
            // this teardown either way.
            let _ = lifecycle.transition(&id, SandboxPhase::Stopping);
            runtime.or_else(|| lifecycle.runtime.take())
        };
        self.remember(sandbox.request.sandbox_id, &reason);
        let _ = self.teardown(sandbox, runtime).await;
        SandboxError::Lost { id, reason }
    }
}
