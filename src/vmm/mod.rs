//! Virtual machine monitors: one [`Vmm`] trait that starts a sandbox's microVM from a
//! [`VmSpec`], and its two backends, Firecracker (production, needs working KVM) and QEMU
//! `microvm` (KVM or TCG, for hosts where Firecracker cannot run). Networking, disks and the
//! guest agent are prepared by the layers above; this module only runs and stops the VMM
//! process, pauses it into a snapshot on disk ([`snapshot`]) or restores one, and takes over
//! ([`Vmm::adopt`]) a VMM process an earlier agent process started.

pub mod cgroup;
mod console;
pub mod firecracker;
mod leftovers;
mod pidfd;
mod process;
pub mod qemu;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{AgentConfig, Layout};
pub use crate::config::{ConsoleLogMaxBytes, QemuAccel, VmmKind};
pub use cgroup::{CgroupError, CgroupVersion, Cgroups, IoLimit, VmCgroup, VmLimits};
pub use console::console_tail;
pub use firecracker::{FirecrackerApiError, FirecrackerVmm};
pub use leftovers::{find_leftovers, kill_leftover, Leftover};
pub use qemu::{Accel, AccelDecision, QemuVmm, QmpError};
pub use snapshot::{rebase_snapshot_meta, SnapshotError, SnapshotFiles, SnapshotMeta};

/// Kernel arguments every guest boots with, whatever the backend: the serial console the agent
/// captures, reboot through the keyboard controller (Firecracker exits on it), reboot instead of
/// hanging on a panic, and no PCI probing on the virtio-mmio machines.
pub const BASE_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Everything needed to start one sandbox's VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Sandbox id (`cl-...`); letters, digits and `-` only.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Uncompressed ELF `vmlinux`.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Arguments appended to [`BASE_BOOT_ARGS`], e.g. the network layer's `ip=...`.
    pub extra_boot_args: String,
    /// Block devices in guest order: the first is `/dev/vda`, the second `/dev/vdb`.
    pub drives: Vec<Drive>,
    pub net: Option<NetAttachment>,
    /// Guest CID of a virtio-vsock device, when the guest agent is reached over vsock.
    pub vsock_cid: Option<u32>,
    pub files: VmFiles,
    /// How the VMM process is confined; `None` runs it with the agent's own privileges.
    pub confinement: Option<Confinement>,
}

/// What a confined VMM process may do: it runs as an unprivileged user of its own, inside an
/// empty root directory, under a seccomp filter, in a cgroup whose limits follow from the VM's
/// vCPUs and memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// The user and group the VMM runs as once it has opened its files. One per running VM,
    /// so that a VMM taken over by its guest cannot signal or trace another VM's.
    pub uid: u32,
    pub gid: u32,
    /// Where the VM's cgroup is made.
    pub cgroups: Cgroups,
}

impl Confinement {
    /// The cgroup of `spec`'s VM.
    fn cgroup(&self, spec: &VmSpec) -> VmCgroup {
        self.cgroups.vm(&spec.id)
    }
}

/// How the agent confines every VMM it starts: the VM in network slot N runs as uid and gid
/// `id_base + N`, in a cgroup under `cgroups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfinementPolicy {
    pub id_base: u32,
    pub cgroups: Cgroups,
}

impl ConfinementPolicy {
    /// The host's cgroup hierarchy (v2, or v1 on hybrid hosts) under `agent.cgroup_parent`,
    /// with the disk I/O limit on the files root's disk; the choice is logged.
    pub fn from_config(agent: &AgentConfig) -> Result<Self, CgroupError> {
        let io = IoLimit::for_path(
            &agent.files_rootdir,
            agent.vm_io_bytes_per_sec,
            agent.vm_io_ops_per_sec,
        );
        let cgroups = Cgroups::detect(Path::new(cgroup::DEFAULT_ROOT), &agent.cgroup_parent, io)?;
        tracing::info!(
            version = %cgroups.version(),
            parent = %agent.cgroup_parent.display(),
            io_device = ?io.map(|io| format!("{}:{}", io.major, io.minor)),
            "each VM gets a cgroup {} of its own",
            cgroups.version()
        );
        Ok(Self {
            id_base: agent.vmm_id_base,
            cgroups,
        })
    }

