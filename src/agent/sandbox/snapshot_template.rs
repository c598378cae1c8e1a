//! Snapshot templates: a sandbox's memory and disk at one instant, kept on this host as a
//! template (`images/<template>/`: the base image it booted from, and `snapshot/` with a
//! shared snapshot, the writable disk of that instant and `snapshot.json`). Every sandbox
//! created from it continues from that instant: its processes, memory and files.
//!
//! A running sandbox is paused to its own snapshot for the moment it takes to link that
//! snapshot's files and copy its disk, then resumed; the memory is made a shared snapshot
//! afterwards, while the sandbox runs on. A paused sandbox stays paused throughout.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::boot_snapshot::link_or_copy;
use super::pause::RestoreFailure;
use super::record::RecordedState;
use super::{Sandbox, SandboxError, SandboxManager};
use crate::agent::disk;
use crate::agent::wire::{CreateSandbox, SandboxPhase, SnapshotTemplate, SnapshotTemplateInfo};
use crate::id::SandboxId;
use crate::secret::SecretText;
use crate::template::TemplateName;
use crate::vmm::{AfterFailedPause, SnapshotFiles, VmmError};

const INFO_FORMAT: u32 = 1;

/// `snapshot.json`: the shape every sandbox of the template has, and the envd token its guest
/// was saved with (the agent's `/init` of each new guest must present it, then replaces it).
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotTemplateRecord {
    format: u32,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
    pub access_token: SecretText,
    /// The template the snapshotted sandbox was created from.
    pub from_template: TemplateName,
    made_unix_ms: u64,
}

/// A snapshot template on this host, ready to restore.
pub(super) struct TemplateSnapshot {
    pub files: SnapshotFiles,
    pub upper: PathBuf,
    pub record: SnapshotTemplateRecord,
}

impl SandboxManager {
    /// The snapshot template `template`, when this host's image of it is one.
    pub(super) fn template_snapshot(
        &self,
        template: &TemplateName,
    ) -> Result<Option<TemplateSnapshot>, SandboxError> {
        read_template_snapshot(self.layout.image_snapshot_dir(template.as_str()))
    }

    /// Makes the sandbox's memory and disk, as they are now, the snapshot template
    /// `request.template` on this host. Runs to its end whatever the caller does.
    pub async fn snapshot_template(
        self: &Arc<Self>,
        id: &str,
        request: SnapshotTemplate,
    ) -> Result<SnapshotTemplateInfo, SandboxError> {
        let this = self.clone();
        let id = id.to_owned();
        self.run_to_end(async move { this.snapshot_template_now(&id, request).await })
            .await
    }

    async fn snapshot_template_now(
        &self,
        id: &str,
        request: SnapshotTemplate,
    ) -> Result<SnapshotTemplateInfo, SandboxError> {
        let started = Instant::now();
        let sandbox = self.get(id)?;
        let exists = || {
            (!request.overwrite && self.layout.image_dir(request.template.as_str()).exists())
                .then(|| SandboxError::TemplateExists(request.template.to_string()))
        };
        if let Some(error) = exists() {
            return Err(error);
        }
        // Before the freeze: the sandbox is paused only for its own snapshot's sake, never
        // while another snapshot of that name finishes.
        let lease = self.templates.lock(&request.template).await;
        let frozen = self.freeze(&sandbox).await?;
        let failed = |reason: String| SandboxError::SnapshotFailed {
            id: id.to_owned(),
            reason,
        };
        let paused_for = started.elapsed();
        let staging = self.layout.images_dir().join(format!(
            ".snapshot-{}-{:016x}",
            request.template,
            rand::random::<u64>()
        ));
        let staged = match exists() {
            Some(error) => Err(error.to_string()),
            None => self.stage_snapshot(&sandbox, &frozen.snapshot, &staging),
        };
        let back = self.thaw(&sandbox, frozen).await;
        let staging = match staged {
            Ok(staging) => staging,
            Err(reason) => {
                back?;
                return Err(failed(reason));
            }
        };
        let made = self
            .finish_snapshot_template(&sandbox.request, sandbox.access_token(), &request, &staging)
            .await;
        let _ = fs::remove_dir_all(staging.join(PAUSED_DIR));
        let info = match made {
            Ok(info) => info,
            Err(reason) => {
                let _ = fs::remove_dir_all(&staging);
                back?;
                return Err(failed(reason));
            }
        };
        let installed = install(&self.layout.image_dir(request.template.as_str()), &staging);
        drop(lease);
        if let Err(reason) = installed {
            let _ = fs::remove_dir_all(&staging);
            back?;
            return Err(failed(reason));
        }
        tracing::info!(sandbox = id, template = %request.template, ?paused_for, elapsed = ?started.elapsed(), "snapshot template made");
        // The template is made and installed whatever became of the sandbox; the control plane
        // asks the agent where the sandbox is.
        if let Err(error) = back {
            tracing::warn!(sandbox = id, %error, "the sandbox did not come back as it was after its snapshot");
        }
        Ok(info)
    }

