//! The agent API the control plane calls: sandbox lifecycle, and a streaming proxy to each
//! sandbox's envd for exec, processes, PTYs and files. Served over TLS only to clients presenting
//! the control plane's client certificate (`crate::tls::agent_server_config`); every request
//! must also carry the agent secret issued at registration (`Authorization: Bearer <secret>`).
//! Both are replaced in place when a refresh renews them.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{Json, Router};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq;

use super::port_proxy::{proxy_port, PortProxySettings};
use super::prometheus;
use super::registration::{Adopt, HostCredentials, RegistrationError};
use super::sandbox::{SandboxError, SandboxManager};
use super::templates::{ImportSource, TemplateError};
use super::wire::{
    AgentPing, CaptureTemplate, CreateSandbox, ForkSandbox, ForkedSandboxes, ImportFromPath,
    ImportedTemplate, MetricsRange, ResumeSandbox, SandboxInfo, SandboxList, SandboxMetrics,
    SnapshotTemplate, SnapshotTemplateInfo,
};
use crate::egress::EgressPolicy;
use crate::error_code::{ErrorCode, ErrorEnvelope};
use crate::id::SandboxId;
use crate::secret::SecretText;
use crate::store::{BlobRef, StoreError};
use crate::template::{TemplateName, TemplateNameError};
use crate::tls::ServerIdentity;

/// Upper bound for a JSON request body; file contents travel through the envd proxy, unbounded.
const JSON_BODY_LIMIT: usize = 1 << 20;

/// A TLS handshake that has not finished in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API serves with from the host credentials: its certificate and the secret it
/// expects, both swapped when a refresh renews them.
#[derive(Debug)]
pub struct ServedCredentials {
    identity: Arc<ServerIdentity>,
    secret: RwLock<SecretText>,
    ca_cert_pem: String,
}

impl ServedCredentials {
    pub fn new(creds: &HostCredentials) -> Result<Self, RegistrationError> {
        let tls = creds.tls.as_ref().ok_or(RegistrationError::NoCertificate)?;
        Ok(Self {
            identity: Arc::new(ServerIdentity::new(crate::tls::certified_key(
                &tls.cert_pem,
                tls.key_pem.expose(),
            )?)),
            secret: RwLock::new(creds.agent_secret.clone()),
            ca_cert_pem: tls.ca_cert_pem.clone(),
        })
    }

    /// The TLS server config: this identity, and clients certified by the pinned CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, RegistrationError> {
        Ok(crate::tls::agent_server_config(
            self.identity.clone(),
            &self.ca_cert_pem,
        )?)
    }

    fn secret_matches(&self, presented: &str) -> bool {
        let secret = self
            .secret
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bool::from(presented.as_bytes().ct_eq(secret.expose().as_bytes()))
    }
}

impl Adopt for ServedCredentials {
    fn adopt(&self, creds: &HostCredentials) -> Result<(), RegistrationError> {
        if let Some(tls) = &creds.tls {
            self.identity.replace(crate::tls::certified_key(
                &tls.cert_pem,
                tls.key_pem.expose(),
            )?);
        }
        *self
            .secret
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = creds.agent_secret.clone();
        Ok(())
    }
}

#[derive(Clone)]
pub struct AgentState {
    pub sandboxes: Arc<SandboxManager>,
    pub credentials: Arc<ServedCredentials>,
    pub host_id: Arc<str>,
    pub port_proxy: PortProxySettings,
}

impl AgentState {
    pub fn new(
        sandboxes: Arc<SandboxManager>,
        credentials: Arc<ServedCredentials>,
        host_id: &str,
        port_proxy: PortProxySettings,
    ) -> Self {
        Self {
            sandboxes,
            credentials,
            host_id: host_id.into(),
            port_proxy,
        }
    }
}

/// Serves `app` over TLS with `config` until `stop` fires, then lets open requests finish. A
/// client that fails the handshake (no certificate, or one the CA did not issue for clients)
/// never reaches the router.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    config: rustls::ServerConfig,
    app: Router,
    stop: tokio_util::sync::CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let (acceptor, app, stop) = (acceptor.clone(), app.clone(), stop.clone());
        connections.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
}

