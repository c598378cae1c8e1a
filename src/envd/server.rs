//! The envd HTTP surface: routing, the access-token check, request parsing and the single place
//! where module errors become HTTP statuses and error codes.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, Notify};
use tokio_util::io::ReaderStream;

use super::api::{
    AttachRequest, ClientMessage, EntryInfo, ErrorBody, ErrorCode, ErrorEnvelope, FileQuery,
    Health, InitRequest, ListRequest, ListResponse, Metrics, MoveRequest, PathRequest, ProcessList,
    PtySize, RunRequest, RunResponse, ServerMessage, SignalRequest, StartRequest, StartResponse,
    ACCESS_TOKEN_HEADER, FRAME_PTY, FRAME_STDERR, FRAME_STDOUT, PORT_TUNNEL_PROTOCOL,
};
use super::clock::{ClockError, WallClock};
use super::files::{FileError, FileUser};
use super::identity::{Entropy, Hostname, IdentityError, MachineId};
use super::metrics::MetricsSampler;
use super::output::{LogItem, StreamKind};
use super::ports::{self, PortError};
use super::process::{parse_signal, Defaults, ProcessError, Processes};
use super::users::UserError;
use super::watch::DirWatch;
use crate::secret::SecretText;

/// Download chunk size: large enough to keep per-chunk overhead low, small enough for memory.
const DOWNLOAD_CHUNK: usize = 256 << 10;

pub struct AppState {
    pub processes: Processes,
    defaults: RwLock<Defaults>,
    /// SHA-256 of the access token, so comparisons are constant-time over a fixed length.
    token_digest: RwLock<Option<[u8; 32]>>,
    metrics: MetricsSampler,
    pub shutdown: Notify,
    /// The template's processes, started by the first `/init`: a guest saved before it (a
    /// template's boot snapshot, restored by many sandboxes) holds none of them, so each
    /// sandbox's are its own, started after it got its own identity.
    pending_start: Mutex<Vec<StartRequest>>,
}

impl AppState {
    pub fn new(processes: Processes, defaults: Defaults, start: Vec<StartRequest>) -> Self {
        Self {
            processes,
            defaults: RwLock::new(defaults),
            token_digest: RwLock::default(),
            metrics: MetricsSampler::default(),
            shutdown: Notify::new(),
            pending_start: Mutex::new(start),
        }
    }

    /// Starts the template's processes that no `/init` has started yet.
    fn start_pending(&self) {
        let pending =
            std::mem::take(&mut *self.pending_start.lock().unwrap_or_else(|p| p.into_inner()));
        for request in &pending {
            self.start_at_boot(request);
        }
    }

    fn defaults(&self) -> Defaults {
        self.defaults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts one of the template's boot processes; one that cannot start is reported on the
    /// console and in the log, and the sandbox runs on without it.
    pub fn start_at_boot(&self, request: &StartRequest) {
        match self.processes.start(request, &self.defaults()) {
            Ok(process) => {
                tracing::info!(tag = %process.tag, pid = process.pid, cmd = %process.cmd, "started the template's process");
            }
            Err(error) => {
                let tag = request.tag.as_deref().unwrap_or_default();
                let _ = writeln!(
                    std::io::stdout(),
                    "envd: the template's process {tag} did not start: {error}"
                );
                tracing::error!(tag, %error, "the template's process did not start");
            }
        }
    }

    fn default_user(&self) -> Option<String> {
        self.defaults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .user
            .clone()
    }
}

type Shared = Arc<AppState>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Clock(#[from] ClockError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("no route for this method and path")]
    NoRoute,
    #[error("the `X-Access-Token` header is required")]
    MissingToken,
    #[error("the access token is not valid")]
    WrongToken,
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        use StatusCode as S;
        let invalid = (S::BAD_REQUEST, ErrorCode::InvalidRequest);
        let not_found = (S::NOT_FOUND, ErrorCode::NotFound);
        let conflict = (S::CONFLICT, ErrorCode::Conflict);
        let forbidden = (S::FORBIDDEN, ErrorCode::Forbidden);
        let internal = (S::INTERNAL_SERVER_ERROR, ErrorCode::InternalError);
        match self {
            Self::Process(e) => match e {
                ProcessError::User(UserError::UnknownUser(_)) => not_found,
                ProcessError::User(UserError::Unreadable { .. }) => internal,
                ProcessError::Invalid(_)
                | ProcessError::MissingCwd(_)
                | ProcessError::NotPty(_) => invalid,
                ProcessError::CommandNotFound(_) | ProcessError::NotFound(_) => not_found,
                ProcessError::PermissionDenied { .. } => forbidden,
                ProcessError::Exited(_)
                | ProcessError::TagInUse(_)
                | ProcessError::StdinClosed(_) => conflict,
                ProcessError::Spawn { .. } | ProcessError::Pty(_) | ProcessError::Io { .. } => {
                    internal
                }
            },
            Self::File(e) => match e {
                FileError::User(UserError::UnknownUser(_)) => not_found,
                FileError::User(UserError::Unreadable { .. }) => internal,
                FileError::InvalidPath(_)
                | FileError::IsDirectory(_)
                | FileError::NotDirectory(_)
                | FileError::TooMany(_)
                | FileError::Upload { .. } => invalid,
                FileError::NotFound(_) => not_found,
                FileError::Exists(_) => conflict,
                FileError::PermissionDenied(_) => forbidden,
                FileError::NoSpace(_) => (S::INSUFFICIENT_STORAGE, ErrorCode::InsufficientStorage),
                FileError::Io { .. } => internal,
            },
            Self::Clock(e) => match e {
                ClockError::OutOfRange(_) => invalid,
                ClockError::Read(_) | ClockError::Set { .. } => internal,
            },
            Self::Identity(e) => match e {
                IdentityError::Entropy | IdentityError::Hostname | IdentityError::MachineId => {
                    invalid
                }
                IdentityError::System { .. } | IdentityError::Io { .. } => internal,
            },
            Self::Port(_) => (S::BAD_GATEWAY, ErrorCode::PortClosed),
            Self::BadRequest(_) => invalid,
            Self::NoRoute => not_found,
            Self::MissingToken | Self::WrongToken => (S::UNAUTHORIZED, ErrorCode::Unauthorized),
            Self::Internal(_) => internal,
        }
    }

