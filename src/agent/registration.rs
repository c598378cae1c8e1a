//! The agent's side of the deployment guide: first-start registration with a one-time token,
//! saved host credentials, the 30-second heartbeat and credential refresh. The agent's TLS key
//! is generated here and never leaves the host: registration and every refresh send a CSR, and
//! the control plane answers with the certificate and its CA, which the agent pins.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::HttpUrl;
use crate::error_code::ErrorEnvelope;
use crate::secret::SecretText;

const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest wait before retrying a refresh that failed in transit. Short, because the
/// control plane accepts the same refresh token again only for its grace window (60 s by
/// default) after it rotated it, and the lost answer may have carried that rotation.
const MAX_REFRESH_RETRY_DELAY: Duration = Duration::from_secs(8);
/// A certificate this close to its end is renewed at the next heartbeat (the control plane
/// issues them for 7 days).
const CERT_RENEW_BEFORE: chrono::Duration = chrono::Duration::days(3);

/// What `host-token` holds: everything the agent needs to talk to the control plane again and
/// to serve it. `Debug` shows no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCredentials {
    pub host_id: String,
    /// Host JWT, sent as `X-Host-Token`.
    pub token: SecretText,
    pub refresh_token: SecretText,
    /// Shared secret the control plane presents on every call to this agent.
    pub agent_secret: SecretText,
    /// The agent API's TLS identity; missing in credentials saved before mTLS, which a refresh
    /// then supplies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsCredentials>,
    /// Why the control plane no longer accepts these credentials, once it refused them: a
    /// restart then stops at once with the reason instead of asking the control plane again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
}

/// The agent's certificate and key, and the control plane's CA pinned at registration: only
/// clients it certified may call this agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCredentials {
    pub key_pem: SecretText,
    pub cert_pem: String,
    pub cert_expires_at: DateTime<Utc>,
    pub ca_cert_pem: String,
}

impl HostCredentials {
    /// Whether the next heartbeat should refresh to get a certificate, or a newer one.
    pub fn certificate_due(&self, now: DateTime<Utc>) -> bool {
        match &self.tls {
            Some(tls) => tls.cert_expires_at - now < CERT_RENEW_BEFORE,
            None => true,
        }
    }
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
    #[error(
        "agent.cp_url {url} is plain http:// to a non-loopback address: the registration, host \
         and refresh tokens would cross the network unencrypted. Use https://, or set \
         agent.allow_plain_http (AGENT_ALLOW_PLAIN_HTTP=true) on a network you trust"
    )]
    PlainHttp { url: String },
    #[error("agent.cp_ca_file {path} is unreadable: {reason}")]
    CaFileUnreadable { path: PathBuf, reason: String },
    #[error("the host credentials carry no TLS certificate to serve the control plane with")]
    NoCertificate,
    #[error("cannot make a TLS key and certificate request: {0}")]
    KeyGeneration(String),
    #[error("the control plane's certificate for this agent is unusable: {0}")]
    Certificate(#[from] crate::tls::TlsError),
    #[error(
        "the control plane at {url} answered with a different CA than the one pinned at \
         registration; the agent keeps its credentials"
    )]
    CaChanged { url: String },
}

