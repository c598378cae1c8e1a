//! Changing a sandbox's egress policy while it lives: applied to its network at once while it
//! runs, and kept in its record (so an adopting agent, a resume and a relocation find it) while
//! it runs or is paused.

use crate::agent::network::NetworkError;
use crate::agent::wire::SandboxPhase;
use crate::egress::EgressPolicy;

use super::record::SandboxRecord;
use super::{SandboxError, SandboxManager};

impl SandboxManager {
    pub async fn set_egress(&self, id: &str, policy: EgressPolicy) -> Result<(), SandboxError> {
        let policy = policy.normalised().map_err(SandboxError::Invalid)?;
        let sandbox = self.get(id)?;
        // In force before it reaches the network, so a resume racing this one uses it too.
        let previous = std::mem::replace(
            &mut *sandbox.egress.lock().expect("egress lock"),
            policy.clone(),
        );
        let applied = loop {
            let (phase, slot) = {
                let lifecycle = sandbox.lifecycle();
                let slot = lifecycle.runtime.as_ref().map(|r| r.network.slot);
                (lifecycle.phase, slot)
            };
            match (phase, slot) {
                (SandboxPhase::Running, Some(slot)) => {
                    match self.network.set_egress(slot, policy.clone()).await {
                        // Paused meanwhile: its slot went with its runtime.
                        Err(NetworkError::NoSuchSlot(_)) => continue,
                        result => break result.map_err(SandboxError::from),
                    }
                }
                (SandboxPhase::Paused, _) => break Ok(()),
                (SandboxPhase::Stopping, _) => {
                    break Err(SandboxError::NotRunning {
                        id: id.to_owned(),
                        state: phase,
                    })
                }
                // Starting, pausing, resuming or snapshotting: the network is being made or
                // released; act on the phase that follows.
                (phase, _) => {
                    if let Err(error) = sandbox.settled_from(phase).await {
                        break Err(error);
                    }
                }
            }
        };
        if let Err(error) = applied {
            *sandbox.egress.lock().expect("egress lock") = previous;
            return Err(error);
        }
        let path = self.layout.sandbox_record(id);
        if let Ok(mut record) = SandboxRecord::load(&path) {
            record.request.egress = policy;
            record.save(&self.layout)?;
        }
        tracing::info!(sandbox = id, "egress policy replaced");
        Ok(())
    }
}
