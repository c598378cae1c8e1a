//! Every create is a restore. The first create of a template in a given shape (vCPUs, memory,
//! disk) boots a kernel as before; afterwards, in the background, the agent boots one more VM of
//! that template, waits for its envd, pauses it and makes it a shared snapshot
//! ([`crate::vmm::Vmm::share`]) with the writable disk of that instant. Later creates restore
//! that snapshot ([`crate::vmm::Vmm::restore_shared`]) with a copy of the disk instead of booting:
//! the guest continues from "envd ready", and only its identity (entropy, host name, machine
//! ID, clock, envd token) is given to it through `/init`.
//!
//! A boot snapshot is keyed by everything it was made from: the template image (its inode,
//! size and modification time: a pulled or rebuilt image is a new file), the kernel and
//! initramfs, the VMM's version, the shape and this agent's version. Any change makes a new
//! key, so a create never restores a stale guest; the superseded snapshot is removed when its
//! successor is published. A restore that fails anyway (the snapshot's own checks refuse it)
//! falls back to a cold boot and discards the snapshot. Each choice is logged and recorded in
//! the sandbox's metadata (`create_path`).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};

use super::SandboxManager;
use crate::agent::wire::CreateSandbox;
use crate::envd::client::EnvdClient;
use crate::id::SandboxId;
use crate::template::TemplateName;
use crate::vmm::{SnapshotFiles, Vm, VmSpec};

/// `boot.json`'s format.
const INFO_FORMAT: u32 = 1;
/// After a boot snapshot could not be made (or restored), creates of that key boot for this
/// long before another is attempted.
const RETRY_AFTER: Duration = Duration::from_secs(600);

/// What a boot snapshot is made of: a create with the same key may restore it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BootKey {
    /// 32 hex digits of a SHA-256 over every input.
    pub key: String,
    pub shape: Shape,
}

/// The template and VM shape a boot snapshot is for; a newer key of the same shape replaces
/// the older.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Shape {
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
}

/// `boot.json`: what a boot snapshot was made from.
#[derive(Debug, Serialize, Deserialize)]
struct BootSnapshotInfo {
    format: u32,
    key: String,
    #[serde(flatten)]
    shape: Shape,
    made_unix_ms: u64,
}

/// A boot snapshot ready to restore.
pub(super) struct ReadyBootSnapshot {
    pub files: SnapshotFiles,
    pub upper: PathBuf,
}

enum Making {
    InProgress,
    FailedAt(Instant),
}

/// The agent's boot snapshots: which are being made, and one maker at a time.
pub(super) struct BootSnapshots {
    enabled: bool,
    making: Mutex<HashMap<String, Making>>,
    /// Each making boots a VM: one at a time, so a burst of first creates of several templates
    /// does not boot them all at once beside the users' own VMs.
    maker: Semaphore,
    vmm_version: OnceCell<String>,
}

impl BootSnapshots {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            making: Mutex::new(HashMap::new()),
            maker: Semaphore::new(1),
            vmm_version: OnceCell::new(),
        }
    }

    fn making(&self) -> std::sync::MutexGuard<'_, HashMap<String, Making>> {
        self.making.lock().expect("boot snapshot state")
    }

    /// Claims `key` for making, unless it is being made or failed recently.
    fn claim(&self, key: &str) -> bool {
        let mut making = self.making();
        match making.get(key) {
            Some(Making::InProgress) => false,
            Some(Making::FailedAt(at)) if at.elapsed() < RETRY_AFTER => false,
            _ => {
                making.insert(key.to_owned(), Making::InProgress);
                true
            }
        }
    }

    fn finished(&self, key: &str, ok: bool) {
        let mut making = self.making();
        if ok {
            making.remove(key);
        } else {
            making.insert(key.to_owned(), Making::FailedAt(Instant::now()));
        }
    }
}

