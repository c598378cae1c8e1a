//! Resume on any host. After a pause, a sandbox's record, snapshot and writable disk are copied
//! to the template store (when it is shared: `store.url`), described by one document,
//! [`StoredPause`]; another host *imports* that copy when the sandbox's own host is gone or full,
//! and resumes it there. The copy is deleted by every resume before the guest runs again, so a
//! copy in the store always holds the guest's latest state: importing it can never bring back
//! an older disk or memory than a guest that ran on.
//!
//! The copy is made in the background after the pause has answered (a pause stays as quick as
//! before). A resume that arrives meanwhile cancels it and waits for it to stop. On this host
//! `sandboxes/<id>/stored.json` lists what was put in the store (written before the document
//! and after each blob), so a resume, a destroy or a restarted agent always knows what to
//! remove.

use std::path::PathBuf;
use std::sync::Arc;

use std::os::unix::fs::OpenOptionsExt;

use super::record::{RecordedState, SandboxRecord};
use super::{Sandbox, SandboxError, SandboxManager};
use crate::agent::wire::{
    stored_pause_key, PausedPart, SandboxInfo, SandboxPhase, StoredPart, StoredPause,
    STORED_PAUSE_FORMAT,
};
use crate::config::Layout;
use crate::id::SandboxId;
use crate::store::{sha256_of, StoreError, TemplateStore};
use crate::vmm::{rebase_snapshot_meta, SnapshotFiles, SnapshotMeta};

/// One paused sandbox's copy: made or removed by one task at a time. A copy stops by itself
/// as soon as the sandbox leaves `paused` (a resume or destroy moves the phase first, then
/// waits here), checked between pages while packing and while uploading.
#[derive(Default)]
pub(super) struct StoreCopy {
    busy: tokio::sync::Mutex<()>,
    /// Set by a destroy that removes only this host's files (the capsule lives on elsewhere,
    /// and the store's copy may still be needed there).
    keep: std::sync::atomic::AtomicBool,
}

