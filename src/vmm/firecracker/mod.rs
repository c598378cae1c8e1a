//! The Firecracker backend: one `firecracker` process per sandbox, configured over its API
//! socket in the documented order and started with `InstanceStart`; paused into a full
//! snapshot (`PATCH /vm`, `PUT /snapshot/create`) and restored in a fresh process
//! (`PUT /snapshot/load`).

pub mod api;
pub mod jail;
pub mod uffd;

use jail::Jail;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

pub use api::FirecrackerApiError;
use api::{
    ActionType, ApiCall, ApiClient, Endpoint, FirecrackerVersion, InstanceAction, InstanceInfo,
    MemBackend, MemBackendType, SnapshotType, VmRunState,
};

use super::process::{self, VmmProcess};
use super::snapshot::{self, Machine, SnapshotReader, SnapshotWriter};
use super::{
    AfterFailedPause, SnapshotFiles, SnapshotMeta, Vm, VmSpec, VmStatus, Vmm, VmmError, VmmExit,
    VmmKind,
};
use crate::config::{ConsoleLogMaxBytes, Layout};

/// The guest's only network interface.
pub const IFACE_ID: &str = "eth0";

#[derive(Debug, Clone)]
pub struct FirecrackerVmm {
    bin: PathBuf,
    console_cap: ConsoleLogMaxBytes,
    jailer: Option<Jailer>,
    /// The `wrenn` binary whose `uffd-serve` loads restored guests' memory lazily; none: each
    /// restore maps the whole memory file.
    page_server_bin: Option<PathBuf>,
}

/// The jailer confined VMs start through, and the base directory of their jails.
#[derive(Debug, Clone)]
struct Jailer {
    bin: PathBuf,
    chroot_base: PathBuf,
}

impl FirecrackerVmm {
    pub fn new(bin: PathBuf, console_cap: ConsoleLogMaxBytes) -> Self {
        Self {
            bin,
            console_cap,
            jailer: None,
            page_server_bin: None,
        }
    }

    /// Restores load guest memory lazily from `wrenn_bin uffd-serve` ([`uffd`]).
    pub fn lazy_memory(mut self, wrenn_bin: Option<PathBuf>) -> Self {
        self.page_server_bin = wrenn_bin;
        self
    }

    /// Starts the VMs of confined specs through the jailer `bin`, in jails under
    /// `chroot_base` ([`jail::Jail`]); without it a confined VM gets its cgroup only.
    pub fn jailed(mut self, bin: PathBuf, chroot_base: PathBuf) -> Self {
        self.jailer = Some(Jailer { bin, chroot_base });
        self
    }

    /// The jail of `spec`'s VM, when it is confined and a jailer is configured.
    fn jail(&self, spec: &VmSpec) -> Option<Jail> {
        let jailer = self.jailer.as_ref()?;
        let confinement = spec.confinement.as_ref()?;
        Some(Jail::new(&jailer.chroot_base, &self.bin, spec, confinement))
    }

    /// `spec` as Firecracker sees it: from inside its jail when it has one.
    fn api_view(&self, spec: &VmSpec) -> VmSpec {
        match self.jail(spec) {
            Some(jail) => jail.inside(spec),
            None => spec.clone(),
        }
    }
}

/// Where a VM's Firecracker can be reached and what it leaves on the host.
struct Endpoints {
    api_socket: PathBuf,
    log: PathBuf,
    vsock_socket: PathBuf,
}

impl Endpoints {
    fn of(spec: &VmSpec, jail: Option<&Jail>) -> Self {
        match jail {
            Some(jail) => Self {
                api_socket: jail.host_path(jail::API_SOCKET),
                log: jail.host_path(jail::LOG),
                vsock_socket: jail.host_path(jail::VSOCK_SOCKET),
            },
            None => Self {
                api_socket: spec.files.firecracker_socket.clone(),
                log: spec.files.firecracker_log.clone(),
                vsock_socket: spec.files.vsock_socket.clone(),
            },
        }
    }
}

