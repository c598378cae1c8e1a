//! Sandbox lifecycle on this host: create (disk, network, VMM, envd readiness) with a rollback
//! of every earlier step when a later one fails, destroy (graceful, then forced), the idle
//! reaper, and clean-up of what an earlier agent process left behind.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::agent::disk;
use crate::agent::network::{NetworkError, NetworkManager, SandboxNetwork};
use crate::agent::wire::{CreateSandbox, SandboxInfo, SandboxPhase};
use crate::config::Layout;
use crate::envd::api::InitRequest;
use crate::envd::client::EnvdClient;
use crate::vmm::{
    console_tail, find_leftovers, kill_leftover, Drive, NetAttachment, Vm, VmFiles, VmSpec,
    VmStatus, Vmm,
};

/// How long a graceful guest shutdown may take before the VMM is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the idle reaper looks for sandboxes past their timeout.
const REAPER_PERIOD: Duration = Duration::from_secs(1);

/// Limits the agent enforces on a create request.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_vcpus: u32,
    pub max_memory_mb: u32,
    pub max_disk_mb: u64,
    pub envd_ready_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("template `{template}` is not on this host (expected {path})")]
    UnknownTemplate { template: String, path: PathBuf },
    #[error("sandbox {0} already exists on this host")]
    AlreadyExists(String),
    #[error("sandbox {0} is not on this host")]
    NotFound(String),
    #[error("sandbox {id} is {state:?}, not running")]
    NotRunning { id: String, state: SandboxPhase },
    #[error("creating sandbox {id} failed while {step}: {reason}")]
    CreateFailed {
        id: String,
        step: CreateStep,
        reason: String,
    },
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// The create steps in order; a failure names the step and undoes the earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateStep {
    Directory,
    Disk,
    Network,
    Vmm,
    EnvdReady,
    EnvdInit,
}

impl std::fmt::Display for CreateStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Directory => "creating the sandbox directory",
            Self::Disk => "creating the writable disk",
            Self::Network => "creating the network",
            Self::Vmm => "starting the VMM",
            Self::EnvdReady => "waiting for envd",
            Self::EnvdInit => "initialising envd",
        })
    }
}

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
impl CreateStep {
    /// The fail point that aborts a create right after this step (`failpoints` builds only).
    fn fail_point(self) -> &'static str {
        match self {
            Self::Directory => "agent-create-after-directory",
            Self::Disk => "agent-create-after-disk",
            Self::Network => "agent-create-after-network",
            Self::Vmm => "agent-create-after-vmm",
            Self::EnvdReady => "agent-create-after-envd-ready",
            Self::EnvdInit => "agent-create-after-envd-init",
        }
    }
}

/// The host resources a running sandbox holds.
struct Runtime {
    network: SandboxNetwork,
    vm: Box<dyn Vm>,
    envd: EnvdClient,
}

struct Sandbox {
    request: CreateSandbox,
    created_at: DateTime<Utc>,
    last_active_ms: AtomicI64,
    /// Proxied requests and sessions still open: a long command or an interactive terminal is
    /// activity for as long as it lasts, not only when it starts.
    open_sessions: AtomicUsize,
    state: Mutex<SandboxPhase>,
    runtime: tokio::sync::Mutex<Option<Runtime>>,
    guest_addr: Mutex<Option<String>>,
    metadata: Mutex<BTreeMap<String, String>>,
}

/// Holds a sandbox active (exempt from the idle reaper) while it lives; the idle timer restarts
/// when the last lease is dropped.
pub struct ActivityLease(Arc<Sandbox>);

impl ActivityLease {
    fn open(sandbox: Arc<Sandbox>) -> Self {
        sandbox.open_sessions.fetch_add(1, Ordering::Relaxed);
        sandbox.touch();
        Self(sandbox)
    }
}

impl Drop for ActivityLease {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Sandbox {
    fn state(&self) -> SandboxPhase {
        *self.state.lock().expect("state lock")
    }

    fn set_state(&self, state: SandboxPhase) {
        *self.state.lock().expect("state lock") = state;
    }