/// `path`'s identity as a file: a replaced file (a pulled image, a rebuilt kernel) differs.
fn file_identity(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}:{}:{}.{}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl SandboxManager {
    /// The boot key of a create of `req` from `image`; `None` when boot snapshots are off or
    /// an input cannot be read (that create boots).
    pub(super) async fn boot_key(&self, req: &CreateSandbox, image: &Path) -> Option<BootKey> {
        if !self.boot_snapshots.enabled {
            return None;
        }
        let vmm_version = match self
            .boot_snapshots
            .vmm_version
            .get_or_try_init(|| self.vmm.version())
            .await
        {
            Ok(version) => version,
            Err(error) => {
                tracing::warn!(%error, "cannot read the VMM's version; creates boot");
                return None;
            }
        };
        let inputs = [
            file_identity(image)?,
            file_identity(&self.layout.default_kernel())?,
            file_identity(&self.layout.default_initramfs())?,
        ];
        let shape = Shape {
            template: req.template.clone(),
            vcpus: req.vcpus,
            memory_mb: req.memory_mb,
            disk_mb: req.disk_mb,
        };
        let mut hash = Sha256::new();
        for part in [
            format!("boot-snapshot/{INFO_FORMAT}"),
            crate::version::VERSION.to_owned(),
            self.vmm.kind().to_string(),
            vmm_version.clone(),
            serde_json::to_string(&shape).expect("a shape serializes"),
        ]
        .iter()
        .chain(inputs.iter())
        {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let key = hex::encode(&hash.finalize()[..16]);
        Some(BootKey { key, shape })
    }

    /// The boot snapshot of `key`, when one is published.
    pub(super) fn ready_boot_snapshot(&self, key: &BootKey) -> Option<ReadyBootSnapshot> {
        let dir = self.layout.boot_snapshot_dir(&key.key);
        let files = SnapshotFiles::in_dir(dir.clone());
        let upper = dir.join("upper.ext4");
        (files.meta.is_file() && upper.is_file()).then_some(ReadyBootSnapshot { files, upper })
    }

    /// A boot snapshot that could not be restored: removed, and not made again for a while.
    pub(super) fn discard_boot_snapshot(&self, key: &BootKey) {
        self.boot_snapshots.finished(&key.key, false);
        remove_unless_in_use(&self.layout.boot_snapshot_dir(&key.key));
    }

    /// Makes the boot snapshot of `key` in the background, unless it exists, is being made or
    /// failed recently. `image` is the template image the key was computed from.
    pub(super) fn want_boot_snapshot(self: &Arc<Self>, key: BootKey, image: PathBuf) {
        if self.ready_boot_snapshot(&key).is_some() || !self.boot_snapshots.claim(&key.key) {
            return;
        }
        let this = self.clone();
        // Tracked: a graceful stop waits for it rather than leaving its VM behind.
        self.operations.spawn(async move {
            let Ok(_permit) = this.boot_snapshots.maker.acquire().await else {
                return;
            };
            let started = Instant::now();
            let made = this.make_boot_snapshot(&key, &image).await;
            match &made {
                Ok(()) => {
                    tracing::info!(template = %key.shape.template, key = %key.key, elapsed = ?started.elapsed(), "boot snapshot made; creates of this template restore it");
                    this.remove_superseded_boot_snapshots(&key);
                }
                Err(reason) => {
                    tracing::warn!(template = %key.shape.template, key = %key.key, %reason, "could not make a boot snapshot; creates of this template boot")
                }
            }
            this.boot_snapshots.finished(&key.key, made.is_ok());
        });
    }

    /// Boots a VM of `key`'s template and shape, waits for envd, pauses it and publishes it as
    /// a shared snapshot with its disk. Everything it made is removed on the way out, and on
    /// failure nothing is published.
    async fn make_boot_snapshot(&self, key: &BootKey, image: &Path) -> Result<(), String> {
        let id = SandboxId::new_random();
        let id_text = id.to_string();
        let shape = &key.shape;
        let req = CreateSandbox {
            sandbox_id: id,
            template: shape.template.clone(),
            vcpus: shape.vcpus,
            memory_mb: shape.memory_mb,
            disk_mb: shape.disk_mb,
            timeout_sec: 0,
            envs: Default::default(),
            user: None,
            image: None,
            snapshot: None,
            egress: Default::default(),
        };
        let dir = self.layout.sandbox_dir(&id_text);
        let work = SnapshotFiles::in_dir(self.layout.boot_snapshot_work_dir(&key.key));
        let staging = self.layout.boot_snapshot_staging_dir(&key.key);
        let mut network = None;
        let result = async {
            fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let base = self.layout.sandbox_base_image(&id_text);
            {
                let _lease = self.templates.lock(&shape.template).await;
                // The image may have been replaced since the create that asked for this key.
                if self.boot_key(&req, image).await.as_ref() != Some(key) {
                    return Err("the template image changed; the next create asks again".into());
                }
                link_or_copy(image, &base)?;
            }
            let upper = self.layout.sandbox_upper_disk(&id_text);
            self.uppers
                .create(&upper, u64::from(shape.disk_mb) << 20)
                .await
                .map_err(|e| e.to_string())?;
            let made = self
                .network
                .create(&id_text, &Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let spec = self.vm_spec(&req, &base, &made);
            let envd_addr = made.envd_addr();
            network = Some(made);
            let mut vm = self.vmm.start(&spec).await.map_err(|e| e.to_string())?;
            let booted = async {
                self.wait_envd_of(&id_text, &envd_addr, &mut *vm).await?;
                vm.pause_to(&work).await.map_err(|e| e.to_string())
            }
            .await;
            if let Err(reason) = booted {
                if let Err(error) = vm.kill().await {
                    tracing::warn!(sandbox = %id_text, %error, "killing a boot snapshot's VM");
                }
                return Err(reason);
            }
            drop(vm);
            remove_dir_if_present(&staging)?;
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&staging)
                .map_err(|e| format!("creating {}: {e}", staging.display()))?;
            let snapshot_upper = staging.join("upper.ext4");
            fs::rename(&upper, &snapshot_upper)
                .map_err(|e| format!("moving the disk into {}: {e}", staging.display()))?;
            let share_spec = with_drive(&spec, "upper", &snapshot_upper);
            self.vmm
                .share(&share_spec, &work, &SnapshotFiles::in_dir(staging.clone()))
                .await
                .map_err(|e| e.to_string())?;
            let info = BootSnapshotInfo {
                format: INFO_FORMAT,
                key: key.key.clone(),
                shape: shape.clone(),
                made_unix_ms: now_unix_ms(),
            };
            let json = serde_json::to_vec_pretty(&info).expect("info serializes");
            fs::write(staging.join("boot.json"), json)
                .and_then(|()| fs::File::open(staging.join("boot.json"))?.sync_all())
                .map_err(|e| format!("writing boot.json: {e}"))?;
            let published = self.layout.boot_snapshot_dir(&key.key);
            fs::rename(&staging, &published)
                .and_then(|()| fs::File::open(self.layout.boot_snapshots_dir())?.sync_all())
                .map_err(|e| format!("publishing {}: {e}", published.display()))
        }
        .await;
        if let Some(network) = network {
            if let Err(error) = self.network.destroy(&network).await {
                tracing::warn!(sandbox = %id_text, %error, "removing a boot snapshot's network");
            }
        }
        for leftover in [&dir, &work.dir, &staging] {
            if let Err(reason) = remove_dir_if_present(leftover) {
                tracing::warn!(%reason, "removing what making a boot snapshot left");
            }
        }
        result
    }

    /// Removes the other boot snapshots of `key`'s shape: made from an older image, kernel or
    /// VMM, no create asks for them again.
    fn remove_superseded_boot_snapshots(&self, key: &BootKey) {
        self.remove_boot_snapshots_where(|info| info.shape == key.shape && info.key != key.key);
    }

    /// Removes every boot snapshot of `template` (its image was removed from this host).
    pub(super) fn remove_boot_snapshots_of(&self, template: &TemplateName) {
        self.remove_boot_snapshots_where(|info| &info.shape.template == template);
    }

    /// At agent start: removes what an interrupted making left, and snapshots without a
    /// readable `boot.json`.
    pub(super) fn collect_boot_snapshots(&self) {
        let Ok(entries) = fs::read_dir(self.layout.boot_snapshots_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || read_info(&path).is_none() {
                tracing::info!(path = %path.display(), "removing an unfinished boot snapshot");
                remove_unless_in_use(&path);
            }
        }
    }

    fn remove_boot_snapshots_where(&self, doomed: impl Fn(&BootSnapshotInfo) -> bool) {
        let Ok(entries) = fs::read_dir(self.layout.boot_snapshots_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if read_info(&path).is_some_and(|info| doomed(&info)) {
                tracing::info!(path = %path.display(), "removing a boot snapshot no create asks for");
                remove_unless_in_use(&path);
            }
        }
    }

    /// Waits for envd at `addr` in a VM that just booted, up to the create deadline.
    async fn wait_envd_of(
        &self,
        id: &str,
        addr: &std::net::SocketAddr,
        vm: &mut dyn Vm,
    ) -> Result<(), String> {
        let envd = EnvdClient::new(&format!("http://{addr}")).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + self.limits.envd_ready_timeout;
        loop {
            if let Ok(Ok(_)) = tokio::time::timeout(super::pause::ENVD_ATTEMPT, envd.health()).await
            {
                return Ok(());
            }
            if let Ok(crate::vmm::VmStatus::Exited(status)) = vm.status().await {
                return Err(format!(
                    "the VM exited ({status}) before envd answered; console: {}",
                    self.console_tail(id)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "envd did not answer within {:?}; console: {}",
                    self.limits.envd_ready_timeout,
                    self.console_tail(id)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn read_info(dir: &Path) -> Option<BootSnapshotInfo> {
    let text = fs::read(dir.join("boot.json")).ok()?;
    let info: BootSnapshotInfo = serde_json::from_slice(&text).ok()?;
    (info.format == INFO_FORMAT).then_some(info)
}

/// `spec` with drive `id` at `path`.
fn with_drive(spec: &VmSpec, id: &str, path: &Path) -> VmSpec {
    let mut spec = spec.clone();
    for drive in spec.drives.iter_mut().filter(|d| d.id == id) {
        drive.path = path.to_owned();
    }
    spec
}

/// Links `image` to `target`, or copies it when they are on different filesystems.
pub(super) fn link_or_copy(image: &Path, target: &Path) -> Result<(), String> {
    match fs::hard_link(image, target) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => fs::copy(image, target)
            .map(drop)
            .map_err(|e| format!("copying {}: {e}", image.display())),
        Err(e) => Err(format!("linking {}: {e}", image.display())),
    }
}

fn remove_dir_if_present(dir: &Path) -> Result<(), String> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("removing {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Removes a boot snapshot directory unless a restore holds it (its shared lock); a later
/// collection removes it then. A restored VM keeps the files it mapped either way.
fn remove_unless_in_use(dir: &Path) {
    let Ok(handle) = fs::File::open(dir) else {
        return;
    };
    match Flock::lock(handle, FlockArg::LockExclusiveNonblock) {
        Ok(_lock) => {
            // Out of the way at once, then removed: nobody (a create, a collection, a test
            // watching the directory) sees it half removed under its own name. A dot-name left
            // by a crash is removed by the next collection.
            let doomed = dir.with_file_name(format!(
                ".removing-{}",
                dir.file_name().unwrap_or_default().to_string_lossy()
            ));
            let target = if fs::rename(dir, &doomed).is_ok() {
                doomed
            } else {
                dir.to_owned()
            };
            if let Err(reason) = remove_dir_if_present(&target) {
                tracing::warn!(%reason, "could not remove a boot snapshot");
            }
        }
        Err(_) => tracing::info!(dir = %dir.display(), "a boot snapshot in use is left for later"),
    }
}
