//! Sandboxes on this host: the registry and what each sandbox holds. The work is split by job:
//! `phase` (the transition table every phase change goes through), `boot` (create, step by step
//! with rollback), `pause` (pause to disk and resume), `teardown` (destroy, exactly once however
//! many callers ask), `reaper` (the idle reaper, which pauses), `record` (each sandbox's state on
//! disk), `adopt` (taking over the sandboxes of an earlier agent process), `capture` (a
//! sandbox's disk made a template image, a build's last step) and `metrics` (each sandbox's
//! use of the host, sampled every second).

mod adopt;
mod boot;
mod boot_snapshot;
mod capture;
mod egress;
mod fork;
pub mod metrics;
mod pause;
mod phase;
mod reaper;
mod record;
mod relocation;
mod snapshot_store;
mod snapshot_template;
mod teardown;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::agent::disk;
use crate::agent::network::{NetworkError, NetworkManager, SandboxNetwork};
use crate::agent::templates::{TemplateError, TemplateImages};
use crate::agent::wire::{CreateSandbox, LostSandbox, SandboxInfo, SandboxPhase};
use crate::config::Layout;
use crate::egress::EgressPolicy;
use crate::envd::client::EnvdClient;
use crate::id::SandboxId;
use crate::secret::SecretText;
use crate::vmm::{ConfinementPolicy, Vm, Vmm};

pub use adopt::Recovery;
pub use boot::CreateStep;
pub use phase::IllegalTransition;

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
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("sandbox {0} already exists on this host")]
    AlreadyExists(String),
    #[error("sandbox {0} is not on this host")]
    NotFound(String),
    #[error("sandbox {id} is {state}, not running")]
    NotRunning { id: String, state: SandboxPhase },
    #[error("sandbox {id}: {source}")]
    Transition {
        id: String,
        source: IllegalTransition,
    },
    #[error("creating sandbox {id} failed while {step}: {reason}")]
    CreateFailed {
        id: String,
        step: CreateStep,
        reason: String,
    },
    #[error("sandbox {0} was destroyed while it was starting")]
    DestroyedWhileStarting(String),
    /// A destroy arrived while an operation ran; the sandbox was torn down instead of becoming
    /// `phase`.
    #[error("sandbox {id} was destroyed before it was {phase}")]
    DestroyedBefore { id: String, phase: SandboxPhase },
    /// The pause did not happen and the sandbox runs on (or, if it was paused, stays so).
    #[error("pausing sandbox {id} failed; it runs on: {reason}")]
    PauseFailed {
        id: String,
        reason: String,
        disk_full: bool,
    },
    /// No snapshot template was made; the sandbox is as it was.
    #[error("making a snapshot template of sandbox {id} failed: {reason}")]
    SnapshotFailed { id: String, reason: String },
    #[error("template `{0}` already exists on this host")]
    TemplateExists(String),
    /// No template image was made; the sandbox runs on.
    #[error("capturing sandbox {id} as a template failed: {reason}")]
    CaptureFailed { id: String, reason: String },
    /// The template store holds no copy of the sandbox (it was not paused elsewhere with a
    /// shared store, or it has been resumed since).
    #[error("the template store holds no paused copy of sandbox {0}")]
    NotStored(String),
    /// The store's copy of a paused sandbox cannot be taken in here; nothing of it was kept.
    #[error("importing paused sandbox {id} failed: {reason}")]
    ImportFailed { id: String, reason: String },
    /// The resume did not happen; the sandbox is still paused and may be resumed again.
    #[error("resuming sandbox {id} failed; it stays paused: {reason}")]
    ResumeFailed { id: String, reason: String },
    /// The sandbox's VM is gone (it died, or its snapshot could not be used) and it was removed
    /// from the host.
    #[error("sandbox {id} was lost: {reason}")]
    Lost { id: String, reason: String },
    /// The runtime shut down under an operation.
    #[error("the operation was interrupted: {0}")]
    Interrupted(String),
    #[error("sandbox {id} is {phase}; try again once it has settled")]
    Busy { id: String, phase: SandboxPhase },
    #[error("sandbox {id} did not settle within {waited:?}; it is still {phase}")]
    Unsettled {
        id: String,
        phase: SandboxPhase,
        waited: Duration,
    },
    /// The port proxy's connections to this sandbox are at their limit.
    #[error("sandbox {id} already has {limit} proxied connections open")]
    TooManyConnections { id: String, limit: usize },
    #[error(
        "sandbox {id} was destroyed, but not all of its host resources were released: {reason}"
    )]
    TeardownFailed { id: String, reason: String },
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// The host resources a booted sandbox holds.
struct Runtime {
    network: SandboxNetwork,
    vm: Box<dyn Vm>,
    envd: EnvdClient,
}

