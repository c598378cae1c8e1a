//! The control plane's client for the host agent API (its contract: `agent::wire`): sandbox
//! lifecycle calls, and envd's own typed client (`envd::client`) pointed at the agent's proxy to
//! each sandbox's envd (`/v1/sandboxes/{id}/envd/...`) over the same connection pool. Every call
//! goes over mTLS (the agent's certificate must chain to the control plane's CA and name the
//! address dialled; the control plane presents its client certificate, `cp::ca`), and
//! carries `Authorization: Bearer <agent secret>` and the `x-request-id` of the API request
//! being served (`crate::request_id`); failures are typed so the API can tell "the
//! agent (or envd) said no" from "the agent is not there".

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ca::CaHandle;
use crate::agent::wire::{
    envd_proxy_path, AgentPing, CaptureTemplate, CreateSandbox, ForkSandbox, ForkedSandboxes,
    ImportFromPath, ImportedTemplate, MetricsRange, ResumeSandbox, SandboxInfo, SandboxList,
    SandboxMetrics, SnapshotTemplate, SnapshotTemplateInfo,
};
use crate::egress::EgressPolicy;
use crate::envd::client::{EnvdClient, EnvdClientError, HttpClient, RequestBody};
use crate::error_code::{ErrorBody, ErrorCode, ErrorEnvelope};
use crate::id::{HostId, SandboxId};
use crate::store::BlobRef;
use crate::template::TemplateName;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("host agent {host} at {address} is unreachable: {reason}")]
    Unreachable {
        host: HostId,
        address: String,
        reason: String,
    },
    #[error("host agent {host} did not answer within {}s", .after.as_secs())]
    Timeout { host: HostId, after: Duration },
    /// The agent (or envd behind it) refused the request with a client error.
    #[error("{message}")]
    Rejected {
        status: StatusCode,
        code: ErrorCode,
        message: String,
    },
    /// The agent answered 5xx (or 401: the control plane and agent disagree on the secret).
    #[error("host agent {host} failed: {message} ({status})")]
    Failed {
        host: HostId,
        status: StatusCode,
        message: String,
    },
    #[error("unexpected answer from host agent {host}: {reason}")]
    Decode { host: HostId, reason: String },
    /// The answer was longer than any legitimate one (a hostile agent, or a guest behind it):
    /// reading stopped at the cap.
    #[error("the agent's answer exceeded {} MiB (host agent {host})", .limit >> 20)]
    TooLarge { host: HostId, limit: usize },
}

/// The largest JSON answer read from an agent's own API (sandbox lifecycle, its sandbox list):
/// a list of thousands of sandboxes fits many times over.
pub const AGENT_ANSWER_LIMIT: usize = 16 << 20;
/// The largest error body read from an agent; only its message is kept.
const ERROR_BODY_LIMIT: usize = 64 << 10;

impl AgentError {
    /// The error code the agent or envd answered with, if it refused the request.
    pub fn rejected_code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A failed call to a sandbox's envd through `target`'s proxy, in the same terms as the
    /// agent's own calls: a refusal (by envd or by the agent) keeps its status and code, anything
    /// else is the agent failing or not being there.
    pub fn from_envd(target: &AgentTarget, error: EnvdClientError) -> Self {
        match error {
            EnvdClientError::Api { status, detail } => refusal(
                target.host,
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                detail,
            ),
            EnvdClientError::Decode(reason) => AgentError::Decode {
                host: target.host,
                reason,
            },
            EnvdClientError::TooLarge { limit } => AgentError::TooLarge {
                host: target.host,
                limit,
            },
            unreachable @ (EnvdClientError::BadAddress(_)
            | EnvdClientError::BadCredential
            | EnvdClientError::Transport(_)
            | EnvdClientError::WebSocket(_)) => AgentError::Unreachable {
                host: target.host,
                address: target.address.clone(),
                reason: unreachable.to_string(),
            },
        }
    }
}

/// Where and how to reach one host's agent.
#[derive(Clone)]
pub struct AgentTarget {
    pub host: HostId,
    /// `host:port`.
    pub address: String,
    pub secret: String,
}

impl std::fmt::Debug for AgentTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTarget")
            .field("host", &self.host)
            .field("address", &self.address)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Timeouts for agent calls; creation waits for a VM to boot, so it has its own.
