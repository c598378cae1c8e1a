//! Snapshots of paused VMs on disk, shared by both backends: the files one snapshot is made of,
//! its metadata, and the rules that keep a half-written or stale snapshot from ever being
//! loaded. Every file is written under a `.partial` name, made durable and renamed into place;
//! the metadata comes last, so its presence means the snapshot is complete. A restore checks
//! the metadata against the VMM and the VM spec before any process starts, and then moves the
//! metadata aside: the restored guest writes its disk, so the memory in the snapshot no longer
//! matches it and loading it again would corrupt the disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{posix_fadvise, Flock, FlockArg, PosixFadviseAdvice};
use nix::sys::statvfs::statvfs;
use serde::{Deserialize, Serialize};

use super::{VmSpec, VmmKind};
use crate::config::Layout;

/// The version of this layout and metadata. A snapshot of another version is refused.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// The files of one snapshot, all in one directory under the files root's `snapshots/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    pub dir: PathBuf,
    pub meta: PathBuf,
    /// Where the metadata goes once the snapshot has been restored.
    pub restored_meta: PathBuf,
    pub state: PathBuf,
    pub memory: PathBuf,
}

impl SnapshotFiles {
    pub fn for_sandbox(layout: &Layout, id: &str) -> Self {
        Self {
            dir: layout.snapshot_dir(id),
            meta: layout.snapshot_meta(id),
            restored_meta: layout.snapshot_restored_meta(id),
            state: layout.snapshot_state(id),
            memory: layout.snapshot_memory(id),
        }
    }

    /// The same files in another directory (a shared snapshot's, see [`SnapshotMeta::shared`]).
    pub fn in_dir(dir: PathBuf) -> Self {
        let named = |path: PathBuf| dir.join(path.file_name().unwrap_or_default());
        let layout = Layout::new("/");
        Self {
            meta: named(layout.snapshot_meta("x")),
            restored_meta: named(layout.snapshot_restored_meta("x")),
            state: named(layout.snapshot_state("x")),
            memory: named(layout.snapshot_memory("x")),
            dir,
        }
    }

    /// Bytes the snapshot occupies on disk (allocated blocks, not apparent sizes: holes and
    /// skipped zero pages cost nothing).
    pub fn allocated_bytes(&self) -> u64 {
        [&self.meta, &self.state, &self.memory]
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }
}

/// What a snapshot was taken of and by whom; `meta.json` beside the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub format: u32,
    #[serde(with = "vmm_kind")]
    pub vmm: VmmKind,
    /// The running VMM's own version report at pause time (`QEMU 7.2.22 (Debian ...)`,
    /// Firecracker's `1.16.1`): the state format is tied to it.
    pub vmm_version: String,
    /// Firecracker's snapshot data format (`firecracker --snapshot-version`); QEMU has none
    /// apart from its version.
    pub vmm_snapshot_version: Option<String>,
    pub machine: Machine,
    /// A shared snapshot is the start of any number of VMs ([`super::Vmm::restore_shared`]) and is
    /// never retired; each VM gets its own copy of the writable drives, so their paths are not
    /// part of the machine check. A paused VM's snapshot (the default) is restored once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// The state files and their exact sizes, checked before a restore.
    pub files: Vec<SnapshotFile>,
    pub created_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFile {
    /// The name inside the snapshot directory.
    pub name: String,
    pub bytes: u64,
}

