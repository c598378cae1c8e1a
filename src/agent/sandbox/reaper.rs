//! The idle reaper: destroys running sandboxes idle for longer than their `timeout_sec`.

use std::sync::Arc;
use std::time::Duration;

use super::SandboxManager;
use crate::agent::wire::SandboxPhase;

/// How often the idle reaper looks for sandboxes past their timeout.
const REAPER_PERIOD: Duration = Duration::from_secs(1);

impl SandboxManager {
    /// Destroys running sandboxes idle for longer than their timeout, until `shutdown`.
    pub async fn reap_idle(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut ticker = tokio::time::interval(REAPER_PERIOD);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let candidates: Vec<_> = self.registry().values().cloned().collect();
            let expired = candidates
                .iter()
                .filter(|s| s.phase() == SandboxPhase::Running)
                .filter(|s| {
                    let timeout = s.request.timeout_sec;
                    timeout > 0 && s.idle_for() > Duration::from_secs(u64::from(timeout))
                })
                .map(|s| s.id());
            for id in expired {
                tracing::info!(sandbox = %id, "idle timeout reached; destroying");
                if let Err(error) = self.destroy(&id).await {
                    tracing::warn!(sandbox = %id, %error, "idle destroy failed");
                }
            }
        }
    }
}
