//! The agent API's contract: the request and response bodies of every route the host agent
//! serves. The agent's server (`agent::api`) and the control plane's client
//! (`cp::agent_client`) both use these types, so the hop is defined once.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::egress::EgressPolicy;
use crate::id::SandboxId;
use crate::secret::EnvNames;
use crate::store::{BlobRef, StoreError, TemplateStore};
use crate::template::TemplateName;

/// `POST /v1/sandboxes/{id}/resume` body, which may be left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeSandbox {
    /// Replaces the egress policy the sandbox was paused with (the control plane's may have
    /// changed since, or the paused copy came from another host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressPolicy>,
}

/// The default writable disk of a sandbox when a request names none.
pub const DEFAULT_DISK_MB: u32 = 5120;

/// `POST /v1/sandboxes`: boot a sandbox; answered once envd in the guest answers.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    pub sandbox_id: SandboxId,
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mb: u32,
    #[serde(default = "default_disk_mb")]
    pub disk_mb: u32,
    /// Idle seconds before the agent's reaper acts on the sandbox; 0 means never.
    #[serde(default)]
    pub timeout_sec: u32,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    /// Default user for commands inside the guest; envd's default when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// The template image's version in the template store: an agent that holds another
    /// version, or none, pulls this one first. Absent means the image the host holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<BlobRef>,
    /// For a snapshot template: its [`StoredSnapshotTemplate`] document in the template store,
    /// which an agent that lacks this version of the template fetches first. Absent means the
    /// snapshot template this host holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<BlobRef>,
    /// Where the guest may connect out to; absent admits what the host admits.
    #[serde(default, skip_serializing_if = "EgressPolicy::is_open")]
    pub egress: EgressPolicy,
}

impl std::fmt::Debug for CreateSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateSandbox")
            .field("sandbox_id", &self.sandbox_id)
            .field("template", &self.template)
            .field("vcpus", &self.vcpus)
            .field("memory_mb", &self.memory_mb)
            .field("disk_mb", &self.disk_mb)
            .field("timeout_sec", &self.timeout_sec)
            .field("envs", &EnvNames(&self.envs))
            .field("user", &self.user)
            .field("image", &self.image)
            .field("egress", &self.egress)
            .finish()
    }
}

fn default_disk_mb() -> u32 {
    DEFAULT_DISK_MB
}

/// Where a sandbox is in its life on the agent. The agent's transition table lives with its
/// lifecycle (`agent::sandbox`); this is only the name on the wire.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, strum::Display, strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum SandboxPhase {
    Starting,
    Running,
    Pausing,
    Paused,
    Resuming,
    Snapshotting,
    Stopping,
}

/// `GET /v1/sandboxes/{id}`, and the answer to a create (`POST /v1/sandboxes`), a pause
/// (`POST /v1/sandboxes/{id}/pause`) and a resume (`POST /v1/sandboxes/{id}/resume`). Pause and
/// resume are idempotent on the agent and wait for one in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub sandbox_id: SandboxId,
    pub status: SandboxPhase,
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
    pub timeout_sec: u32,
    pub created_at: DateTime<Utc>,
    pub last_active_at: DateTime<Utc>,
    /// Where this host reaches the guest (the per-sandbox host-routable address).
    pub guest_addr: Option<String>,
    /// Operator facts: VMM and envd versions, per-phase create timings (`create_ms.*`).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// `GET /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxInfo>,
    /// Sandboxes this agent process removed because their VM was gone, most recent last; kept
    /// in memory (a bounded number) so the control plane can record why.
    #[serde(default)]
    pub lost: Vec<LostSandbox>,
    /// The template images this host holds, for the control plane's registry and scheduler.
    #[serde(default)]
    pub templates: Vec<HeldTemplate>,
}

/// A template image in the host's files root (`images/<name>/rootfs.ext4`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldTemplate {
    pub name: TemplateName,
    pub size_bytes: u64,
    /// From the image's `meta.json`, when it has one.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// A sandbox whose VM is gone: it died during a pause, its snapshot could not be restored, or
/// it did not survive a restart of its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostSandbox {
    pub sandbox_id: SandboxId,
    pub reason: String,
    pub lost_at: DateTime<Utc>,
}

/// `GET /v1/ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPing {
    pub status: String,
    pub host_id: String,
    pub version: String,
    pub vmm: String,
    pub sandboxes: u64,
}

/// The agent's path for `path_and_query` on TCP port `port` in a sandbox (the port proxy).
pub fn port_proxy_path(id: SandboxId, port: u16, path_and_query: &str) -> String {
    format!("/v1/sandboxes/{id}/ports/{port}{path_and_query}")
}

