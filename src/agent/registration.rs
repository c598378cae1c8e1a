//! The agent's side of the deployment guide: first-start registration with a one-time token,
//! saved host credentials, the 30-second heartbeat and credential refresh.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::HttpUrl;
use crate::error_code::ErrorEnvelope;

const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest wait before retrying a refresh that failed in transit. Short, because the
/// control plane accepts the same refresh token again only for its grace window (60 s by
/// default) after it rotated it, and the lost answer may have carried that rotation.
const MAX_REFRESH_RETRY_DELAY: Duration = Duration::from_secs(8);

/// What `host-token` holds: everything the agent needs to talk to the control plane again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCredentials {
    pub host_id: String,
    /// Host JWT, sent as `X-Host-Token`.
    pub token: String,
    pub refresh_token: String,
    /// Shared secret the control plane presents on every call to this agent.
    pub agent_secret: String,
    /// Why the control plane no longer accepts these credentials, once it refused them: a
    /// restart then stops at once with the reason instead of asking the control plane again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("AGENT_CP_URL (agent.cp_url) is not set; the agent needs the control plane's URL")]
    NoControlPlaneUrl,
    #[error(
        "no saved host credentials at {path}; start the agent once with --register <token> \
         (an admin creates one with POST /v1/hosts)"
    )]
    NotRegistered { path: PathBuf },
    #[error("host credentials at {path} are unreadable: {reason}")]
    CredentialsUnreadable { path: PathBuf, reason: String },
    #[error("host credentials could not be saved to {path}: {source}")]
    CredentialsUnwritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the control plane rejected the registration token ({message}): it is invalid, expired \
         (tokens last 1 hour) or already used; regenerate one with POST /v1/hosts/{{id}}/token \
         and start the agent again with --register <new token>"
    )]
    TokenRejected { message: String },
    #[error("the control plane deleted this host ({message}); the agent stops. Create a new host with POST /v1/hosts and register again")]
    HostDeleted { message: String },
    #[error(
        "the control plane refused the refresh token of host {host_id} ({message}); this host \
         must be registered again: issue a new registration token with \
         POST /v1/hosts/{host_id}/token and start the agent with --register <token> \
         --address <ip:port>"
    )]
    RefreshRejected { host_id: String, message: String },
    #[error("the host credentials at {path} no longer work and the agent will not start with them: {reason}")]
    CredentialsRevoked { path: PathBuf, reason: String },
    #[error("control plane at {url} answered {status}: {message}")]
    Unexpected {
        url: String,
        status: u16,
        message: String,
    },
    #[error("control plane at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
}

/// The machine facts sent at registration.
#[derive(Debug, Clone, Serialize)]
pub struct HostSpecs {
    pub arch: String,
    pub cpu_cores: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
}

impl HostSpecs {
    /// Reads this machine's specs; disk is the filesystem holding the files root.
    pub fn detect(files_root: &Path) -> Self {
        let mut system = sysinfo::System::new();
        system.refresh_memory();
        let cpu_cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let disk_gb = nix::sys::statvfs::statvfs(files_root)
            .map(|s| s.blocks() * s.fragment_size() / (1 << 30))
            .unwrap_or(0);
        Self {
            arch: std::env::consts::ARCH.to_owned(),
            cpu_cores,
            memory_mb: system.total_memory() / (1 << 20),
            disk_gb,
        }
    }
}

impl RegistrationError {
    /// Whether only an operator can fix this (a new host or registration token): restarting the
    /// agent would fail the same way.
    pub fn needs_registration(&self) -> bool {
        match self {
            RegistrationError::NotRegistered { .. }
            | RegistrationError::TokenRejected { .. }
            | RegistrationError::HostDeleted { .. }
            | RegistrationError::RefreshRejected { .. }
            | RegistrationError::CredentialsRevoked { .. } => true,
            RegistrationError::NoControlPlaneUrl
            | RegistrationError::CredentialsUnreadable { .. }
            | RegistrationError::CredentialsUnwritable { .. }
            | RegistrationError::Unexpected { .. }
            | RegistrationError::Unreachable { .. } => false,
        }
    }
}

