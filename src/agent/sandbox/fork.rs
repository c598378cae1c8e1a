//! Forking a sandbox: N new sandboxes, each continuing its memory and disk of one instant, while
//! it runs on (a running sandbox is paused only while that instant's files are linked and its
//! disk copied) or stays paused. The instant is made a shared snapshot, as a snapshot template
//! is, in a directory of the fork's own under `snapshots/forks/`; each child restores it with
//! its own copy of the disk and its own identity, and the directory goes once they run.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::boot::StartFrom;
use super::snapshot_template::read_template_snapshot;
use super::{SandboxError, SandboxManager};
use crate::agent::wire::{CreateSandbox, ForkSandbox, SandboxInfo, SnapshotTemplate};

impl SandboxManager {
    /// Starts `request.children`, each continuing sandbox `id` as it is now. All or nothing:
    /// if one child fails, those started are destroyed again. Runs to its end whatever the
    /// caller does.
    pub async fn fork(
        self: &Arc<Self>,
        id: &str,
        request: ForkSandbox,
    ) -> Result<Vec<SandboxInfo>, SandboxError> {
        let this = self.clone();
        let id = id.to_owned();
        self.run_to_end(async move { this.fork_now(&id, request).await })
            .await
    }

    async fn fork_now(
        self: &Arc<Self>,
        id: &str,
        request: ForkSandbox,
    ) -> Result<Vec<SandboxInfo>, SandboxError> {
        let started = Instant::now();
        if request.children.is_empty() {
            return Err(SandboxError::Invalid(
                "a fork needs at least one child".into(),
            ));
        }
        for child in &request.children {
            let child = child.to_string();
            if self.registry().contains_key(&child) || self.layout.sandbox_dir(&child).exists() {
                return Err(SandboxError::AlreadyExists(child));
            }
        }
        let sandbox = self.get(id)?;
        let failed = |reason: String| SandboxError::SnapshotFailed {
            id: id.to_owned(),
            reason,
        };
        let staging = self
            .layout
            .forks_dir()
            .join(format!("{id}-{:016x}", rand::random::<u64>()));
        let frozen = self.freeze(&sandbox).await?;
        let staged = self.stage_snapshot(&sandbox, &frozen.snapshot, &staging);
        let back = self.thaw(&sandbox, frozen).await;
        let frozen_for = started.elapsed();
        if let Err(reason) = back.as_ref() {
            tracing::warn!(sandbox = id, %reason, "the forked sandbox did not come back as it was");
        }
        let staging = staged.map_err(failed)?;
        let children = self
            // Children inherit the egress policy in force, as they inherit everything else.
            .start_children(
                &sandbox.current_request(),
                sandbox.access_token(),
                &staging,
                &request,
            )
            .await;
        if let Err(error) = fs::remove_dir_all(&staging) {
            tracing::warn!(dir = %staging.display(), %error, "could not remove a fork's files");
        }
        let children = children?;
        tracing::info!(sandbox = id, children = children.len(), ?frozen_for, elapsed = ?started.elapsed(), "sandbox forked");
        Ok(children)
    }

    /// Makes the staged instant a shared snapshot and starts every child from it; on a failure
    /// the children already started are destroyed.
    async fn start_children(
        self: &Arc<Self>,
        source: &CreateSandbox,
        access_token: crate::secret::SecretText,
        staging: &Path,
        request: &ForkSandbox,
    ) -> Result<Vec<SandboxInfo>, SandboxError> {
        let failed = |reason: String| SandboxError::SnapshotFailed {
            id: source.sandbox_id.to_string(),
            reason,
        };
        let as_template = SnapshotTemplate {
            template: source.template.clone(),
            overwrite: false,
        };
        self.finish_snapshot_template(source, access_token, &as_template, staging)
            .await
            .map_err(failed)?;
        let base = staging.join("rootfs.ext4");
        let mut started: Vec<SandboxInfo> = Vec::with_capacity(request.children.len());
        for child in &request.children {
            let snapshot = read_template_snapshot(staging.join("snapshot"))?
                .ok_or_else(|| failed("the fork's snapshot disappeared".into()))?;
            let req = CreateSandbox {
                sandbox_id: *child,
                image: None,
                snapshot: None,
                ..source.clone()
            };
            match self
                .create_with(req, &base, None, StartFrom::Template(Box::new(snapshot)))
                .await
            {
                Ok(info) => started.push(info),
                Err(error) => {
                    for info in &started {
                        let id = info.sandbox_id.to_string();
                        if let Err(error) = self.destroy(&id).await {
                            tracing::warn!(sandbox = %id, %error, "could not remove a failed fork's child");
                        }
                    }
                    return Err(error);
                }
            }
        }
        Ok(started)
    }
}