/// An API failure, rendered as the `{"error":{"code","message"}}` envelope.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorEnvelope::new(self.code, self.message)),
        )
            .into_response()
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            SandboxError::Invalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest),
            SandboxError::Template(TemplateError::NotHere { .. }) => {
                (StatusCode::NOT_FOUND, ErrorCode::TemplateNotFound)
            }
            SandboxError::Template(TemplateError::Store {
                source: StoreError::Unreachable { .. },
                ..
            }) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::StoreUnavailable),
            SandboxError::Template(TemplateError::Store { .. }) => {
                (StatusCode::BAD_GATEWAY, ErrorCode::AgentError)
            }
            SandboxError::Template(TemplateError::ImportRefused { .. }) => {
                (StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest)
            }
            SandboxError::Template(TemplateError::ImportFailed { .. }) => {
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::InternalError)
            }
            SandboxError::Template(TemplateError::ArchiveTooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge)
            }
            SandboxError::Template(TemplateError::Io { .. }) => {
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::InternalError)
            }
            SandboxError::AlreadyExists(_)
            | SandboxError::TemplateExists(_)
            | SandboxError::Template(
                TemplateError::SnapshotTemplate(_) | TemplateError::SnapshotUnusable { .. },
            ) => (StatusCode::CONFLICT, ErrorCode::Conflict),
            SandboxError::NotFound(_) | SandboxError::NotStored(_) => {
                (StatusCode::NOT_FOUND, ErrorCode::NotFound)
            }
            SandboxError::ImportFailed { .. } => (StatusCode::CONFLICT, ErrorCode::Conflict),
            SandboxError::NotRunning { .. } | SandboxError::Transition { .. } => {
                (StatusCode::CONFLICT, ErrorCode::InvalidState)
            }
            SandboxError::DestroyedWhileStarting(_) | SandboxError::DestroyedBefore { .. } => {
                (StatusCode::CONFLICT, ErrorCode::Conflict)
            }
            SandboxError::Unsettled { .. } | SandboxError::Busy { .. } => {
                (StatusCode::CONFLICT, ErrorCode::InvalidState)
            }
            SandboxError::TooManyConnections { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited)
            }
            SandboxError::PauseFailed {
                disk_full: true, ..
            } => (
                StatusCode::INSUFFICIENT_STORAGE,
                ErrorCode::InsufficientStorage,
            ),
            SandboxError::CreateFailed { .. }
            | SandboxError::CaptureFailed { .. }
            | SandboxError::SnapshotFailed { .. }
            | SandboxError::PauseFailed { .. }
            | SandboxError::ResumeFailed { .. } => (StatusCode::BAD_GATEWAY, ErrorCode::AgentError),
            SandboxError::TeardownFailed { .. }
            | SandboxError::Lost { .. }
            | SandboxError::Interrupted(_)
            | SandboxError::Network(_)
            | SandboxError::Io { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::InternalError)
            }
        };
        Self::new(status, code, message)
    }
}

/// A sandbox ID from the path; anything else cannot name a sandbox.
pub(super) fn sandbox_id(raw: &str) -> Result<SandboxId, ApiError> {
    raw.parse().map_err(|e: crate::id::IdError| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            e.to_string(),
        )
    })
}

pub fn router(state: AgentState) -> Router {
    let routes = Router::new()
        .route("/v1/ping", get(ping))
        .route("/v1/sandboxes", post(create).get(list))
        .route("/v1/sandboxes/{id}", get(info).delete(destroy))
        .route("/v1/sandboxes/{id}/ping", post(ping_sandbox))
        .route("/v1/sandboxes/{id}/pause", post(pause))
        .route("/v1/sandboxes/{id}/resume", post(resume))
        .route("/v1/sandboxes/{id}/egress", put(set_egress))
        .route("/v1/sandboxes/{id}/metrics", get(sandbox_metrics))
        .route("/v1/sandboxes/{id}/envd/{*path}", any(proxy_envd))
        .route("/v1/sandboxes/{id}/ports/{port}", any(proxy_port))
        .route("/v1/sandboxes/{id}/ports/{port}/", any(proxy_port))
        .route("/v1/sandboxes/{id}/ports/{port}/{*path}", any(proxy_port))
        .route("/v1/sandboxes/{id}/template", post(capture_template))
        .route("/v1/sandboxes/{id}/snapshot", post(snapshot_template))
        .route("/v1/sandboxes/{id}/fork", post(fork_sandbox))
        .route("/v1/sandboxes/{id}/import", post(import_sandbox))
        .route("/v1/templates/{name}/publish", post(publish_template))
        .route("/v1/templates/{name}/import", post(import_template))
        .route(
            "/v1/templates/{name}",
            axum::routing::delete(remove_template),
        )
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_secret,
        ))
        .with_state(state);
    crate::request_id::layer(routes)
}

async fn require_secret(State(state): State<AgentState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if state.credentials.secret_matches(presented) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or wrong agent secret",
        )
        .into_response()
    }
}

