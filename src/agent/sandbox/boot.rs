//! Creating a sandbox: validation, then the create steps in order (directory, disk, network,
//! VMM, envd readiness, envd init), each undone in reverse when a later one fails.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::boot_snapshot::{link_or_copy, BootKey};
use super::pause::ENVD_ATTEMPT;
use super::record::RecordedState;
use super::snapshot_template::TemplateSnapshot;
use super::{Runtime, Sandbox, SandboxError, SandboxManager};
use crate::agent::disk;
use crate::agent::network::SandboxNetwork;
use crate::agent::templates::ImageLease;
use crate::agent::wire::{CreateSandbox, SandboxInfo, SandboxPhase};
use crate::envd::api::InitRequest;
use crate::envd::client::EnvdClient;
use crate::secret::SecretText;
use crate::vmm::{console_tail, Drive, NetAttachment, Vm, VmFiles, VmSpec, VmStatus};

/// What a sandbox's VM starts from.
pub(super) enum StartFrom<'a> {
    /// A snapshot template, restored: there is no other way to start one.
    Template(Box<TemplateSnapshot>),
    /// Its template's boot snapshot of this key when there is one, else a boot.
    Boot(Option<&'a BootKey>),
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

impl SandboxManager {
    fn validate(&self, req: &CreateSandbox) -> Result<(), SandboxError> {
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
        req.egress
            .clone()
            .normalised()
            .map_err(|e| SandboxError::Invalid(format!("egress: {e}")))?;
        Ok(())
    }

    /// Creates and boots a sandbox; returns once envd answers. On failure nothing is left. A
    /// destroy that arrives while the sandbox starts waits for this task, which then tears the
    /// fresh sandbox down instead of marking it running.
    ///
    /// The create runs in its own tracked task: a caller that hangs up half way (a control
    /// plane killed or timing out) must not cancel it between its steps, which would leave a
    /// `starting` sandbox holding a network slot, files and addresses until the agent restarts.
    /// It ends running, for the reconciler to find and settle, or rolled back.
    pub async fn create(self: &Arc<Self>, req: CreateSandbox) -> Result<SandboxInfo, SandboxError> {
        let this = self.clone();
        self.run_to_end(async move { this.create_now(req).await })
            .await
    }

    async fn create_now(self: Arc<Self>, req: CreateSandbox) -> Result<SandboxInfo, SandboxError> {
        self.validate(&req)?;
        let (image, lease) = match &req.snapshot {
            Some(document) => {
                let lease = self.templates.lock(&req.template).await;
                self.ensure_snapshot_template(&req.template, document, lease)
                    .await?
            }
            None => {
                self.templates
                    .ensure(&req.template, req.image.as_ref())
                    .await?
            }
        };
        let template_snapshot = self.template_snapshot(&req.template)?;
        if let Some(snapshot) = &template_snapshot {
            let record = &snapshot.record;
            if (req.vcpus, req.memory_mb) != (record.vcpus, record.memory_mb) {
                return Err(SandboxError::Invalid(format!(
                    "template `{}` is a snapshot of a sandbox with {} vCPUs and {} MB; its \
                     sandboxes have that size, not {} vCPUs and {} MB",
                    req.template, record.vcpus, record.memory_mb, req.vcpus, req.memory_mb
                )));
            }
        }
        let boot_key = match template_snapshot {
            Some(_) => None,
            None => self.boot_key(&req, &image).await,
        };
        let start = match template_snapshot {
            Some(snapshot) => StartFrom::Template(Box::new(snapshot)),
            None => StartFrom::Boot(boot_key.as_ref()),
        };
        let info = self.create_with(req, &image, Some(lease), start).await?;
        if let Some(key) = boot_key {
            // After the create, so that its own boot has the CPU to itself.
            self.want_boot_snapshot(key, image);
        }
        Ok(info)
    }

    /// Creates sandbox `req` from base image `image` (held still by `lease` until it is
    /// linked), its VM started as `start` says.
    pub(super) async fn create_with(
        &self,
        req: CreateSandbox,
        image: &Path,
        lease: Option<ImageLease>,
        start: StartFrom<'_>,
    ) -> Result<SandboxInfo, SandboxError> {
        let id = req.sandbox_id.to_string();
        let sandbox = Arc::new(Sandbox::new(req));
        {
            let mut registry = self.registry();
            if registry.contains_key(&id) || self.layout.sandbox_dir(&id).exists() {
                return Err(SandboxError::AlreadyExists(id));
            }
            registry.insert(id.clone(), sandbox.clone());
        }
        let runtime = match self.boot(&sandbox, image, lease, start).await {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::warn!(sandbox = %id, %error, "sandbox create failed and was rolled back");
                // Starting → Stopping cannot be refused unless a destroy already made it.
                let _ = sandbox.lifecycle().transition(&id, SandboxPhase::Stopping);
                self.forget(&sandbox, Ok(()));
                return Err(error);
            }
        };
        *sandbox.guest_addr.lock().expect("addr lock") =
            Some(runtime.network.envd_addr().ip().to_string());
        let recorded = RecordedState::Running {
            vmm_pid: runtime.vm.pid(),
            slot: runtime.network.slot,
        };
        if let Err(error) = sandbox.record(recorded).save(&self.layout) {
            // A sandbox a restarted agent could not adopt is not created.
            tracing::warn!(sandbox = %id, %error, "could not record the new sandbox; rolling back");
            let _ = sandbox.lifecycle().transition(&id, SandboxPhase::Stopping);
            let _ = self.teardown(&sandbox, Some(runtime)).await;
            return Err(error);
        }
        let refused = {
            let mut lifecycle = sandbox.lifecycle();
            match lifecycle.transition(&id, SandboxPhase::Running) {
                Ok(()) => {
                    lifecycle.runtime = Some(runtime);
                    None
                }
                Err(_) => Some(runtime),
            }
        };
        if let Some(runtime) = refused {
            tracing::info!(sandbox = %id, "destroyed while starting; tearing down");
            let _ = self.teardown(&sandbox, Some(runtime)).await;
            return Err(SandboxError::DestroyedWhileStarting(id));
        }
        sandbox.touch();
        tracing::info!(sandbox = %id, "sandbox running");
        Ok(sandbox.info())
    }

    /// The VM of a sandbox in `network`: the same for its first boot and every resume, so a
    /// snapshot's machine always matches (the network's TAP and namespace may differ).
    pub(super) fn vm_spec(
        &self,
        req: &CreateSandbox,
        image: &Path,
        network: &SandboxNetwork,
    ) -> VmSpec {
        let id = req.sandbox_id.to_string();
        VmSpec {
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
                    path: self.layout.sandbox_upper_disk(&id),
                    read_only: false,
                },
            ],
            net: Some(NetAttachment {
                tap: network.tap_name.clone(),
                mac: network.guest_mac.clone(),
                netns: Some(network.netns_path.clone()),
            }),
            vsock_cid: None,
            files: VmFiles::for_sandbox(&self.layout, &id),
            confinement: Some(self.confinement.for_slot(network.slot)),
            id,
        }
    }

    async fn boot(
        &self,
        sandbox: &Sandbox,
        image: &Path,
        lease: Option<ImageLease>,
        start: StartFrom<'_>,
    ) -> Result<Runtime, SandboxError> {
        let req = &sandbox.request;
        let id_text = req.sandbox_id.to_string();
        let id = id_text.as_str();
        let fail = |step: CreateStep, reason: String| SandboxError::CreateFailed {
            id: id.to_owned(),
            step,
            reason,
        };
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
        let base = self.layout.sandbox_base_image(id);
        // Images on another file system than the sandboxes (a symlinked images/) cannot be
        // linked: the sandbox gets a copy, since a pull may replace the template's image under
        // a paused sandbox.
        let (from, to) = (image.to_owned(), base.clone());
        let linked = match tokio::task::spawn_blocking(move || link_or_copy(&from, &to)).await {
            Ok(linked) => linked.map_err(|reason| fail(CreateStep::Directory, reason)),
            Err(e) => Err(fail(CreateStep::Directory, e.to_string())),
        };
        // The lease is held until the VM has started: a snapshot template's files (its disk,
        // memory and state) are read by path below, and an overwrite must not swap them
        // half way.
        if let Err(e) = linked.and(injected_failure(id, CreateStep::Directory).await) {
            undo_dir();
            return Err(e);
        }
        let image = if base.is_file() {
            base.as_path()
        } else {
            image
        };

        let upper = self.layout.sandbox_upper_disk(id);
        // What the VM starts from: a snapshot template (no other way), the template's boot
        // snapshot (a boot when there is none yet, or it fails), or a boot.
        let (restore_from, boot_key, saved_token) = match start {
            StartFrom::Template(snapshot) => (
                Some((snapshot.files, snapshot.upper)),
                None,
                Some(snapshot.record.access_token),
            ),
            StartFrom::Boot(key) => (
                key.and_then(|key| self.ready_boot_snapshot(key))
                    .map(|snapshot| (snapshot.files, snapshot.upper)),
                key,
                None,
            ),
        };
        let copied = match &restore_from {
            // The disk as it was when the snapshot's guest last wrote it.
            Some((_, snapshot_upper)) => {
                let (from, to) = (snapshot_upper.clone(), upper.clone());
                Some(
                    match tokio::task::spawn_blocking(move || disk::copy_sparse(&from, &to)).await {
                        Ok(copied) => copied.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                )
            }
            None => None,
        };
        // A boot snapshot removed meanwhile (superseded) leaves the create to a boot.
        let restore_from = match (copied.as_ref(), boot_key) {
            (Some(Err(reason)), Some(_)) => {
                tracing::warn!(sandbox = id, %reason, "copying the boot snapshot's disk failed; booting");
                let _ = disk::remove(&upper);
                None
            }
            _ => restore_from,
        };
        let disk = match copied {
            Some(Ok(())) if restore_from.is_some() => Ok(()),
            Some(Err(reason)) if restore_from.is_some() => Err(reason),
            _ => self
                .uppers
                .create(&upper, u64::from(req.disk_mb) << 20)
                .await
                .map_err(|e| e.to_string()),
        };
        let disk_result = match disk {
            Ok(()) => injected_failure(id, CreateStep::Disk).await,
            Err(reason) => Err(fail(CreateStep::Disk, reason)),
        };
        if let Err(e) = disk_result {
            undo_dir();
            return Err(e);
        }
        phases.lap("disk");

        let network = match self.network.create(id, &req.egress).await {
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
        if let Err(e) = injected_failure(id, CreateStep::Network).await {
            undo_network().await;
            undo_dir();
            return Err(e);
        }
        phases.lap("network");

        let spec = self.vm_spec(req, image, &network);
        let restored = match (restore_from, boot_key) {
            (Some((files, _)), None) => match self.vmm.restore_shared(&spec, &files).await {
                Ok(vm) => Some(vm),
                Err(error) => {
                    undo_network().await;
                    undo_dir();
                    return Err(fail(
                        CreateStep::Vmm,
                        format!("restoring the snapshot template: {error}"),
                    ));
                }
            },
            (Some((files, _)), Some(key)) => {
                match self.vmm.restore_shared(&spec, &files).await {
                    Ok(vm) => Some(vm),
                    Err(error) => {
                        tracing::warn!(sandbox = id, %error, "restoring the boot snapshot failed; discarding it and booting");
                        self.discard_boot_snapshot(key);
                        // The copied disk belongs to the snapshot's guest: a booting one gets a new one.
                        let fresh = match disk::remove(&upper) {
                            Ok(()) => self
                                .uppers
                                .create(&upper, u64::from(req.disk_mb) << 20)
                                .await
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        if let Err(reason) = fresh {
                            undo_network().await;
                            undo_dir();
                            return Err(fail(CreateStep::Disk, reason));
                        }
                        None
                    }
                }
            }
            _ => None,
        };
        let create_path = match (&restored, &saved_token) {
            (Some(_), Some(_)) => "snapshot_template",
            (Some(_), None) => "boot_snapshot",
            (None, _) => "cold_boot",
        };
        let started = match restored {
            Some(vm) => Ok(vm),
            None => self.vmm.start(&spec).await,
        };
        drop(lease);
        let mut vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                undo_network().await;
                undo_dir();
                return Err(fail(CreateStep::Vmm, e.to_string()));
            }
        };

        phases.lap("vmm_spawn");
        tracing::info!(sandbox = id, create_path, "the sandbox's VM runs");
        let result: Result<EnvdClient, SandboxError> = async {
            injected_failure(id, CreateStep::Vmm).await?;
            let mut envd = EnvdClient::new(&format!("http://{}", network.envd_addr()))
                .map_err(|e| fail(CreateStep::EnvdReady, e.to_string()))?;
            // A snapshot template's guest still expects the token it was saved with.
            if let Some(token) = &saved_token {
                envd.set_token(Some(token.clone().into_exposed()));
            }
            self.wait_envd(sandbox, &envd, &mut *vm).await?;
            injected_failure(id, CreateStep::EnvdReady).await?;
            phases.lap("boot_to_envd");
            let access_token = SecretText::new(hex::encode(rand::random::<[u8; 32]>()));
            // The guest's own identity, before any user code runs: a restored guest woke with
            // the snapshot's random state, name and clock, shared with every other one.
            let entropy: [[u8; 32]; 2] = rand::random();
            let init = InitRequest {
                env_vars: req.envs.clone().into_iter().collect(),
                default_user: req.user.clone(),
                default_workdir: None,
                access_token: Some(access_token.clone()),
                wall_clock_unix_ms: Some(chrono::Utc::now().timestamp_millis()),
                entropy: Some(SecretText::new(hex::encode(entropy.concat()))),
                hostname: Some(id.to_ascii_lowercase()),
                machine_id: Some(req.sandbox_id.uuid().simple().to_string()),
            };
            envd.init(&init)
                .await
                .map_err(|e| fail(CreateStep::EnvdInit, e.to_string()))?;
            *sandbox.access_token.lock().expect("token lock") = access_token.clone();
            injected_failure(id, CreateStep::EnvdInit).await?;
            Ok(envd.with_token(access_token.into_exposed()))
        }
        .await;
        match result {
            Ok(envd) => {
                let mut metadata = sandbox.metadata.lock().expect("metadata lock");
                metadata.insert("vmm".into(), self.vmm.kind().to_string());
                metadata.insert("vmm_version".into(), vm.vmm_version().to_owned());
                metadata.insert("agent_version".into(), crate::version::VERSION.into());
                metadata.insert("create_path".into(), create_path.into());
                phases.lap("envd_init");
                crate::agent::prometheus::create_phases(create_path, &phases.laps);
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
        sandbox: &Sandbox,
        envd: &EnvdClient,
        vm: &mut dyn Vm,
    ) -> Result<(), SandboxError> {
        let id = sandbox.id();
        let deadline = Instant::now() + self.limits.envd_ready_timeout;
        loop {
            if let Ok(Ok(health)) = tokio::time::timeout(ENVD_ATTEMPT, envd.health()).await {
                sandbox
                    .metadata
                    .lock()
                    .expect("metadata lock")
                    .insert("envd_version".into(), health.version);
                return Ok(());
            }
            if let Ok(VmStatus::Exited(status)) = vm.status().await {
                return Err(SandboxError::CreateFailed {
                    step: CreateStep::EnvdReady,
                    reason: format!(
                        "the VM exited ({status}) before envd answered; console: {}",
                        self.console_tail(&id)
                    ),
                    id,
                });
            }
            if Instant::now() > deadline {
                return Err(SandboxError::CreateFailed {
                    step: CreateStep::EnvdReady,
                    reason: format!(
                        "envd did not answer within {:?}; console: {}",
                        self.limits.envd_ready_timeout,
                        self.console_tail(&id)
                    ),
                    id,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The guest's last console lines, for an error message.
    pub(super) fn console_tail(&self, id: &str) -> String {
        console_tail(&VmFiles::for_sandbox(&self.layout, id), 8).join(" | ")
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

/// What an armed fail point does to a create (`failpoints` builds only).
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
enum Injected {
    /// `return`: the step fails, and the create rolls back.
    Failure,
    /// `return(hang)`: the create stops after the step and never goes on, for a test to kill
    /// the agent at exactly that point.
    Hang,
}

#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn armed(step: CreateStep) -> Option<Injected> {
    fail::fail_point!(step.fail_point(), |action: Option<String>| Some(
        match action.as_deref() {
            Some("hang") => Injected::Hang,
            _ => Injected::Failure,
        }
    ));
    None
}

/// Aborts or stops a create right after `step` when its fail point is armed.
async fn injected_failure(id: &str, step: CreateStep) -> Result<(), SandboxError> {
    match armed(step) {
        None => Ok(()),
        Some(Injected::Failure) => Err(SandboxError::CreateFailed {
            id: id.to_owned(),
            step,
            reason: "injected failure".into(),
        }),
        Some(Injected::Hang) => {
            tracing::warn!(sandbox = id, %step, "fail point: the create hangs after this step");
            std::future::pending().await
        }
    }
}