    fn touch(&self) {
        self.last_active_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        if self.open_sessions.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let idle_ms = Utc::now().timestamp_millis() - self.last_active_ms.load(Ordering::Relaxed);
        Duration::from_millis(idle_ms.max(0) as u64)
    }

    fn info(&self) -> SandboxInfo {
        let r = &self.request;
        let last = self.last_active_ms.load(Ordering::Relaxed);
        SandboxInfo {
            sandbox_id: r.sandbox_id,
            status: self.state(),
            template: r.template.clone(),
            vcpus: r.vcpus,
            memory_mb: r.memory_mb,
            disk_mb: r.disk_mb,
            timeout_sec: r.timeout_sec,
            created_at: self.created_at,
            last_active_at: DateTime::from_timestamp_millis(last).unwrap_or(self.created_at),
            guest_addr: self.guest_addr.lock().expect("addr lock").clone(),
            metadata: self.metadata.lock().expect("metadata lock").clone(),
        }
    }
}

/// Owns every sandbox on this host.
pub struct SandboxManager {
    layout: Layout,
    vmm: Arc<dyn Vmm>,
    network: NetworkManager,
    uppers: disk::UpperDisks,
    limits: Limits,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
}

impl std::fmt::Debug for SandboxManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxManager")
            .field("vmm", &self.vmm.kind())
            .finish_non_exhaustive()
    }
}