/// The client's own `Authorization` on a port-proxy request, moved aside by the control plane
/// (whose agent secret travels in `Authorization`) and put back by the agent for the guest.
pub const FORWARDED_AUTHORIZATION: &str = "x-wrenn-authorization";
/// Marks a port-proxy answer as the guest service's, so the control plane tells it from the
/// agent's own refusals.
pub const UPSTREAM_HEADER: &str = "x-wrenn-upstream";

/// The agent's path for a sandbox's envd API: `envd_path` is envd's own path, e.g.
/// `/processes/run`.
pub fn envd_proxy_path(id: SandboxId, envd_path: &str) -> String {
    format!(
        "/v1/sandboxes/{id}/envd/{}",
        envd_path.trim_start_matches('/')
    )
}

/// `POST /v1/sandboxes/{id}/template`: turn the sandbox's disk as it is now into the base image
/// of `template` (with `config` as its `/etc/wrenn/template.json`), install it on this host and
/// publish it to the template store; answered with its blob. The sandbox keeps running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureTemplate {
    pub template: TemplateName,
    pub config: crate::envd::template::TemplateConfig,
}

/// `POST /v1/sandboxes/{id}/snapshot`: make the sandbox's memory and disk, as they are now, the
/// snapshot template `template` on this host (`images/<template>/`). A running sandbox is
/// paused for the moment it takes and runs on; a paused one stays paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotTemplate {
    pub template: TemplateName,
    /// Replace a template of that name on this host; without it one is a conflict.
    #[serde(default)]
    pub overwrite: bool,
}

/// A snapshot template made on this host: creates of it restore with exactly this shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotTemplateInfo {
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
    /// What it occupies on the host's disk (memory, device state, disk copy).
    pub size_bytes: u64,
}

/// `POST /v1/sandboxes/{id}/fork`: start `children` (new sandbox IDs), each continuing the
/// sandbox's memory and disk of one instant. The sandbox runs on (or stays paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkSandbox {
    pub children: Vec<SandboxId>,
}

/// The children a fork started, in the order asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForkedSandboxes {
    pub children: Vec<SandboxInfo>,
}

/// A paused sandbox's copy in the template store, the document [`stored_pause_key`]: all
/// another host needs to resume it when its own host is gone or full
/// (`agent::sandbox::relocation`). Its presence means the guest has not run since the pause
/// it holds: every resume removes it before the guest runs again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredPause {
    pub format: u32,
    pub sandbox_id: SandboxId,
    /// When its snapshot was taken (the snapshot's own `created_unix_ms`): which pause this is
    /// the copy of.
    pub paused_at_unix_ms: u64,
    /// The VMM that paused it (`qemu`, `firecracker`) and its version; a snapshot loads only
    /// into the same.
    pub vmm: String,
    pub vmm_version: String,
    /// The guest kernel and initramfs it runs: a host with other ones cannot resume it.
    pub kernel_sha256: String,
    pub initrd_sha256: Option<String>,
    /// The read-only template image under its disk, byte for byte (shared with the template
    /// and other sandboxes: content-addressed, and never removed with the copy).
    pub base_image: BlobRef,
    /// Its record, snapshot and writable disk, each a pack of its own (`sparse::pack`) whose
    /// label names this sandbox and pause, so these blobs belong to this copy alone.
    pub parts: Vec<StoredPart>,
    pub stored_at: DateTime<Utc>,
}

/// The version of [`StoredPause`] this build writes and reads.
pub const STORED_PAUSE_FORMAT: u32 = 1;

/// Where a paused sandbox's copy is in the template store.
pub fn stored_pause_key(id: SandboxId) -> String {
    format!("paused/{id}.json")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredPart {
    pub part: PausedPart,
    pub blob: BlobRef,
}

/// The files a paused sandbox is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, strum::EnumIter)]
#[serde(rename_all = "snake_case")]
pub enum PausedPart {
    /// `sandboxes/<id>/sandbox.json`: the create request, envd's token, the metadata.
    Record,
    SnapshotMeta,
    SnapshotState,
    SnapshotMemory,
    /// `sandboxes/<id>/upper.ext4`, the writable disk.
    Disk,
}

/// A snapshot template's copy in the template store (`agent::sandbox::snapshot_store`): one
/// blob, content-addressed like an image, that the registry names as the template's version.
/// Every host with the same VMM and guest kernel can restore it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSnapshotTemplate {
    pub format: u32,
    /// The template's image name on hosts (`<name>.t<team>`).
    pub template: TemplateName,
    /// The VMM that made the shared snapshot and its version; it loads only into the same.
    pub vmm: String,
    pub vmm_version: String,
    pub kernel_sha256: String,
    pub initrd_sha256: Option<String>,
    /// The template the snapshotted sandbox was created from, and its image, byte for byte
    /// (content-addressed: shared with that template, never removed with this copy).
    pub from_template: TemplateName,
    pub base_image: BlobRef,
    /// Each file of the template's `snapshot/`, a pack of its own (`sparse::pack`) whose label
    /// names the template and this copy, so these blobs belong to this copy alone.
    pub files: Vec<StoredSnapshotFile>,
    pub stored_at: DateTime<Utc>,
}