#[derive(Debug, Clone, Copy)]
pub struct AgentTimeouts {
    pub request: Duration,
    pub create: Duration,
}

impl Default for AgentTimeouts {
    fn default() -> Self {
        Self {
            request: Duration::from_secs(30),
            create: Duration::from_secs(180),
        }
    }
}

/// One HTTPS connection pool for every agent.
#[derive(Clone)]
pub struct AgentClient {
    http: HttpClient,
    /// Port-proxy traffic has connections of its own: a user's many long WebSockets and
    /// downloads never hold those the lifecycle calls need.
    ports: Client<HttpsConnector<HttpConnector>, axum::body::Body>,
    tls: Arc<rustls::ClientConfig>,
    ca: CaHandle,
    timeouts: AgentTimeouts,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// A client whose TLS trusts the CA installed later in [`AgentClient::ca`]; until then every
    /// connection is refused.
    pub fn new(timeouts: AgentTimeouts) -> Self {
        let ca = CaHandle::default();
        let tls = ca.agent_client_config();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        // A host that vanished without closing is noticed on proxied connections that wait on
        // it, not only when the next request is written.
        connector.set_keepalive(Some(Duration::from_secs(30)));
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_only()
            .enable_http1()
            .wrap_connector(connector);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector.clone());
        let ports = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self {
            http,
            ports,
            tls,
            ca,
            timeouts,
        }
    }

    /// Where the control plane's CA is installed once loaded (`cp::run`).
    pub fn ca(&self) -> &CaHandle {
        &self.ca
    }

    pub fn timeouts(&self) -> AgentTimeouts {
        self.timeouts
    }

    fn full(bytes: impl Into<Bytes>) -> RequestBody {
        Full::new(bytes.into())
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    fn request(
        target: &AgentTarget,
        method: Method,
        path_and_query: &str,
        body: RequestBody,
        content_type: Option<&str>,
    ) -> Request<RequestBody> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("https://{}{}", target.address, path_and_query))
            .header(header::AUTHORIZATION, format!("Bearer {}", target.secret));
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        if let Some(id) = crate::request_id::current() {
            builder = builder.header(crate::request_id::HEADER, id);
        }
        builder
            .body(body)
            .expect("method, URI and headers are valid")
    }

    /// Sends a request and waits up to `timeout` for the response head; a non-success answer
    /// becomes a typed error. The body is left to stream.
    async fn send(
        &self,
        target: &AgentTarget,
        request: Request<RequestBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, AgentError> {
        let response = match tokio::time::timeout(timeout, self.http.request(request)).await {
            Err(_) => {
                return Err(AgentError::Timeout {
                    host: target.host,
                    after: timeout,
                })
            }
            Ok(Err(error)) => {
                return Err(AgentError::Unreachable {
                    host: target.host,
                    address: target.address.clone(),
                    reason: error_chain(&error),
                })
            }
            Ok(Ok(response)) => response,
        };
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        // An unreadable or oversized error body still leaves the status to go by.
        let body = read_capped(target, response, ERROR_BODY_LIMIT, timeout)
            .await
            .unwrap_or_default();
        Err(answer_error(target.host, status, &body))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        target: &AgentTarget,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, AgentError> {
        let bytes = self.send_json(target, method, path, body, timeout).await?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Decode {
            host: target.host,
            reason: e.to_string(),
        })
    }

    async fn send_json(
        &self,
        target: &AgentTarget,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<Bytes, AgentError> {
        let request = match body {
            Some(body) => {
                let json = serde_json::to_vec(body).expect("request types serialize");
                Self::request(
                    target,
                    method,
                    path,
                    Self::full(json),
                    Some("application/json"),
                )
            }
            None => Self::request(target, method, path, Self::full(Bytes::new()), None),
        };
        let response = self.send(target, request, timeout).await?;
        read_capped(target, response, AGENT_ANSWER_LIMIT, timeout).await
    }

    pub async fn ping(&self, target: &AgentTarget) -> Result<AgentPing, AgentError> {
        self.json(
            target,
            Method::GET,
            "/v1/ping",
            None::<&()>,
            self.timeouts.request,
        )
        .await
    }

    /// Creates a sandbox and waits until its envd answers; on failure the agent has already
    /// removed whatever it built.
    pub async fn create_sandbox(
        &self,
        target: &AgentTarget,
        request: &CreateSandbox,
    ) -> Result<SandboxInfo, AgentError> {
        self.json(
            target,
            Method::POST,
            "/v1/sandboxes",
            Some(request),
            self.timeouts.create,
        )
        .await
    }

    /// Has the agent put its image of `template` into the template store: hashing and uploading
    /// a multi-GiB image to a remote store takes a while.
    pub async fn publish_template(
        &self,
        target: &AgentTarget,
        template: &TemplateName,
    ) -> Result<BlobRef, AgentError> {
        self.json(
            target,
            Method::POST,
            &format!("/v1/templates/{template}/publish"),
            None::<&()>,
            PUBLISH_TIMEOUT,
        )
        .await
    }

    /// Has the agent make a template image of a sandbox's disk (a build's last step).
    pub async fn capture_template(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        request: &CaptureTemplate,
        timeout: Duration,
    ) -> Result<BlobRef, AgentError> {
        self.json(
            target,
            Method::POST,
            &format!("/v1/sandboxes/{id}/template"),
            Some(request),
            timeout,
        )
        .await
    }

    /// Has the agent make a sandbox's memory and disk a snapshot template on its host.
    pub async fn snapshot_template(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        request: &SnapshotTemplate,
    ) -> Result<SnapshotTemplateInfo, AgentError> {
        self.json(
            target,
            Method::POST,
            &format!("/v1/sandboxes/{id}/snapshot"),
            Some(request),
            SNAPSHOT_TIMEOUT,
        )
        .await
    }

    /// Has the agent start `request.children`, each continuing sandbox `id` as it is now.
    pub async fn fork_sandbox(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        request: &ForkSandbox,
    ) -> Result<ForkedSandboxes, AgentError> {
        self.json(
            target,
            Method::POST,
            &format!("/v1/sandboxes/{id}/fork"),
            Some(request),
            SNAPSHOT_TIMEOUT,
        )
        .await
    }

    /// Has the agent import a container image archive as a template's image: `archive` streams
    /// the archive to it, or names a file on its host.
    pub async fn import_template(
        &self,
        target: &AgentTarget,
        template: &TemplateName,
        archive: ImportArchive,
        start_entrypoint: bool,
        timeout: Duration,
    ) -> Result<ImportedTemplate, AgentError> {
        let path = format!("/v1/templates/{template}/import?start_entrypoint={start_entrypoint}");
        let request = match archive {
            ImportArchive::Upload(body) => Self::request(
                target,
                Method::POST,
                &path,
                body,
                Some("application/octet-stream"),
            ),
            ImportArchive::OnHost(path_on_host) => {
                let json = serde_json::to_vec(&ImportFromPath { path: path_on_host })
                    .expect("request types serialize");
                Self::request(
                    target,
                    Method::POST,
                    &path,
                    Self::full(json),
                    Some("application/json"),
                )
            }
        };
        let response = self.send(target, request, timeout).await?;
        let bytes = read_capped(target, response, AGENT_ANSWER_LIMIT, timeout).await?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Decode {
            host: target.host,
            reason: e.to_string(),
        })
    }

    /// Has the agent remove its local image of `template` (its sandboxes keep their own links).
    pub async fn remove_template(
        &self,
        target: &AgentTarget,
        template: &TemplateName,
    ) -> Result<(), AgentError> {
        self.send_json(
            target,
            Method::DELETE,
            &format!("/v1/templates/{template}"),
            None::<&()>,
            self.timeouts.request,
        )
        .await
        .map(drop)
    }

    /// The agent's sandboxes, and those it lost recently.
    pub async fn list_sandboxes(&self, target: &AgentTarget) -> Result<SandboxList, AgentError> {
        self.json(
            target,
            Method::GET,
            "/v1/sandboxes",
            None::<&()>,
            self.timeouts.request,
        )
        .await
    }

    /// Pauses a sandbox to disk; answers once the snapshot is durable. Allowed as long as a
    /// create: a large guest's memory takes a while to write.
    pub async fn pause_sandbox(
        &self,
        target: &AgentTarget,
        id: SandboxId,
    ) -> Result<SandboxInfo, AgentError> {
        self.json(
            target,
            Method::POST,
            &format!("/v1/sandboxes/{id}/pause"),
            None::<&()>,
            self.timeouts.create,
        )
        .await
    }

    /// Has the host take in a paused sandbox from its copy in the template store (another host
    /// paused it); answers it paused there.
    pub async fn import_sandbox(
        &self,
        target: &AgentTarget,
        id: SandboxId,
    ) -> Result<SandboxInfo, AgentError> {
        self.json(
            target,
            Method::POST,
            &format!("/v1/sandboxes/{id}/import"),
            None::<&()>,
            self.timeouts.create,
        )
        .await
    }

    /// Resumes a paused sandbox under `egress` (the capsule's policy now, which may differ
    /// from the one it was paused with); answers once its envd answers.
    pub async fn resume_sandbox(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        egress: &EgressPolicy,
    ) -> Result<SandboxInfo, AgentError> {
        let body = ResumeSandbox {
            egress: Some(egress.clone()),
        };
        self.json(
            target,
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            Some(&body),
            self.timeouts.create,
        )
        .await
    }

    /// Replaces a running or paused sandbox's egress policy.
    pub async fn set_egress(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        egress: &EgressPolicy,
    ) -> Result<(), AgentError> {
        self.send_json(
            target,
            Method::PUT,
            &format!("/v1/sandboxes/{id}/egress"),
            Some(egress),
            self.timeouts.request,
        )
        .await
        .map(drop)
    }

    pub async fn sandbox_metrics(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        range: MetricsRange,
    ) -> Result<SandboxMetrics, AgentError> {
        self.json(
            target,
            Method::GET,
            &format!("/v1/sandboxes/{id}/metrics?range={}", range.as_str()),
            None::<&()>,
            self.timeouts.request,
        )
        .await
    }

    pub async fn get_sandbox(
        &self,
        target: &AgentTarget,
        id: SandboxId,
    ) -> Result<SandboxInfo, AgentError> {
        self.json(
            target,
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            None::<&()>,
            self.timeouts.request,
        )
        .await
    }

    pub async fn destroy_sandbox(
        &self,
        target: &AgentTarget,
        id: SandboxId,
    ) -> Result<(), AgentError> {
        self.send_json(
            target,
            Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            None::<&()>,
            self.timeouts.request,
        )
        .await
        .map(drop)
    }

    /// Destroys the sandbox on that host only, keeping its copy in the template store: for a
    /// stale copy of a capsule that lives on (or is being moved to) another host.
    pub async fn destroy_sandbox_here(
        &self,
        target: &AgentTarget,
        id: SandboxId,
    ) -> Result<(), AgentError> {
        self.send_json(
            target,
            Method::DELETE,
            &format!("/v1/sandboxes/{id}?keep_store_copy=true"),
            None::<&()>,
            self.timeouts.request,
        )
        .await
        .map(drop)
    }

    /// Resets the sandbox's idle timer.
    pub async fn ping_sandbox(
        &self,
        target: &AgentTarget,
        id: SandboxId,
    ) -> Result<(), AgentError> {
        self.send_json(
            target,
            Method::POST,
            &format!("/v1/sandboxes/{id}/ping"),
            None::<&()>,
            self.timeouts.request,
        )
        .await
        .map(drop)
    }

    /// Sends a port-proxy request (its URI a path on the agent, from
    /// `wire::port_proxy_path`) to `target` with the agent secret, and answers whatever comes
    /// back, bodies streaming; the caller tells the guest's answers from the agent's.
    pub async fn forward_port(
        &self,
        target: &AgentTarget,
        mut request: Request<axum::body::Body>,
    ) -> Result<Response<Incoming>, AgentError> {
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *request.uri_mut() = format!("https://{}{path}", target.address)
            .parse()
            .map_err(|_| AgentError::Unreachable {
                host: target.host,
                address: target.address.clone(),
                reason: "not a valid address".into(),
            })?;
        let bearer = http::HeaderValue::from_str(&format!("Bearer {}", target.secret))
            .expect("agent secrets are hex");
        request.headers_mut().insert(header::AUTHORIZATION, bearer);
        self.ports
            .request(request)
            .await
            .map_err(|error| AgentError::Unreachable {
                host: target.host,
                address: target.address.clone(),
                reason: error_chain(&error),
            })
    }

    /// envd's typed client for sandbox `id`, through `target`'s proxy and over this pool.
    pub fn envd(&self, target: &AgentTarget, id: SandboxId) -> Result<EnvdClient, AgentError> {
        let base = format!("https://{}{}", target.address, envd_proxy_path(id, ""));
        EnvdClient::through_proxy(self.http.clone(), &base, &target.secret, self.tls.clone())
            .map_err(|e| AgentError::from_envd(target, e))
    }
}

