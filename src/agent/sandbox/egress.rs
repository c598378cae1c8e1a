//! Changing a sandbox's egress policy while it lives: applied to its network at once while it
//! runs, and kept in its record (so an adopting agent, a resume and a relocation find it) while
//! it runs or is paused. A sandbox on its way between the two is refused, not waited for: the
//! control plane's call must not outlast its own timeout, and the next resume carries the
//! control plane's policy anyway.

use std::sync::Arc;

use crate::agent::network::NetworkError;
use crate::agent::wire::SandboxPhase;
use crate::egress::EgressPolicy;

use super::record::SandboxRecord;
use super::{SandboxError, SandboxManager};

impl SandboxManager {
    pub async fn set_egress(
        self: &Arc<Self>,
        id: &str,
        policy: EgressPolicy,
    ) -> Result<(), SandboxError> {
        let policy = policy.normalised().map_err(SandboxError::Invalid)?;
        let this = self.clone();
        let id = id.to_owned();
        // In a task of its own: a caller that goes away cannot leave the kernel's table and the
        // record disagreeing.
        self.run_to_end(async move { this.set_egress_now(&id, policy).await })
            .await
    }

    async fn set_egress_now(&self, id: &str, policy: EgressPolicy) -> Result<(), SandboxError> {
        let sandbox = self.get(id)?;
        let _one_at_a_time = sandbox.egress_change.lock().await;
        let (phase, slot) = {
            let lifecycle = sandbox.lifecycle();
            let slot = lifecycle.runtime.as_ref().map(|r| r.network.slot);
            (lifecycle.phase, slot)
        };
        let busy = |phase| SandboxError::Busy {
            id: id.to_owned(),
            phase,
        };
        match (phase, slot) {
            (SandboxPhase::Running, Some(slot)) => {
                match self.network.set_egress(slot, id, policy.clone()).await {
                    Ok(()) => {}
                    // Paused meanwhile: its slot went with its runtime.
                    Err(NetworkError::NoSuchSlot(_)) => return Err(busy(SandboxPhase::Pausing)),
                    Err(error) => return Err(error.into()),
                }
            }
            (SandboxPhase::Paused, _) => {}
            (SandboxPhase::Stopping, _) => {
                return Err(SandboxError::NotRunning {
                    id: id.to_owned(),
                    state: phase,
                })
            }
            (phase, _) => return Err(busy(phase)),
        }
        *sandbox.egress.lock().expect("egress lock") = policy.clone();
        let path = self.layout.sandbox_record(id);
        if let Ok(mut record) = SandboxRecord::load(&path) {
            record.request.egress = policy;
            record.save(&self.layout)?;
        }
        tracing::info!(sandbox = id, "egress policy replaced");
        Ok(())
    }
}
