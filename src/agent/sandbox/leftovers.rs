//! Clean-up after a crashed agent: the VMM processes, sandbox directories and network slots an
//! earlier agent process left on this host.

use super::{SandboxError, SandboxManager};
use crate::vmm::{find_leftovers, kill_leftover};

impl SandboxManager {
    /// Removes what an earlier agent process left: VMM processes, sandbox directories and
    /// network slots. Called before serving, when this process owns no sandbox yet.
    pub async fn cleanup_leftovers(&self) -> Result<Vec<String>, SandboxError> {
        for leftover in find_leftovers(&self.layout) {
            tracing::info!(sandbox = %leftover.sandbox_id, pid = leftover.pid, "killing a leftover VMM");
            kill_leftover(&leftover).await;
        }
        let mut removed = Vec::new();
        let dir = self.layout.sandboxes_dir();
        let entries = std::fs::read_dir(&dir).map_err(|source| SandboxError::Io {
            what: format!("reading {}", dir.display()),
            source,
        })?;
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if let Err(error) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), %error, "could not remove a leftover");
            }
            removed.push(id);
        }
        let slots = self.network.cleanup_leftovers(&[]).await?;
        if !removed.is_empty() || !slots.is_empty() {
            tracing::info!(sandboxes = ?removed, slots = ?slots, "removed leftovers of an earlier agent");
        }
        Ok(removed)
    }
}