/// The machine options both ends of a restore must agree on. The network attachment (TAP,
/// namespace) may differ: the guest keeps its address by design.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
    pub drives: Vec<MachineDrive>,
    pub mac: Option<String>,
    pub vsock_cid: Option<u32>,
    /// QEMU's accelerator (`kvm`, `tcg`): CPU state taken under one does not load under the
    /// other.
    pub accel: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineDrive {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

impl Machine {
    pub fn of(spec: &VmSpec, accel: Option<&str>) -> Self {
        Self {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            boot_args: spec.boot_args(),
            drives: spec
                .drives
                .iter()
                .map(|d| MachineDrive {
                    id: d.id.clone(),
                    path: d.path.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            mac: spec.net.as_ref().map(|n| n.mac.clone()),
            vsock_cid: spec.vsock_cid,
            accel: accel.map(str::to_owned),
        }
    }

    /// The first option that differs, as (name, in the snapshot, in the spec); drives are
    /// compared by id and mode only unless `drive_paths`.
    fn difference(&self, spec: &Self, drive_paths: bool) -> Option<(&'static str, String, String)> {
        let drives = |machine: &Self| {
            let listed: Vec<_> = machine
                .drives
                .iter()
                .map(|d| {
                    if drive_paths {
                        format!("{} {} ro={}", d.id, d.path.display(), d.read_only)
                    } else {
                        format!("{} ro={}", d.id, d.read_only)
                    }
                })
                .collect();
            listed.join(", ")
        };
        let differs = |name, a: String, b: String| (a != b).then_some((name, a, b));
        differs("vcpus", self.vcpus.to_string(), spec.vcpus.to_string())
            .or_else(|| {
                differs(
                    "memory_mib",
                    self.memory_mib.to_string(),
                    spec.memory_mib.to_string(),
                )
            })
            .or_else(|| {
                differs(
                    "kernel",
                    self.kernel.display().to_string(),
                    spec.kernel.display().to_string(),
                )
            })
            .or_else(|| {
                differs(
                    "initrd",
                    format!("{:?}", self.initrd),
                    format!("{:?}", spec.initrd),
                )
            })
            .or_else(|| differs("boot_args", self.boot_args.clone(), spec.boot_args.clone()))
            .or_else(|| differs("drives", drives(self), drives(spec)))
            .or_else(|| differs("mac", format!("{:?}", self.mac), format!("{:?}", spec.mac)))
            .or_else(|| {
                differs(
                    "vsock_cid",
                    format!("{:?}", self.vsock_cid),
                    format!("{:?}", spec.vsock_cid),
                )
            })
            .or_else(|| {
                differs(
                    "accel",
                    format!("{:?}", self.accel),
                    format!("{:?}", spec.accel),
                )
            })
    }
}

mod vmm_kind {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::VmmKind;

    pub fn serialize<S: Serializer>(kind: &VmmKind, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(kind)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VmmKind, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {dir} is incomplete: it has no metadata (never finished, or removed)")]
    Incomplete { dir: PathBuf },
    #[error("snapshot {dir} was already restored; the restored guest has since changed its disk")]
    AlreadyRestored { dir: PathBuf },
    #[error("snapshot {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("snapshot {dir} has format {found}; this build reads format {SNAPSHOT_FORMAT}")]
    Format { dir: PathBuf, found: u32 },
    #[error("snapshot {dir} was taken by {snapshot}, not {ours}")]
    VmmKind {
        dir: PathBuf,
        snapshot: VmmKind,
        ours: VmmKind,
    },
    #[error("snapshot {dir} was taken by {what} `{snapshot}`; this host runs `{ours}`")]
    VmmVersion {
        dir: PathBuf,
        what: &'static str,
        snapshot: String,
        ours: String,
    },
    #[error("snapshot {dir} has {option} = {snapshot}, the VM spec has {spec}")]
    Machine {
        dir: PathBuf,
        option: &'static str,
        snapshot: String,
        spec: String,
    },
    #[error(
        "no space for a snapshot in {dir}: it needs up to {needed} bytes, {available} are free"
    )]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("snapshot {dir} is {}, not {}", kind_name(*.shared), kind_name(!*.shared))]
    Kind { dir: PathBuf, shared: bool },
    #[error("snapshot {dir} is being written or restored by another caller")]
    Busy { dir: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl SnapshotError {
    /// The disk is full (or the quota reached): the caller says so rather than "internal".
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::NoSpace { .. } => true,
            Self::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            }
            _ => false,
        }
    }
}

fn kind_name(shared: bool) -> &'static str {
    if shared {
        "a shared snapshot"
    } else {
        "a paused VM's snapshot"
    }
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn remove_if_present(path: &Path) -> Result<(), SnapshotError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("failed to remove", path)(e)),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("failed to sync directory", dir))
}

/// Drops a written file's pages from the page cache: a paused sandbox holds no host RAM.
pub(crate) fn drop_page_cache(file: &File) {
    if let Err(errno) = posix_fadvise(file.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED) {
        tracing::debug!(%errno, "posix_fadvise(DONTNEED) on a snapshot file");
    }
}

/// Makes a file another process wrote durable and evicts it from the page cache.
pub(crate) fn sync_file(path: &Path) -> Result<(), SnapshotError> {
    let file = File::open(path).map_err(io_error("failed to open", path))?;
    file.sync_all().map_err(io_error("failed to sync", path))?;
    drop_page_cache(&file);
    Ok(())
}

