//! The envd wire types: every request and response body, shared by the server and the client so
//! the two cannot drift apart. The HTTP surface is described in docs/envd-api.md.

use std::collections::BTreeMap;

use crate::secret::{EnvNames, SecretText};
use serde::{Deserialize, Serialize};

/// The TCP (and vsock) port envd listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 49983;
/// The header that carries the access token once `/init` has set one.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// The `Upgrade` protocol of `GET /ports/{port}/connect`: after `101`, the connection carries
/// the bytes of a TCP connection to that port on the guest's loopback.
pub const PORT_TUNNEL_PROTOCOL: &str = "wrenn-tcp";

/// envd's path for a tunnel to `port` on the guest's loopback.
pub fn port_tunnel_path(port: u16) -> String {
    format!("/ports/{port}/connect")
}

/// Bytes of recent output kept per process for clients that attach late.
pub const REPLAY_BYTES: usize = 1 << 20;
/// Bytes of each of stdout and stderr a foreground run returns; the rest is counted and dropped.
pub const RUN_OUTPUT_LIMIT: usize = 16 << 20;
/// Largest single data chunk a stream carries.
pub const CHUNK_BYTES: usize = 64 << 10;

/// First byte of a binary WebSocket frame from the server: which stream the rest belongs to.
pub const FRAME_STDOUT: u8 = 1;
pub const FRAME_STDERR: u8 = 2;
pub const FRAME_PTY: u8 = 3;

pub use crate::error_code::{ErrorBody, ErrorCode, ErrorEnvelope};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub cpu_count: u32,
    /// Busy share of all CPUs since the previous `/metrics` call (or since envd started).
    pub cpu_used_pct: f64,
    /// `MemTotal - MemAvailable`, bytes.
    pub mem_used: u64,
    pub mem_total: u64,
    /// Of the filesystem holding `/`, bytes.
    pub disk_used: u64,
    pub disk_total: u64,
}

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitRequest {
    /// Merged into the environment of every process started afterwards.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    /// The user processes and file operations run as when a request names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    /// Working directory of processes when a request names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    /// From now on every request must carry this in `X-Access-Token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<SecretText>,
    /// The host's wall clock, in milliseconds since the Unix epoch, when it sent the request.
    /// envd sets the guest's clock to it; sent after a resume from a snapshot, when the guest's
    /// clock still shows the time of the pause. Absent, the clock is left alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_clock_unix_ms: Option<i64>,
    /// Fresh random bytes (hex, 32 to 512 bytes), mixed into the guest kernel's pool, which is
    /// then reseeded: guests restored from one snapshot diverge before any user code runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<SecretText>,
    /// The guest's host name (one DNS label), set and written to `/etc/hostname` and
    /// `/etc/hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Written to `/etc/machine-id` (32 lowercase hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
}

impl std::fmt::Debug for InitRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitRequest")
            .field("env_vars", &EnvNames(&self.env_vars))
            .field("default_user", &self.default_user)
            .field("default_workdir", &self.default_workdir)
            .field("access_token", &self.access_token)
            .field("wall_clock_unix_ms", &self.wall_clock_unix_ms)
            .field("entropy", &self.entropy.as_ref().map(|_| "<redacted>"))
            .field("hostname", &self.hostname)
            .field("machine_id", &self.machine_id)
            .finish()
    }
}

/// What to run and as whom.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub cmd: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    /// Absolute, `~`-prefixed or relative to the user's home.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl ProcessSpec {
    pub fn new(cmd: impl Into<String>, args: &[&str]) -> Self {
        Self {
            cmd: cmd.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub process: ProcessSpec,
    /// Default 30; the process group is killed when it runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_sec: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    #[serde(rename = "utf-8")]
    Utf8,
    #[serde(rename = "base64")]
    Base64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResponse {
    pub stdout: String,
    pub stderr: String,
    /// The exit status; `128 + signal` when a signal ended the process.
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    pub duration_ms: u64,
    /// How `stdout` and `stderr` are encoded: base64 for both when either is not valid UTF-8.
    pub encoding: Encoding,
    /// The timeout ran out and the process group was killed.
    #[serde(default)]
    pub timed_out: bool,
    /// Bytes beyond [`RUN_OUTPUT_LIMIT`] that were dropped, per stream.
    #[serde(default)]
    pub stdout_dropped: u64,
    #[serde(default)]
    pub stderr_dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub process: ProcessSpec,
    /// Defaults to `proc-` (or `pty-`) and 8 hex digits; unique among live processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Run on a pseudo-terminal of this size instead of pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartResponse {
    pub pid: u32,
    pub tag: String,
    pub cmd: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub tag: String,
    pub cmd: String,
    pub args: Vec<String>,
    pub pty: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessList {
    pub processes: Vec<ProcessInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// `SIGTERM`, `TERM` or a number.
    pub signal: String,
}

/// The first text message a client sends on `/processes/attach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AttachRequest {
    Start(StartRequest),
    /// Re-attach to a live (or recently exited) process by pid or tag.
    Connect {
        selector: String,
    },
}

/// Text messages a client sends after attaching; binary frames are stdin bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    CloseStdin,
    Signal { signal: String },
    Resize { cols: u16, rows: u16 },
    Kill,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The exit status; `128 + signal` when a signal ended the process.
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

/// Text messages the server sends on `/processes/attach`; output travels in binary frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Start {
        pid: u32,
        tag: String,
    },
    /// This many output bytes were dropped before this client could read them.
    Lost {
        bytes: u64,
    },
    Exit(ExitInfo),
    Error(ErrorBody),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    File,
    Directory,
    Symlink,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    pub size: u64,
    /// Permission and special bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    /// RFC 3339.
    pub modified_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRequest {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    pub path: String,
    /// 1 (the default) lists the directory's children, 2 their children too, and so on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    pub entries: Vec<EntryInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub from: String,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Query of `GET/PUT /files` and `GET /files/watch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Watch only: include subdirectories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recursive: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchEventKind {
    Create,
    Modify,
    Remove,
    Rename,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchMessage {
    Event {
        kind: WatchEventKind,
        path: String,
        /// Rename only: the new path when both ends are known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    /// This many events were dropped because the client read too slowly.
    Lost {
        events: u64,
    },
    Error(ErrorBody),
}