impl StoredSnapshotTemplate {
    /// Removes the blobs this copy is made of (not its base image, content shared with its
    /// template).
    pub async fn remove_files(&self, store: &TemplateStore) -> Result<(), StoreError> {
        for stored in &self.files {
            store.delete(&stored.blob.sha256).await?;
        }
        Ok(())
    }

    /// Removes the copy whose document is `document` from the store: its files, then the
    /// document. A document already gone is not an error.
    pub async fn remove(store: &TemplateStore, document: &BlobRef) -> Result<(), StoreError> {
        let bytes = match store.read_bytes(document).await {
            Ok(bytes) => bytes,
            Err(StoreError::Missing(_)) => return Ok(()),
            Err(error) => return Err(error),
        };
        if let Ok(copy) = serde_json::from_slice::<Self>(&bytes) {
            copy.remove_files(store).await?;
        }
        store.delete(&document.sha256).await
    }
}

/// The version of [`StoredSnapshotTemplate`] this build writes and reads.
pub const STORED_SNAPSHOT_TEMPLATE_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSnapshotFile {
    pub file: SnapshotTemplateFile,
    pub blob: BlobRef,
}

/// The files of a snapshot template's `snapshot/` directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, strum::EnumIter)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotTemplateFile {
    /// `snapshot.json`: the sandboxes' size and the envd token the guest was saved with.
    Record,
    SnapshotMeta,
    SnapshotState,
    SnapshotMemory,
    /// `upper.ext4`, the writable disk of that instant.
    Disk,
}

/// `POST /v1/templates/{name}/import`, as JSON: import the container image archive already at
/// `path` on the host. (The archive may also be the request's body itself.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportFromPath {
    pub path: std::path::PathBuf,
}

/// The answer to an import: the template image as installed and published, and what the image's
/// config said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedTemplate {
    pub image: BlobRef,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    /// The names of the variables the image's config sets (their values may be secrets).
    pub env: Vec<String>,
}

/// The windows `GET /v1/sandboxes/{id}/metrics?range=` (and the capsule API's `metrics`)
/// answers over: the 0.3.0 API's `Range1`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumIter,
    strum::EnumString,
    strum::IntoStaticStr,
)]
pub enum MetricsRange {
    #[serde(rename = "5m")]
    #[strum(serialize = "5m")]
    FiveMinutes,
    #[serde(rename = "10m")]
    #[strum(serialize = "10m")]
    TenMinutes,
    #[serde(rename = "1h")]
    #[strum(serialize = "1h")]
    OneHour,
    #[serde(rename = "2h")]
    #[strum(serialize = "2h")]
    TwoHours,
    #[serde(rename = "6h")]
    #[strum(serialize = "6h")]
    SixHours,
    #[serde(rename = "12h")]
    #[strum(serialize = "12h")]
    TwelveHours,
    #[serde(rename = "24h")]
    #[strum(serialize = "24h")]
    OneDay,
}

impl MetricsRange {
    /// How far back the range reaches.
    pub fn span_secs(self) -> i64 {
        match self {
            MetricsRange::FiveMinutes => 300,
            MetricsRange::TenMinutes => 600,
            MetricsRange::OneHour => 3600,
            MetricsRange::TwoHours => 7200,
            MetricsRange::SixHours => 6 * 3600,
            MetricsRange::TwelveHours => 12 * 3600,
            MetricsRange::OneDay => 24 * 3600,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// One sample of a sandbox's use of its host (or an average of samples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub timestamp_unix: i64,
    /// The VMM process's CPU time as a share of the sandbox's vCPUs, 0-100.
    pub cpu_pct: f64,
    /// Memory the guest uses (`MemTotal - MemAvailable`, from envd).
    pub mem_bytes: u64,
    /// Bytes allocated to the sandbox's copy-on-write disk on the host.
    pub disk_bytes: u64,
}

/// `GET /v1/sandboxes/{id}/metrics`: the 0.3.0 API's `CapsuleMetrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxMetrics {
    pub sandbox_id: SandboxId,
    pub range: MetricsRange,
    pub points: Vec<MetricPoint>,
}