    /// Holds a running or paused sandbox still, paused to its own snapshot, for the files of
    /// that instant to be taken ([`Self::stage_snapshot`]); [`Self::thaw`] gives it back.
    pub(super) async fn freeze(&self, sandbox: &Sandbox) -> Result<Frozen, SandboxError> {
        let id = sandbox.id();
        let runtime = loop {
            let phase = {
                let mut lifecycle = sandbox.lifecycle();
                match lifecycle.phase {
                    SandboxPhase::Running => {
                        lifecycle.transition(&id, SandboxPhase::Snapshotting)?;
                        break lifecycle.runtime.take();
                    }
                    SandboxPhase::Paused => {
                        lifecycle.transition(&id, SandboxPhase::Snapshotting)?;
                        break None;
                    }
                    phase => phase,
                }
            };
            match phase {
                SandboxPhase::Starting
                | SandboxPhase::Pausing
                | SandboxPhase::Resuming
                | SandboxPhase::Snapshotting => sandbox.settled_from(phase).await?,
                SandboxPhase::Running | SandboxPhase::Paused | SandboxPhase::Stopping => {
                    return Err(SandboxError::NotRunning {
                        id: id.clone(),
                        state: phase,
                    })
                }
            }
        };
        let was_running = runtime.is_some();
        let failed = |reason: String| SandboxError::SnapshotFailed {
            id: id.to_string(),
            reason,
        };
        let snapshot = SnapshotFiles::for_sandbox(&self.layout, &id);
        if let Some(mut runtime) = runtime {
            match runtime.vm.pause_to(&snapshot).await {
                Ok(_) => {}
                Err(error) if snapshot.meta.is_file() => {
                    tracing::warn!(sandbox = %id, %error, "the VMM did not end cleanly after its snapshot; killing it");
                    let _ = runtime.vm.kill().await;
                }
                Err(
                    error @ VmmError::PauseFailed {
                        after: AfterFailedPause::Running | AfterFailedPause::Paused,
                        ..
                    },
                ) => {
                    self.settle(sandbox, SandboxPhase::Running, Some(runtime))
                        .await?;
                    return Err(failed(format!("pausing it: {error}")));
                }
                Err(error) => {
                    return Err(self.lose(sandbox, Some(runtime), error.to_string()).await)
                }
            }
            if let Err(error) = self.network.destroy(&runtime.network).await {
                tracing::warn!(sandbox = %id, %error, "could not release the network of a paused sandbox");
            }
            if let Err(error) = sandbox.record(RecordedState::Paused).save(&self.layout) {
                tracing::error!(sandbox = %id, %error, "could not record the pause");
            }
        }
        Ok(Frozen {
            was_running,
            snapshot,
        })
    }

    /// Gives a frozen sandbox back as it was: a running one resumed (its snapshot was only
    /// linked), a paused one paused.
    pub(super) async fn thaw(&self, sandbox: &Sandbox, frozen: Frozen) -> Result<(), SandboxError> {
        if frozen.was_running {
            self.resume_after_snapshot(sandbox).await
        } else {
            self.settle(sandbox, SandboxPhase::Paused, None).await
        }
    }

