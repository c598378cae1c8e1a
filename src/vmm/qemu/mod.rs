//! The QEMU backend: `qemu-system-x86_64 -M microvm` with virtio-mmio disks and network,
//! controlled over QMP, under KVM when it can really run a guest and TCG otherwise.

mod accel;
pub mod qmp;

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::net::UnixStream;
use tokio::sync::OnceCell;

pub use accel::{Accel, AccelDecision, PROBE_DEADLINE};
use qmp::QmpClient;
pub use qmp::QmpError;

use super::process::{self, VmmProcess};
use super::snapshot::{self, Machine, SnapshotReader, SnapshotWriter};
use super::{
    AdoptRefusal, AfterFailedPause, SnapshotFiles, SnapshotMeta, Vm, VmSpec, VmStatus, Vmm,
    VmmError, VmmExit, VmmKind,
};
use crate::config::{ConsoleLogMaxBytes, Layout, QemuAccel};

const MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=on";
/// The id of the guest's RAM block: the one `-m` alone gives it, so that a migration stream of
/// any VM loads into one whose RAM is a file, and back.
const RAM_ID: &str = "microvm.ram";
const VHOST_VSOCK: &str = "/dev/vhost-vsock";
/// The serial console goes to QEMU's stdout, the named pipe the agent drains into the capped
/// console log; QEMU opens it anew, so the file backend works unchanged on the pipe.
const CONSOLE_PATH: &str = "/proc/self/fd/1";
/// How long `quit` may take before the process is killed.
const QUIT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct QemuVmm {
    bin: PathBuf,
    accel: QemuAccel,
    console_cap: ConsoleLogMaxBytes,
    /// The accelerator decision, made on the first start and kept for the agent's lifetime.
    decision: Arc<OnceCell<AccelDecision>>,
    /// How the installed QEMU spells the confinement options, read on the first confined start.
    confinement_options: Arc<OnceCell<ConfinementOptions>>,
}

impl QemuVmm {
    pub fn new(bin: PathBuf, accel: QemuAccel, console_cap: ConsoleLogMaxBytes) -> Self {
        Self {
            bin,
            accel,
            console_cap,
            decision: Arc::new(OnceCell::new()),
            confinement_options: Arc::new(OnceCell::new()),
        }
    }

    /// The accelerator VMs run under, probing KVM with `kernel` the first time for `auto`.
    pub async fn accel(&self, kernel: &Path) -> AccelDecision {
        self.decision
            .get_or_init(|| accel::decide(self.accel, &self.bin, kernel))
            .await
            .clone()
    }
}

/// QEMU option values are comma-separated: a literal comma is written twice.
fn opt_value(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The host's TSC frequency in kHz, from the first `cpu MHz` of /proc/cpuinfo.
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    // Truncation is intended: a kHz figure is plenty precise for the guest's first clock.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((mhz * 1000.0) as u64)
}

/// Where a VM's RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMemory {
    /// The QEMU process's own memory: cold boots and paused VMs' restores.
    Anonymous,
    /// A file, `shared` (the guest's memory is written to it: a shared snapshot being made) or
    /// mapped privately (each VM started from a shared snapshot reads the one file and pays
    /// only for the pages it changes).
    File { path: PathBuf, shared: bool },
}