/// Flushes a VM's writable disks to stable storage: the disk is part of the paused state.
pub(crate) fn sync_writable_drives(machine: &Machine) -> Result<(), SnapshotError> {
    for drive in machine.drives.iter().filter(|d| !d.read_only) {
        let file = OpenOptions::new()
            .write(true)
            .open(&drive.path)
            .map_err(io_error("failed to open disk", &drive.path))?;
        file.sync_all()
            .map_err(io_error("failed to sync disk", &drive.path))?;
    }
    Ok(())
}

/// The most a snapshot of a guest with `memory_mib` can take: all of its memory, plus room for
/// the device state and the stream's page headers.
pub(crate) fn bytes_needed(memory_mib: u32) -> u64 {
    (u64::from(memory_mib) + 16) << 20
}

/// Holds the snapshot directory while one pause or restore works on it; `shared` lets any
/// number of restores of a shared snapshot hold it together (but no writer).
fn lock_dir(files: &SnapshotFiles, shared: bool) -> Result<Flock<File>, SnapshotError> {
    let dir = File::open(&files.dir).map_err(io_error("failed to open", &files.dir))?;
    let mode = if shared {
        FlockArg::LockSharedNonblock
    } else {
        FlockArg::LockExclusiveNonblock
    };
    Flock::lock(dir, mode).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            SnapshotError::Busy {
                dir: files.dir.clone(),
            }
        } else {
            io_error("failed to lock", &files.dir)(errno.into())
        }
    })
}

/// A snapshot being written. Created before the VM stops; [`SnapshotWriter::commit`] publishes
/// it, dropping it without a commit removes what was written.
#[derive(Debug)]
pub(crate) struct SnapshotWriter {
    files: SnapshotFiles,
    /// The final names of the files the VMM writes under their `.partial` names.
    parts: Vec<PathBuf>,
    committed: bool,
    _lock: Flock<File>,
}