/// Reads the saved credentials; credentials the control plane refused earlier are an error
/// carrying the reason it gave.
pub fn load_credentials(path: &Path) -> Result<HostCredentials, RegistrationError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RegistrationError::NotRegistered {
                path: path.to_owned(),
            })
        }
        Err(e) => {
            return Err(RegistrationError::CredentialsUnreadable {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        }
    };
    let creds: HostCredentials =
        serde_json::from_str(&text).map_err(|e| RegistrationError::CredentialsUnreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    match creds.revoked {
        Some(reason) => Err(RegistrationError::CredentialsRevoked {
            path: path.to_owned(),
            reason,
        }),
        None => Ok(creds),
    }
}

/// Writes the credentials atomically with mode 0600, so a crash never leaves half a file.
pub fn save_credentials(path: &Path, creds: &HostCredentials) -> Result<(), RegistrationError> {
    let unwritable = |source| RegistrationError::CredentialsUnwritable {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(unwritable)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(unwritable)?;
    let json = serde_json::to_vec_pretty(creds).expect("credentials serialize");
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(unwritable)?;
    fs::rename(&tmp, path).map_err(unwritable)
}

#[derive(Debug, Deserialize)]
struct HostRef {
    id: String,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    host: HostRef,
    token: String,
    refresh_token: String,
    #[serde(default)]
    agent_secret: Option<String>,
}

/// Talks to the control plane's host endpoints. Blocking (ureq): call from `spawn_blocking`.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    base: HttpUrl,
    http: ureq::Agent,
}

enum Reply {
    Ok(ureq::http::Response<ureq::Body>),
    Status(u16, String),
}

impl ControlPlane {
    pub fn new(base: HttpUrl) -> Self {
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(HTTP_TIMEOUT))
            .build()
            .into();
        Self { base, http }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn post(
        &self,
        path: &str,
        host_token: Option<&str>,
        body: serde_json::Value,
    ) -> Result<Reply, RegistrationError> {
        let url = self.url(path);
        let mut request = self.http.post(&url);
        if let Some(token) = host_token {
            request = request.header("X-Host-Token", token);
        }
        let mut response =
            request
                .send_json(&body)
                .map_err(|e| RegistrationError::Unreachable {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(Reply::Ok(response));
        }
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let message = serde_json::from_str::<ErrorEnvelope>(&text)
            .map(|e| e.error.message)
            .unwrap_or(text);
        Ok(Reply::Status(status, message))
    }

    fn credentials_from(
        &self,
        path: &str,
        mut response: ureq::http::Response<ureq::Body>,
        current_secret: Option<&str>,
    ) -> Result<HostCredentials, RegistrationError> {
        let malformed = |message: String| RegistrationError::Unexpected {
            url: self.url(path),
            status: 200,
            message,
        };
        let parsed: TokenResponse = response
            .body_mut()
            .read_json()
            .map_err(|e| malformed(format!("malformed response: {e}")))?;
        // Registration always issues the agent secret; a refresh may leave it unchanged.
        let agent_secret = parsed
            .agent_secret
            .or_else(|| current_secret.map(str::to_owned))
            .ok_or_else(|| malformed("response carries no agent_secret".into()))?;
        Ok(HostCredentials {
            host_id: parsed.host.id,
            token: parsed.token,
            refresh_token: parsed.refresh_token,
            agent_secret,
            revoked: None,
        })
    }

    /// Exchanges a one-time registration token for host credentials.
    pub fn register(
        &self,
        token: &str,
        address: &str,
        specs: &HostSpecs,
    ) -> Result<HostCredentials, RegistrationError> {
        let path = "/v1/hosts/register";
        let body = serde_json::json!({
            "token": token,
            "address": address,
            "arch": specs.arch,
            "cpu_cores": specs.cpu_cores,
            "memory_mb": specs.memory_mb,
            "disk_gb": specs.disk_gb,
        });
        match self.post(path, None, body)? {
            Reply::Ok(response) => self.credentials_from(path, response, None),
            Reply::Status(401, message) => Err(RegistrationError::TokenRejected { message }),
            Reply::Status(status, message) => Err(RegistrationError::Unexpected {
                url: self.url(path),
                status,
                message,
            }),
        }
    }

    /// Rotates the refresh token and obtains a new host JWT.
    pub fn refresh(&self, creds: &HostCredentials) -> Result<HostCredentials, RegistrationError> {
        let path = "/v1/hosts/auth/refresh";
        let body = serde_json::json!({ "refresh_token": creds.refresh_token });
        match self.post(path, None, body)? {
            Reply::Ok(response) => self.credentials_from(path, response, Some(&creds.agent_secret)),
            Reply::Status(401, message) => Err(RegistrationError::RefreshRejected {
                host_id: creds.host_id.clone(),
                message,
            }),
            Reply::Status(status, message) => Err(RegistrationError::Unexpected {
                url: self.url(path),
                status,
                message,
            }),
        }
    }

    /// One heartbeat. `Ok(false)` means the host token expired and a refresh is due.
    pub fn heartbeat(&self, creds: &HostCredentials) -> Result<bool, RegistrationError> {
        let path = format!("/v1/hosts/{}/heartbeat", creds.host_id);
        match self.post(&path, Some(&creds.token), serde_json::json!({}))? {
            Reply::Ok(_) => Ok(true),
            Reply::Status(401, _) => Ok(false),
            Reply::Status(404, message) => Err(RegistrationError::HostDeleted { message }),
            Reply::Status(status, message) => Err(RegistrationError::Unexpected {
                url: self.url(&path),
                status,
                message,
            }),
        }
    }
}

/// Marks the saved credentials refused, with the reason, so the next start stops at once.
fn retire_credentials(path: &Path, creds: &HostCredentials, error: &RegistrationError) {
    let retired = HostCredentials {
        revoked: Some(error.to_string()),
        ..creds.clone()
    };
    if let Err(save) = save_credentials(path, &retired) {
        tracing::warn!(error = %save, "could not mark the refused credentials in the credentials file");
    }
}

/// Doubling waits from one second up to a cap, for retrying a refresh lost in transit.
#[derive(Debug)]
struct RetryDelay {
    next: Duration,
    cap: Duration,
}

impl RetryDelay {
    fn new(cap: Duration) -> Self {
        Self {
            next: Duration::from_secs(1).min(cap),
            cap,
        }
    }

    fn take(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        delay
    }
}

/// Heartbeats every `interval` until `shutdown` fires. A refused host token triggers a refresh
/// (the new credentials are saved before they are used). A refresh lost in transit is retried
/// with the same token within seconds. A refused refresh token, or a deleted host, ends the
/// loop with an error that tells the operator what to do; the credentials file records it, so
/// a restart fails the same way without calling the control plane.
pub async fn heartbeat_loop(
    cp: ControlPlane,
    mut creds: HostCredentials,
    token_file: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) -> Result<(), RegistrationError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = RetryDelay::new(interval.min(MAX_REFRESH_RETRY_DELAY));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let (cp2, c2) = (cp.clone(), creds.clone());
        let beat = tokio::task::spawn_blocking(move || cp2.heartbeat(&c2))
            .await
            .expect("heartbeat task does not panic");
        let refused = match beat {
            Ok(true) => continue,
            Ok(false) => {
                tracing::info!("host token refused; refreshing credentials");
                let (cp2, c2) = (cp.clone(), creds.clone());
                match tokio::task::spawn_blocking(move || cp2.refresh(&c2))
                    .await
                    .expect("refresh task does not panic")
                {
                    Ok(fresh) => {
                        save_credentials(&token_file, &fresh)?;
                        creds = fresh;
                        retry = RetryDelay::new(interval.min(MAX_REFRESH_RETRY_DELAY));
                        ticker.reset_immediately();
                        continue;
                    }
                    Err(error) if error.needs_registration() => error,
                    Err(error) => {
                        let delay = retry.take();
                        tracing::warn!(%error, ?delay, "credential refresh failed; retrying with the same refresh token");
                        ticker.reset_after(delay);
                        continue;
                    }
                }
            }
            Err(error @ RegistrationError::HostDeleted { .. }) => error,
            Err(error) => {
                tracing::warn!(%error, "heartbeat failed; retrying next interval");
                continue;
            }
        };
        retire_credentials(&token_file, &creds, &refused);
        tracing::error!(error = %refused, "the control plane refused this host's credentials; the agent stops");
        return Err(refused);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_with_private_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("host-token");
        let creds = HostCredentials {
            host_id: "host-1".into(),
            token: "jwt".into(),
            refresh_token: "r".into(),
            agent_secret: "s".repeat(64),
            revoked: None,
        };
        save_credentials(&path, &creds).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_credentials(&path).unwrap(), creds);
    }

    #[test]
    fn missing_and_corrupt_credentials_are_explained() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("host-token");
        let err = load_credentials(&path).unwrap_err().to_string();
        assert!(err.contains("--register"), "{err}");
        fs::write(&path, "not json").unwrap();
        let err = load_credentials(&path).unwrap_err().to_string();
        assert!(err.contains("unreadable"), "{err}");
    }

    #[test]
    fn refresh_retries_double_up_to_the_cap() {
        let mut retry = RetryDelay::new(Duration::from_secs(8));
        let delays: Vec<u64> = (0..6).map(|_| retry.take().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
        let mut short = RetryDelay::new(Duration::from_millis(500));
        assert_eq!(short.take(), Duration::from_millis(500));
    }

    #[test]
    fn specs_are_plausible() {
        let specs = HostSpecs::detect(Path::new("/"));
        assert!(specs.cpu_cores >= 1);
        assert!(specs.memory_mb > 0);
        assert!(!specs.arch.is_empty());
    }
}
