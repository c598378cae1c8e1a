//! Destroying a sandbox, exactly once. Whoever moves the phase to `Stopping` (under the lock
//! that holds the runtime) takes the runtime and tears the sandbox down; every other destroy of
//! that sandbox (a second DELETE, the idle reaper, a graceful agent stop) finds it `Stopping`
//! and waits for that teardown to end, then reports its outcome. A sandbox that is already gone
//! is `NotFound`.

use std::sync::Arc;
use std::time::Duration;

use super::{Runtime, Sandbox, SandboxError, SandboxManager, TeardownOutcome};
use crate::agent::wire::SandboxPhase;

/// How long a graceful guest shutdown may take before the VMM is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long envd may take to accept the request to shut the guest down.
const ENVD_SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// What a destroy call does, decided under the lifecycle lock.
// One lives on the stack for the length of one call; boxing the runtime would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Role {
    /// This call tears down; it holds the runtime (none when create never finished one).
    TearDown(Option<Runtime>),
    /// Another task tears down: the one that marked the sandbox `Stopping`, or the one whose
    /// operation (a start, pause, resume or snapshot) holds the runtime now.
    Wait,
}

impl SandboxManager {
    /// Destroys the sandbox on this host only: its copy in the template store stays (the
    /// control plane's reconciler removing a stale copy of a capsule that lives on, or is being
    /// resumed, on another host, which may still need the store's copy).
    pub async fn destroy_here(self: &Arc<Self>, id: &str) -> Result<(), SandboxError> {
        self.get(id)?.store_copy.keep_in_store();
        self.destroy(id).await
    }

    /// Stops the VM (graceful, then forced) and releases the network, disk and directory; or,
    /// when another caller is already doing so, waits for it to finish.
    pub async fn destroy(self: &Arc<Self>, id: &str) -> Result<(), SandboxError> {
        let sandbox = self.get(id)?;
        let role = {
            let mut lifecycle = sandbox.lifecycle();
            match lifecycle.phase {
                SandboxPhase::Running | SandboxPhase::Paused => {
                    lifecycle.transition(id, SandboxPhase::Stopping)?;
                    Role::TearDown(lifecycle.runtime.take())
                }
                SandboxPhase::Starting
                | SandboxPhase::Pausing
                | SandboxPhase::Resuming
                | SandboxPhase::Snapshotting => {
                    lifecycle.transition(id, SandboxPhase::Stopping)?;
                    Role::Wait
                }
                SandboxPhase::Stopping => Role::Wait,
            }
        };
        match role {
            // Even while the agent shuts down: a sandbox left `stopping` by a caller that hung
            // up would refuse every later destroy until the agent restarts.
            Role::TearDown(runtime) => {
                let this = self.clone();
                self.in_own_task(async move { this.teardown(&sandbox, runtime).await })
                    .await
            }
            Role::Wait => wait_gone(&sandbox).await,
        }
    }

    /// Releases everything `runtime`, the sandbox directory and its snapshot hold, then forgets
    /// the sandbox.
    /// Every step runs even when an earlier one failed; the first failure is returned (and
    /// what it left is removed by the next agent's leftover clean-up).
    pub(super) async fn teardown(
        &self,
        sandbox: &Sandbox,
        runtime: Option<Runtime>,
    ) -> Result<(), SandboxError> {
        let id = sandbox.id();
        let mut result = Ok(());
        if let Some(mut runtime) = runtime {
            // A guest that accepts the request but never answers must not hold the destroy.
            match tokio::time::timeout(ENVD_SHUTDOWN_WAIT, runtime.envd.shutdown()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(sandbox = %id, %error, "envd shutdown request failed; stopping the VM")
                }
                Err(_) => {
                    tracing::debug!(sandbox = %id, "envd did not answer the shutdown request; stopping the VM")
                }
            }
            if let Err(error) = runtime.vm.shutdown(SHUTDOWN_GRACE).await {
                tracing::warn!(sandbox = %id, %error, "graceful VM shutdown failed; killed");
            }
            if let Err(error) = self.network.destroy(&runtime.network).await {
                result = Err(SandboxError::from(error));
            }
        }
        if let Err(error) = self.drop_store_copy(sandbox).await {
            tracing::warn!(sandbox = %id, %error, "could not remove the sandbox's copy from the template store");
        }
        // The record (in the sandbox directory) first: after a crash in between, a snapshot
        // without a record is a leftover to remove, while a record without its snapshot would
        // look like a paused sandbox that was lost.
        for dir in [self.layout.sandbox_dir(&id), self.layout.snapshot_dir(&id)] {
            match std::fs::remove_dir_all(&dir) {
                Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                    let error = SandboxError::Io {
                        what: format!("removing {}", dir.display()),
                        source,
                    };
                    match result {
                        Ok(()) => result = Err(error),
                        Err(_) => {
                            tracing::error!(sandbox = %id, %error, "could not remove a sandbox directory")
                        }
                    }
                }
                Ok(()) | Err(_) => {}
            }
        }
        match &result {
            Ok(()) => tracing::info!(sandbox = %id, "sandbox destroyed"),
            Err(error) => {
                tracing::error!(sandbox = %id, %error, "sandbox destroyed, leaving host resources behind")
            }
        }
        self.forget(sandbox, result.as_ref().copied().map_err(|e| e.to_string()));
        result
    }

    /// Removes the sandbox from the registry and wakes the destroys waiting for it.
    pub(super) fn forget(&self, sandbox: &Sandbox, outcome: TeardownOutcome) {
        self.registry().remove(&sandbox.id());
        sandbox.gone.send_replace(Some(outcome));
    }

    /// Destroys every sandbox and then the host firewall table they needed; at agent shutdown.
    pub async fn destroy_all(self: &Arc<Self>) {
        let sandboxes: Vec<Arc<Sandbox>> = self.registry().values().cloned().collect();
        for sandbox in sandboxes {
            let id = sandbox.id();
            match self.destroy(&id).await {
                // Gone in the meantime: someone else's destroy finished first.
                Ok(()) | Err(SandboxError::NotFound(_)) => {}
                Err(error) => tracing::warn!(sandbox = %id, %error, "destroy at shutdown failed"),
            }
        }
        if let Err(error) = self.network.remove_host_table().await {
            tracing::warn!(%error, "could not remove the host firewall table at shutdown");
        }
    }
}

/// Waits for the teardown another task is doing and reports its outcome as this caller's.
async fn wait_gone(sandbox: &Sandbox) -> Result<(), SandboxError> {
    let mut gone = sandbox.gone.subscribe();
    let outcome = gone
        .wait_for(Option::is_some)
        .await
        .expect("the sender lives in the sandbox this call holds")
        .clone();
    match outcome.expect("wait_for returned a finished teardown") {
        Ok(()) => Ok(()),
        Err(reason) => Err(SandboxError::TeardownFailed {
            id: sandbox.id(),
            reason,
        }),
    }
}
