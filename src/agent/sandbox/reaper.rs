//! The idle reaper: pauses running sandboxes idle for longer than their `timeout_sec`. A paused
//! sandbox holds no CPU or RAM and resumes on its next call, so idleness costs its owner nothing
//! but disk. The sandboxes due in one round are paused concurrently, so a slow pause never
//! delays another.

use std::sync::Arc;
use std::time::Duration;

use super::{SandboxError, SandboxManager};
use crate::agent::wire::SandboxPhase;

/// How often the idle reaper looks for sandboxes past their timeout.
const REAPER_PERIOD: Duration = Duration::from_secs(1);

impl SandboxManager {
    /// Pauses running sandboxes idle for longer than their timeout, until `shutdown`.
    pub async fn reap_idle(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut ticker = tokio::time::interval(REAPER_PERIOD);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let candidates: Vec<_> = self.registry().values().cloned().collect();
            let expired: Vec<_> = candidates
                .iter()
                .filter(|s| s.phase() == SandboxPhase::Running)
                .filter(|s| {
                    let timeout = s.request.timeout_sec;
                    timeout > 0 && s.idle_for() > Duration::from_secs(u64::from(timeout))
                })
                .cloned()
                .collect();
            let pauses = expired.into_iter().map(|sandbox| {
                let manager = self.clone();
                async move {
                    let id = sandbox.id();
                    let timeout = Duration::from_secs(u64::from(sandbox.request.timeout_sec));
                    tracing::info!(sandbox = %id, "idle timeout reached; pausing");
                    match manager.pause_if_idle(&id, timeout).await {
                        Ok(_) => {}
                        Err(error @ SandboxError::PauseFailed { .. }) => {
                            // It runs on; the next attempt waits another full timeout, so a
                            // full disk is not hammered every second.
                            sandbox.touch();
                            tracing::warn!(sandbox = %id, %error, "idle pause failed; retrying after another timeout");
                        }
                        Err(error) => tracing::warn!(sandbox = %id, %error, "idle pause failed"),
                    }
                }
            });
            // Not cancelled by a shutdown: each pause runs in its own task to the end anyway.
            futures::future::join_all(pauses).await;
        }
    }
}