    fn detail(&self) -> ErrorBody {
        ErrorBody {
            code: self.status_and_code().1,
            message: self.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_code();
        // A port nobody listens on yet is the service's business, not envd's failure.
        if status.is_server_error() && !matches!(self, Self::Port(_)) {
            tracing::warn!(error = %self, "request failed");
        }
        (
            status,
            Json(ErrorEnvelope {
                error: self.detail(),
            }),
        )
            .into_response()
    }
}

/// `Json` whose rejections use the envd error envelope.
struct JsonBody<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| Self(v))
            .map_err(|e: JsonRejection| ApiError::BadRequest(e.body_text()))
    }
}

/// `Query` whose rejections use the envd error envelope.
struct QueryArgs<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Self(v))
            .map_err(|e: QueryRejection| ApiError::BadRequest(e.body_text()))
    }
}

/// A WebSocket upgrade whose rejection (a plain HTTP request) uses the envd error envelope.
struct Upgrade(WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(Self)
            .map_err(|e| {
                ApiError::BadRequest(format!(
                    "a WebSocket upgrade is required: {}",
                    e.body_text()
                ))
            })
    }
}

pub fn router(state: Shared) -> Router {
    let routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/init", post(init))
        .route("/envs", get(envs))
        .route("/shutdown", post(shutdown))
        .route("/processes", get(list_processes).post(start_process))
        .route("/processes/run", post(run_process))
        .route("/processes/attach", get(attach))
        .route("/processes/{selector}", axum::routing::delete(kill_process))
        .route("/processes/{selector}/signal", post(signal_process))
        .route("/processes/{selector}/stdin", post(write_stdin))
        .route("/processes/{selector}/close-stdin", post(close_stdin))
        .route("/processes/{selector}/resize", post(resize))
        .route("/files", get(download).put(upload))
        .route("/files/list", post(list_dir))
        .route("/files/stat", post(stat))
        .route("/files/mkdir", post(mkdir))
        .route("/files/remove", post(remove))
        .route("/files/move", post(move_path))
        .route("/files/watch", get(watch))
        .route("/ports/{port}/connect", get(connect_port))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async {
            ApiError::BadRequest("method not allowed for this path".into())
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state);
    // The agent forwards the control plane's request ID; envd records it in its request span.
    crate::request_id::layer(routes)
}