/// The calls that configure and boot `spec`, in the order they are sent: machine, kernel,
/// drives (vda, vdb, ...), network, vsock, then `InstanceStart`.
pub fn boot_sequence(spec: &VmSpec) -> Result<Vec<ApiCall>, FirecrackerApiError> {
    let mut calls = vec![
        api::MachineConfig {
            vcpu_count: spec.vcpus,
            mem_size_mib: spec.memory_mib,
            smt: None,
            track_dirty_pages: None,
        }
        .call(),
        api::BootSource {
            kernel_image_path: api::utf8(&spec.kernel)?,
            boot_args: Some(spec.boot_args()),
            initrd_path: spec.initrd.as_deref().map(api::utf8).transpose()?,
        }
        .call(),
    ];
    for drive in &spec.drives {
        calls.push(
            api::Drive {
                drive_id: drive.id.clone(),
                path_on_host: api::utf8(&drive.path)?,
                // The initramfs mounts the drives; Firecracker must not add `root=` for one.
                is_root_device: false,
                is_read_only: drive.read_only,
                cache_type: None,
            }
            .call(),
        );
    }
    if let Some(net) = &spec.net {
        calls.push(
            api::NetworkInterface {
                iface_id: IFACE_ID.into(),
                host_dev_name: net.tap.clone(),
                guest_mac: Some(net.mac.clone()),
            }
            .call(),
        );
    }
    if let Some(cid) = spec.vsock_cid {
        calls.push(
            api::Vsock {
                guest_cid: cid,
                uds_path: api::utf8(&spec.files.vsock_socket)?,
            }
            .call(),
        );
    }
    calls.push(
        InstanceAction {
            action_type: ActionType::InstanceStart,
        }
        .call(),
    );
    Ok(calls)
}

/// The calls that pause a running VM and write a full snapshot of it: the vmstate and the
/// memory go to their `.partial` names, renamed into place once durable.
pub fn pause_sequence(snapshot: &SnapshotFiles) -> Result<Vec<ApiCall>, FirecrackerApiError> {
    Ok(vec![
        api::VmState {
            state: VmRunState::Paused,
        }
        .call(),
        api::SnapshotCreate {
            snapshot_type: SnapshotType::Full,
            snapshot_path: api::utf8(&Layout::partial(&snapshot.state))?,
            mem_file_path: api::utf8(&Layout::partial(&snapshot.memory))?,
        }
        .call(),
    ])
}

/// Where a restored guest's memory comes from: the snapshot's memory file, mapped privately,
/// or (`page_server`) the userfaultfd page server listening on that socket.
fn memory_backend(
    snapshot: &SnapshotFiles,
    page_server: Option<&Path>,
) -> Result<MemBackend, FirecrackerApiError> {
    Ok(match page_server {
        Some(socket) => MemBackend {
            backend_type: MemBackendType::Uffd,
            backend_path: api::utf8(socket)?,
        },
        None => MemBackend {
            backend_type: MemBackendType::File,
            backend_path: api::utf8(&snapshot.memory)?,
        },
    })
}

/// The call that loads `snapshot` into a fresh process and resumes it, attached to `spec`'s
/// TAP and vsock socket (the drives must be where they were: Firecracker has no override); its
/// memory from the page server on socket `page_server` when there is one.
pub fn restore_sequence(
    spec: &VmSpec,
    snapshot: &SnapshotFiles,
    page_server: Option<&Path>,
) -> Result<Vec<ApiCall>, FirecrackerApiError> {
    let network_overrides = spec
        .net
        .iter()
        .map(|net| api::NetworkOverride {
            iface_id: IFACE_ID.into(),
            host_dev_name: net.tap.clone(),
        })
        .collect();
    let vsock_override = spec
        .vsock_cid
        .map(|_| {
            api::utf8(&spec.files.vsock_socket).map(|uds_path| api::VsockOverride { uds_path })
        })
        .transpose()?;
    Ok(vec![api::SnapshotLoad {
        snapshot_path: api::utf8(&snapshot.state)?,
        mem_backend: memory_backend(snapshot, page_server)?,
        resume_vm: Some(true),
        network_overrides,
        vsock_override,
    }
    .call()])
}