    /// At agent start: removes the staging directories of snapshot templates an earlier agent
    /// process did not finish.
    pub(super) fn collect_snapshot_template_leftovers(&self) {
        let Ok(entries) = fs::read_dir(self.layout.images_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(".snapshot-")
            {
                tracing::info!(path = %entry.path().display(), "removing an unfinished snapshot template");
                if let Err(error) = fs::remove_dir_all(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), %error, "could not remove an unfinished snapshot template");
                }
            }
        }
    }

    /// Resumes a sandbox paused for a snapshot template; one whose resume fails stays paused
    /// (its snapshot is intact) or is lost, as any resume.
    async fn resume_after_snapshot(&self, sandbox: &Sandbox) -> Result<(), SandboxError> {
        match self.restore(sandbox).await {
            Ok(runtime) => {
                *sandbox.guest_addr.lock().expect("addr lock") =
                    Some(runtime.network.envd_addr().ip().to_string());
                self.settle(sandbox, SandboxPhase::Running, Some(runtime))
                    .await?;
                sandbox.touch();
                Ok(())
            }
            Err(RestoreFailure {
                snapshot_intact: true,
                reason,
            }) => {
                tracing::warn!(sandbox = %sandbox.id(), %reason, "resuming after the snapshot failed; the sandbox stays paused");
                self.settle(sandbox, SandboxPhase::Paused, None).await
            }
            Err(RestoreFailure {
                snapshot_intact: false,
                reason,
            }) => Err(self.lose(sandbox, None, reason).await),
        }
    }

    /// Puts what the template needs from the paused sandbox into a staging directory under
    /// `images/`: its base image (linked), its snapshot's files (linked: a later pause writes
    /// new files, never into these) and a copy of its disk.
    pub(super) fn stage_snapshot(
        &self,
        sandbox: &Sandbox,
        snapshot: &SnapshotFiles,
        staging: &Path,
    ) -> Result<PathBuf, String> {
        let id = sandbox.id();
        let staging = staging.to_owned();
        let result = (|| {
            let paused = staging.join(PAUSED_DIR);
            let snapshot_dir = staging.join("snapshot");
            for dir in [&staging, &paused, &snapshot_dir] {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .recursive(true)
                    .create(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            link_or_copy(
                &self.base_image(&sandbox.request),
                &staging.join("rootfs.ext4"),
            )?;
            let linked = SnapshotFiles::in_dir(paused);
            for (from, to) in [
                (&snapshot.state, &linked.state),
                (&snapshot.memory, &linked.memory),
            ] {
                if from.exists() {
                    link_or_copy(from, to)?;
                }
            }
            fs::copy(&snapshot.meta, &linked.meta)
                .map_err(|e| format!("copying {}: {e}", snapshot.meta.display()))?;
            disk::copy_sparse(
                &self.layout.sandbox_upper_disk(&id),
                &snapshot_dir.join("upper.ext4"),
            )
            .map_err(|e| e.to_string())?;
            Ok(())
        })();
        match result {
            Ok(()) => Ok(staging),
            Err(reason) => {
                let _ = fs::remove_dir_all(&staging);
                Err(reason)
            }
        }
    }

    /// Makes the staged snapshot a shared one (in a network slot of its own: QEMU loads it
    /// into a process whose devices match), and writes `snapshot.json` and `meta.json`.
    pub(super) async fn finish_snapshot_template(
        &self,
        source: &CreateSandbox,
        access_token: SecretText,
        request: &SnapshotTemplate,
        staging: &Path,
    ) -> Result<SnapshotTemplateInfo, String> {
        let snapshot_dir = staging.join("snapshot");
        let shared = SnapshotFiles::in_dir(snapshot_dir.clone());
        self.share_with_spare_slot(
            source,
            &staging.join("rootfs.ext4"),
            &snapshot_dir.join("upper.ext4"),
            &SnapshotFiles::in_dir(staging.join(PAUSED_DIR)),
            &shared,
        )
        .await?;
        let record = SnapshotTemplateRecord {
            format: INFO_FORMAT,
            vcpus: source.vcpus,
            memory_mb: source.memory_mb,
            disk_mb: source.disk_mb,
            access_token,
            from_template: source.template.clone(),
            made_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        write_private(
            &snapshot_dir.join("snapshot.json"),
            &serde_json::to_vec_pretty(&record).expect("record serializes"),
        )?;
        let meta = serde_json::json!({
            "template": request.template,
            "source": "snapshot",
            "from_template": source.template,
            "made_at": chrono::Utc::now(),
        });
        write_private(
            &staging.join("meta.json"),
            &serde_json::to_vec_pretty(&meta).expect("meta serializes"),
        )?;
        let size_bytes = [
            &shared.state,
            &shared.memory,
            &snapshot_dir.join("upper.ext4"),
        ]
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum();
        Ok(SnapshotTemplateInfo {
            template: request.template.clone(),
            vcpus: source.vcpus,
            memory_mb: source.memory_mb,
            disk_mb: source.disk_mb,
            size_bytes,
        })
    }

    /// [`crate::vmm::Vmm::share`] of `paused` (a snapshot of `source`'s VM) into `out`, the
    /// VM's drives being `base` and `upper`, in a network slot taken for it and released after.
    pub(super) async fn share_with_spare_slot(
        &self,
        source: &CreateSandbox,
        base: &Path,
        upper: &Path,
        paused: &SnapshotFiles,
        out: &SnapshotFiles,
    ) -> Result<(), String> {
        let id = SandboxId::new_random();
        let id_text = id.to_string();
        let dir = self.layout.sandbox_dir(&id_text);
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let network = match self.network.create(&id_text, &Default::default()).await {
            Ok(network) => network,
            Err(error) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(error.to_string());
            }
        };
        let request = CreateSandbox {
            sandbox_id: id,
            ..source.clone()
        };
        let mut spec = self.vm_spec(&request, base, &network);
        for drive in spec.drives.iter_mut().filter(|d| !d.read_only) {
            drive.path = upper.to_owned();
        }
        let shared = self.vmm.share(&spec, paused, out).await;
        if let Err(error) = self.network.destroy(&network).await {
            tracing::warn!(%error, "releasing the network slot of a snapshot conversion");
        }
        let _ = fs::remove_dir_all(&dir);
        shared.map(drop).map_err(|e| e.to_string())
    }
}

/// The snapshot template saved in `dir` (a template's `snapshot/`, or a fork's), if there is
/// one.
pub(super) fn read_template_snapshot(
    dir: PathBuf,
) -> Result<Option<TemplateSnapshot>, SandboxError> {
    let path = dir.join("snapshot.json");
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SandboxError::Io {
                what: format!("reading {}", path.display()),
                source,
            })
        }
    };
    let record: SnapshotTemplateRecord =
        serde_json::from_slice(&text).map_err(|e| SandboxError::Io {
            what: format!("reading {}", path.display()),
            source: std::io::Error::other(e),
        })?;
    Ok(Some(TemplateSnapshot {
        files: SnapshotFiles::in_dir(dir.clone()),
        upper: dir.join("upper.ext4"),
        record,
    }))
}

/// A sandbox held still by [`SandboxManager::freeze`].
pub(super) struct Frozen {
    was_running: bool,
    pub snapshot: SnapshotFiles,
}

/// The staging directory's copy of the sandbox's paused snapshot, removed once shared.
const PAUSED_DIR: &str = ".paused";

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Moves `staging` to `target`, replacing a template there: the old one is renamed aside first
/// and removed after, so a create sees the old template or the new, never half of one.
pub(super) fn install(target: &Path, staging: &Path) -> Result<(), String> {
    let doomed = target.with_file_name(format!(
        ".removing-{}-{:016x}",
        target.file_name().unwrap_or_default().to_string_lossy(),
        rand::random::<u64>()
    ));
    let replaced = match fs::rename(target, &doomed) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(format!("moving {} aside: {e}", target.display())),
    };
    if let Err(e) = fs::rename(staging, target) {
        if replaced {
            let _ = fs::rename(&doomed, target);
        }
        return Err(format!("installing {}: {e}", target.display()));
    }
    if replaced {
        let _ = fs::remove_dir_all(&doomed);
    }
    Ok(())
}