/// A sandbox's phase and its runtime, behind one lock: whoever moves the phase also decides who
/// holds the runtime, in the same step.
struct Lifecycle {
    phase: SandboxPhase,
    /// Present while the sandbox is `Running`, and held by the one task that pauses or tears
    /// it down.
    runtime: Option<Runtime>,
    /// Every phase change, for callers that wait for an operation in progress to settle.
    changed: watch::Sender<SandboxPhase>,
}

impl Lifecycle {
    /// Moves to `next` if the transition table allows it.
    fn transition(&mut self, id: &str, next: SandboxPhase) -> Result<(), SandboxError> {
        self.phase = self
            .phase
            .transition(next)
            .map_err(|source| SandboxError::Transition {
                id: id.to_owned(),
                source,
            })?;
        self.changed.send_replace(next);
        Ok(())
    }
}

/// How long a caller waits for another task's pause, resume or start to finish before it acts.
const SETTLE_WAIT: Duration = Duration::from_secs(120);

/// How a teardown ended, for the callers that waited for it: `Err` names what was left behind.
type TeardownOutcome = Result<(), String>;

struct Sandbox {
    request: CreateSandbox,
    created_at: DateTime<Utc>,
    last_active_ms: AtomicI64,
    /// Proxied requests and sessions still open: a long command or an interactive terminal is
    /// activity for as long as it lasts, not only when it starts.
    open_sessions: AtomicUsize,
    /// The port proxy's connections open to the guest, bounded per sandbox.
    port_connections: Arc<AtomicUsize>,
    lifecycle: Mutex<Lifecycle>,
    /// Set once, when the sandbox has left the host (and the registry).
    gone: watch::Sender<Option<TeardownOutcome>>,
    guest_addr: Mutex<Option<String>>,
    metadata: Mutex<BTreeMap<String, String>>,
    /// The token envd in the guest expects. It lives in the guest's memory, so it survives a
    /// pause; a resume replaces it.
    access_token: Mutex<SecretText>,
    /// Its copy in the template store, while paused (`relocation`).
    store_copy: relocation::StoreCopy,
    /// The egress policy now in force: the request's until it is changed.
    egress: Mutex<EgressPolicy>,
    /// Held by a change of the egress policy, so changes apply one at a time and in order.
    egress_change: tokio::sync::Mutex<()>,
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

/// Where the port proxy dials a sandbox: its guest's address (for services listening on all
/// interfaces) and its envd (for those on the guest's loopback). Keeps the sandbox active and
/// counts as one of its proxied connections while it lives.
pub struct PortRoute {
    pub guest: Ipv4Addr,
    pub envd: EnvdClient,
    _lease: ActivityLease,
    _slot: PortConnection,
}

struct PortConnection(Arc<AtomicUsize>);

impl Drop for PortConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ActivityLease {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Sandbox {
    fn new(request: CreateSandbox) -> Self {
        Self::in_phase(request, Utc::now(), SandboxPhase::Starting)
    }

    fn in_phase(request: CreateSandbox, created_at: DateTime<Utc>, phase: SandboxPhase) -> Self {
        Self {
            egress: Mutex::new(request.egress.clone()),
            egress_change: tokio::sync::Mutex::new(()),
            request,
            created_at,
            last_active_ms: AtomicI64::new(Utc::now().timestamp_millis()),
            open_sessions: AtomicUsize::new(0),
            port_connections: Arc::default(),
            lifecycle: Mutex::new(Lifecycle {
                phase,
                runtime: None,
                changed: watch::Sender::new(phase),
            }),
            gone: watch::Sender::new(None),
            guest_addr: Mutex::new(None),
            metadata: Mutex::new(BTreeMap::new()),
            access_token: Mutex::new(SecretText::default()),
            store_copy: relocation::StoreCopy::default(),
        }
    }