    /// The confinement of the VM in network slot `slot`.
    pub fn for_slot(&self, slot: u32) -> Confinement {
        let id = self.id_base.saturating_add(slot);
        Confinement {
            uid: id,
            gid: id,
            cgroups: self.cgroups.clone(),
        }
    }
}

impl VmSpec {
    /// The full kernel command line.
    pub fn boot_args(&self) -> String {
        let extra = self.extra_boot_args.trim();
        if extra.is_empty() {
            BASE_BOOT_ARGS.to_owned()
        } else {
            format!("{BASE_BOOT_ARGS} {extra}")
        }
    }

    /// Rejects what no backend can start, before any process exists.
    fn check(&self) -> Result<(), VmmError> {
        let invalid = |reason: String| {
            Err(VmmError::InvalidSpec {
                id: self.id.clone(),
                reason,
            })
        };
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return invalid("the id must be 1 to 64 letters, digits or `-`".into());
        }
        if self.vcpus == 0 || self.vcpus > 32 {
            return invalid(format!("{} vCPUs is outside 1..=32", self.vcpus));
        }
        if self.memory_mib < 64 {
            return invalid(format!(
                "{} MiB of memory is below the 64 MiB minimum",
                self.memory_mib
            ));
        }
        for drive in &self.drives {
            if drive.id.is_empty()
                || !drive
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return invalid(format!(
                    "drive id `{}` must be letters, digits or `_`",
                    drive.id
                ));
            }
        }
        if self
            .drives
            .iter()
            .enumerate()
            .any(|(i, d)| self.drives[..i].iter().any(|e| e.id == d.id))
        {
            return invalid("drive ids must be unique".into());
        }
        if let Some(cid) = self.vsock_cid {
            if cid < 3 {
                return invalid(format!("vsock CID {cid} is reserved; use 3 or above"));
            }
        }
        if let Some(confinement) = &self.confinement {
            if confinement.uid == 0 || confinement.gid == 0 {
                return invalid("a confined VMM must not run as uid or gid 0".into());
            }
        }
        Ok(())
    }
}

/// A block device backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    /// `root`, `data`, ...: letters, digits and `_` (Firecracker's rule for ids in URLs).
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// The guest's network interface, backed by a TAP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetAttachment {
    pub tap: String,
    /// e.g. `02:FC:00:00:00:05`.
    pub mac: String,
    /// The network namespace the TAP lives in (`/run/netns/NAME`); the VMM process joins it.
    pub netns: Option<PathBuf>,
}

/// Where one VM's sockets and logs live, all inside the sandbox directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFiles {
    pub dir: PathBuf,
    pub console_log: PathBuf,
    pub previous_console_log: PathBuf,
    /// The named pipe the VMM writes its console to, so that a later agent process can read it.
    pub console_fifo: PathBuf,
    pub vmm_log: PathBuf,
    pub firecracker_log: PathBuf,
    pub firecracker_socket: PathBuf,
    pub vsock_socket: PathBuf,
    pub qmp_socket: PathBuf,
    /// The empty directory a confined QEMU is chrooted into.
    pub vmm_root: PathBuf,
}

impl VmFiles {
    pub fn for_sandbox(layout: &Layout, id: &str) -> Self {
        Self {
            dir: layout.sandbox_dir(id),
            console_log: layout.console_log(id),
            previous_console_log: layout.previous_console_log(id),
            console_fifo: layout.console_fifo(id),
            vmm_log: layout.vmm_log(id),
            firecracker_log: layout.firecracker_log(id),
            firecracker_socket: layout.firecracker_socket(id),
            vsock_socket: layout.vsock_socket(id),
            qmp_socket: layout.qmp_socket(id),
            vmm_root: layout.vmm_root(id),
        }
    }
}

/// What the VMM reports about its guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStatus {
    Running,
    Paused,
    NotStarted,
    /// The VMM process has exited.
    Exited(VmmExit),
    /// A state this driver does not model, verbatim (e.g. QEMU's `guest-panicked`).
    Other(String),
}