/// The complete QEMU command line for `spec`; a confined spec's options are spelt as `options`
/// says (see [`ConfinementOptions::of_version`]).
pub fn command_line(
    spec: &VmSpec,
    accel: Accel,
    vsock_available: bool,
    options: ConfinementOptions,
    memory: &GuestMemory,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    match memory {
        GuestMemory::Anonymous => push(&["-name", &format!("wrenn-{}", spec.id), "-M", MACHINE]),
        GuestMemory::File { path, shared } => push(&[
            "-name",
            &format!("wrenn-{}", spec.id),
            "-M",
            &format!("{MACHINE},memory-backend={RAM_ID}"),
            "-object",
            &format!(
                "memory-backend-file,id={RAM_ID},size={}M,mem-path={},share={}",
                spec.memory_mib,
                opt_value(path),
                if *shared { "on" } else { "off" }
            ),
        ]),
    }
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    push(&[
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.vcpus.to_string(),
    ]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    push(&["-chardev", &format!("file,id=console,path={CONSOLE_PATH}")]);
    push(&["-serial", "chardev:console"]);
    push(&[
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            opt_value(&spec.files.qmp_socket)
        ),
    ]);
    let mut boot_args = spec.boot_args();
    if accel == Accel::Tcg {
        // Under TCG the guest's PIT-based TSC calibration fails when the host is busy, and the
        // 6.1 kernel then hangs early in boot; TCG's TSC is the host's, so name its rate.
        if let Some(khz) = host_tsc_khz() {
            boot_args.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    push(&["-append", &boot_args]);
    args.push("-kernel".into());
    args.push(spec.kernel.clone().into());
    if let Some(initrd) = &spec.initrd {
        args.push("-initrd".into());
        args.push(initrd.clone().into());
    }
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    for drive in &spec.drives {
        // A writable drive keeps the descriptor it was opened with: by default QEMU reopens it
        // read-only when a migration (a pause) stops the guest's writes, and read-write when
        // one ends, which a confined QEMU, chrooted and unprivileged, cannot do.
        let mode = if drive.read_only {
            "readonly=on"
        } else {
            "readonly=off,auto-read-only=off"
        };
        push(&[
            "-drive",
            &format!(
                "id={},file={},format=raw,if=none,{mode}",
                drive.id,
                opt_value(&drive.path)
            ),
            "-device",
            &format!("virtio-blk-device,drive={}", drive.id),
        ]);
    }
    if let Some(net) = &spec.net {
        push(&[
            "-netdev",
            &format!(
                "tap,id=net0,ifname={},script=no,downscript=no",
                net.tap.replace(',', ",,")
            ),
            "-device",
            &format!("virtio-net-device,netdev=net0,mac={}", net.mac),
        ]);
    }
    if let (Some(cid), true) = (spec.vsock_cid, vsock_available) {
        push(&["-device", &format!("vhost-vsock-device,guest-cid={cid}")]);
    }
    if let Some(confinement) = &spec.confinement {
        let root = opt_value(&spec.files.vmm_root);
        let user = format!("{}:{}", confinement.uid, confinement.gid);
        push(&["-sandbox", SECCOMP_POLICY]);
        match options {
            ConfinementOptions::Legacy => push(&[
                "-chroot",
                &spec.files.vmm_root.to_string_lossy(),
                "-runas",
                &user,
            ]),
            ConfinementOptions::RunWithChroot => {
                push(&["-run-with", &format!("chroot={root}"), "-runas", &user]);
            }
            ConfinementOptions::RunWith => {
                push(&["-run-with", &format!("chroot={root},user={user}")]);
            }
        }
    }
    args
}

/// How a QEMU release spells "chroot, then drop to this user": `-chroot` and `-runas` until
/// 8.1 added `-run-with chroot=` (and 9.0 removed `-chroot`); 9.1 added `-run-with user=` and
/// deprecated `-runas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfinementOptions {
    Legacy,
    RunWithChroot,
    RunWith,
}

impl ConfinementOptions {
    /// The options of the QEMU whose `--version` line is `line`; the oldest spelling when the
    /// version cannot be read.
    pub fn of_version(line: &str) -> Self {
        let version = line
            .split_whitespace()
            .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
            .unwrap_or_default();
        let mut numbers = version.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
        let major_minor = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        if major_minor >= (9, 1) {
            Self::RunWith
        } else if major_minor >= (8, 1) {
            Self::RunWithChroot
        } else {
            Self::Legacy
        }
    }
}

/// QEMU's seccomp filter: no obsolete system calls, no new processes or programs, no changes to
/// scheduling or CPU affinity. `elevateprivileges=deny` cannot be among them: QEMU installs the
/// filter before it applies `-runas`, so it would be killed by its own `setgid` (SIGSYS). The
/// same end is reached another way: after `-runas` every uid of the process is unprivileged,
/// it holds no capability, and `-sandbox` sets no-new-privileges, so a `set*id` call can only
/// name the ids it already has.
const SECCOMP_POLICY: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

#[async_trait]
impl Vmm for QemuVmm {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    async fn version(&self) -> Result<String, VmmError> {
        process::version_line(&self.bin, "QEMU emulator version").await
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError> {
        spec.check()?;
        let this = self.clone();
        let spec = spec.clone();
        let task = tokio::spawn(async move { this.start_detached(spec).await });
        let vm = task
            .await
            .map_err(|e| VmmError::StartTask(e.to_string()))??;
        Ok(Box::new(vm))
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        snapshot: &SnapshotFiles,
    ) -> Result<Box<dyn Vm>, VmmError> {
        spec.check()?;
        let this = self.clone();
        let spec = spec.clone();
        let snapshot = snapshot.clone();
        let task = tokio::spawn(async move { this.restore_detached(spec, snapshot, false).await });
        let vm = task
            .await
            .map_err(|e| VmmError::StartTask(e.to_string()))??;
        Ok(Box::new(vm))
    }

    async fn share(
        &self,
        spec: &VmSpec,
        paused: &SnapshotFiles,
        out: &SnapshotFiles,
    ) -> Result<SnapshotMeta, VmmError> {
        spec.check()?;
        let this = self.clone();
        let (spec, paused, out) = (spec.clone(), paused.clone(), out.clone());
        tokio::spawn(async move { this.share_detached(spec, paused, out).await })
            .await
            .map_err(|e| VmmError::StartTask(e.to_string()))?
    }

    async fn restore_shared(
        &self,
        spec: &VmSpec,
        snapshot: &SnapshotFiles,
    ) -> Result<Box<dyn Vm>, VmmError> {
        spec.check()?;
        let this = self.clone();
        let spec = spec.clone();
        let snapshot = snapshot.clone();
        let task = tokio::spawn(async move { this.restore_detached(spec, snapshot, true).await });
        let vm = task
            .await
            .map_err(|e| VmmError::StartTask(e.to_string()))??;
        Ok(Box::new(vm))
    }

    async fn adopt(&self, spec: &VmSpec, pid: u32) -> Result<Box<dyn Vm>, VmmError> {
        spec.check()?;
        let files = &spec.files;
        let (process, cmdline) = process::adopt(
            &self.bin,
            pid,
            VmmKind::Qemu,
            spec,
            &files.qmp_socket,
            self.console_cap,
        )?;
        // The accelerator the guest runs under, which a later snapshot records, is the one it
        // was started with: this agent's own decision may differ.
        let accel = Accel::of_command_line(&cmdline).ok_or_else(|| VmmError::NotAdoptable {
            pid,
            id: spec.id.clone(),
            kind: VmmKind::Qemu,
            refusal: AdoptRefusal::CommandLine("`-accel kvm` or `-accel tcg`"),
        })?;
        // The previous agent's monitor connection died with it, so QEMU takes a new client.
        let stream = UnixStream::connect(&files.qmp_socket)
            .await
            .map_err(|source| QmpError::Io {
                path: files.qmp_socket.clone(),
                source,
            })?;
        let mut qmp = QmpClient::handshake(stream, &files.qmp_socket).await?;
        let vmm_version = qmp.query_version().await?.describe();
        tracing::info!(id = %spec.id, pid, accel = accel.as_str(), %vmm_version, "QEMU VM adopted");
        Ok(Box::new(QemuVm {
            process,
            qmp,
            vmm_version,
            accel,
            machine: Machine::of(spec, Some(accel.as_str())),
            console_log: files.console_log.clone(),
            qmp_socket: files.qmp_socket.clone(),
        }))
    }
}

impl QemuVmm {
    async fn start_detached(&self, spec: VmSpec) -> Result<QemuVm, VmmError> {
        let accel = self.accel(&spec.kernel).await.accel;
        let vm = self
            .spawn_vm(&spec, accel, &[], &GuestMemory::Anonymous)
            .await?;
        tracing::info!(id = %spec.id, pid = vm.pid(), accel = accel.as_str(), vmm_version = %vm.vmm_version, "QEMU VM started");
        Ok(vm)
    }

    /// Spawns QEMU for `spec` with `extra` arguments and connects to its monitor; on failure
    /// the process is killed and its socket removed.
    async fn spawn_vm(
        &self,
        spec: &VmSpec,
        accel: Accel,
        extra: &[&str],
        memory: &GuestMemory,
    ) -> Result<QemuVm, VmmError> {
        let vsock_available = Path::new(VHOST_VSOCK).exists();
        if spec.vsock_cid.is_some() && !vsock_available {
            tracing::warn!(id = %spec.id, "{VHOST_VSOCK} is missing; the VM gets no vsock device");
        }
        let files = &spec.files;
        process::prepare_files(files, &[&files.qmp_socket])?;
        let options = match spec.confinement {
            Some(_) => {
                *self
                    .confinement_options
                    .get_or_try_init(|| async {
                        Ok::<_, VmmError>(ConfinementOptions::of_version(&self.version().await?))
                    })
                    .await?
            }
            None => ConfinementOptions::Legacy,
        };
        let mut args = command_line(spec, accel, vsock_available, options, memory);
        args.extend(extra.iter().map(OsString::from));
        let netns = spec.net.as_ref().and_then(|n| n.netns.as_deref());
        if spec.confinement.is_some() {
            process::prepare_empty_root(&files.vmm_root)?;
        }
        let mut process = process::spawn(&self.bin, &args, netns, spec, self.console_cap)?;
        match connect(&mut process, &files.qmp_socket).await {
            Ok((qmp, vmm_version)) => Ok(QemuVm {
                process,
                qmp,
                vmm_version,
                accel,
                machine: Machine::of(spec, Some(accel.as_str())),
                console_log: files.console_log.clone(),
                qmp_socket: files.qmp_socket.clone(),
            }),
            Err(error) => {
                if let Err(kill_error) = process.kill().await {
                    tracing::warn!(id = %spec.id, error = %kill_error, "killing a failed QEMU");
                }
                let _ = process::remove_if_present(&files.qmp_socket);
                Err(error)
            }
        }
    }

    /// Restores a paused VM's snapshot, or (`shared`) starts a VM from a shared snapshot, its
    /// RAM the snapshot's memory file mapped privately.
    async fn restore_detached(
        &self,
        spec: VmSpec,
        snapshot: SnapshotFiles,
        shared: bool,
    ) -> Result<QemuVm, VmmError> {
        let started = Instant::now();
        let reader = if shared {
            SnapshotReader::open_shared(&snapshot)?
        } else {
            SnapshotReader::open(&snapshot)?
        };
        let accel = self.accel(&spec.kernel).await.accel;
        let version = qmp_style_version(&self.version().await?);
        reader.check(
            VmmKind::Qemu,
            &version,
            None,
            &Machine::of(&spec, Some(accel.as_str())),
        )?;
        let state = File::open(&snapshot.state).map_err(|source| VmmError::File {
            what: "failed to open snapshot state",
            path: snapshot.state.clone(),
            source,
        })?;
        let memory = if shared {
            GuestMemory::File {
                path: snapshot.memory.clone(),
                shared: false,
            }
        } else {
            GuestMemory::Anonymous
        };
        let mut vm = self
            .spawn_vm(&spec, accel, &["-incoming", "defer"], &memory)
            .await?;
        match vm.load(&state, &reader, spec.memory_mib, shared).await {
            Ok(()) => {
                tracing::info!(id = %spec.id, pid = vm.pid(), shared, elapsed = ?started.elapsed(), "QEMU VM restored");
                Ok(vm)
            }
            Err(error) => {
                if let Err(kill_error) = vm.kill().await {
                    tracing::warn!(id = %spec.id, error = %kill_error, "killing a failed restore");
                }
                Err(error)
            }
        }
    }

    /// Loads the paused snapshot into a QEMU whose RAM is the shared snapshot's memory file
    /// (written through), never running the guest, and saves only the device state beside it.
    async fn share_detached(
        &self,
        spec: VmSpec,
        paused: SnapshotFiles,
        out: SnapshotFiles,
    ) -> Result<SnapshotMeta, VmmError> {
        let started = Instant::now();
        let reader = SnapshotReader::open(&paused)?;
        let accel = self.accel(&spec.kernel).await.accel;
        let version = qmp_style_version(&self.version().await?);
        reader.check_ignoring_drive_paths(
            VmmKind::Qemu,
            &version,
            None,
            &Machine::of(&spec, Some(accel.as_str())),
        )?;
        let state = File::open(&paused.state).map_err(|source| VmmError::File {
            what: "failed to open snapshot state",
            path: paused.state.clone(),
            source,
        })?;
        let writer = SnapshotWriter::begin(
            &out,
            &[&out.state, &out.memory],
            snapshot::bytes_needed(spec.memory_mib),
        )?;
        let device_state = writer.create_partial(&out.state)?;
        let memory = Layout::partial(&out.memory);
        let mut vm = self
            .spawn_vm(
                &spec,
                accel,
                &["-incoming", "defer"],
                &GuestMemory::File {
                    path: memory.clone(),
                    shared: true,
                },
            )
            .await?;
        if let Err(error) = vm.convert(&state, &device_state, spec.memory_mib).await {
            if let Err(kill_error) = vm.kill().await {
                tracing::warn!(id = %spec.id, error = %kill_error, "killing a failed conversion");
            }
            return Err(error);
        }
        drop(reader);
        let punched = punch_zero_pages_of(&memory)?;
        let meta = writer.commit(
            VmmKind::Qemu,
            &vm.vmm_version,
            None,
            &Machine::of(&spec, Some(accel.as_str())),
            true,
        )?;
        tracing::info!(id = %spec.id, elapsed = ?started.elapsed(), zero_bytes_punched = punched, dir = %out.dir.display(), "shared snapshot made");
        Ok(meta)
    }
}

/// Gives back the zero pages of a memory file written by a VMM that has exited.
fn punch_zero_pages_of(path: &Path) -> Result<u64, VmmError> {
    let file_error = |what| {
        move |source| VmmError::File {
            what,
            path: path.to_owned(),
            source,
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(file_error("failed to open memory file"))?;
    crate::sparse::punch_zero_pages(&file).map_err(file_error("failed to punch zero pages of"))
}

/// QEMU's `--version` line in the words of its `query-version` ([`qmp::VersionInfo::describe`]),
/// which is what a snapshot records.
fn qmp_style_version(line: &str) -> String {
    match line.strip_prefix("QEMU emulator version ") {
        Some(rest) => format!("QEMU {rest}"),
        None => line.to_owned(),
    }
}

/// The name the snapshot file's descriptor is handed to QEMU under.
const SNAPSHOT_FD: &str = "wrenn-snapshot";
const MIGRATION_POLL: Duration = Duration::from_millis(5);

/// How long saving or loading a guest's memory may take: generous, since TCG hosts are slow
/// and shared, but bounded.
fn migration_deadline(memory_mib: u32) -> Duration {
    Duration::from_secs(60) + Duration::from_secs(60) * memory_mib.div_ceil(1024)
}

/// How long a QEMU whose monitor went away may take to finish exiting.
const EXIT_AFTER_CLOSE: Duration = Duration::from_secs(2);

async fn connect(process: &mut VmmProcess, socket: &Path) -> Result<(QmpClient, String), VmmError> {
    let stream = process.wait_for_socket(socket).await?;
    let handshake = async {
        let mut qmp = QmpClient::handshake(stream, socket).await?;
        let version = qmp.query_version().await?.describe();
        Ok::<_, QmpError>((qmp, version))
    };
    match handshake.await {
        Ok(connected) => Ok(connected),
        // QEMU binds the monitor before it opens the disks, so a bad device shows up here as
        // a closed socket; report the exit and QEMU's own complaint instead.
        Err(error) => match process.wait_for(EXIT_AFTER_CLOSE).await? {
            Some(status) => Err(process.exited_early(status)),
            None => Err(error.into()),
        },
    }
}

pub struct QemuVm {
    process: VmmProcess,
    qmp: QmpClient,
    vmm_version: String,
    accel: Accel,
    machine: Machine,
    console_log: PathBuf,
    qmp_socket: PathBuf,
}

impl QemuVm {
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Waits until the migration in `direction` completes, fails, or outlives its deadline.
    async fn wait_for_migration(
        &mut self,
        direction: &'static str,
        deadline: Duration,
    ) -> Result<(), VmmError> {
        let started = Instant::now();
        loop {
            let info = match self.qmp.query_migrate().await {
                Ok(info) => info,
                // A failed incoming migration ends QEMU; its log says why.
                Err(error) => {
                    return match self.process.wait_for(EXIT_AFTER_CLOSE).await? {
                        Some(status) => Err(self.process.exited_early(status)),
                        None => Err(error.into()),
                    }
                }
            };
            let failed = |status: &str, detail: Option<String>| VmmError::Migration {
                direction,
                status: status.to_owned(),
                waited: started.elapsed(),
                detail: detail.unwrap_or_else(|| "QEMU gave no reason".into()),
            };
            match info.status.as_deref() {
                Some("completed") => return Ok(()),
                Some(status @ ("failed" | "cancelled")) => {
                    return Err(failed(status, info.error_desc))
                }
                _ => {}
            }
            if started.elapsed() > deadline {
                if direction == "out" {
                    if let Err(error) = self.qmp.migrate_cancel().await {
                        tracing::warn!(%error, "cancelling a migration that timed out");
                    }
                }
                return Err(failed(
                    "timed out",
                    Some(format!("still {:?} at the deadline", info.status)),
                ));
            }
            tokio::time::sleep(MIGRATION_POLL).await;
        }
    }

    /// Stops the guest and streams its whole state into the snapshot's partial file.
    async fn save(
        &mut self,
        writer: &SnapshotWriter,
        snapshot: &SnapshotFiles,
    ) -> Result<(), VmmError> {
        let file = writer.create_partial(&snapshot.state)?;
        self.qmp.stop().await?;
        self.qmp.unlimit_migration_bandwidth().await?;
        self.qmp.getfd(SNAPSHOT_FD, file.as_fd()).await?;
        self.qmp.migrate(&format!("fd:{SNAPSHOT_FD}")).await?;
        self.wait_for_migration("out", migration_deadline(self.machine.memory_mib))
            .await?;
        fail::fail_point!("vmm-pause-after-save", |_| Err(VmmError::Migration {
            direction: "out",
            status: "failed".into(),
            waited: Duration::ZERO,
            detail: "injected failure".into(),
        }));
        // QEMU flushed the disks when it stopped; this also covers a disk QEMU could not flush.
        snapshot::sync_writable_drives(&self.machine)?;
        Ok(())
    }

    /// After a failed pause: resumes a guest that ran before, or reports the VMM gone.
    async fn recover(&mut self, was_running: bool, cause: VmmError) -> VmmError {
        let gone = |cause| VmmError::PauseFailed {
            after: AfterFailedPause::VmmGone,
            cause: Box::new(cause),
        };
        if matches!(self.process.try_exit().await, Ok(Some(_)) | Err(_)) {
            let _ = process::remove_if_present(&self.qmp_socket);
            return gone(cause);
        }
        if !was_running {
            return VmmError::PauseFailed {
                after: AfterFailedPause::Paused,
                cause: Box::new(cause),
            };
        }
        match self.qmp.cont().await {
            Ok(()) => VmmError::PauseFailed {
                after: AfterFailedPause::Running,
                cause: Box::new(cause),
            },
            Err(error) => {
                tracing::warn!(pid = self.pid(), %error, "a VM whose pause failed cannot resume; killing it");
                if let Err(error) = self.kill().await {
                    tracing::warn!(%error, "killing a VM whose pause failed");
                }
                gone(cause)
            }
        }
    }

    /// Loads the snapshot into this QEMU (started with `-incoming defer`) and resumes it. A
    /// paused VM's snapshot is retired before the guest runs; a shared one stays as it is.
    async fn load(
        &mut self,
        state: &File,
        reader: &SnapshotReader,
        memory_mib: u32,
        shared: bool,
    ) -> Result<(), VmmError> {
        if shared {
            // The stream has no RAM: it is the memory file this QEMU maps.
            self.qmp.set_ignore_shared(true).await?;
        }
        self.qmp.getfd(SNAPSHOT_FD, state.as_fd()).await?;
        self.qmp
            .migrate_incoming(&format!("fd:{SNAPSHOT_FD}"))
            .await?;
        self.wait_for_migration("in", migration_deadline(memory_mib))
            .await?;
        if shared {
            // This VM's own RAM is private: a later pause must write it into its stream.
            self.qmp.set_ignore_shared(false).await?;
            return self
                .qmp
                .cont()
                .await
                .map_err(|error| VmmError::ResumeFailed {
                    pid: self.pid(),
                    cause: Box::new(error.into()),
                });
        }
        snapshot::drop_page_cache(state);
        reader.consume()?;
        match self.qmp.cont().await {
            Ok(()) => Ok(()),
            Err(error) => {
                // QEMU refused, so the guest never ran and its disk is untouched: the snapshot
                // stays good. Otherwise it may have run, and stays retired.
                if matches!(error, QmpError::Command { .. }) {
                    reader.unconsume();
                }
                Err(VmmError::ResumeFailed {
                    pid: self.pid(),
                    cause: Box::new(error.into()),
                })
            }
        }
    }

    /// Loads a paused VM's stream into this QEMU (its RAM a shared memory file), then writes
    /// only the device state to `device_state` and quits without ever running the guest.
    async fn convert(
        &mut self,
        stream: &File,
        device_state: &File,
        memory_mib: u32,
    ) -> Result<(), VmmError> {
        self.qmp.getfd(SNAPSHOT_FD, stream.as_fd()).await?;
        self.qmp
            .migrate_incoming(&format!("fd:{SNAPSHOT_FD}"))
            .await?;
        self.wait_for_migration("in", migration_deadline(memory_mib))
            .await?;
        snapshot::drop_page_cache(stream);
        self.qmp.set_ignore_shared(true).await?;
        self.qmp.unlimit_migration_bandwidth().await?;
        self.qmp.getfd(SNAPSHOT_FD, device_state.as_fd()).await?;
        self.qmp.migrate(&format!("fd:{SNAPSHOT_FD}")).await?;
        self.wait_for_migration("out", migration_deadline(memory_mib))
            .await?;
        if self.qmp.quit().await.is_err() || self.process.wait_for(QUIT_GRACE).await?.is_none() {
            self.process.kill().await?;
        }
        let _ = process::remove_if_present(&self.qmp_socket);
        Ok(())
    }

    fn exited(&mut self, status: VmmExit) -> VmmExit {
        let _ = process::remove_if_present(&self.qmp_socket);
        status
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn serial_log(&self) -> &Path {
        &self.console_log
    }

    fn vmm_version(&self) -> &str {
        &self.vmm_version
    }

    async fn status(&mut self) -> Result<VmStatus, VmmError> {
        if let Some(status) = self.process.try_exit().await? {
            return Ok(VmStatus::Exited(status));
        }
        let info = match self.qmp.query_status().await {
            Ok(info) => info,
            // The guest powered off between the check above and the query: the monitor closed,
            // or the query was written into the closing socket.
            Err(error @ (QmpError::Closed { .. } | QmpError::Io { .. })) => {
                return match self.process.wait_for(EXIT_AFTER_CLOSE).await? {
                    Some(status) => Ok(VmStatus::Exited(status)),
                    None => Err(error.into()),
                };
            }
            Err(e) => return Err(e.into()),
        };
        Ok(match (info.running, info.status.as_str()) {
            (true, _) => VmStatus::Running,
            (false, "paused") => VmStatus::Paused,
            (false, "prelaunch") => VmStatus::NotStarted,
            (false, other) => VmStatus::Other(other.to_owned()),
        })
    }

    async fn shutdown(&mut self, grace: Duration) -> Result<VmmExit, VmmError> {
        if let Some(status) = self.process.try_exit().await? {
            return Ok(self.exited(status));
        }
        match self.qmp.system_powerdown().await {
            Ok(()) => {
                if let Some(status) = self.process.wait_for(grace).await? {
                    return Ok(self.exited(status));
                }
                tracing::info!(
                    pid = self.pid(),
                    ?grace,
                    "guest ignored the ACPI power button; quitting QEMU"
                );
            }
            Err(error) => {
                tracing::info!(pid = self.pid(), %error, "ACPI powerdown not delivered; quitting QEMU")
            }
        }
        if self.qmp.quit().await.is_ok() {
            if let Some(status) = self.process.wait_for(QUIT_GRACE).await? {
                return Ok(self.exited(status));
            }
        }
        self.kill().await
    }

    async fn kill(&mut self) -> Result<VmmExit, VmmError> {
        let status = self.process.kill().await?;
        Ok(self.exited(status))
    }

    async fn wait_exit(&mut self) -> Result<VmmExit, VmmError> {
        let status = self.process.wait().await?;
        Ok(self.exited(status))
    }

    async fn pause_to(&mut self, snapshot: &SnapshotFiles) -> Result<SnapshotMeta, VmmError> {
        let started = Instant::now();
        let was_running = match self.qmp.query_status().await {
            Ok(info) => info.running,
            Err(error) => return Err(self.recover(true, error.into()).await),
        };
        let writer = match SnapshotWriter::begin(
            snapshot,
            &[&snapshot.state],
            snapshot::bytes_needed(self.machine.memory_mib),
        ) {
            Ok(writer) => writer,
            Err(error) => return Err(self.recover(was_running, error.into()).await),
        };
        let saved = match self.save(&writer, snapshot).await {
            Ok(()) => writer
                .commit(VmmKind::Qemu, &self.vmm_version, None, &self.machine, false)
                .map_err(VmmError::from),
            Err(error) => {
                drop(writer);
                Err(error)
            }
        };
        let meta = match saved {
            Ok(meta) => meta,
            Err(error) => return Err(self.recover(was_running, error).await),
        };
        // The state is on disk: QEMU has nothing left to do.
        if self.qmp.quit().await.is_err() || self.process.wait_for(QUIT_GRACE).await?.is_none() {
            self.process.kill().await?;
        }
        let _ = process::remove_if_present(&self.qmp_socket);
        tracing::info!(pid = self.pid(), elapsed = ?started.elapsed(), dir = %snapshot.dir.display(), "QEMU VM paused to disk");
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layout;
    use crate::vmm::{Drive, NetAttachment, VmFiles};

    fn spec() -> VmSpec {
        VmSpec {
            id: "cl-q".into(),
            vcpus: 2,
            memory_mib: 256,
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd".into()),
            extra_boot_args: "ip=dhcp".into(),
            drives: vec![
                Drive {
                    id: "root".into(),
                    path: "/img/base,v1.ext4".into(),
                    read_only: true,
                },
                Drive {
                    id: "data".into(),
                    path: "/s/data.ext4".into(),
                    read_only: false,
                },
            ],
            net: Some(NetAttachment {
                tap: "tap0".into(),
                mac: "02:FC:00:00:00:05".into(),
                netns: None,
            }),
            vsock_cid: Some(3),
            files: VmFiles::for_sandbox(&Layout::new("/srv"), "cl-q"),
            confinement: None,
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_carries_every_device_in_order() {
        let line = joined(&command_line(
            &spec(),
            Accel::Kvm,
            true,
            ConfinementOptions::Legacy,
            &GuestMemory::Anonymous,
        ));
        for needle in [
            "-M microvm,x-option-roms=off,isa-serial=on,rtc=on -accel kvm -cpu host -m 256 -smp 2",
            "-nodefaults -no-user-config -nographic -no-reboot",
            "-chardev file,id=console,path=/proc/self/fd/1 -serial chardev:console",
            "-qmp unix:/srv/sandboxes/cl-q/qmp.sock,server=on,wait=off",
            "-append console=ttyS0 reboot=k panic=1 pci=off ip=dhcp -kernel /k/vmlinux -initrd /k/initrd",
            "-drive id=root,file=/img/base,,v1.ext4,format=raw,if=none,readonly=on -device virtio-blk-device,drive=root \
             -drive id=data,file=/s/data.ext4,format=raw,if=none,readonly=off,auto-read-only=off -device virtio-blk-device,drive=data",
            "-netdev tap,id=net0,ifname=tap0,script=no,downscript=no -device virtio-net-device,netdev=net0,mac=02:FC:00:00:00:05",
            "-device vhost-vsock-device,guest-cid=3",
        ] {
            assert!(line.contains(needle), "`{needle}` missing from {line}");
        }
        assert!(!line.contains("tsc_early_khz"), "{line}");
    }

    #[test]
    fn a_confined_vm_gets_seccomp_a_chroot_and_a_user_spelt_for_its_qemu() {
        use crate::vmm::{CgroupVersion, Cgroups, Confinement};
        let mut spec = spec();
        assert!(!joined(&command_line(
            &spec,
            Accel::Kvm,
            true,
            ConfinementOptions::Legacy,
            &GuestMemory::Anonymous
        ))
        .contains("-sandbox"));
        spec.confinement = Some(Confinement {
            uid: 900_000_007,
            gid: 900_000_008,
            cgroups: Cgroups::with_version(
                CgroupVersion::V2,
                Path::new("/sys/fs/cgroup"),
                Path::new("wrenn"),
                None,
            )
            .unwrap(),
        });
        let seccomp =
            "-sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";
        for (version, options, expected) in [
            (
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)",
                ConfinementOptions::Legacy,
                "-chroot /srv/sandboxes/cl-q/vmm-root -runas 900000007:900000008",
            ),
            (
                "QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)",
                ConfinementOptions::RunWithChroot,
                "-run-with chroot=/srv/sandboxes/cl-q/vmm-root -runas 900000007:900000008",
            ),
            (
                "QEMU emulator version 10.0.2",
                ConfinementOptions::RunWith,
                "-run-with chroot=/srv/sandboxes/cl-q/vmm-root,user=900000007:900000008",
            ),
        ] {
            assert_eq!(
                ConfinementOptions::of_version(version),
                options,
                "{version}"
            );
            let line = joined(&command_line(
                &spec,
                Accel::Kvm,
                true,
                options,
                &GuestMemory::Anonymous,
            ));
            assert!(line.ends_with(&format!("{seccomp} {expected}")), "{line}");
        }
        assert_eq!(
            ConfinementOptions::of_version("QEMU 9.0.0"),
            ConfinementOptions::RunWithChroot
        );
        assert_eq!(
            ConfinementOptions::of_version("garbage"),
            ConfinementOptions::Legacy
        );
    }

    #[test]
    fn guest_memory_in_a_file_names_the_ram_block_as_m_does() {
        for (shared, share) in [(true, "share=on"), (false, "share=off")] {
            let line = joined(&command_line(
                &spec(),
                Accel::Tcg,
                false,
                ConfinementOptions::Legacy,
                &GuestMemory::File {
                    path: "/snap/me,m".into(),
                    shared,
                },
            ));
            assert!(
                line.contains(&format!(
                    "-M {MACHINE},memory-backend=microvm.ram -object memory-backend-file,\
                     id=microvm.ram,size=256M,mem-path=/snap/me,,m,{share}"
                )),
                "{line}"
            );
            assert!(line.contains("-m 256"), "{line}");
        }
    }

    #[test]
    fn the_version_line_reads_like_query_version() {
        assert_eq!(
            qmp_style_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            "QEMU 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
        );
        assert_eq!(qmp_style_version("QEMU 9.0.0"), "QEMU 9.0.0");
    }

    #[test]
    fn the_accelerator_is_read_back_from_the_command_line() {
        for accel in [Accel::Kvm, Accel::Tcg] {
            let line: Vec<String> = command_line(
                &spec(),
                accel,
                true,
                ConfinementOptions::Legacy,
                &GuestMemory::Anonymous,
            )
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
            assert_eq!(Accel::of_command_line(&line), Some(accel));
        }
        let line = vec!["qemu-system-x86_64".to_owned(), "-accel".to_owned()];
        assert_eq!(Accel::of_command_line(&line), None);
        let line = vec!["-accel".to_owned(), "hvf".to_owned()];
        assert_eq!(Accel::of_command_line(&line), None);
    }

    #[test]
    fn tcg_uses_the_max_cpu_and_skips_vsock_without_vhost() {
        let line = joined(&command_line(
            &spec(),
            Accel::Tcg,
            false,
            ConfinementOptions::Legacy,
            &GuestMemory::Anonymous,
        ));
        assert!(line.contains("-accel tcg -cpu max"), "{line}");
        assert!(!line.contains("vhost-vsock"), "{line}");
    }
}