/// How long making a snapshot template may take: a pause, a copy of the disk, a resume and the
/// memory made a shared snapshot, each bounded on the agent.
pub(crate) const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a publish may take: a multi-GiB image to a remote store.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3600);

/// The archive of an import: streamed in the request, or a file on the agent's host.
pub enum ImportArchive {
    Upload(RequestBody),
    OnHost(std::path::PathBuf),
}

/// Reads a whole answer of at most `limit` bytes within `timeout`; a longer one is
/// [`AgentError::TooLarge`] and nothing beyond the limit is buffered (the connection is dropped
/// rather than drained).
async fn read_capped(
    target: &AgentTarget,
    response: Response<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, AgentError> {
    let read = Limited::new(response.into_body(), limit).collect();
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(AgentError::Timeout {
            host: target.host,
            after: timeout,
        }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => Err(AgentError::TooLarge {
            host: target.host,
            limit,
        }),
        Ok(Err(error)) => Err(AgentError::Unreachable {
            host: target.host,
            address: target.address.clone(),
            reason: error_chain(&*error),
        }),
    }
}

/// Turns a non-success answer into an error: client errors keep the agent's (or envd's) code,
/// everything else is the agent failing.
fn answer_error(host: HostId, status: StatusCode, body: &[u8]) -> AgentError {
    refusal(host, status, ErrorEnvelope::body_of(body))
}

fn refusal(host: HostId, status: StatusCode, detail: ErrorBody) -> AgentError {
    if status.is_client_error() && status != StatusCode::UNAUTHORIZED {
        AgentError::Rejected {
            status,
            code: detail.code,
            message: detail.message,
        }
    } else {
        let message = if status == StatusCode::UNAUTHORIZED {
            format!(
                "it rejected the control plane's agent secret ({})",
                detail.message
            )
        } else {
            detail.message
        };
        AgentError::Failed {
            host,
            status,
            message,
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cp::ca::Ca;
    use crate::template::TemplateName;
    use std::collections::BTreeMap;

    #[test]
    fn client_errors_keep_their_code_and_the_rest_is_the_agent_failing() {
        let host = HostId(uuid::Uuid::nil());
        let body = br#"{"error":{"code":"not_found","message":"no such file"}}"#;
        match answer_error(host, StatusCode::NOT_FOUND, body) {
            AgentError::Rejected {
                status,
                code,
                message,
            } => {
                assert_eq!(
                    (status, code.as_str(), message.as_str()),
                    (StatusCode::NOT_FOUND, "not_found", "no such file")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            answer_error(host, StatusCode::BAD_GATEWAY, b"boom"),
            AgentError::Failed { status: StatusCode::BAD_GATEWAY, ref message, .. } if message == "boom"
        ));
        assert!(matches!(
            answer_error(host, StatusCode::UNAUTHORIZED, b"{}"),
            AgentError::Failed {
                status: StatusCode::UNAUTHORIZED,
                ..
            }
        ));
        assert_eq!(
            envd_proxy_path(SandboxId(uuid::Uuid::from_u128(35)), "/processes/run"),
            format!("/v1/sandboxes/cl-{}z/envd/processes/run", "0".repeat(24))
        );
    }

    /// An agent, certified by `ca` for the address it listens on, that answers every request
    /// with `head` and then zeros without end.
    async fn endless(ca: &Ca, head: &'static str) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let cert = ca
            .issue_agent_cert(
                HostId(uuid::Uuid::nil()),
                &addr.to_string().parse().unwrap(),
                &csr,
            )
            .unwrap();
        let identity = crate::tls::ServerIdentity::new(
            crate::tls::certified_key(&cert.pem, &key.serialize_pem()).unwrap(),
        );
        let config = crate::tls::agent_server_config(Arc::new(identity), ca.cert_pem()).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut socket = acceptor.accept(tcp).await?;
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    socket.write_all(head.as_bytes()).await?;
                    let zeros = vec![b'0'; 1 << 20];
                    loop {
                        socket.write_all(&zeros).await?;
                    }
                    #[allow(unreachable_code)]
                    Ok::<_, std::io::Error>(())
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_endless_answer_or_error_body_is_cut_at_its_cap() {
        let client = AgentClient::new(AgentTimeouts::default());
        let ca = Arc::new(Ca::ephemeral());
        client.ca().install(ca.clone()).unwrap();
        let target = |addr: std::net::SocketAddr| AgentTarget {
            host: HostId(uuid::Uuid::nil()),
            address: addr.to_string(),
            secret: "s".into(),
        };
        let ok = endless(&ca, "HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n").await;
        let started = std::time::Instant::now();
        match client.ping(&target(ok)).await {
            Err(error @ AgentError::TooLarge { limit, .. }) => {
                assert_eq!(limit, AGENT_ANSWER_LIMIT);
                assert!(error
                    .to_string()
                    .starts_with("the agent's answer exceeded 16 MiB"));
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(20));
        // An endless error body: the status is what the error tells.
        let failed = endless(
            &ca,
            "HTTP/1.1 500 Oops\r\ncontent-length: 1073741824\r\n\r\n",
        )
        .await;
        assert!(matches!(
            client.ping(&target(failed)).await,
            Err(AgentError::Failed {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                ..
            })
        ));
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn envd_failures_are_told_like_the_agents_own() {
        let target = AgentTarget {
            host: HostId(uuid::Uuid::nil()),
            address: "127.0.0.1:1".into(),
            secret: "s".into(),
        };
        let api = |status: u16, code: ErrorCode| EnvdClientError::Api {
            status,
            detail: ErrorBody {
                code,
                message: "m".into(),
            },
        };
        for (status, code) in [
            (404, ErrorCode::NotFound),
            (409, ErrorCode::Conflict),
            (413, ErrorCode::TooLarge),
            (400, ErrorCode::InvalidRequest),
        ] {
            assert!(
                matches!(
                    AgentError::from_envd(&target, api(status, code)),
                    AgentError::Rejected { status: s, code: c, .. } if s.as_u16() == status && c == code
                ),
                "{status}"
            );
        }
        for failed in [502, 500, 507, 401] {
            assert!(
                matches!(
                    AgentError::from_envd(&target, api(failed, ErrorCode::AgentError)),
                    AgentError::Failed { status, .. } if status.as_u16() == failed
                ),
                "{failed}"
            );
        }
        assert!(matches!(
            AgentError::from_envd(&target, EnvdClientError::Transport("refused".into())),
            AgentError::Unreachable { .. }
        ));
        assert!(matches!(
            AgentError::from_envd(&target, EnvdClientError::WebSocket("reset".into())),
            AgentError::Unreachable { .. }
        ));
        assert!(matches!(
            AgentError::from_envd(&target, EnvdClientError::Decode("garbled".into())),
            AgentError::Decode { .. }
        ));
        let too_large =
            AgentError::from_envd(&target, EnvdClientError::TooLarge { limit: 64 << 20 });
        assert!(
            too_large
                .to_string()
                .starts_with("the agent's answer exceeded 64 MiB"),
            "{too_large}"
        );
    }

    #[test]
    fn create_request_matches_the_contract() {
        let request = CreateSandbox {
            sandbox_id: SandboxId(uuid::Uuid::nil()),
            template: TemplateName::default_template(),
            vcpus: 1,
            memory_mb: 512,
            disk_mb: 5120,
            timeout_sec: 0,
            envs: BTreeMap::new(),
            user: None,
            image: Some(BlobRef::new(&"0".repeat(64), 1 << 20).unwrap()),
            snapshot: None,
            egress: Default::default(),
        };
        let value = serde_json::to_value(&request).unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "disk_mb",
                "envs",
                "image",
                "memory_mb",
                "sandbox_id",
                "template",
                "timeout_sec",
                "user",
                "vcpus"
            ]
        );
    }
}