/// How a VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmExit {
    /// Its exit status, reaped by this process, which started it.
    Status(ExitStatus),
    /// An adopted VMM ([`Vmm::adopt`]) ended. It is not this process's child: its parent
    /// (init, or a subreaper) reaps it, and only a parent can read an exit status, so there is
    /// none to report. A made-up status would read as a clean exit or a kill that nobody saw.
    Unobserved,
}

impl VmmExit {
    /// The exit status, when this process could read it.
    pub fn status(self) -> Option<ExitStatus> {
        match self {
            Self::Status(status) => Some(status),
            Self::Unobserved => None,
        }
    }
}

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(status) => status.fmt(f),
            Self::Unobserved => f.write_str("exited, status unknown (an adopted process)"),
        }
    }
}

/// Why a process is not taken over as a sandbox's VMM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdoptRefusal {
    #[error("no such process is running")]
    Gone,
    #[error("its command line does not name the control socket {socket}")]
    OtherProcess { socket: PathBuf },
    #[error("its command line lacks {0}")]
    CommandLine(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid VM spec for {id}: {reason}")]
    InvalidSpec { id: String, reason: String },
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket path {path} is longer than the 107 bytes a Unix socket allows")]
    SocketPathTooLong { path: PathBuf },
    #[error("failed to open network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("{bin} exited during start-up ({status}); its log {log} ends with: {tail}")]
    ExitedEarly {
        bin: PathBuf,
        status: VmmExit,
        log: PathBuf,
        tail: String,
    },
    #[error("{bin} did not open its control socket {path} within {waited:?}")]
    SocketTimeout {
        bin: PathBuf,
        path: PathBuf,
        waited: Duration,
    },
    #[error("could not read the version of {bin}: {detail}")]
    Version { bin: PathBuf, detail: String },
    #[error("waiting for VMM process {pid} failed: {source}")]
    Wait { pid: u32, source: std::io::Error },
    #[error("process {pid} is not taken over as the {kind} VMM of sandbox {id}: {refusal}")]
    NotAdoptable {
        pid: u32,
        id: String,
        kind: VmmKind,
        refusal: AdoptRefusal,
    },
    #[error("the start-up task failed: {0}")]
    StartTask(String),
    #[error(transparent)]
    FirecrackerApi(#[from] FirecrackerApiError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("QEMU's migration {direction} {status} after {waited:?}: {detail}")]
    Migration {
        direction: &'static str,
        status: String,
        waited: Duration,
        detail: String,
    },
    #[error("pausing the VM failed, and {after}: {cause}")]
    PauseFailed {
        after: AfterFailedPause,
        cause: Box<VmmError>,
    },
    #[error("restored VMM process {pid} could not resume the guest, so it was stopped: {cause}")]
    ResumeFailed { pid: u32, cause: Box<VmmError> },
}

impl VmmError {
    /// The disk the snapshot goes to is full: the caller answers with a clear "no space".
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::Snapshot(e) => e.is_disk_full(),
            Self::PauseFailed { cause, .. } | Self::ResumeFailed { cause, .. } => {
                cause.is_disk_full()
            }
            _ => false,
        }
    }
}

/// The state a VM is left in when [`Vm::pause_to`] fails; no snapshot is loadable either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailedPause {
    /// The guest was resumed and runs on.
    Running,
    /// The guest was already paused before the call and stays paused.
    Paused,
    /// The VMM process exited or had to be killed: the VM is lost.
    VmmGone,
}

impl std::fmt::Display for AfterFailedPause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Running => "the VM runs on",
            Self::Paused => "the VM stays paused",
            Self::VmmGone => "the VMM is gone",
        })
    }
}

/// A VMM backend: starts VMs. Cheap to share; one per agent.
#[async_trait]
pub trait Vmm: Send + Sync {
    fn kind(&self) -> VmmKind;

    /// The VMM binary's version string, e.g. `Firecracker v1.16.1` or `QEMU emulator version 7.2.22`.
    async fn version(&self) -> Result<String, VmmError>;