/// `firecracker --snapshot-version`: the snapshot data format this binary writes and reads.
async fn snapshot_format_version(bin: &Path) -> Result<String, VmmError> {
    let output = tokio::process::Command::new(bin)
        .arg("--snapshot-version")
        .output()
        .await
        .map_err(|source| VmmError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().next().map(str::trim) {
        Some(line) if output.status.success() && !line.is_empty() => {
            Ok(line.trim_start_matches('v').to_owned())
        }
        _ => Err(VmmError::Version {
            bin: bin.to_owned(),
            detail: format!(
                "`--snapshot-version` exited {} and printed {:?}",
                output.status,
                stdout.trim()
            ),
        }),
    }
}

/// A snapshot's list of the pages its guest touched after its previous restore
/// ([`uffd::write_pages`]), prefetched by the next restore's page server.
pub const TOUCHED_PAGES: &str = "touched";

/// Where a lazily restored VM's page server keeps its list of touched pages.
fn touched_record_path(spec: &VmSpec) -> PathBuf {
    spec.files.firecracker_socket.with_file_name("uffd-touched")
}

/// How a restore's memory will be served lazily: the page server's socket (on the host), its
/// memory file, and its lists.
struct LazyMemory {
    bin: PathBuf,
    socket: PathBuf,
    memory: PathBuf,
    prefetch: PathBuf,
    record: PathBuf,
    log: PathBuf,
    owner: Option<(u32, u32)>,
}

/// How long a page server has to come up, and to end once its guest is gone.
const PAGE_SERVER_TIMEOUT: Duration = Duration::from_secs(5);

impl LazyMemory {
    fn plan(bin: &Path, spec: &VmSpec, jail: Option<&Jail>, snapshot: &SnapshotFiles) -> Self {
        let socket = match jail {
            Some(jail) => jail.host_path(jail::UFFD_SOCKET),
            None => spec.files.firecracker_socket.with_file_name("uffd.sock"),
        };
        Self {
            bin: bin.to_owned(),
            socket,
            memory: snapshot.memory.clone(),
            prefetch: snapshot.dir.join(TOUCHED_PAGES),
            record: touched_record_path(spec),
            log: spec.files.firecracker_socket.with_file_name("uffd.log"),
            owner: jail.map(Jail::owner),
        }
    }

    /// Starts the page server and waits until it listens. It runs in a process group of its
    /// own: an agent stopped with its group leaves it serving its guest.
    async fn start(self) -> Result<PageServer, VmmError> {
        let mut command = tokio::process::Command::new(&self.bin);
        command
            .arg("uffd-serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--memory")
            .arg(&self.memory)
            .arg("--record")
            .arg(&self.record);
        if self.prefetch.is_file() {
            command.arg("--prefetch").arg(&self.prefetch);
        }
        if let Some((uid, gid)) = self.owner {
            command.arg("--owner").arg(format!("{uid}:{gid}"));
        }
        let log = std::fs::File::create(&self.log).map_err(|source| VmmError::File {
            what: "failed to create",
            path: self.log.clone(),
            source,
        })?;
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        let ready = tokio::time::timeout(
            PAGE_SERVER_TIMEOUT,
            tokio::io::AsyncBufReadExt::read_line(
                &mut tokio::io::BufReader::new(stdout),
                &mut line,
            ),
        )
        .await;
        if !matches!(ready, Ok(Ok(_)) if line == "ready\n") {
            let _ = child.kill().await;
            let said = std::fs::read_to_string(&self.log).unwrap_or_default();
            return Err(VmmError::StartTask(format!(
                "the page server did not come up: {}",
                said.trim()
            )));
        }
        Ok(PageServer { child })
    }
}

/// A running `wrenn uffd-serve`.
struct PageServer {
    child: tokio::process::Child,
}

impl PageServer {
    /// Once its guest is gone: it writes its record and ends by itself; one that does not
    /// (Firecracker never connected) is killed.
    async fn end(mut self) {
        if tokio::time::timeout(PAGE_SERVER_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!("a page server outlived its VM; killing it");
            let _ = self.child.kill().await;
        }
    }
}

#[async_trait]
impl Vmm for FirecrackerVmm {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    async fn version(&self) -> Result<String, VmmError> {
        process::version_line(&self.bin, "Firecracker v").await
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError> {
        spec.check()?;
        let calls = boot_sequence(&self.api_view(spec))?;
        let this = self.clone();
        let spec = spec.clone();
        let task = tokio::spawn(async move {
            let mut vm = this.spawn_vm(&spec).await?;
            match vm.configure(&calls).await {
                Ok(()) => {
                    tracing::info!(id = %spec.id, pid = vm.pid(), vmm_version = %vm.vmm_version, "Firecracker VM started");
                    Ok(vm)
                }
                Err(error) => Err(vm.roll_back(&spec.id, error).await),
            }
        });
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
        self.restore_as(spec, snapshot, false).await
    }

    async fn share(
        &self,
        spec: &VmSpec,
        paused: &SnapshotFiles,
        out: &SnapshotFiles,
    ) -> Result<SnapshotMeta, VmmError> {
        spec.check()?;
        let version = self.version().await?;
        let version = version.trim_start_matches("Firecracker v").to_owned();
        let snapshot_version = snapshot_format_version(&self.bin).await?;
        let (paused, out) = (paused.clone(), out.clone());
        tokio::task::spawn_blocking(move || {
            let meta = snapshot::share_by_copy(
                &paused,
                &out,
                VmmKind::Firecracker,
                &version,
                Some(&snapshot_version),
            )?;
            // The paused guest's working set is every clone's first guess at its own.
            let _ = std::fs::copy(paused.dir.join(TOUCHED_PAGES), out.dir.join(TOUCHED_PAGES));
            Ok::<_, snapshot::SnapshotError>(meta)
        })
        .await
        .map_err(|e| VmmError::StartTask(e.to_string()))?
        .map_err(VmmError::from)
    }

    async fn restore_shared(
        &self,
        spec: &VmSpec,
        snapshot: &SnapshotFiles,
    ) -> Result<Box<dyn Vm>, VmmError> {
        self.restore_as(spec, snapshot, true).await
    }

    async fn adopt(&self, spec: &VmSpec, pid: u32) -> Result<Box<dyn Vm>, VmmError> {
        spec.check()?;
        let files = &spec.files;
        let jail = self.jail(spec);
        let endpoints = Endpoints::of(spec, jail.as_ref());
        let api_socket = endpoints.api_socket.clone();
        // A jailed Firecracker names its socket as it sees it.
        let named = match &jail {
            Some(_) => PathBuf::from(jail::API_SOCKET),
            None => api_socket.clone(),
        };
        let (process, _) = process::adopt(
            &self.bin,
            pid,
            VmmKind::Firecracker,
            spec,
            &named,
            self.console_cap,
        )?;
        let mut process = process.with_diagnostics_log(endpoints.log.clone());
        if let Some(jail) = &jail {
            process = process.with_jail(jail.clone());
        }
        let stream = tokio::net::UnixStream::connect(&api_socket)
            .await
            .map_err(|source| FirecrackerApiError::Connect {
                socket: api_socket.clone(),
                source,
            })?;
        let mut client = ApiClient::handshake(stream, &api_socket).await?;
        let version: FirecrackerVersion = client.get(&api::get_version()).await?;
        let vmm_version = version.firecracker_version;
        // The snapshot format is the running binary's. The installed one answers for it unless
        // it was upgraded since; then the binary the process runs (still readable through
        // /proc, even when replaced on disk) is asked.
        let installed = self.version().await?;
        let asked = if installed.trim_start_matches("Firecracker v") == vmm_version {
            self.bin.clone()
        } else {
            PathBuf::from(format!("/proc/{pid}/exe"))
        };
        let snapshot_version = snapshot_format_version(&asked).await?;
        tracing::info!(id = %spec.id, pid, %vmm_version, "Firecracker VM adopted");
        Ok(Box::new(FirecrackerVm {
            process,
            client,
            vmm_version,
            snapshot_version,
            machine: Machine::of(spec, None),
            console_log: files.console_log.clone(),
            sockets: vec![api_socket, endpoints.vsock_socket],
            jail,
            page_server: None,
            touched_record: self
                .page_server_bin
                .as_ref()
                .map(|_| touched_record_path(spec)),
        }))
    }
}

impl FirecrackerVmm {
    /// Spawns Firecracker for `spec` and connects to its API socket; on failure the process is
    /// killed and its sockets removed.
    /// Restores a paused VM's snapshot (retired before the guest runs), or (`shared`) starts a
    /// VM from a shared snapshot, which stays as it is: its files are copied into the jail,
    /// where they belong to this VM's user alone.
    async fn restore_as(
        &self,
        spec: &VmSpec,
        snapshot: &SnapshotFiles,
        shared: bool,
    ) -> Result<Box<dyn Vm>, VmmError> {
        spec.check()?;
        if shared && self.jail(spec).is_none() {
            // The drives are restored where the snapshot's VM had them: only a jail, whose
            // drive paths are the same for every VM, gives each VM its own.
            return Err(VmmError::InvalidSpec {
                id: spec.id.clone(),
                reason: "a shared snapshot is restored only by a jailed Firecracker".into(),
            });
        }
        let lazy = self
            .page_server_bin
            .as_ref()
            .map(|bin| LazyMemory::plan(bin, spec, self.jail(spec).as_ref(), snapshot));
        let calls = match self.jail(spec) {
            Some(jail) => restore_sequence(
                &jail.inside(spec),
                &jail.snapshot_inside(snapshot),
                lazy.as_ref().map(|_| Path::new(jail::UFFD_SOCKET)),
            )?,
            None => restore_sequence(
                spec,
                snapshot,
                lazy.as_ref().map(|plan| plan.socket.as_path()),
            )?,
        };
        let this = self.clone();
        let spec = spec.clone();
        let snapshot = snapshot.clone();
        let task = tokio::spawn(async move {
            let reader = if shared {
                SnapshotReader::open_shared(&snapshot)?
            } else {
                SnapshotReader::open(&snapshot)?
            };
            let version = this.version().await?;
            let version = version.trim_start_matches("Firecracker v");
            let snapshot_version = snapshot_format_version(&this.bin).await?;
            reader.check(
                VmmKind::Firecracker,
                version,
                Some(&snapshot_version),
                &Machine::of(&spec, None),
            )?;
            let mut vm = this.spawn_vm(&spec).await?;
            if let Some(jail) = &vm.jail {
                if let Err(error) = jail.bring_snapshot(&snapshot, shared, lazy.is_none()) {
                    return Err(vm.roll_back(&spec.id, error).await);
                }
            }
            if let Some(plan) = lazy {
                vm.touched_record = Some(plan.record.clone());
                match plan.start().await {
                    Ok(server) => vm.page_server = Some(server),
                    Err(error) => return Err(vm.roll_back(&spec.id, error).await),
                }
            }
            // With `resume_vm` the guest runs as soon as the load succeeds: retire the snapshot
            // first, and put it back if Firecracker refused the load (the guest never ran).
            let retired = if shared { Ok(()) } else { reader.consume() };
            let loaded = match retired {
                Ok(()) => vm.configure(&calls).await,
                Err(error) => Err(error.into()),
            };
            match loaded {
                Ok(()) => {
                    tracing::info!(id = %spec.id, pid = vm.pid(), shared, "Firecracker VM restored");
                    Ok(vm)
                }
                Err(error) => {
                    if !shared
                        && matches!(
                            error,
                            VmmError::FirecrackerApi(FirecrackerApiError::Fault { .. })
                        )
                    {
                        reader.unconsume();
                    }
                    Err(vm.roll_back(&spec.id, error).await)
                }
            }
        });
        let vm = task
            .await
            .map_err(|e| VmmError::StartTask(e.to_string()))??;
        Ok(Box::new(vm))
    }

    async fn spawn_vm(&self, spec: &VmSpec) -> Result<FirecrackerVm, VmmError> {
        let files = &spec.files;
        let jail = self.jail(spec);
        let endpoints = Endpoints::of(spec, jail.as_ref());
        let api_socket = endpoints.api_socket.clone();
        process::prepare_files(files, &[&api_socket, &endpoints.vsock_socket])?;
        let netns = spec.net.as_ref().and_then(|n| n.netns.as_deref());
        let spawned = match (&jail, &self.jailer) {
            (Some(jail), Some(jailer)) => {
                jail.populate(spec)?;
                // The jailer joins the namespace itself, before it drops its privileges.
                process::spawn(
                    &jailer.bin,
                    &jail.command_line(netns),
                    None,
                    spec,
                    self.console_cap,
                )
                .map(|p| p.with_jail(jail.clone()))
            }
            _ => {
                let args: Vec<OsString> = vec![
                    "--api-sock".into(),
                    api_socket.clone().into(),
                    "--id".into(),
                    spec.id.clone().into(),
                    "--log-path".into(),
                    endpoints.log.clone().into(),
                    "--level".into(),
                    "Info".into(),
                ];
                // Firecracker opens its log itself, with its own file offset: give it a file
                // of its own rather than interleaving it with stderr.
                process::reset_log(&endpoints.log)?;
                // Its stdout is the guest console (Firecracker's default without `PUT /serial`).
                process::spawn(&self.bin, &args, netns, spec, self.console_cap)
            }
        };
        let mut process = spawned?.with_diagnostics_log(endpoints.log.clone());
        let sockets = vec![api_socket.clone(), endpoints.vsock_socket.clone()];
        let connected = async {
            let stream = process.wait_for_socket(&api_socket).await?;
            let mut client = ApiClient::handshake(stream, &api_socket).await?;
            let version: FirecrackerVersion = client.get(&api::get_version()).await?;
            // Asked once the process runs, so that a binary that cannot start is reported
            // with its own complaint rather than this one.
            let snapshot_version = snapshot_format_version(&self.bin).await?;
            Ok::<_, VmmError>((client, version.firecracker_version, snapshot_version))
        }
        .await;
        match connected {
            Ok((client, vmm_version, snapshot_version)) => Ok(FirecrackerVm {
                process,
                client,
                vmm_version,
                snapshot_version,
                machine: Machine::of(spec, None),
                console_log: files.console_log.clone(),
                sockets,
                jail,
                page_server: None,
                touched_record: None,
            }),
            Err(error) => {
                if let Err(kill_error) = process.kill().await {
                    tracing::warn!(id = %spec.id, error = %kill_error, "killing a failed Firecracker");
                }
                for socket in &sockets {
                    let _ = process::remove_if_present(socket);
                }
                Err(error)
            }
        }
    }
}

pub struct FirecrackerVm {
    process: VmmProcess,
    client: ApiClient,
    vmm_version: String,
    /// `--snapshot-version` of the binary this VM runs.
    snapshot_version: String,
    machine: Machine,
    console_log: PathBuf,
    sockets: Vec<PathBuf>,
    /// The jail the VM runs in: its snapshots are written there first.
    jail: Option<Jail>,
    /// The page server of a lazily restored VM (not of one adopted after an agent restart:
    /// that one ends with its VM on its own).
    page_server: Option<PageServer>,
    /// Where the VM's page server lists the pages the guest touched; a pause keeps the list
    /// with the snapshot for the next restore to prefetch.
    touched_record: Option<PathBuf>,
}

impl FirecrackerVm {
    /// Sends `calls` in order; a transport error usually means the process died, which is
    /// then reported with its log.
    async fn configure(&mut self, calls: &[ApiCall]) -> Result<(), VmmError> {
        for call in calls {
            if let Err(error) = self.client.send(call).await {
                if let Some(status) = self.process.try_exit().await? {
                    return Err(self.process.exited_early(status));
                }
                return Err(error.into());
            }
        }
        Ok(())
    }

    /// Kills a process that failed to start or restore (a half-configured Firecracker is
    /// useless and holds the TAP) and returns `error`.
    async fn roll_back(&mut self, id: &str, error: VmmError) -> VmmError {
        if let Err(kill_error) = self.kill().await {
            tracing::warn!(id, error = %kill_error, "killing a failed Firecracker");
        }
        error
    }

    /// Pauses the vCPUs and writes the snapshot's partial files.
    async fn save(&mut self, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
        match self.jail.clone() {
            Some(jail) => {
                jail.prepare_snapshot()?;
                let calls = pause_sequence(&jail.snapshot_inside(snapshot))?;
                self.configure(&calls).await?;
                jail.take_snapshot(snapshot)?;
            }
            None => {
                let calls = pause_sequence(snapshot)?;
                self.configure(&calls).await?;
            }
        }
        // Firecracker only promises the disks reached the host's page cache.
        snapshot::sync_writable_drives(&self.machine)?;
        Ok(())
    }

    /// After a failed pause: resumes a guest that ran before, or reports the VMM gone.
    async fn recover(&mut self, was_running: bool, cause: VmmError) -> VmmError {
        let after = if matches!(self.process.try_exit().await, Ok(Some(_)) | Err(_)) {
            self.remove_sockets();
            AfterFailedPause::VmmGone
        } else if !was_running {
            AfterFailedPause::Paused
        } else {
            let resume = api::VmState {
                state: VmRunState::Resumed,
            }
            .call();
            match self.client.send(&resume).await {
                Ok(_) => AfterFailedPause::Running,
                Err(error) => {
                    tracing::warn!(pid = self.pid(), %error, "a VM whose pause failed cannot resume; killing it");
                    if let Err(error) = self.kill().await {
                        tracing::warn!(%error, "killing a VM whose pause failed");
                    }
                    AfterFailedPause::VmmGone
                }
            }
        };
        VmmError::PauseFailed {
            after,
            cause: Box::new(cause),
        }
    }

    /// Waits for the page server, whose guest is gone, to write its record and end.
    async fn end_page_server(&mut self) {
        if let Some(server) = self.page_server.take() {
            server.end().await;
        }
    }

    /// Keeps the list of pages the guest touched since its restore (as its page server last
    /// recorded it before the pause) with its new snapshot: the next restore prefetches them.
    fn keep_touched_pages(&self, snapshot: &SnapshotFiles, working_set: Option<Vec<u8>>) {
        let Some(record) = &self.touched_record else {
            return;
        };
        let _ = std::fs::remove_file(record);
        let Some(pages) = working_set else {
            return;
        };
        let kept = snapshot.dir.join(TOUCHED_PAGES);
        let partial = Layout::partial(&kept);
        if let Err(error) =
            std::fs::write(&partial, pages).and_then(|()| std::fs::rename(&partial, &kept))
        {
            tracing::warn!(%error, "could not keep the guest's touched pages with its snapshot");
        }
    }

    fn remove_sockets(&self) {
        for socket in &self.sockets {
            if let Err(error) = process::remove_if_present(socket) {
                tracing::warn!(%error, "removing a stopped VM's socket");
            }
        }
    }
}

#[async_trait]
impl Vm for FirecrackerVm {
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
        let info: InstanceInfo = self.client.get(&api::get_instance_info()).await?;
        Ok(match info.state.as_str() {
            "Running" => VmStatus::Running,
            "Paused" => VmStatus::Paused,
            "Not started" => VmStatus::NotStarted,
            other => VmStatus::Other(other.to_owned()),
        })
    }

    async fn shutdown(&mut self, grace: Duration) -> Result<VmmExit, VmmError> {
        if self.process.try_exit().await?.is_none() {
            let ctrl_alt_del = InstanceAction {
                action_type: ActionType::SendCtrlAltDel,
            }
            .call();
            if let Err(error) = self.client.send(&ctrl_alt_del).await {
                tracing::info!(pid = self.pid(), %error, "Ctrl+Alt+Del not delivered; killing the VM");
            } else if let Some(status) = self.process.wait_for(grace).await? {
                self.remove_sockets();
                self.end_page_server().await;
                return Ok(status);
            } else {
                tracing::info!(
                    pid = self.pid(),
                    ?grace,
                    "guest did not stop within its grace period; killing it"
                );
            }
        }
        self.kill().await
    }

    async fn kill(&mut self) -> Result<VmmExit, VmmError> {
        let status = self.process.kill().await?;
        self.remove_sockets();
        self.end_page_server().await;
        Ok(status)
    }

    async fn wait_exit(&mut self) -> Result<VmmExit, VmmError> {
        let status = self.process.wait().await?;
        self.remove_sockets();
        self.end_page_server().await;
        Ok(status)
    }

    async fn pause_to(&mut self, snapshot: &SnapshotFiles) -> Result<SnapshotMeta, VmmError> {
        let was_running = match self
            .client
            .get::<InstanceInfo>(&api::get_instance_info())
            .await
        {
            Ok(info) => info.state == "Running",
            Err(error) => return Err(self.recover(true, error.into()).await),
        };
        let writer = match SnapshotWriter::begin(
            snapshot,
            &[&snapshot.state, &snapshot.memory],
            snapshot::bytes_needed(self.machine.memory_mib),
        ) {
            Ok(writer) => writer,
            Err(error) => return Err(self.recover(was_running, error.into()).await),
        };
        // Taken before the snapshot: writing it reads every page of the guest, through the page
        // server, which would record them all.
        let working_set = self
            .touched_record
            .as_ref()
            .and_then(|record| std::fs::read(record).ok());
        let saved = match self.save(snapshot).await {
            Ok(()) => writer
                .commit(
                    VmmKind::Firecracker,
                    &self.vmm_version,
                    Some(&self.snapshot_version),
                    &self.machine,
                    false,
                )
                .map_err(VmmError::from),
            Err(error) => {
                drop(writer);
                Err(error)
            }
        };
        match saved {
            Ok(meta) => {
                // Firecracker's documented end of a snapshot that is not resumed in place.
                self.kill().await?;
                self.keep_touched_pages(snapshot, working_set);
                Ok(meta)
            }
            Err(error) => Err(self.recover(was_running, error).await),
        }
    }
}