    /// A sandbox an earlier agent process recorded, taken over in `phase`.
    fn recovered(record: record::SandboxRecord, phase: SandboxPhase) -> Self {
        let sandbox = Self::in_phase(record.request, record.created_at, phase);
        *sandbox.metadata.lock().expect("metadata lock") = record.metadata;
        *sandbox.access_token.lock().expect("token lock") = record.access_token;
        sandbox
    }

    /// Waits until the sandbox leaves `phase` (an operation in progress finished), up to
    /// [`SETTLE_WAIT`].
    async fn settled_from(&self, phase: SandboxPhase) -> Result<(), SandboxError> {
        let mut changed = self.lifecycle().changed.subscribe();
        let settled = tokio::time::timeout(SETTLE_WAIT, changed.wait_for(|now| *now != phase))
            .await
            .is_ok();
        if settled {
            Ok(())
        } else {
            Err(SandboxError::Unsettled {
                id: self.id(),
                phase,
                waited: SETTLE_WAIT,
            })
        }
    }

    fn access_token(&self) -> SecretText {
        self.access_token.lock().expect("token lock").clone()
    }

    /// The record a restarted agent reads to take this sandbox over.
    fn record(&self, state: record::RecordedState) -> record::SandboxRecord {
        record::SandboxRecord {
            format: record::RECORD_FORMAT,
            request: self.current_request(),
            created_at: self.created_at,
            access_token: self.access_token(),
            state,
            metadata: self.metadata.lock().expect("metadata lock").clone(),
        }
    }

    fn id(&self) -> String {
        self.request.sandbox_id.to_string()
    }

    fn egress(&self) -> EgressPolicy {
        self.egress.lock().expect("egress lock").clone()
    }

    /// The request as it would be made now: with the egress policy in force.
    fn current_request(&self) -> CreateSandbox {
        CreateSandbox {
            egress: self.egress(),
            ..self.request.clone()
        }
    }

    fn lifecycle(&self) -> MutexGuard<'_, Lifecycle> {
        self.lifecycle.lock().expect("lifecycle lock")
    }

    fn phase(&self) -> SandboxPhase {
        self.lifecycle().phase
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
            status: self.phase(),
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

/// Which uses of snapshots beyond pause and resume this host makes.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotUse {
    /// Creates restore their template's boot snapshot.
    pub boot_snapshots: bool,
    /// Paused sandboxes are copied to the (shared) template store, resumable on any host.
    pub store_paused: bool,
}

/// Owns every sandbox on this host.
pub struct SandboxManager {
    layout: Layout,
    vmm: Arc<dyn Vmm>,
    network: NetworkManager,
    uppers: disk::UpperDisks,
    limits: Limits,
    confinement: ConfinementPolicy,
    templates: Arc<TemplateImages>,
    boot_snapshots: boot_snapshot::BootSnapshots,
    /// Paused sandboxes are copied to the (shared) template store.
    store_paused: bool,
    kernel_checksums: relocation::KernelChecksums,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    /// Each sandbox's sampled use of the host (`metrics`), kept a while after it has gone.
    metric_rings: Mutex<HashMap<String, metrics::MetricRings>>,
    /// The most recent sandboxes lost, for the control plane's reconciler.
    lost: Mutex<VecDeque<LostSandbox>>,
    /// Creates, pauses and resumes in progress, which neither a caller hanging up nor a
    /// graceful stop interrupts.
    operations: tokio_util::task::TaskTracker,
}

/// How many lost sandboxes the agent remembers; the reconciler reads them every few seconds.
const LOST_KEPT: usize = 1024;

impl std::fmt::Debug for SandboxManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxManager")
            .field("vmm", &self.vmm.kind())
            .finish_non_exhaustive()
    }
}