impl SnapshotWriter {
    /// Makes the directory and takes it, refuses to start without room for `needed` bytes
    /// (so that a full disk is found before the VM stops), then unpublishes whatever snapshot
    /// was there (its metadata goes first, durably) and clears leftovers of an interrupted
    /// pause.
    pub(crate) fn begin(
        files: &SnapshotFiles,
        parts: &[&Path],
        needed: u64,
    ) -> Result<Self, SnapshotError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&files.dir)
            .map_err(io_error("failed to create snapshot directory", &files.dir))?;
        let lock = lock_dir(files, false)?;
        let stat = statvfs(&files.dir)
            .map_err(|errno| io_error("failed to stat filesystem of", &files.dir)(errno.into()))?;
        // The files being replaced count as free: they go before the new ones are written.
        let replaced: u64 = parts
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.blocks() * 512)
            .sum();
        let available = stat.blocks_available() * stat.fragment_size() + replaced;
        if available < needed {
            return Err(SnapshotError::NoSpace {
                dir: files.dir.clone(),
                needed,
                available,
            });
        }
        remove_if_present(&files.meta)?;
        remove_if_present(&files.restored_meta)?;
        remove_if_present(&Layout::partial(&files.meta))?;
        sync_dir(&files.dir)?;
        for part in [&files.state, &files.memory] {
            remove_if_present(&Layout::partial(part))?;
            // The old files go now: the space check counted them as free.
            if parts.contains(&part.as_path()) {
                remove_if_present(part)?;
            }
        }
        Ok(Self {
            files: files.clone(),
            parts: parts.iter().map(|p| p.to_path_buf()).collect(),
            committed: false,
            _lock: lock,
        })
    }

    /// Creates the `.partial` file of `part` for the VMM to write into (QEMU gets the file
    /// descriptor).
    pub(crate) fn create_partial(&self, part: &Path) -> Result<File, SnapshotError> {
        let path = Layout::partial(part);
        OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("failed to create", &path))
    }

    /// Publishes the snapshot: each part is synced and renamed into place, then the metadata
    /// (listing the parts and their sizes) is written, synced and renamed, and the directory
    /// synced. Until the last rename nothing here is loadable.
    pub(crate) fn commit(
        mut self,
        vmm: VmmKind,
        vmm_version: &str,
        vmm_snapshot_version: Option<&str>,
        machine: &Machine,
        shared: bool,
    ) -> Result<SnapshotMeta, SnapshotError> {
        let mut listed = Vec::new();
        for part in &self.parts {
            let partial = Layout::partial(part);
            if shared {
                // Every VM started from a shared snapshot reads it: its pages stay cached.
                File::open(&partial)
                    .and_then(|file| file.sync_all())
                    .map_err(io_error("failed to sync", &partial))?;
            } else {
                sync_file(&partial)?;
            }
            let bytes = fs::metadata(&partial)
                .map_err(io_error("failed to stat", &partial))?
                .len();
            fs::rename(&partial, part).map_err(io_error("failed to rename", &partial))?;
            listed.push(SnapshotFile {
                name: file_name(part),
                bytes,
            });
        }
        let meta = SnapshotMeta {
            format: SNAPSHOT_FORMAT,
            vmm,
            vmm_version: vmm_version.to_owned(),
            vmm_snapshot_version: vmm_snapshot_version.map(str::to_owned),
            machine: machine.clone(),
            shared,
            files: listed,
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        write_meta(&self.files.meta, &meta)?;
        sync_dir(&self.files.dir)?;
        self.committed = true;
        Ok(meta)
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for part in &self.parts {
            if let Err(error) = remove_if_present(&Layout::partial(part)) {
                tracing::warn!(%error, "removing a failed snapshot's partial file");
            }
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl SnapshotMeta {
    /// The metadata at `path` (`meta.json` of a committed snapshot).
    pub fn read(path: &Path) -> Result<Self, SnapshotError> {
        let bytes = fs::read(path).map_err(io_error("failed to read", path))?;
        serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Corrupt {
            path: path.to_owned(),
            detail: format!("the metadata does not parse: {e}"),
        })
    }
}

/// Points the snapshot whose metadata is at `meta_path` at this host's files: the kernel, the
/// initramfs and each drive (by id) under this host's paths, for a snapshot taken on another
/// host whose files root differs. The caller has checked that the files are the same.
pub fn rebase_snapshot_meta(
    meta_path: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    drives: &[(&str, &Path)],
) -> Result<(), SnapshotError> {
    let mut meta = SnapshotMeta::read(meta_path)?;
    meta.machine.kernel = kernel.to_owned();
    meta.machine.initrd = initrd.map(Path::to_owned);
    for drive in &mut meta.machine.drives {
        if let Some((_, path)) = drives.iter().find(|(id, _)| *id == drive.id) {
            drive.path = (*path).to_owned();
        }
    }
    write_meta(meta_path, &meta)
}

/// Writes `meta.json` through a `.partial` file, durably.
fn write_meta(path: &Path, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
    let partial = Layout::partial(path);
    let mut json = serde_json::to_vec_pretty(meta).expect("metadata serializes");
    json.push(b'\n');
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io_error("failed to create", &partial))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(io_error("failed to write", &partial))?;
    fs::rename(&partial, path).map_err(io_error("failed to rename", &partial))
}

/// Makes the paused VM's snapshot `paused` (left loadable) into the shared snapshot `out` by
/// copying its files, sparsely, and giving back the memory's zero pages: for VMMs whose paused
/// snapshot already keeps the guest's memory in a file of its own (Firecracker).
pub(crate) fn share_by_copy(
    paused: &SnapshotFiles,
    out: &SnapshotFiles,
    vmm: VmmKind,
    vmm_version: &str,
    vmm_snapshot_version: Option<&str>,
) -> Result<SnapshotMeta, SnapshotError> {
    let reader = SnapshotReader::open(paused)?;
    let machine = reader.meta.machine.clone();
    reader.check(vmm, vmm_version, vmm_snapshot_version, &machine)?;
    let writer = SnapshotWriter::begin(out, &[&out.state, &out.memory], paused.allocated_bytes())?;
    for (from, to) in [(&paused.state, &out.state), (&paused.memory, &out.memory)] {
        let input = File::open(from).map_err(io_error("failed to open", from))?;
        let output = writer.create_partial(to)?;
        crate::sparse::copy_sparse(&input, &output).map_err(io_error("failed to copy", from))?;
    }
    let memory = Layout::partial(&out.memory);
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&memory)
        .and_then(|file| crate::sparse::punch_zero_pages(&file))
        .map_err(io_error("failed to punch zero pages of", &memory))?;
    writer.commit(vmm, vmm_version, vmm_snapshot_version, &machine, true)
}