async fn ping(State(state): State<AgentState>) -> Json<AgentPing> {
    Json(AgentPing {
        status: "ok".to_owned(),
        host_id: state.host_id.to_string(),
        version: crate::version::VERSION.to_owned(),
        vmm: state.sandboxes.vmm_kind(),
        sandboxes: state.sandboxes.list().len() as u64,
    })
}

/// Parses a JSON body into `T`, answering malformed input with the error envelope.
async fn json_body<T: serde::de::DeserializeOwned>(request: Request) -> Result<T, ApiError> {
    parse_json(&body_bytes(request).await?)
}

async fn body_bytes(request: Request) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(request.into_body(), JSON_BODY_LIMIT)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                "request body exceeds 1 MiB",
            )
        })
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            e.to_string(),
        )
    })
}

async fn create(State(state): State<AgentState>, request: Request) -> Result<Response, ApiError> {
    let create: CreateSandbox = json_body(request).await?;
    let started = std::time::Instant::now();
    let created = state.sandboxes.create(create).await;
    prometheus::operation("create", created.is_ok(), started.elapsed());
    Ok((StatusCode::CREATED, Json(created?)).into_response())
}

async fn list(State(state): State<AgentState>) -> Json<SandboxList> {
    Json(SandboxList {
        sandboxes: state.sandboxes.list(),
        lost: state.sandboxes.lost(),
        templates: state.sandboxes.held_templates(),
    })
}

async fn info(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    Ok(Json(state.sandboxes.info(&id.to_string())?).into_response())
}

/// `DELETE /v1/sandboxes/{id}`; with `?keep_store_copy=true` the sandbox's copy in the template
/// store stays (see [`SandboxManager::destroy_here`]).
async fn destroy(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    Query(query): Query<DestroyQuery>,
) -> Result<StatusCode, ApiError> {
    let id = sandbox_id(&id)?;
    if query.keep_store_copy {
        state.sandboxes.destroy_here(&id.to_string()).await?;
    } else {
        state.sandboxes.destroy(&id.to_string()).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DestroyQuery {
    #[serde(default)]
    keep_store_copy: bool,
}

async fn ping_sandbox(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = sandbox_id(&id)?;
    state.sandboxes.ping(&id.to_string())?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Result<Json<SandboxInfo>, ApiError> {
    let id = sandbox_id(&id)?;
    let started = std::time::Instant::now();
    let paused = state.sandboxes.pause(&id.to_string()).await;
    prometheus::operation("pause", paused.is_ok(), started.elapsed());
    Ok(Json(paused?))
}

async fn resume(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Json<SandboxInfo>, ApiError> {
    let id = sandbox_id(&id)?.to_string();
    let bytes = body_bytes(request).await?;
    // The body may be left out.
    if !bytes.is_empty() {
        let body: ResumeSandbox = parse_json(&bytes)?;
        if let Some(egress) = body.egress {
            state.sandboxes.set_egress(&id, egress).await?;
        }
    }
    let started = std::time::Instant::now();
    let resumed = state.sandboxes.resume(&id).await;
    prometheus::operation("resume", resumed.is_ok(), started.elapsed());
    Ok(Json(resumed?))
}

/// Replaces a running or paused sandbox's egress policy.
async fn set_egress(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    request: Request,
) -> Result<StatusCode, ApiError> {
    let id = sandbox_id(&id)?;
    let policy: EgressPolicy = json_body(request).await?;
    state.sandboxes.set_egress(&id.to_string(), policy).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize)]
struct MetricsQuery {
    range: Option<String>,
}

/// The sandbox's sampled use of this host over `range` (default `10m`), while it is here and
/// for a day after it has left.
async fn sandbox_metrics(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    Query(query): Query<MetricsQuery>,
) -> Result<Json<SandboxMetrics>, ApiError> {
    let id = sandbox_id(&id)?;
    let range = match query.range.as_deref() {
        None => MetricsRange::TenMinutes,
        Some(raw) => raw.parse().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                format!("range: `{raw}` is not one of 5m, 10m, 1h, 2h, 6h, 12h, 24h"),
            )
        })?,
    };
    let points = state
        .sandboxes
        .metrics(&id.to_string(), range)
        .ok_or_else(|| SandboxError::NotFound(id.to_string()))?;
    Ok(Json(SandboxMetrics {
        sandbox_id: id,
        range,
        points,
    }))
}

/// Takes in a paused sandbox from its copy in the template store (another host paused it);
/// answered with it paused here, ready for a resume.
async fn import_sandbox(
    State(state): State<AgentState>,
    Path(id): Path<String>,
) -> Result<Json<SandboxInfo>, ApiError> {
    let id = sandbox_id(&id)?;
    Ok(Json(state.sandboxes.import_paused(id).await?))
}