async fn require_token(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let expected = *state.token_digest.read().unwrap_or_else(|p| p.into_inner());
    if let Some(expected) = expected {
        let Some(presented) = request.headers().get(ACCESS_TOKEN_HEADER) else {
            return ApiError::MissingToken.into_response();
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if !bool::from(digest.ct_eq(&expected)) {
            return ApiError::WrongToken.into_response();
        }
    }
    next.run(request).await
}

async fn health() -> Json<Health> {
    Json(Health {
        version: crate::version::VERSION.to_owned(),
    })
}

async fn metrics(State(state): State<Shared>) -> Json<Metrics> {
    Json(state.metrics.sample())
}

async fn init(
    State(state): State<Shared>,
    JsonBody(request): JsonBody<InitRequest>,
) -> Result<StatusCode, ApiError> {
    if let Some(user) = &request.default_user {
        FileUser::resolve(Some(user))?;
    }
    if request.access_token.as_ref().map(SecretText::expose) == Some("") {
        return Err(ApiError::BadRequest(
            "`access_token` must not be empty".into(),
        ));
    }
    let wall_clock = request
        .wall_clock_unix_ms
        .map(WallClock::from_unix_ms)
        .transpose()?;
    let entropy = request
        .entropy
        .as_ref()
        .map(|hex| Entropy::from_hex(hex.expose()))
        .transpose()?;
    let hostname = request
        .hostname
        .as_deref()
        .map(Hostname::parse)
        .transpose()?;
    let machine_id = request
        .machine_id
        .as_deref()
        .map(MachineId::parse)
        .transpose()?;
    // Only when asked: envd also runs as a plain process on hosts, whose clock, random pool
    // and names are not its own.
    if let Some(wall_clock) = wall_clock {
        wall_clock.apply()?;
    }
    if let Some(entropy) = entropy {
        entropy.apply()?;
    }
    if let Some(hostname) = hostname {
        hostname.apply()?;
    }
    if let Some(machine_id) = machine_id {
        machine_id.apply()?;
    }
    {
        let mut defaults = state.defaults.write().unwrap_or_else(|p| p.into_inner());
        defaults.env.extend(request.env_vars);
        if request.default_user.is_some() {
            defaults.user = request.default_user;
        }
        if request.default_workdir.is_some() {
            defaults.workdir = request.default_workdir;
        }
    }
    if let Some(token) = request.access_token {
        *state
            .token_digest
            .write()
            .unwrap_or_else(|p| p.into_inner()) =
            Some(Sha256::digest(token.expose().as_bytes()).into());
    }
    state.start_pending();
    Ok(StatusCode::NO_CONTENT)
}

async fn envs(State(state): State<Shared>) -> Json<BTreeMap<String, String>> {
    Json(state.defaults().env)
}

async fn shutdown(State(state): State<Shared>) -> StatusCode {
    state.shutdown.notify_one();
    StatusCode::ACCEPTED
}

async fn run_process(
    State(state): State<Shared>,
    JsonBody(request): JsonBody<RunRequest>,
) -> Result<Json<RunResponse>, ApiError> {
    Ok(Json(
        state.processes.run(&request, &state.defaults()).await?,
    ))
}

async fn start_process(
    State(state): State<Shared>,
    JsonBody(request): JsonBody<StartRequest>,
) -> Result<(StatusCode, Json<StartResponse>), ApiError> {
    let process = state.processes.start(&request, &state.defaults())?;
    let response = StartResponse {
        pid: process.pid,
        tag: process.tag.clone(),
        cmd: process.cmd.clone(),
    };
    Ok((StatusCode::ACCEPTED, Json(response)))
}

async fn list_processes(State(state): State<Shared>) -> Json<ProcessList> {
    Json(ProcessList {
        processes: state.processes.list(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillQuery {
    signal: Option<String>,
}

async fn kill_process(
    State(state): State<Shared>,
    Path(selector): Path<String>,
    QueryArgs(query): QueryArgs<KillQuery>,
) -> Result<StatusCode, ApiError> {
    let signal = parse_signal(query.signal.as_deref().unwrap_or("SIGKILL"))?;
    state.processes.signal(&selector, signal)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn signal_process(
    State(state): State<Shared>,
    Path(selector): Path<String>,
    JsonBody(request): JsonBody<SignalRequest>,
) -> Result<StatusCode, ApiError> {
    state
        .processes
        .signal(&selector, parse_signal(&request.signal)?)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn write_stdin(
    State(state): State<Shared>,
    Path(selector): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    state.processes.write_stdin(&selector, &body).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn close_stdin(
    State(state): State<Shared>,
    Path(selector): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.processes.close_stdin(&selector).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn resize(
    State(state): State<Shared>,
    Path(selector): Path<String>,
    JsonBody(size): JsonBody<PtySize>,
) -> Result<StatusCode, ApiError> {
    state.processes.resize(&selector, size)?;
    Ok(StatusCode::NO_CONTENT)
}

/// A tunnel to a port on the guest's loopback: `101 Switching Protocols`
/// ([`PORT_TUNNEL_PROTOCOL`]) once the port accepted, then the connection's bytes both ways.
async fn connect_port(
    Path(port): Path<String>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let port: u16 = port
        .parse()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| ApiError::BadRequest(format!("`{port}` is not a TCP port")))?;
    let asked = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(PORT_TUNNEL_PROTOCOL));
    if !asked {
        return Err(ApiError::BadRequest(format!(
            "`Upgrade: {PORT_TUNNEL_PROTOCOL}` is required"
        )));
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    let mut service = ports::dial_loopback(port).await?;
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut client = hyper_util::rt::TokioIo::new(upgraded);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut service).await;
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PORT_TUNNEL_PROTOCOL)
        .body(Body::empty())
        .expect("static headers are valid"))
}

async fn attach(State(state): State<Shared>, Upgrade(upgrade): Upgrade) -> Response {
    upgrade.on_upgrade(move |socket| attach_session(socket, state))
}

fn text(message: &impl serde::Serialize) -> Message {
    Message::Text(serde_json::to_string(message).unwrap_or_default().into())
}

/// How long a new attach connection may take to say what it wants.
const FIRST_MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn first_request(socket: &mut WebSocket) -> Result<AttachRequest, ApiError> {
    tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, read_first_request(socket))
        .await
        .map_err(|_| ApiError::BadRequest("no start or connect message within 30 s".into()))?
}

async fn read_first_request(socket: &mut WebSocket) -> Result<AttachRequest, ApiError> {
    loop {
        match socket.recv().await {
            Some(Ok(Message::Text(body))) => {
                return serde_json::from_str(&body).map_err(|e| {
                    ApiError::BadRequest(format!("first message must be start or connect: {e}"))
                });
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => {
                return Err(ApiError::BadRequest(
                    "expected a start or connect message".into(),
                ))
            }
        }
    }
}

/// One client attached to one process: output flows to the client while a separate task applies
/// the client's input, so a process that is blocked writing output never blocks its own stdin.
async fn attach_session(mut socket: WebSocket, state: Shared) {
    let process = match first_request(&mut socket)
        .await
        .and_then(|request| match request {
            AttachRequest::Start(start) => Ok(state.processes.start(&start, &state.defaults())?),
            AttachRequest::Connect { selector } => Ok(state.processes.find(&selector)?),
        }) {
        Ok(process) => process,
        Err(error) => {
            let _ = socket
                .send(text(&ServerMessage::Error(error.detail())))
                .await;
            let _ = socket.close().await;
            return;
        }
    };
    let selector = process.pid.to_string();
    let mut reader = process.output.reader();
    let (mut sink, mut stream) = socket.split();
    if sink
        .send(text(&ServerMessage::Start {
            pid: process.pid,
            tag: process.tag.clone(),
        }))
        .await
        .is_err()
    {
        return;
    }
    let (replies, mut replies_rx) = mpsc::channel::<ServerMessage>(16);
    let input_state = state.clone();
    let input = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let outcome = match message {
                Message::Binary(data) => input_state.processes.write_stdin(&selector, &data).await,
                Message::Text(body) => match serde_json::from_str::<ClientMessage>(&body) {
                    Ok(command) => apply(&input_state.processes, &selector, command).await,
                    Err(e) => Err(ProcessError::Invalid(format!("unknown message: {e}"))),
                },
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => Ok(()),
            };
            if let Err(error) = outcome {
                let detail = ApiError::from(error).detail();
                if replies.send(ServerMessage::Error(detail)).await.is_err() {
                    break;
                }
            }
        }
    });
    loop {
        tokio::select! {
            item = reader.next() => {
                let message = match item {
                    Some(LogItem::Data(kind, data)) => {
                        let tag = match kind {
                            StreamKind::Stdout => FRAME_STDOUT,
                            StreamKind::Stderr => FRAME_STDERR,
                            StreamKind::Pty => FRAME_PTY,
                        };
                        let mut frame = Vec::with_capacity(data.len() + 1);
                        frame.push(tag);
                        frame.extend_from_slice(&data);
                        Message::Binary(frame.into())
                    }
                    Some(LogItem::Lost(bytes)) => text(&ServerMessage::Lost { bytes }),
                    Some(LogItem::Exit(exit)) => text(&ServerMessage::Exit(exit)),
                    None => break,
                };
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            reply = replies_rx.recv() => match reply {
                Some(reply) => if sink.send(text(&reply)).await.is_err() { break },
                // The client went away: detach, the process keeps running.
                None => break,
            },
        }
    }
    input.abort();
    let _ = sink.close().await;
}

async fn apply(
    processes: &Processes,
    selector: &str,
    command: ClientMessage,
) -> Result<(), ProcessError> {
    match command {
        ClientMessage::CloseStdin => processes.close_stdin(selector).await,
        ClientMessage::Signal { signal } => processes.signal(selector, parse_signal(&signal)?),
        ClientMessage::Kill => processes.signal(selector, nix::sys::signal::Signal::SIGKILL),
        ClientMessage::Resize { cols, rows } => processes.resize(selector, PtySize { cols, rows }),
    }
}

fn file_user(state: &AppState, user: Option<String>) -> Result<FileUser, ApiError> {
    Ok(FileUser::resolve(
        user.or_else(|| state.default_user()).as_deref(),
    )?)
}

/// Runs a blocking filesystem operation off the runtime thread.
async fn blocking<T: Send + 'static>(
    operation: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(operation)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

async fn download(
    State(state): State<Shared>,
    QueryArgs(query): QueryArgs<FileQuery>,
) -> Result<Response, ApiError> {
    let user = file_user(&state, query.user)?;
    let path = user.path(&query.path)?;
    let (file, size) = user.open_read(&path).await?;
    let body = Body::from_stream(ReaderStream::with_capacity(file, DOWNLOAD_CHUNK));
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, size.into());
    Ok((headers, body).into_response())
}

async fn upload(
    State(state): State<Shared>,
    QueryArgs(query): QueryArgs<FileQuery>,
    body: Body,
) -> Result<Json<EntryInfo>, ApiError> {
    let user = file_user(&state, query.user)?;
    let path = user.path(&query.path)?;
    Ok(Json(user.write(&path, body.into_data_stream()).await?))
}

async fn list_dir(
    State(state): State<Shared>,
    JsonBody(request): JsonBody<ListRequest>,
) -> Result<Json<ListResponse>, ApiError> {
    let user = file_user(&state, request.user)?;
    let path = user.path(&request.path)?;
    let depth = request.depth.unwrap_or(1);
    let entries = blocking(move || user.list(&path, depth)).await?;
    Ok(Json(ListResponse { entries }))
}

async fn stat(
    State(state): State<Shared>,
    JsonBody(request): JsonBody<PathRequest>,
) -> Result<Json<EntryInfo>, ApiError> {
    let user = file_user(&state, request.user)?;
    let path = user.path(&request.path)?;
    Ok(Json(blocking(move || user.entry(&path)).await?))
}

async fn mkdir(
    State(state): State<Shared>,
    JsonBody(request): JsonBody<PathRequest>,
) -> Result<Json<EntryInfo>, ApiError> {
    let user = file_user(&state, request.user)?;
    let path = user.path(&request.path)?;
    Ok(Json(blocking(move || user.mkdir(&path)).await?))
}

async fn remove(
    State(state): State<Shared>,
    JsonBody(request): JsonBody<PathRequest>,
) -> Result<StatusCode, ApiError> {
    let user = file_user(&state, request.user)?;
    let path = user.path(&request.path)?;
    blocking(move || user.remove(&path)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn move_path(
    State(state): State<Shared>,
    JsonBody(request): JsonBody<MoveRequest>,
) -> Result<Json<EntryInfo>, ApiError> {
    let user = file_user(&state, request.user)?;
    let from = user.path(&request.from)?;
    let to = user.path(&request.to)?;
    Ok(Json(blocking(move || user.rename(&from, &to)).await?))
}

async fn watch(
    State(state): State<Shared>,
    QueryArgs(query): QueryArgs<FileQuery>,
    Upgrade(upgrade): Upgrade,
) -> Result<Response, ApiError> {
    let user = file_user(&state, query.user)?;
    let path = user.path(&query.path)?;
    let watch = DirWatch::start(&path, query.recursive.unwrap_or(false))?;
    Ok(upgrade.on_upgrade(move |socket| watch_session(socket, watch)))
}

async fn watch_session(mut socket: WebSocket, mut watch: DirWatch) {
    loop {
        tokio::select! {
            event = watch.next() => {
                let Some(event) = event else { break };
                if socket.send(text(&event)).await.is_err() {
                    break;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
}