impl SandboxManager {
    pub fn new(
        layout: Layout,
        vmm: Arc<dyn Vmm>,
        network: NetworkManager,
        limits: Limits,
        confinement: ConfinementPolicy,
        templates: Arc<TemplateImages>,
        snapshots: SnapshotUse,
    ) -> Self {
        let uppers = disk::UpperDisks::open(layout.clone());
        Self {
            layout,
            vmm,
            network,
            uppers,
            limits,
            confinement,
            templates,
            boot_snapshots: boot_snapshot::BootSnapshots::new(snapshots.boot_snapshots),
            store_paused: snapshots.store_paused,
            kernel_checksums: relocation::KernelChecksums::default(),
            sandboxes: Mutex::new(HashMap::new()),
            metric_rings: Mutex::new(HashMap::new()),
            lost: Mutex::new(VecDeque::new()),
            operations: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Waits for the creates, pauses and resumes in progress (each runs in its own task) and
    /// refuses new ones; at agent shutdown, so that no VM is left half created or frozen half
    /// way through a pause.
    pub async fn finish_operations(&self) {
        self.operations.close();
        self.operations.wait().await;
    }

    /// Starts an operation in its own task, unless the agent is shutting down; see
    /// [`in_own_task`](Self::in_own_task).
    async fn run_to_end<T: Send + 'static>(
        &self,
        operation: impl std::future::Future<Output = Result<T, SandboxError>> + Send + 'static,
    ) -> Result<T, SandboxError> {
        if self.operations.is_closed() {
            return Err(SandboxError::Interrupted(
                "the agent is shutting down".into(),
            ));
        }
        self.in_own_task(operation).await
    }

    /// Runs an operation in its own task, tracked so that neither its caller hanging up nor a
    /// graceful stop cuts it short between two steps.
    async fn in_own_task<T: Send + 'static>(
        &self,
        operation: impl std::future::Future<Output = Result<T, SandboxError>> + Send + 'static,
    ) -> Result<T, SandboxError> {
        // The task carries the caller's span, so its log lines keep the request's ID.
        match self
            .operations
            .spawn(tracing::Instrument::in_current_span(operation))
            .await
        {
            Ok(outcome) => outcome,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => Err(SandboxError::Interrupted(error.to_string())),
        }
    }