    /// Starts a VM and returns once the guest's vCPUs run. The start-up runs in its own task,
    /// so a caller that is cancelled (an HTTP request that went away) neither kills a started
    /// VM nor leaves a half-configured VMM behind: on any failure the process is killed and
    /// its sockets removed.
    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError>;

    /// Starts a new VMM process that continues the guest saved by [`Vm::pause_to`] in
    /// `snapshot`: its processes, memory and open files, attached to `spec`'s network (the TAP
    /// and namespace may differ; the guest keeps its address). The snapshot's metadata is
    /// checked against this VMM's version and `spec`'s machine options before any process
    /// starts, and a mismatch is a typed [`SnapshotError`]. A snapshot is restored once: the
    /// guest writes its disk again, so the snapshot is retired before the guest runs (a second
    /// restore gets [`SnapshotError::AlreadyRestored`]; a concurrent one
    /// [`SnapshotError::Busy`]). Runs in its own task, like [`Vmm::start`].
    async fn restore(
        &self,
        spec: &VmSpec,
        snapshot: &SnapshotFiles,
    ) -> Result<Box<dyn Vm>, VmmError>;

    /// Makes `paused`, a snapshot [`Vm::pause_to`] wrote of `spec`'s VM (left loadable, so
    /// that VM can still be resumed from it), into a shared snapshot in `out`
    /// ([`SnapshotMeta::shared`]) that any number of VMs start from with [`Vmm::restore_shared`].
    /// Its memory file's zero pages cost no disk. `spec` may name copies of the drives (the
    /// guest never runs here) and must be attached to a network: QEMU loads the state into a
    /// process whose devices match. On failure nothing loadable is left in `out`.
    async fn share(
        &self,
        spec: &VmSpec,
        paused: &SnapshotFiles,
        out: &SnapshotFiles,
    ) -> Result<SnapshotMeta, VmmError>;

    /// Starts a new VM that continues the guest of the shared snapshot `snapshot`, attached to
    /// `spec`'s network and drives (each VM's own copies of the snapshot's writable drives).
    /// The snapshot stays as it is, and any number of these restores may run together. Each
    /// VM maps the snapshot's memory file privately, so it pays only for the pages it changes.
    /// Checked like [`Vmm::restore`], apart from the drives' paths.
    async fn restore_shared(
        &self,
        spec: &VmSpec,
        snapshot: &SnapshotFiles,
    ) -> Result<Box<dyn Vm>, VmmError>;

    /// Takes over VMM process `pid`, started for `spec` by an earlier agent process and still
    /// running: after an agent restart, its VMs run on and are adopted rather than killed.
    /// The process must be this backend's VMM for `spec` (its command line names `spec`'s
    /// control socket): anything else, such as a reused pid or another sandbox's VMM, is
    /// [`VmmError::NotAdoptable`] and is left alone, as is the process on any other failure.
    /// The returned [`Vm`] does all that a started one does; its console is drained into the
    /// same capped log again, and its exit is [`VmmExit::Unobserved`].
    async fn adopt(&self, spec: &VmSpec, pid: u32) -> Result<Box<dyn Vm>, VmmError>;
}

/// One running VM, owned by the sandbox that started it. Dropping it leaves the VMM running
/// (it lives in its own session) and stops draining its console, which then waits for
/// [`Vmm::adopt`]; stop the VM with [`Vm::shutdown`] or [`Vm::kill`].
#[async_trait]
pub trait Vm: Send + Sync {
    fn pid(&self) -> u32;

    /// The file the guest serial console is being written to. It holds the latest output:
    /// at half of `agent.console_log_max_bytes` it becomes [`VmFiles::previous_console_log`]
    /// and starts again empty ([`console_tail`] reads across both). Complete once
    /// [`Vm::status`] reports the exit or [`Vm::wait_exit`], [`Vm::kill`] or
    /// [`Vm::shutdown`] return.
    fn serial_log(&self) -> &Path;

    /// The running VMM's own version report (Firecracker's `GET /version`, QEMU's
    /// `query-version`), to store beside snapshots.
    fn vmm_version(&self) -> &str;

    async fn status(&mut self) -> Result<VmStatus, VmmError>;