/// Refuses a control-plane URL that would send the agent's tokens in the clear over a network:
/// plain `http://` is fine to a loopback address, anywhere else only when `allow_plain_http`.
pub fn check_cp_url(url: &HttpUrl, allow_plain_http: bool) -> Result<(), RegistrationError> {
    let loopback = match url.0.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    if url.0.scheme() == "http" && !loopback && !allow_plain_http {
        return Err(RegistrationError::PlainHttp {
            url: url.to_string(),
        });
    }
    Ok(())
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
            | RegistrationError::Unreachable { .. }
            | RegistrationError::PlainHttp { .. }
            | RegistrationError::CaFileUnreadable { .. }
            | RegistrationError::NoCertificate
            | RegistrationError::KeyGeneration(_)
            | RegistrationError::Certificate(_)
            | RegistrationError::CaChanged { .. } => false,
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

/// Writes the credentials atomically with mode 0600: a temporary file, synced, renamed over the
/// old one and the directory synced, so a crash or a full disk leaves the old file or the new
/// one, never half of either. A failed attempt removes its temporary file.
pub fn save_credentials(path: &Path, creds: &HostCredentials) -> Result<(), RegistrationError> {
    let unwritable = |source| RegistrationError::CredentialsUnwritable {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        let json = serde_json::to_vec_pretty(creds).expect("credentials serialize");
        file.write_all(&json)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(unwritable)
}

/// A new TLS key and a CSR for it; the control plane decides the certificate's names.
fn new_key_and_csr() -> Result<(SecretText, String), RegistrationError> {
    let failed = |e: rcgen::Error| RegistrationError::KeyGeneration(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(failed)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(failed)?;
    Ok((SecretText::new(key.serialize_pem()), csr))
}

#[derive(Debug, Deserialize)]
struct HostRef {
    id: String,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    host: HostRef,
    token: SecretText,
    refresh_token: SecretText,
    #[serde(default)]
    agent_secret: Option<SecretText>,
    #[serde(default)]
    cert_pem: Option<String>,
    #[serde(default)]
    cert_expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    ca_cert_pem: Option<String>,
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
    /// A control plane whose `https://` certificate the web PKI vouches for.
    pub fn new(base: HttpUrl) -> Self {
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(HTTP_TIMEOUT))
            .build()
            .into();
        Self { base, http }
    }

    /// A control plane whose `https://` certificate must chain to one of the CAs in `ca_pem`
    /// (`agent.cp_ca_file`) and to nothing else: a private deployment's own CA, pinned.
    pub fn pinned(base: HttpUrl, ca_pem: &str) -> Result<Self, RegistrationError> {
        use ureq::tls::{Certificate, RootCerts, TlsConfig};
        let roots = crate::tls::certificates(ca_pem)?
            .into_iter()
            .map(|der| Certificate::from_der(der.as_ref()).to_owned())
            .collect();
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::Specific(std::sync::Arc::new(roots)))
            .build();
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(HTTP_TIMEOUT))
            .tls_config(tls)
            .build()
            .into();
        Ok(Self { base, http })
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
        current: Option<&HostCredentials>,
        key_pem: SecretText,
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
            .or_else(|| current.map(|c| c.agent_secret.clone()))
            .ok_or_else(|| malformed("response carries no agent_secret".into()))?;
        let (Some(cert_pem), Some(cert_expires_at), Some(ca_cert_pem)) =
            (parsed.cert_pem, parsed.cert_expires_at, parsed.ca_cert_pem)
        else {
            return Err(malformed("response carries no certificate".into()));
        };
        if let Some(pinned) = current.and_then(|c| c.tls.as_ref()) {
            if pinned.ca_cert_pem != ca_cert_pem {
                return Err(RegistrationError::CaChanged {
                    url: self.url(path),
                });
            }
        }
        // Refuse a certificate that does not fit the key before it replaces a working one.
        crate::tls::certified_key(&cert_pem, key_pem.expose())?;
        Ok(HostCredentials {
            host_id: parsed.host.id,
            token: parsed.token,
            refresh_token: parsed.refresh_token,
            agent_secret,
            tls: Some(TlsCredentials {
                key_pem,
                cert_pem,
                cert_expires_at,
                ca_cert_pem,
            }),
            revoked: None,
        })
    }

    /// Exchanges a one-time registration token for host credentials and a certificate for a
    /// new key.
    pub fn register(
        &self,
        token: &SecretText,
        address: &str,
        specs: &HostSpecs,
    ) -> Result<HostCredentials, RegistrationError> {
        let path = "/v1/hosts/register";
        let (key_pem, csr) = new_key_and_csr()?;
        let body = serde_json::json!({
            "token": token.expose(),
            "csr": csr,
            "address": address,
            "arch": specs.arch,
            "cpu_cores": specs.cpu_cores,
            "memory_mb": specs.memory_mb,
            "disk_gb": specs.disk_gb,
        });
        match self.post(path, None, body)? {
            Reply::Ok(response) => self.credentials_from(path, response, None, key_pem),
            Reply::Status(401, message) => Err(RegistrationError::TokenRejected { message }),
            Reply::Status(status, message) => Err(RegistrationError::Unexpected {
                url: self.url(path),
                status,
                message,
            }),
        }
    }

    /// Rotates the refresh token and obtains a new host JWT, and a certificate for a new key.
    pub fn refresh(&self, creds: &HostCredentials) -> Result<HostCredentials, RegistrationError> {
        let path = "/v1/hosts/auth/refresh";
        let (key_pem, csr) = new_key_and_csr()?;
        let body = serde_json::json!({ "refresh_token": creds.refresh_token.expose(), "csr": csr });
        match self.post(path, None, body)? {
            Reply::Ok(response) => self.credentials_from(path, response, Some(creds), key_pem),
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
        match self.post(&path, Some(creds.token.expose()), serde_json::json!({}))? {
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

/// Where refreshed credentials take effect without a restart: the agent API's certificate and
/// the secret it expects.
pub trait Adopt: Send + Sync {
    fn adopt(&self, creds: &HostCredentials) -> Result<(), RegistrationError>;
}

/// Credentials nothing serves, for a heartbeat without an API server.
pub struct ServeNothing;

impl Adopt for ServeNothing {
    fn adopt(&self, _: &HostCredentials) -> Result<(), RegistrationError> {
        Ok(())
    }
}

/// Saves `creds`, or says why not: the agent serves on with them in memory and tries again at
/// the next heartbeat.
fn save_or_keep(path: &Path, creds: &HostCredentials) -> bool {
    match save_credentials(path, creds) {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(%error, "the credentials stay in memory only; retrying the save at the next heartbeat");
            false
        }
    }
}

/// Heartbeats every `interval` until `shutdown` fires. A refused host token, or a certificate
/// near its end, triggers a refresh; the new credentials are adopted at once (`served`) and
/// saved. A save that fails (a full disk) keeps the agent serving with the new credentials in
/// memory and is retried every heartbeat until it succeeds. A refresh lost in transit is retried
/// with the same token within seconds. A refused refresh token, or a deleted host, ends the
/// loop with an error that tells the operator what to do; the credentials file records it, so a
/// restart fails the same way without calling the control plane.
pub async fn heartbeat_loop(
    cp: ControlPlane,
    mut creds: HostCredentials,
    token_file: PathBuf,
    interval: Duration,
    served: std::sync::Arc<dyn Adopt>,
    shutdown: CancellationToken,
) -> Result<(), RegistrationError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = RetryDelay::new(interval.min(MAX_REFRESH_RETRY_DELAY));
    // Credentials a full disk kept from the file at start-up are saved at the first tick.
    let mut saved = load_credentials(&token_file).is_ok_and(|on_disk| on_disk == creds);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        if !saved {
            saved = save_or_keep(&token_file, &creds);
            if saved {
                tracing::info!("the credentials kept in memory are saved now");
            }
        }
        let refresh_due = if creds.certificate_due(Utc::now()) {
            tracing::info!("renewing the agent certificate");
            true
        } else {
            let (cp2, c2) = (cp.clone(), creds.clone());
            let beat = tokio::task::spawn_blocking(move || cp2.heartbeat(&c2))
                .await
                .expect("heartbeat task does not panic");
            match beat {
                Ok(true) => false,
                Ok(false) => {
                    tracing::info!("host token refused; refreshing credentials");
                    true
                }
                Err(error @ RegistrationError::HostDeleted { .. }) => {
                    retire_credentials(&token_file, &creds, &error);
                    tracing::error!(%error, "the control plane deleted this host; the agent stops");
                    return Err(error);
                }
                Err(error) => {
                    tracing::warn!(%error, "heartbeat failed; retrying next interval");
                    false
                }
            }
        };
        if !refresh_due {
            continue;
        }
        let (cp2, c2) = (cp.clone(), creds.clone());
        let refreshed = tokio::task::spawn_blocking(move || cp2.refresh(&c2))
            .await
            .expect("refresh task does not panic")
            .and_then(|fresh| served.adopt(&fresh).map(|()| fresh));
        match refreshed {
            Ok(fresh) => {
                creds = fresh;
                saved = save_or_keep(&token_file, &creds);
                retry = RetryDelay::new(interval.min(MAX_REFRESH_RETRY_DELAY));
                ticker.reset_immediately();
            }
            Err(error) if error.needs_registration() => {
                retire_credentials(&token_file, &creds, &error);
                tracing::error!(%error, "the control plane refused this host's credentials; the agent stops");
                return Err(error);
            }
            Err(error) => {
                let delay = retry.take();
                tracing::warn!(%error, ?delay, "credential refresh failed; retrying with the same refresh token");
                ticker.reset_after(delay);
            }
        }
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
            token: SecretText::new("jwt-value"),
            refresh_token: SecretText::new("refresh-value"),
            agent_secret: SecretText::new("s".repeat(64)),
            tls: Some(TlsCredentials {
                key_pem: SecretText::new("-----BEGIN PRIVATE KEY-----"),
                cert_pem: "cert".into(),
                cert_expires_at: Utc::now(),
                ca_cert_pem: "ca".into(),
            }),
            revoked: None,
        };
        save_credentials(&path, &creds).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_credentials(&path).unwrap(), creds);
        assert!(!path.with_extension("tmp").exists());
        let shown = format!("{creds:?}");
        for secret in ["jwt-value", "refresh-value", "sss", "PRIVATE KEY"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        // Credentials saved before mTLS still load; a refresh brings their certificate.
        let legacy = r#"{"host_id":"h","token":"t","refresh_token":"r","agent_secret":"s"}"#;
        fs::write(&path, legacy).unwrap();
        assert!(load_credentials(&path).unwrap().certificate_due(Utc::now()));
        assert!(!creds.certificate_due(Utc::now() - chrono::Duration::days(4)));
        assert!(creds.certificate_due(Utc::now() - chrono::Duration::days(2)));
    }

    #[test]
    fn a_failed_save_leaves_the_old_file_and_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("host-token");
        fs::write(&path, "old").unwrap();
        // The temporary's name is taken by a directory: the write fails part way.
        fs::create_dir(path.with_extension("tmp")).unwrap();
        let creds: HostCredentials = serde_json::from_str(
            r#"{"host_id":"h","token":"t","refresh_token":"r","agent_secret":"s"}"#,
        )
        .unwrap();
        assert!(matches!(
            save_credentials(&path, &creds),
            Err(RegistrationError::CredentialsUnwritable { .. })
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
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
    fn plain_http_is_refused_off_the_loopback() {
        let check = |url: &str, allow| check_cp_url(&url.parse().unwrap(), allow);
        for ok in [
            "https://cp.example.com",
            "http://127.0.0.1:8000",
            "http://[::1]:8000",
            "http://localhost:8000",
        ] {
            assert!(check(ok, false).is_ok(), "{ok}");
        }
        for refused in ["http://10.0.0.2:8000", "http://cp.example.com"] {
            assert!(
                matches!(
                    check(refused, false),
                    Err(RegistrationError::PlainHttp { .. })
                ),
                "{refused}"
            );
            assert!(check(refused, true).is_ok(), "{refused}");
        }
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