impl StoreCopy {
    /// A later teardown leaves the store's copy where it is.
    pub(super) fn keep_in_store(&self) {
        self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How often an upload looks whether the sandbox is still paused.
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub(super) enum CopyError {
    #[error("a resume or destroy came first")]
    Cancelled,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CopyError {
    let what = what.into();
    move |source| CopyError::Io { what, source }
}

/// Where each part of a paused sandbox lives on a host.
fn part_path(layout: &Layout, id: &str, part: PausedPart) -> PathBuf {
    let snapshot = SnapshotFiles::for_sandbox(layout, id);
    match part {
        PausedPart::Record => layout.sandbox_record(id),
        PausedPart::SnapshotMeta => snapshot.meta,
        PausedPart::SnapshotState => snapshot.state,
        PausedPart::SnapshotMemory => snapshot.memory,
        PausedPart::Disk => layout.sandbox_upper_disk(id),
    }
}

/// The list of what this host put in the store for the sandbox.
fn marker_path(layout: &Layout, id: &str) -> PathBuf {
    layout.sandbox_dir(id).join("stored.json")
}

/// Where packs are written before they are uploaded.
fn staging_dir(layout: &Layout, id: &str) -> PathBuf {
    layout.sandbox_dir(id).join("store-staging")
}

fn write_marker(layout: &Layout, copy: &StoredPause) -> Result<(), std::io::Error> {
    let path = marker_path(layout, &copy.sandbox_id.to_string());
    let partial = Layout::partial(&path);
    let json = serde_json::to_vec_pretty(copy).expect("a stored pause serialises");
    std::fs::write(&partial, json)?;
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, &path)
}

fn read_marker(layout: &Layout, id: &str) -> Option<StoredPause> {
    let bytes = std::fs::read(marker_path(layout, id)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The checksums of this host's guest kernel and initramfs, computed again only when either
/// file changed (a kernel is tens of MiB: hashing it on every pause and import would cost more
/// than the rest of a small copy).
#[derive(Default)]
pub(super) struct KernelChecksums(std::sync::Mutex<Option<(FilesSeen, KernelSums)>>);

type FilesSeen = Vec<Option<(u64, std::time::SystemTime)>>;
type KernelSums = (String, Option<String>);

impl KernelChecksums {
    pub(super) async fn of(&self, layout: &Layout) -> Result<KernelSums, StoreError> {
        let (kernel, initramfs) = (layout.default_kernel(), layout.default_initramfs());
        let seen: FilesSeen = [&kernel, &initramfs]
            .iter()
            .map(|p| {
                let meta = std::fs::metadata(p).ok()?;
                Some((meta.len(), meta.modified().ok()?))
            })
            .collect();
        if let Some((known, sums)) = self.0.lock().expect("checksums lock").as_ref() {
            if *known == seen {
                return Ok(sums.clone());
            }
        }
        let (kernel_sum, _) = sha256_of(&kernel).await?;
        let initrd_sum = if initramfs.is_file() {
            Some(sha256_of(&initramfs).await?.0)
        } else {
            None
        };
        let sums = (kernel_sum, initrd_sum);
        *self.0.lock().expect("checksums lock") = Some((seen, sums.clone()));
        Ok(sums)
    }
}

impl SandboxManager {
    /// Whether a snapshot another host made, by VMM `vmm` (kind, version) for guest `kernel`
    /// (kernel and initramfs checksums), loads here: only into the same VMM and guest.
    pub(super) async fn check_restorable_here(
        &self,
        vmm: (&str, &str),
        kernel: (&str, Option<&str>),
    ) -> Result<(), String> {
        let kind = self.vmm.kind().to_string();
        let version = self
            .vmm
            .version()
            .await
            .map_err(|e| format!("asking the VMM's version: {e}"))?;
        if vmm != (kind.as_str(), version.as_str()) {
            return Err(format!(
                "it was made by {} {}, this host runs {kind} {version}",
                vmm.0, vmm.1
            ));
        }
        let (kernel_sha256, initrd_sha256) = self
            .kernel_checksums
            .of(&self.layout)
            .await
            .map_err(|e| e.to_string())?;
        if kernel != (kernel_sha256.as_str(), initrd_sha256.as_deref()) {
            return Err("its guest kernel or initramfs differs from this host's".into());
        }
        Ok(())
    }

    /// Whether paused sandboxes are copied to the store.
    fn copies_paused(&self) -> bool {
        self.store_paused
    }

    /// Starts copying a sandbox that has just been paused to the store, in the background.
    pub(super) fn copy_to_store_later(self: &Arc<Self>, id: &str) {
        if !self.copies_paused() {
            return;
        }
        let Ok(sandbox) = self.get(id) else { return };
        let this = self.clone();
        tokio::spawn(async move {
            let id = sandbox.id();
            let started = std::time::Instant::now();
            match this.copy_to_store(&sandbox).await {
                Ok(Some(bytes)) => {
                    tracing::info!(sandbox = %id, bytes, elapsed = ?started.elapsed(), "paused sandbox copied to the template store");
                    sandbox
                        .metadata
                        .lock()
                        .expect("metadata lock")
                        .insert("stored_bytes".into(), bytes.to_string());
                }
                Ok(None) => {}
                Err(CopyError::Cancelled) => {
                    tracing::info!(sandbox = %id, "copying the paused sandbox to the store stopped: it was resumed or destroyed")
                }
                Err(error) => {
                    tracing::warn!(sandbox = %id, %error, "could not copy the paused sandbox to the template store; it can only be resumed on this host")
                }
            }
        });
    }

    /// Copies the paused sandbox to the store; `None` when it is no longer paused. What was
    /// uploaded of a copy that fails or is cancelled is removed again.
    async fn copy_to_store(&self, sandbox: &Arc<Sandbox>) -> Result<Option<u64>, CopyError> {
        let _busy = sandbox.store_copy.busy.lock().await;
        if sandbox.phase() != SandboxPhase::Paused {
            return Ok(None);
        }
        let id = sandbox.id();
        let store = self.templates.store().clone();
        // Which pause this is: a copy is of one pause, never taken for another's.
        let paused_at_unix_ms = SnapshotMeta::read(&self.layout.snapshot_meta(&id))
            .map(|meta| meta.created_unix_ms)
            .map_err(|e| io("reading the snapshot's metadata")(std::io::Error::other(e)))?;
        if let Some(made) = read_marker(&self.layout, &id) {
            // A second pause call for a sandbox already paused: this pause's copy may be whole.
            let key = stored_pause_key(made.sandbox_id);
            let whole = made.paused_at_unix_ms == paused_at_unix_ms
                && store.get_document(&key).await?.as_deref()
                    == Some(
                        serde_json::to_vec_pretty(&made)
                            .expect("serialises")
                            .as_slice(),
                    );
            if whole {
                return Ok(None);
            }
            // Unfinished (this agent stopped during it), or of an earlier pause whose removal
            // at the resume failed: removed, and made again.
            self.remove_store_copy(&id).await?;
        }
        let (kernel_sha256, initrd_sha256) = self.kernel_checksums.of(&self.layout).await?;
        // Publishing a template image hashes and uploads hundreds of MiB: a resume must not
        // wait for it.
        let base_path = self.base_image(&sandbox.request);
        let base_image = tokio::select! {
            blob = self.templates.publish_image_file(&sandbox.request.template, &base_path) => blob?,
            () = left_paused(sandbox) => return Err(CopyError::Cancelled),
        };
        let vmm_version = self
            .vmm
            .version()
            .await
            .map_err(|e| io("asking the VMM's version")(std::io::Error::other(e)))?;
        let mut copy = StoredPause {
            format: STORED_PAUSE_FORMAT,
            sandbox_id: sandbox.request.sandbox_id,
            paused_at_unix_ms,
            vmm: self.vmm.kind().to_string(),
            vmm_version,
            kernel_sha256,
            initrd_sha256,
            base_image,
            parts: Vec::new(),
            stored_at: chrono::Utc::now(),
        };
        let pause = uuid::Uuid::new_v4();
        let staging = staging_dir(&self.layout, &id);
        let result = async {
            std::fs::create_dir_all(&staging).map_err(io("creating the staging directory"))?;
            let mut bytes = 0;
            for part in [
                PausedPart::Record,
                PausedPart::SnapshotMeta,
                PausedPart::SnapshotState,
                PausedPart::SnapshotMemory,
                PausedPart::Disk,
            ] {
                let source = part_path(&self.layout, &id, part);
                if !source.exists() {
                    continue;
                }
                let pack = staging.join(format!("{part:?}.pack"));
                let label = format!("wrenn paused sandbox {id} pause {pause} {part:?}");
                let paused = sandbox.clone();
                let stop = move || paused.phase() != SandboxPhase::Paused;
                let written = pack_file(source, pack.clone(), label, stop).await?;
                let blob = tokio::select! {
                    blob = store.publish(&pack, |_| {}) => blob?,
                    () = left_paused(sandbox) => return Err(CopyError::Cancelled),
                };
                let _ = std::fs::remove_file(&pack);
                copy.parts.push(StoredPart { part, blob });
                // Listed before anything else can happen, so the blob is never forgotten.
                write_marker(&self.layout, &copy).map_err(io("recording the store copy"))?;
                bytes += written;
                if sandbox.phase() != SandboxPhase::Paused {
                    return Err(CopyError::Cancelled);
                }
            }
            let document = serde_json::to_vec_pretty(&copy).expect("a stored pause serialises");
            store
                .put_document(&stored_pause_key(copy.sandbox_id), document)
                .await?;
            Ok(bytes)
        }
        .await;
        let _ = std::fs::remove_dir_all(&staging);
        match result {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) => {
                if let Err(cleanup) = self.remove_store_copy(&id).await {
                    tracing::warn!(sandbox = %id, error = %cleanup, "could not remove an unfinished store copy");
                }
                Err(error)
            }
        }
    }

    /// Waits for a copy in progress to stop (the caller has moved the sandbox out of `paused`)
    /// and removes the sandbox's copy from the store, before its guest runs again (a resume)
    /// or when it goes (a destroy; not one that keeps the store's copy, see
    /// [`destroy_here`](SandboxManager::destroy_here)). A store that cannot be reached leaves
    /// the copy there (the error says so); the caller decides whether to go on.
    pub(super) async fn drop_store_copy(&self, sandbox: &Sandbox) -> Result<(), StoreError> {
        let _busy = sandbox.store_copy.busy.lock().await;
        if sandbox
            .store_copy
            .keep
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        self.remove_store_copy(&sandbox.id())
            .await
            .map_err(|error| match error {
                CopyError::Store(error) => error,
                other => StoreError::Io {
                    path: marker_path(&self.layout, &sandbox.id()),
                    source: std::io::Error::other(other.to_string()),
                },
            })
    }

    /// Removes what the marker lists: the document only if it is still this host's copy (another
    /// host may have imported the sandbox, resumed and paused it again since), and the packs,
    /// which belong to this copy alone. Then the marker.
    async fn remove_store_copy(&self, id: &str) -> Result<(), CopyError> {
        let Some(copy) = read_marker(&self.layout, id) else {
            let _ = std::fs::remove_file(marker_path(&self.layout, id));
            return Ok(());
        };
        let store = self.templates.store();
        let key = stored_pause_key(copy.sandbox_id);
        if let Some(document) = store.get_document(&key).await? {
            let theirs: Option<StoredPause> = serde_json::from_slice(&document).ok();
            if theirs.is_none_or(|theirs| theirs.parts == copy.parts) {
                store.delete_document(&key).await?;
            }
        }
        remove_parts(store, &copy).await?;
        match std::fs::remove_file(marker_path(&self.layout, id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io("removing the store copy's marker")(e))
            }
            _ => Ok(()),
        }
    }

    /// Takes in a paused sandbox another host put in the store: its image, record, snapshot and
    /// disk, made this host's, and registers it paused, ready to be resumed here. On failure
    /// nothing of it is left on this host, and the copy in the store is untouched.
    pub async fn import_paused(
        self: &Arc<Self>,
        sandbox_id: SandboxId,
    ) -> Result<SandboxInfo, SandboxError> {
        let this = self.clone();
        self.run_to_end(async move { this.import_now(sandbox_id).await })
            .await
    }

    async fn import_now(&self, sandbox_id: SandboxId) -> Result<SandboxInfo, SandboxError> {
        let id = sandbox_id.to_string();
        if self.get(&id).is_ok() || self.layout.sandbox_dir(&id).exists() {
            return Err(SandboxError::AlreadyExists(id));
        }
        let refused = |reason: String| SandboxError::ImportFailed {
            id: id.clone(),
            reason,
        };
        let store = self.templates.store().clone();
        let document = store
            .get_document(&stored_pause_key(sandbox_id))
            .await
            .map_err(|e| refused(e.to_string()))?
            .ok_or_else(|| SandboxError::NotStored(id.clone()))?;
        let copy: StoredPause = serde_json::from_slice(&document)
            .map_err(|e| refused(format!("its store copy is unreadable: {e}")))?;
        if copy.format != STORED_PAUSE_FORMAT || copy.sandbox_id != sandbox_id {
            return Err(refused(format!(
                "its store copy is of format {} for sandbox {}; this agent reads format {STORED_PAUSE_FORMAT}",
                copy.format, copy.sandbox_id
            )));
        }
        self.check_restorable_here(
            (&copy.vmm, &copy.vmm_version),
            (&copy.kernel_sha256, copy.initrd_sha256.as_deref()),
        )
        .await
        .map_err(refused)?;
        let started = std::time::Instant::now();
        let result = self.take_in(&store, &copy).await;
        match result {
            Ok(sandbox) => {
                tracing::info!(sandbox = %id, elapsed = ?started.elapsed(), "paused sandbox imported from the template store");
                sandbox.metadata.lock().expect("metadata lock").insert(
                    "import_ms".into(),
                    started.elapsed().as_millis().to_string(),
                );
                Ok(sandbox.info())
            }
            Err(reason) => {
                for dir in [self.layout.sandbox_dir(&id), self.layout.snapshot_dir(&id)] {
                    let _ = std::fs::remove_dir_all(dir);
                }
                Err(refused(reason))
            }
        }
    }

    async fn take_in(
        &self,
        store: &TemplateStore,
        copy: &StoredPause,
    ) -> Result<Arc<Sandbox>, String> {
        let id = copy.sandbox_id.to_string();
        for dir in [self.layout.sandbox_dir(&id), self.layout.snapshot_dir(&id)] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let staging = staging_dir(&self.layout, &id);
        std::fs::create_dir_all(&staging)
            .map_err(|e| format!("creating the staging directory: {e}"))?;
        // The record is written last, in place: until then a restarted agent finds a sandbox
        // directory without a record, a leftover it removes, never a half-imported sandbox.
        let record_copy = staging.join("record.json");
        for part in &copy.parts {
            let pack = staging.join(format!("{:?}.pack", part.part));
            store
                .fetch(&part.blob, &pack, |_| {})
                .await
                .map_err(|e| format!("fetching its {:?}: {e}", part.part))?;
            let dest = match part.part {
                PausedPart::Record => record_copy.clone(),
                other => part_path(&self.layout, &id, other),
            };
            let label = unpack_file(pack.clone(), dest)
                .await
                .map_err(|e| format!("unpacking its {:?}: {e}", part.part))?;
            if !label.starts_with(&format!("wrenn paused sandbox {id} ")) {
                return Err(format!(
                    "its {:?} is a pack of something else: {label}",
                    part.part
                ));
            }
            let _ = std::fs::remove_file(&pack);
        }
        let mut record = SandboxRecord::load(&record_copy)?;
        let _ = std::fs::remove_dir_all(&staging);
        if record.request.sandbox_id != copy.sandbox_id {
            return Err(format!(
                "its record names another sandbox, {}",
                record.request.sandbox_id
            ));
        }
        let base = self.layout.sandbox_base_image(&id);
        self.templates
            .image_file_at(&record.request.template, &copy.base_image, &base)
            .await
            .map_err(|e| format!("getting its template image: {e}"))?;
        // The snapshot names the files of the host that paused it; the guest sees the same
        // kernel and disks here (checked above), under this host's paths.
        let initramfs = self.layout.default_initramfs();
        rebase_snapshot_meta(
            &self.layout.snapshot_meta(&id),
            &self.layout.default_kernel(),
            Some(initramfs.as_path()),
            &[
                ("root", &base),
                ("upper", &self.layout.sandbox_upper_disk(&id)),
            ],
        )
        .map_err(|e| format!("pointing its snapshot at this host's files: {e}"))?;
        // This host now holds the store's copy: its resume or destroy removes it.
        write_marker(&self.layout, copy).map_err(|e| format!("recording the store copy: {e}"))?;
        record.state = RecordedState::Paused;
        record
            .save(&self.layout)
            .map_err(|e| format!("recording it: {e}"))?;
        let sandbox = Arc::new(Sandbox::recovered(record, SandboxPhase::Paused));
        let mut registry = self.registry();
        if registry.contains_key(&id) {
            return Err("a sandbox of that ID appeared on this host meanwhile".into());
        }
        registry.insert(id, sandbox.clone());
        Ok(sandbox)
    }
}

async fn remove_parts(store: &TemplateStore, copy: &StoredPause) -> Result<(), StoreError> {
    for part in &copy.parts {
        store.delete(&part.blob.sha256).await?;
    }
    Ok(())
}

/// Resolves once the sandbox is no longer paused.
async fn left_paused(sandbox: &Sandbox) {
    while sandbox.phase() == SandboxPhase::Paused {
        tokio::time::sleep(STOP_POLL).await;
    }
}

/// Packs `source` into `pack` (`sparse::pack`); `stop` is asked between pages whether to give up.
pub(super) async fn pack_file(
    source: PathBuf,
    pack: PathBuf,
    label: String,
    stop: impl Fn() -> bool + Send + 'static,
) -> Result<u64, CopyError> {
    tokio::task::spawn_blocking(move || {
        let input =
            std::fs::File::open(&source).map_err(io(format!("opening {}", source.display())))?;
        let output =
            std::fs::File::create(&pack).map_err(io(format!("creating {}", pack.display())))?;
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, output);
        match crate::sparse::pack(&input, &mut writer, &label, &stop) {
            Ok(written) => {
                use std::io::Write;
                writer
                    .flush()
                    .map_err(io(format!("writing {}", pack.display())))?;
                Ok(written)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(CopyError::Cancelled),
            Err(e) => Err(io(format!("packing {}", source.display()))(e)),
        }
    })
    .await
    .map_err(|e| io("packing")(std::io::Error::other(e)))?
}

/// Unpacks `pack` into the new file `dest` (the owner's alone); answers the pack's label.
pub(super) async fn unpack_file(pack: PathBuf, dest: PathBuf) -> Result<String, std::io::Error> {
    tokio::task::spawn_blocking(move || {
        let input = std::fs::File::open(&pack)?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, input);
        // Records hold envd's token and snapshots the guest's memory: the owner's alone.
        let output = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&dest)?;
        let label = crate::sparse::unpack(&mut reader, &output)?;
        output.sync_all()?;
        Ok(label)
    })
    .await
    .map_err(std::io::Error::other)?
}