    /// Asks the guest to power off, waits up to `grace` for the VMM to exit, then kills it.
    async fn shutdown(&mut self, grace: Duration) -> Result<VmmExit, VmmError>;

    /// Kills the VMM at once and waits until it has ended.
    async fn kill(&mut self) -> Result<VmmExit, VmmError>;

    /// Waits for the VMM process to exit on its own.
    async fn wait_exit(&mut self) -> Result<VmmExit, VmmError>;

    /// Stops the vCPUs, writes the whole VM state (guest memory, device and CPU state; the
    /// writable disks are flushed where they are) into `snapshot`, durably (files and directory
    /// synced) and with the metadata last, then ends the VMM process, which then holds no CPU
    /// and no RAM. Any snapshot already in `snapshot` is replaced. On failure no loadable
    /// snapshot is left and [`VmmError::PauseFailed`] says whether the VM runs on or is gone.
    async fn pause_to(&mut self, snapshot: &SnapshotFiles) -> Result<SnapshotMeta, VmmError>;
}

/// The backend the configuration selects.
pub fn from_config(agent: &AgentConfig) -> Arc<dyn Vmm> {
    match agent.vmm {
        VmmKind::Firecracker => Arc::new(
            FirecrackerVmm::new(agent.firecracker_bin.clone(), agent.console_log_max_bytes)
                .jailed(
                    agent.firecracker_jailer_bin.clone(),
                    Layout::new(&agent.files_rootdir).jails_dir(),
                )
                .lazy_memory(
                    // The agent's own binary, even once an upgrade replaced it on disk.
                    agent
                        .firecracker_lazy_memory
                        .then(|| PathBuf::from("/proc/self/exe")),
                ),
        ),
        VmmKind::Qemu => Arc::new(QemuVmm::new(
            agent.qemu_bin.clone(),
            agent.qemu_accel,
            agent.console_log_max_bytes,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            id: "cl-abc".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: "/k".into(),
            initrd: None,
            extra_boot_args: String::new(),
            drives: vec![],
            net: None,
            vsock_cid: None,
            files: VmFiles::for_sandbox(&Layout::new("/srv"), "cl-abc"),
            confinement: None,
        }
    }

    #[test]
    fn boot_args_always_start_with_the_base() {
        let mut s = spec();
        assert_eq!(s.boot_args(), BASE_BOOT_ARGS);
        s.extra_boot_args = " ip=10.0.0.2::10.0.0.1:255.255.255.252::eth0:off ".into();
        assert_eq!(
            s.boot_args(),
            format!("{BASE_BOOT_ARGS} ip=10.0.0.2::10.0.0.1:255.255.255.252::eth0:off")
        );
    }

    type Mutation = Box<dyn Fn(&mut VmSpec)>;

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.id = "cl/../x".into()), "id"),
            (Box::new(|s| s.vcpus = 0), "vCPUs"),
            (Box::new(|s| s.memory_mib = 1), "memory"),
            (
                Box::new(|s| {
                    s.drives.push(Drive {
                        id: "ro ot".into(),
                        path: "/x".into(),
                        read_only: true,
                    })
                }),
                "drive id",
            ),
            (
                Box::new(|s| {
                    let d = Drive {
                        id: "root".into(),
                        path: "/x".into(),
                        read_only: true,
                    };
                    s.drives = vec![d.clone(), d];
                }),
                "unique",
            ),
            (Box::new(|s| s.vsock_cid = Some(2)), "CID"),
            (
                Box::new(|s| {
                    let cgroups = Cgroups::with_version(
                        CgroupVersion::V2,
                        Path::new("/sys/fs/cgroup"),
                        Path::new("wrenn"),
                        None,
                    )
                    .unwrap();
                    s.confinement = Some(
                        ConfinementPolicy {
                            id_base: 0,
                            cgroups,
                        }
                        .for_slot(0),
                    );
                }),
                "uid or gid 0",
            ),
        ];
        for (mutate, needle) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = s.check().unwrap_err();
            assert!(matches!(err, VmmError::InvalidSpec { .. }), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        spec().check().unwrap();
    }
}