/// A complete snapshot, held for one restore.
#[derive(Debug)]
pub(crate) struct SnapshotReader {
    files: SnapshotFiles,
    meta: SnapshotMeta,
    _lock: Flock<File>,
}

impl SnapshotReader {
    /// Takes a paused VM's snapshot for its one restore, and reads and checks the metadata and
    /// the files it lists.
    pub(crate) fn open(files: &SnapshotFiles) -> Result<Self, SnapshotError> {
        Self::open_as(files, false)
    }

    /// Takes a shared snapshot for one of its many restores (together with any others).
    pub(crate) fn open_shared(files: &SnapshotFiles) -> Result<Self, SnapshotError> {
        Self::open_as(files, true)
    }

    fn open_as(files: &SnapshotFiles, shared: bool) -> Result<Self, SnapshotError> {
        if !files.dir.is_dir() {
            return Err(SnapshotError::Incomplete {
                dir: files.dir.clone(),
            });
        }
        let lock = lock_dir(files, shared)?;
        let text = match fs::read(&files.meta) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let dir = files.dir.clone();
                return Err(if files.restored_meta.exists() {
                    SnapshotError::AlreadyRestored { dir }
                } else {
                    SnapshotError::Incomplete { dir }
                });
            }
            Err(e) => return Err(io_error("failed to read", &files.meta)(e)),
        };
        let corrupt = |detail: String| SnapshotError::Corrupt {
            path: files.meta.clone(),
            detail,
        };
        // The format is checked before the rest: a later format may have other fields.
        let format = serde_json::from_slice::<serde_json::Value>(&text)
            .map_err(|e| corrupt(e.to_string()))?
            .get("format")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| corrupt("no format version".into()))?;
        if format != u64::from(SNAPSHOT_FORMAT) {
            return Err(SnapshotError::Format {
                dir: files.dir.clone(),
                found: u32::try_from(format).unwrap_or(u32::MAX),
            });
        }
        let meta: SnapshotMeta =
            serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        if meta.shared != shared {
            return Err(SnapshotError::Kind {
                dir: files.dir.clone(),
                shared: meta.shared,
            });
        }
        for listed in &meta.files {
            let path = files.dir.join(&listed.name);
            if listed.name.contains('/') || listed.name.is_empty() {
                return Err(corrupt(format!("bad file name `{}`", listed.name)));
            }
            let bytes = fs::metadata(&path)
                .map_err(|e| SnapshotError::Corrupt {
                    path: path.clone(),
                    detail: e.to_string(),
                })?
                .len();
            if bytes != listed.bytes {
                return Err(SnapshotError::Corrupt {
                    path,
                    detail: format!("{bytes} bytes, the metadata says {}", listed.bytes),
                });
            }
        }
        Ok(Self {
            files: files.clone(),
            meta,
            _lock: lock,
        })
    }

    /// Refuses a snapshot this VMM, at this version, cannot load into `machine`.
    pub(crate) fn check(
        &self,
        vmm: VmmKind,
        vmm_version: &str,
        vmm_snapshot_version: Option<&str>,
        machine: &Machine,
    ) -> Result<(), SnapshotError> {
        let drive_paths = !self.meta.shared;
        self.check_with(vmm, vmm_version, vmm_snapshot_version, machine, drive_paths)
    }

    /// [`SnapshotReader::check`] for a load that never runs the guest (making a shared
    /// snapshot), which may name copies of the drives.
    pub(crate) fn check_ignoring_drive_paths(
        &self,
        vmm: VmmKind,
        vmm_version: &str,
        vmm_snapshot_version: Option<&str>,
        machine: &Machine,
    ) -> Result<(), SnapshotError> {
        self.check_with(vmm, vmm_version, vmm_snapshot_version, machine, false)
    }

    fn check_with(
        &self,
        vmm: VmmKind,
        vmm_version: &str,
        vmm_snapshot_version: Option<&str>,
        machine: &Machine,
        drive_paths: bool,
    ) -> Result<(), SnapshotError> {
        let dir = || self.files.dir.clone();
        let meta = &self.meta;
        if meta.vmm != vmm {
            return Err(SnapshotError::VmmKind {
                dir: dir(),
                snapshot: meta.vmm,
                ours: vmm,
            });
        }
        if meta.vmm_version != vmm_version {
            return Err(SnapshotError::VmmVersion {
                dir: dir(),
                what: "VMM version",
                snapshot: meta.vmm_version.clone(),
                ours: vmm_version.to_owned(),
            });
        }
        if meta.vmm_snapshot_version.as_deref() != vmm_snapshot_version {
            return Err(SnapshotError::VmmVersion {
                dir: dir(),
                what: "snapshot format",
                snapshot: meta.vmm_snapshot_version.clone().unwrap_or_default(),
                ours: vmm_snapshot_version.unwrap_or_default().to_owned(),
            });
        }
        if let Some((option, snapshot, spec)) = meta.machine.difference(machine, drive_paths) {
            return Err(SnapshotError::Machine {
                dir: dir(),
                option,
                snapshot,
                spec,
            });
        }
        Ok(())
    }

    /// Marks the snapshot restored, durably, before the guest runs again.
    pub(crate) fn consume(&self) -> Result<(), SnapshotError> {
        fs::rename(&self.files.meta, &self.files.restored_meta)
            .map_err(io_error("failed to retire", &self.files.meta))?;
        sync_dir(&self.files.dir)
    }

    /// Undoes [`SnapshotReader::consume`] when the guest provably never ran.
    pub(crate) fn unconsume(&self) {
        let restored = fs::rename(&self.files.restored_meta, &self.files.meta)
            .map_err(io_error("failed to restore", &self.files.meta))
            .and_then(|()| sync_dir(&self.files.dir));
        if let Err(error) = restored {
            tracing::warn!(%error, "a snapshot whose restore failed stays retired");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{Drive, VmFiles};

    fn machine() -> Machine {
        let spec = VmSpec {
            id: "cl-s".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: None,
            extra_boot_args: String::new(),
            drives: vec![Drive {
                id: "root".into(),
                path: "/r".into(),
                read_only: true,
            }],
            net: None,
            vsock_cid: None,
            files: VmFiles::for_sandbox(&Layout::new("/srv"), "cl-s"),
            confinement: None,
        };
        Machine::of(&spec, Some("tcg"))
    }

    fn written(layout: &Layout, id: &str) -> SnapshotFiles {
        let files = SnapshotFiles::for_sandbox(layout, id);
        let writer = SnapshotWriter::begin(&files, &[&files.state], 5).unwrap();
        let mut f = writer.create_partial(&files.state).unwrap();
        f.write_all(b"state").unwrap();
        writer
            .commit(VmmKind::Qemu, "QEMU 7.2.22", None, &machine(), false)
            .unwrap();
        files
    }

    #[test]
    fn a_committed_snapshot_reads_back_and_is_consumed_once() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        let files = written(&layout, "cl-a");
        assert!(!Layout::partial(&files.state).exists());
        let reader = SnapshotReader::open(&files).unwrap();
        assert_eq!(reader.meta.files[0].bytes, 5);
        reader
            .check(VmmKind::Qemu, "QEMU 7.2.22", None, &machine())
            .unwrap();
        reader.consume().unwrap();
        drop(reader);
        let err = SnapshotReader::open(&files).unwrap_err();
        assert!(
            matches!(err, SnapshotError::AlreadyRestored { .. }),
            "{err}"
        );
    }

    #[test]
    fn a_snapshot_from_another_host_is_rebased_onto_this_hosts_paths_and_then_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        let files = written(&layout, "cl-r");
        let here = Machine {
            kernel: "/here/kernels/vmlinux".into(),
            initrd: Some("/here/kernels/initramfs".into()),
            drives: vec![MachineDrive {
                id: "root".into(),
                path: "/here/sandboxes/cl-r/base.ext4".into(),
                read_only: true,
            }],
            ..machine()
        };
        let reader = SnapshotReader::open(&files).unwrap();
        assert!(reader
            .check(VmmKind::Qemu, "QEMU 7.2.22", None, &here)
            .is_err());
        drop(reader);
        rebase_snapshot_meta(
            &files.meta,
            &here.kernel,
            here.initrd.as_deref(),
            &[("root", &here.drives[0].path), ("absent", Path::new("/x"))],
        )
        .unwrap();
        let reader = SnapshotReader::open(&files).unwrap();
        reader
            .check(VmmKind::Qemu, "QEMU 7.2.22", None, &here)
            .unwrap();
        assert_eq!(reader.meta.machine, here);
    }

    #[test]
    fn an_uncommitted_snapshot_leaves_nothing_loadable() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        let files = written(&layout, "cl-b");
        // A second pause into the same directory that fails midway.
        let writer = SnapshotWriter::begin(&files, &[&files.state], 5).unwrap();
        writer.create_partial(&files.state).unwrap();
        drop(writer);
        assert!(!Layout::partial(&files.state).exists());
        let err = SnapshotReader::open(&files).unwrap_err();
        assert!(matches!(err, SnapshotError::Incomplete { .. }), "{err}");
    }

    #[test]
    fn a_second_caller_finds_the_directory_busy() {
        let tmp = tempfile::tempdir().unwrap();
        let files = written(&Layout::new(tmp.path()), "cl-c");
        let _reader = SnapshotReader::open(&files).unwrap();
        let err = SnapshotReader::open(&files).unwrap_err();
        assert!(matches!(err, SnapshotError::Busy { .. }), "{err}");
    }

    #[test]
    fn a_shared_snapshot_is_read_by_many_never_retired_and_not_taken_for_a_paused_one() {
        let tmp = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::in_dir(tmp.path().join("shared"));
        let writer = SnapshotWriter::begin(&files, &[&files.state], 5).unwrap();
        writer
            .create_partial(&files.state)
            .unwrap()
            .write_all(b"state")
            .unwrap();
        let meta = writer
            .commit(VmmKind::Qemu, "QEMU 7.2.22", None, &machine(), true)
            .unwrap();
        assert!(meta.shared);
        let err = SnapshotReader::open(&files).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Kind { shared: true, .. }),
            "{err}"
        );
        let first = SnapshotReader::open_shared(&files).unwrap();
        let second = SnapshotReader::open_shared(&files).unwrap();
        // Each VM has its own copy of the writable drives: their paths do not count.
        let mut elsewhere = machine();
        elsewhere.drives[0].path = "/somewhere/else".into();
        first
            .check(VmmKind::Qemu, "QEMU 7.2.22", None, &elsewhere)
            .unwrap();
        // A writer waits for the readers.
        let err = SnapshotWriter::begin(&files, &[&files.state], 5).unwrap_err();
        assert!(matches!(err, SnapshotError::Busy { .. }), "{err}");
        drop((first, second));
        assert!(files.meta.is_file(), "never retired");

        let paused = written(&Layout::new(tmp.path()), "cl-p");
        let err = SnapshotReader::open_shared(&paused).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Kind { shared: false, .. }),
            "{err}"
        );
        let reader = SnapshotReader::open(&paused).unwrap();
        let err = reader
            .check(VmmKind::Qemu, "QEMU 7.2.22", None, &elsewhere)
            .unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Machine {
                    option: "drives",
                    ..
                }
            ),
            "a paused VM's drives stay where they were: {err}"
        );
    }

    #[test]
    fn mismatches_are_refused_with_what_differs() {
        let tmp = tempfile::tempdir().unwrap();
        let files = written(&Layout::new(tmp.path()), "cl-d");
        let reader = SnapshotReader::open(&files).unwrap();
        let err = reader
            .check(VmmKind::Firecracker, "QEMU 7.2.22", None, &machine())
            .unwrap_err();
        assert!(matches!(err, SnapshotError::VmmKind { .. }), "{err}");
        let err = reader
            .check(VmmKind::Qemu, "QEMU 8.0.0", None, &machine())
            .unwrap_err();
        assert!(matches!(err, SnapshotError::VmmVersion { .. }), "{err}");
        let mut bigger = machine();
        bigger.memory_mib = 512;
        let err = reader
            .check(VmmKind::Qemu, "QEMU 7.2.22", None, &bigger)
            .unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Machine {
                    option: "memory_mib",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_file_a_garbled_meta_and_another_format_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        let files = written(&layout, "cl-e");
        fs::write(&files.state, b"sta").unwrap();
        let err = SnapshotReader::open(&files).unwrap_err();
        assert!(matches!(err, SnapshotError::Corrupt { .. }), "{err}");
        fs::write(&files.meta, b"{\"format\": 1, \"vmm\": ").unwrap();
        let err = SnapshotReader::open(&files).unwrap_err();
        assert!(matches!(err, SnapshotError::Corrupt { .. }), "{err}");
        fs::write(&files.meta, b"{\"format\": 99}").unwrap();
        let err = SnapshotReader::open(&files).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Format { found: 99, .. }),
            "{err}"
        );
    }
}
