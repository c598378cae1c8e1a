//! The Firecracker backend: one `firecracker` process per sandbox, configured over its API
//! socket in the documented order and started with `InstanceStart`.

pub mod api;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use async_trait::async_trait;

pub use api::FirecrackerApiError;
use api::{
    ActionType, ApiCall, ApiClient, Endpoint, FirecrackerVersion, InstanceAction, InstanceInfo,
};

use super::process::{self, VmmProcess};
use super::{Vm, VmSpec, VmStatus, Vmm, VmmError, VmmKind};
use crate::config::ConsoleLogMaxBytes;

/// The guest's only network interface.
pub const IFACE_ID: &str = "eth0";

#[derive(Debug, Clone)]
pub struct FirecrackerVmm {
    bin: PathBuf,
    console_cap: ConsoleLogMaxBytes,
}

impl FirecrackerVmm {
    pub fn new(bin: PathBuf, console_cap: ConsoleLogMaxBytes) -> Self {
        Self { bin, console_cap }
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
        let calls = boot_sequence(spec)?;
        let bin = self.bin.clone();
        let spec = spec.clone();
        let console_cap = self.console_cap;
        let task = tokio::spawn(async move { start_detached(bin, console_cap, spec, calls).await });
        let vm = task
            .await
            .map_err(|e| VmmError::StartTask(e.to_string()))??;
        Ok(Box::new(vm))
    }
}

async fn start_detached(
    bin: PathBuf,
    console_cap: ConsoleLogMaxBytes,
    spec: VmSpec,
    calls: Vec<ApiCall>,
) -> Result<FirecrackerVm, VmmError> {
    let files = &spec.files;
    let api_socket = files.firecracker_socket.clone();
    process::prepare_files(files, &[&api_socket, &files.vsock_socket])?;
    let args: Vec<OsString> = vec![
        "--api-sock".into(),
        api_socket.clone().into(),
        "--id".into(),
        spec.id.clone().into(),
        "--log-path".into(),
        files.firecracker_log.clone().into(),
        "--level".into(),
        "Info".into(),
    ];
    let netns = spec.net.as_ref().and_then(|n| n.netns.as_deref());
    // Firecracker opens its log itself, with its own file offset: give it a file of its own
    // rather than interleaving it with stderr.
    process::reset_log(&files.firecracker_log)?;
    // Its stdout is the guest console (Firecracker's default without `PUT /serial`).
    let mut process = process::spawn(&bin, &args, netns, files, console_cap)?
        .with_diagnostics_log(files.firecracker_log.clone());
    match configure(&mut process, &api_socket, &calls).await {
        Ok((client, vmm_version)) => {
            tracing::info!(id = %spec.id, pid = process.pid(), %vmm_version, "Firecracker VM started");
            Ok(FirecrackerVm {
                process,
                client,
                vmm_version,
                console_log: files.console_log.clone(),
                sockets: vec![api_socket, files.vsock_socket.clone()],
            })
        }
        Err(error) => {
            // Roll back: a half-configured Firecracker is useless and holds the TAP.
            if let Err(kill_error) = process.kill().await {
                tracing::warn!(id = %spec.id, error = %kill_error, "killing a failed Firecracker");
            }
            for socket in [&api_socket, &files.vsock_socket] {
                let _ = process::remove_if_present(socket);
            }
            Err(error)
        }
    }
}

async fn configure(
    process: &mut VmmProcess,
    api_socket: &Path,
    calls: &[ApiCall],
) -> Result<(ApiClient, String), VmmError> {
    let stream = process.wait_for_socket(api_socket).await?;
    let mut client = ApiClient::handshake(stream, api_socket).await?;
    let version: FirecrackerVersion = client.get(&api::get_version()).await?;
    for call in calls {
        if let Err(error) = client.send(call).await {
            // A transport error usually means the process died; say so with its log.
            if let Some(status) = process.try_exit().await? {
                return Err(process.exited_early(status));
            }
            return Err(error.into());
        }
    }
    Ok((client, version.firecracker_version))
}

pub struct FirecrackerVm {
    process: VmmProcess,
    client: ApiClient,
    vmm_version: String,
    console_log: PathBuf,
    sockets: Vec<PathBuf>,
}

impl FirecrackerVm {
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

    async fn shutdown(&mut self, grace: Duration) -> Result<ExitStatus, VmmError> {
        if self.process.try_exit().await?.is_none() {
            let ctrl_alt_del = InstanceAction {
                action_type: ActionType::SendCtrlAltDel,
            }
            .call();
            if let Err(error) = self.client.send(&ctrl_alt_del).await {
                tracing::info!(pid = self.pid(), %error, "Ctrl+Alt+Del not delivered; killing the VM");
            } else if let Some(status) = self.process.wait_for(grace).await? {
                self.remove_sockets();
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

    async fn kill(&mut self) -> Result<ExitStatus, VmmError> {
        let status = self.process.kill().await?;
        self.remove_sockets();
        Ok(status)
    }

    async fn wait_exit(&mut self) -> Result<ExitStatus, VmmError> {
        let status = self.process.wait().await?;
        self.remove_sockets();
        Ok(status)
    }
}