impl SandboxManager {
    pub fn new(layout: Layout, vmm: Arc<dyn Vmm>, network: NetworkManager, limits: Limits) -> Self {
        let uppers = disk::UpperDisks::open(layout.clone());
        Self {
            layout,
            vmm,
            network,
            uppers,
            limits,
            sandboxes: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        self.sandboxes
            .lock()
            .expect("sandboxes lock")
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_owned()))
    }

    pub fn list(&self) -> Vec<SandboxInfo> {
        let mut list: Vec<SandboxInfo> = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .values()
            .map(|s| s.info())
            .collect();
        list.sort_by_key(|s| s.created_at);
        list
    }

    pub fn info(&self, id: &str) -> Result<SandboxInfo, SandboxError> {
        Ok(self.get(id)?.info())
    }

    /// Resets the idle timer.
    pub fn ping(&self, id: &str) -> Result<(), SandboxError> {
        self.get(id)?.touch();
        Ok(())
    }

    /// The envd client of a running sandbox, for the API's proxy, and a lease that keeps the
    /// sandbox active until the proxied exchange ends and is dropped.
    pub async fn envd(&self, id: &str) -> Result<(EnvdClient, ActivityLease), SandboxError> {
        let sandbox = self.get(id)?;
        match sandbox.state() {
            SandboxPhase::Running => {}
            state @ (SandboxPhase::Starting
            | SandboxPhase::Pausing
            | SandboxPhase::Paused
            | SandboxPhase::Resuming
            | SandboxPhase::Snapshotting
            | SandboxPhase::Stopping) => {
                return Err(SandboxError::NotRunning {
                    id: id.to_owned(),
                    state,
                })
            }
        }
        let lease = ActivityLease::open(Arc::clone(&sandbox));
        let runtime = sandbox.runtime.lock().await;
        let runtime = runtime.as_ref().ok_or_else(|| SandboxError::NotRunning {
            id: id.to_owned(),
            state: SandboxPhase::Stopping,
        })?;
        Ok((runtime.envd.clone(), lease))
    }

    fn validate(&self, req: &CreateSandbox) -> Result<PathBuf, SandboxError> {
        let l = &self.limits;
        if req.vcpus == 0 || req.vcpus > l.max_vcpus {
            return Err(SandboxError::Invalid(format!(
                "vcpus must be between 1 and {}, got {}",
                l.max_vcpus, req.vcpus
            )));
        }
        if req.memory_mb < 128 || req.memory_mb > l.max_memory_mb {
            return Err(SandboxError::Invalid(format!(
                "memory_mb must be between 128 and {}, got {}",
                l.max_memory_mb, req.memory_mb
            )));
        }
        let min_disk = disk::MIN_UPPER_SIZE_BYTES >> 20;
        let disk_mb = u64::from(req.disk_mb);
        if disk_mb < min_disk || disk_mb > l.max_disk_mb {
            return Err(SandboxError::Invalid(format!(
                "disk_mb must be between {min_disk} and {}, got {}",
                l.max_disk_mb, req.disk_mb
            )));
        }
        let image = self.layout.image_rootfs(req.template.as_str());
        if !image.is_file() {
            return Err(SandboxError::UnknownTemplate {
                template: req.template.to_string(),
                path: image,
            });
        }
        Ok(image)
    }

    /// Creates and boots a sandbox; returns once envd answers. On failure nothing is left.
    pub async fn create(&self, req: CreateSandbox) -> Result<SandboxInfo, SandboxError> {
        let image = self.validate(&req)?;
        let id = req.sandbox_id.to_string();
        let sandbox = Arc::new(Sandbox {
            request: req,
            created_at: Utc::now(),
            last_active_ms: AtomicI64::new(Utc::now().timestamp_millis()),
            open_sessions: AtomicUsize::new(0),
            state: Mutex::new(SandboxPhase::Starting),
            runtime: tokio::sync::Mutex::new(None),
            guest_addr: Mutex::new(None),
            metadata: Mutex::new(BTreeMap::new()),
        });
        {
            let mut map = self.sandboxes.lock().expect("sandboxes lock");
            if map.contains_key(&id) || self.layout.sandbox_dir(&id).exists() {
                return Err(SandboxError::AlreadyExists(id));
            }
            map.insert(id.clone(), sandbox.clone());
        }
        let mut runtime_slot = sandbox.runtime.lock().await;
        match self.boot(&sandbox, &image).await {
            Ok(runtime) => {
                *sandbox.guest_addr.lock().expect("addr lock") =
                    Some(runtime.network.envd_addr().ip().to_string());
                *runtime_slot = Some(runtime);
                sandbox.set_state(SandboxPhase::Running);
                sandbox.touch();
                tracing::info!(sandbox = %id, "sandbox running");
                Ok(sandbox.info())
            }
            Err(error) => {
                self.sandboxes.lock().expect("sandboxes lock").remove(&id);
                tracing::warn!(sandbox = %id, %error, "sandbox create failed and was rolled back");
                Err(error)
            }
        }
    }

    async fn boot(&self, sandbox: &Sandbox, image: &Path) -> Result<Runtime, SandboxError> {
        let req = &sandbox.request;
        let id_text = req.sandbox_id.to_string();
        let id = id_text.as_str();
        let fail = |step: CreateStep, reason: String| SandboxError::CreateFailed {
            id: id.to_owned(),
            step,
            reason,
        };
        let check_fail_point = |step: CreateStep| injected_failure(id, step);
        // How long each phase took, reported in the sandbox's metadata for operators and the
        // agent benchmark.
        let mut phases = PhaseClock::start();

        let dir = self.layout.sandbox_dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| fail(CreateStep::Directory, e.to_string()))?;
        let undo_dir = || {
            if let Err(error) = std::fs::remove_dir_all(&dir) {
                tracing::error!(sandbox = id, %error, "could not remove the sandbox directory");
            }
        };
        if let Err(e) = check_fail_point(CreateStep::Directory) {
            undo_dir();
            return Err(e);
        }

        let upper = self.layout.sandbox_upper_disk(id);
        let disk_result = self
            .uppers
            .create(&upper, u64::from(req.disk_mb) << 20)
            .await
            .map_err(|e| fail(CreateStep::Disk, e.to_string()))
            .and_then(|()| check_fail_point(CreateStep::Disk));
        if let Err(e) = disk_result {
            undo_dir();
            return Err(e);
        }
        phases.lap("disk");

        let network = match self.network.create(id).await {
            Ok(network) => network,
            Err(e) => {
                undo_dir();
                return Err(fail(CreateStep::Network, e.to_string()));
            }
        };
        let undo_network = || async {
            if let Err(error) = self.network.destroy(&network).await {
                tracing::error!(sandbox = id, %error, "could not remove the sandbox network");
            }
        };
        if let Err(e) = check_fail_point(CreateStep::Network) {
            undo_network().await;
            undo_dir();
            return Err(e);
        }
        phases.lap("network");

        let spec = VmSpec {
            id: id.to_owned(),
            vcpus: req.vcpus,
            memory_mib: req.memory_mb,
            kernel: self.layout.default_kernel(),
            initrd: Some(self.layout.default_initramfs()),
            extra_boot_args: format!("quiet {}", network.boot_ip_arg),
            drives: vec![
                Drive {
                    id: "root".into(),
                    path: image.to_owned(),
                    read_only: true,
                },
                Drive {
                    id: "upper".into(),
                    path: upper.clone(),
                    read_only: false,
                },
            ],
            net: Some(NetAttachment {
                tap: network.tap_name.clone(),
                mac: network.guest_mac.clone(),
                netns: Some(network.netns_path.clone()),
            }),
            vsock_cid: None,
            files: VmFiles::for_sandbox(&self.layout, id),
        };
        let mut vm = match self.vmm.start(&spec).await {
            Ok(vm) => vm,
            Err(e) => {
                undo_network().await;
                undo_dir();
                return Err(fail(CreateStep::Vmm, e.to_string()));
            }
        };

        phases.lap("vmm_spawn");
        let result: Result<EnvdClient, SandboxError> = async {
            check_fail_point(CreateStep::Vmm)?;
            let envd = EnvdClient::new(&format!("http://{}", network.envd_addr()))
                .map_err(|e| fail(CreateStep::EnvdReady, e.to_string()))?;
            self.wait_envd(&envd, &mut *vm, id).await?;
            check_fail_point(CreateStep::EnvdReady)?;
            phases.lap("boot_to_envd");
            let access_token = hex::encode(rand::random::<[u8; 32]>());
            let init = InitRequest {
                env_vars: req.envs.clone().into_iter().collect(),
                default_user: req.user.clone(),
                default_workdir: None,
                access_token: Some(access_token.clone()),
            };
            envd.init(&init)
                .await
                .map_err(|e| fail(CreateStep::EnvdInit, e.to_string()))?;
            check_fail_point(CreateStep::EnvdInit)?;
            Ok(envd.with_token(access_token))
        }
        .await;
        match result {
            Ok(envd) => {
                let mut metadata = sandbox.metadata.lock().expect("metadata lock");
                metadata.insert("vmm".into(), self.vmm.kind().to_string());
                metadata.insert("vmm_version".into(), vm.vmm_version().to_owned());
                metadata.insert("agent_version".into(), crate::version::VERSION.into());
                phases.lap("envd_init");
                for (phase, took) in phases.laps {
                    metadata.insert(format!("create_ms.{phase}"), took.as_millis().to_string());
                }
                drop(metadata);
                Ok(Runtime { network, vm, envd })
            }
            Err(e) => {
                if let Err(error) = vm.kill().await {
                    tracing::error!(sandbox = id, %error, "could not kill the VMM");
                }
                undo_network().await;
                undo_dir();
                Err(e)
            }
        }
    }

    async fn wait_envd(
        &self,
        envd: &EnvdClient,
        vm: &mut dyn Vm,
        id: &str,
    ) -> Result<(), SandboxError> {
        let deadline = Instant::now() + self.limits.envd_ready_timeout;
        loop {
            if let Ok(health) = envd.health().await {
                self.get(id)?
                    .metadata
                    .lock()
                    .expect("metadata lock")
                    .insert("envd_version".into(), health.version);
                return Ok(());
            }
            if let Ok(VmStatus::Exited(status)) = vm.status().await {
                return Err(SandboxError::CreateFailed {
                    id: id.to_owned(),
                    step: CreateStep::EnvdReady,
                    reason: format!(
                        "the VM exited ({status}) before envd answered; console: {}",
                        self.console_tail(id)
                    ),
                });
            }
            if Instant::now() > deadline {
                return Err(SandboxError::CreateFailed {
                    id: id.to_owned(),
                    step: CreateStep::EnvdReady,
                    reason: format!(
                        "envd did not answer within {:?}; console: {}",
                        self.limits.envd_ready_timeout,
                        self.console_tail(id)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the VM (graceful, then forced) and releases the network, disk and directory.
    pub async fn destroy(&self, id: &str) -> Result<(), SandboxError> {
        let sandbox = self.get(id)?;
        match sandbox.state() {
            SandboxPhase::Running => {}
            state @ (SandboxPhase::Starting
            | SandboxPhase::Pausing
            | SandboxPhase::Paused
            | SandboxPhase::Resuming
            | SandboxPhase::Snapshotting
            | SandboxPhase::Stopping) => {
                return Err(SandboxError::NotRunning {
                    id: id.to_owned(),
                    state,
                })
            }
        }
        sandbox.set_state(SandboxPhase::Stopping);
        let runtime = sandbox.runtime.lock().await.take();
        if let Some(mut runtime) = runtime {
            if let Err(error) = runtime.envd.shutdown().await {
                tracing::debug!(sandbox = id, %error, "envd shutdown request failed; stopping the VM");
            }
            if let Err(error) = runtime.vm.shutdown(SHUTDOWN_GRACE).await {
                tracing::warn!(sandbox = id, %error, "graceful VM shutdown failed; killed");
            }
            self.network.destroy(&runtime.network).await?;
        }
        let dir = self.layout.sandbox_dir(id);
        std::fs::remove_dir_all(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|source| SandboxError::Io {
                what: format!("removing {}", dir.display()),
                source,
            })?;
        self.sandboxes.lock().expect("sandboxes lock").remove(id);
        tracing::info!(sandbox = id, "sandbox destroyed");
        Ok(())
    }

    /// Destroys every sandbox and then the host firewall table they needed; at agent shutdown.
    pub async fn destroy_all(&self) {
        let ids: Vec<String> = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if let Err(error) = self.destroy(&id).await {
                tracing::warn!(sandbox = %id, %error, "destroy at shutdown failed");
            }
        }
        if let Err(error) = self.network.remove_host_table().await {
            tracing::warn!(%error, "could not remove the host firewall table at shutdown");
        }
    }

    /// Destroys running sandboxes idle for longer than their timeout, until `shutdown`.
    pub async fn reap_idle(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut ticker = tokio::time::interval(REAPER_PERIOD);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let expired: Vec<String> = self
                .sandboxes
                .lock()
                .expect("sandboxes lock")
                .values()
                .filter(|s| s.state() == SandboxPhase::Running)
                .filter(|s| {
                    let timeout = s.request.timeout_sec;
                    timeout > 0 && s.idle_for() > Duration::from_secs(u64::from(timeout))
                })
                .map(|s| s.request.sandbox_id.to_string())
                .collect();
            for id in expired {
                tracing::info!(sandbox = %id, "idle timeout reached; destroying");
                if let Err(error) = self.destroy(&id).await {
                    tracing::warn!(sandbox = %id, %error, "idle destroy failed");
                }
            }
        }
    }

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

    /// The guest's last console lines, for an error message.
    fn console_tail(&self, id: &str) -> String {
        console_tail(&VmFiles::for_sandbox(&self.layout, id), 8).join(" | ")
    }

    pub fn vmm_kind(&self) -> String {
        self.vmm.kind().to_string()
    }
}

/// Splits a create's wall time into named phases.
struct PhaseClock {
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl PhaseClock {
    fn start() -> Self {
        Self {
            last: Instant::now(),
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.laps.push((phase, now - self.last));
        self.last = now;
    }
}

/// Aborts a create right after `step` when its fail point is armed (`failpoints` builds).
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn injected_failure(id: &str, step: CreateStep) -> Result<(), SandboxError> {
    fail::fail_point!(step.fail_point(), |_| Err(SandboxError::CreateFailed {
        id: id.to_owned(),
        step,
        reason: "injected failure".into(),
    }));
    Ok(())
}