    fn registry(&self) -> MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.lock().expect("sandboxes lock")
    }

    fn get(&self, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        self.registry()
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_owned()))
    }

    pub fn list(&self) -> Vec<SandboxInfo> {
        let sandboxes: Vec<Arc<Sandbox>> = self.registry().values().cloned().collect();
        let mut list: Vec<SandboxInfo> = sandboxes.iter().map(|s| s.info()).collect();
        list.sort_by_key(|s| s.created_at);
        list
    }

    /// The sandboxes lost since this agent started, oldest first.
    pub fn lost(&self) -> Vec<LostSandbox> {
        self.lost
            .lock()
            .expect("lost lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Remembers that sandbox `id` was lost, and why, for the control plane.
    fn remember(&self, sandbox_id: SandboxId, reason: &str) {
        let mut lost = self.lost.lock().expect("lost lock");
        if lost.len() == LOST_KEPT {
            lost.pop_front();
        }
        lost.push_back(LostSandbox {
            sandbox_id,
            reason: reason.to_owned(),
            lost_at: Utc::now(),
        });
    }

    /// The image a sandbox boots and resumes from: its own link to the template image it was
    /// created from, so that a template updated since cannot change a paused sandbox's disk
    /// under it. Sandboxes created before these links existed use the template's image.
    fn base_image(&self, request: &CreateSandbox) -> PathBuf {
        let own = self
            .layout
            .sandbox_base_image(&request.sandbox_id.to_string());
        if own.is_file() {
            own
        } else {
            self.layout.image_rootfs(request.template.as_str())
        }
    }

    /// Imports a container image archive as the image of `template` (see
    /// [`TemplateImages::import`]).
    pub async fn import_template(
        &self,
        template: &crate::template::TemplateName,
        source: crate::agent::templates::ImportSource,
        start_entrypoint: bool,
    ) -> Result<crate::agent::wire::ImportedTemplate, SandboxError> {
        // To its end whatever the caller does: an import dropped half way would still install
        // its image (the blocking work goes on) without publishing it.
        let (templates, template) = (self.templates.clone(), template.clone());
        self.run_to_end(async move {
            Ok(templates
                .import(&template, source, start_entrypoint)
                .await?)
        })
        .await
    }

    /// Removes this host's image of `template`; its sandboxes keep their own links to it.
    pub async fn remove_template(
        &self,
        template: &crate::template::TemplateName,
    ) -> Result<(), SandboxError> {
        self.templates.remove(template).await?;
        self.remove_boot_snapshots_of(template);
        Ok(())
    }

    /// Puts this host's image of `template` into the template store.
    pub async fn publish_template(
        self: &Arc<Self>,
        template: &crate::template::TemplateName,
    ) -> Result<crate::store::BlobRef, SandboxError> {
        // An upload dropped half way would leave its multipart parts in the store.
        let (this, template) = (self.clone(), template.clone());
        self.run_to_end(async move {
            if this
                .layout
                .image_snapshot_dir(template.as_str())
                .join("snapshot.json")
                .is_file()
            {
                this.publish_snapshot_template(&template).await
            } else {
                Ok(this.templates.publish(&template).await?)
            }
        })
        .await
    }

    /// The template images on this host.
    pub fn held_templates(&self) -> Vec<crate::agent::wire::HeldTemplate> {
        self.templates.held()
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
    /// sandbox active until the proxied exchange ends and is dropped. A paused sandbox is
    /// resumed first, and a pause or resume in progress is waited for: a caller never needs to
    /// know that the sandbox was idle.
    pub async fn envd(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<(EnvdClient, ActivityLease), SandboxError> {
        let (_, envd, _, lease) = self.running(id).await?;
        Ok((envd, lease))
    }

    /// Where the port proxy reaches a running sandbox's ports (resumed first, as for
    /// [`Self::envd`]), holding one of the `limit` connections it may have open.
    pub async fn port_route(
        self: &Arc<Self>,
        id: &str,
        limit: usize,
    ) -> Result<PortRoute, SandboxError> {
        let (sandbox, envd, guest, lease) = self.running(id).await?;
        let open = sandbox.port_connections.fetch_add(1, Ordering::AcqRel);
        let slot = PortConnection(sandbox.port_connections.clone());
        if open >= limit {
            return Err(SandboxError::TooManyConnections {
                id: id.to_owned(),
                limit,
            });
        }
        Ok(PortRoute {
            guest,
            envd,
            _lease: lease,
            _slot: slot,
        })
    }

    async fn running(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<(Arc<Sandbox>, EnvdClient, Ipv4Addr, ActivityLease), SandboxError> {
        let sandbox = self.get(id)?;
        loop {
            let phase = {
                let lifecycle = sandbox.lifecycle();
                if let (SandboxPhase::Running, Some(runtime)) =
                    (lifecycle.phase, lifecycle.runtime.as_ref())
                {
                    // The lease is taken under the lock, so the idle reaper, which decides
                    // under it too, never pauses a sandbox a call has just reached.
                    let envd = runtime.envd.clone();
                    let guest = runtime.network.host_addr;
                    let lease = ActivityLease::open(sandbox.clone());
                    drop(lifecycle);
                    return Ok((sandbox, envd, guest, lease));
                }
                lifecycle.phase
            };
            match phase {
                SandboxPhase::Paused => {
                    tracing::info!(sandbox = id, "a call for a paused sandbox resumes it");
                    self.resume(id).await?;
                }
                SandboxPhase::Pausing | SandboxPhase::Resuming | SandboxPhase::Snapshotting => {
                    sandbox.settled_from(phase).await?
                }
                SandboxPhase::Running => {
                    unreachable!("a running sandbox holds its runtime (checked under the lock)")
                }
                SandboxPhase::Starting | SandboxPhase::Stopping => {
                    return Err(SandboxError::NotRunning {
                        id: id.to_owned(),
                        state: phase,
                    })
                }
            }
        }
    }

    /// At a graceful stop that leaves no sandbox on the host: puts the host's sysctls back.
    pub fn leave_host(&self) {
        if self.registry().is_empty() {
            self.network.restore_host_sysctls();
        }
    }

    pub fn vmm_kind(&self) -> String {
        self.vmm.kind().to_string()
    }
}