/// Makes the sandbox's disk a template image, installed here and published to the store.
async fn capture_template(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Json<BlobRef>, ApiError> {
    let id = sandbox_id(&id)?;
    let capture: CaptureTemplate = json_body(request).await?;
    Ok(Json(
        state
            .sandboxes
            .capture_template(&id.to_string(), capture)
            .await?,
    ))
}

/// Makes the sandbox's memory and disk a snapshot template on this host.
async fn snapshot_template(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Json<SnapshotTemplateInfo>, ApiError> {
    let id = sandbox_id(&id)?;
    let snapshot: SnapshotTemplate = json_body(request).await?;
    Ok(Json(
        state
            .sandboxes
            .snapshot_template(&id.to_string(), snapshot)
            .await?,
    ))
}

/// Starts children continuing the sandbox as it is now.
async fn fork_sandbox(
    State(state): State<AgentState>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Json<ForkedSandboxes>, ApiError> {
    let id = sandbox_id(&id)?;
    let fork: ForkSandbox = json_body(request).await?;
    let children = state.sandboxes.fork(&id.to_string(), fork).await?;
    Ok(Json(ForkedSandboxes { children }))
}

#[derive(Debug, serde::Deserialize)]
struct ImportQuery {
    #[serde(default)]
    start_entrypoint: bool,
}

/// Imports a container image archive, the body itself or (as JSON) a file on this host, as a
/// template's image; installed here and published to the store.
async fn import_template(
    State(state): State<AgentState>,
    Path(name): Path<String>,
    Query(query): Query<ImportQuery>,
    request: Request,
) -> Result<Json<ImportedTemplate>, ApiError> {
    let name: TemplateName = name.parse().map_err(|e: TemplateNameError| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            e.to_string(),
        )
    })?;
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let source = if is_json {
        let from: ImportFromPath = json_body(request).await?;
        ImportSource::Path(from.path)
    } else {
        ImportSource::Upload(request.into_body())
    };
    Ok(Json(
        state
            .sandboxes
            .import_template(&name, source, query.start_entrypoint)
            .await?,
    ))
}

/// Removes this host's image of a template; sandboxes made from it keep their own links.
async fn remove_template(
    State(state): State<AgentState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let name: TemplateName = name.parse().map_err(|e: TemplateNameError| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            e.to_string(),
        )
    })?;
    state.sandboxes.remove_template(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Puts this host's image of a template into the template store; answers its reference.
async fn publish_template(
    State(state): State<AgentState>,
    Path(name): Path<String>,
) -> Result<Json<BlobRef>, ApiError> {
    let name: TemplateName = name.parse().map_err(|e: TemplateNameError| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            e.to_string(),
        )
    })?;
    Ok(Json(state.sandboxes.publish_template(&name).await?))
}

/// Forwards a request to the sandbox's envd unchanged but for the envd access token, streaming
/// both bodies, and splices WebSocket upgrades end to end. The request's `x-request-id` goes
/// along with the other headers.
async fn proxy_envd(
    State(state): State<AgentState>,
    Path((id, path)): Path<(String, String)>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    let (envd, lease) = state.sandboxes.envd(&id.to_string()).await?;
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri = format!("http://{}/{path}{query}", envd.authority());
    let client_upgrade = request
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));

    let (mut parts, body) = request.into_parts();
    parts.uri = uri.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "malformed envd path",
        )
    })?;
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.remove(header::HOST);
    if let Some(token) = envd.token() {
        let value = HeaderValue::from_str(token).expect("access tokens are hex");
        parts.headers.insert("x-access-token", value);
    }
    // The sandbox's own pool: a shared one would keep connections to a destroyed guest whose
    // address a new sandbox reuses, and the new sandbox's first call would fail on them.
    let body = body.map_err(std::io::Error::other).boxed_unsync();
    let mut upstream = envd
        .pool()
        .request(Request::from_parts(parts, body))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::AgentError,
                format!("envd: {e}"),
            )
        })?;

    if upstream.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::AgentError,
                "unexpected upgrade",
            ));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut upstream);
        tokio::spawn(async move {
            let _active = lease;
            let (Ok(client), Ok(server)) = (client_upgrade.await, upstream_upgrade.await) else {
                return;
            };
            let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        let (parts, body) = upstream.into_parts();
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    // The lease lives as long as the response body: a foreground command's answer (or a
    // download) may stream for longer than the sandbox's idle timeout.
    let (parts, body) = upstream.into_parts();
    let body = body.map_frame(move |frame| {
        let _active = &lease;
        frame
    });
    Ok(Response::from_parts(parts, Body::new(body)))
}
