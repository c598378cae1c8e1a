//! A stand-in for `wrenn agent` until the real one (with VMs) runs in these tests: an in-process
//! HTTP server implementing the host agent contract (/work/agent-api-contract.md, summarised in
//! docs/architecture.md) faithfully, where each "sandbox" is a real `wrenn envd` process on
//! loopback. Requests are validated against the contract's shapes (bearer secret, unknown fields
//! rejected, status codes); only the VM is missing. To swap in the real agent, register a real
//! `wrenn agent` with the control plane instead of [`AgentDouble::start`]: the tests talk to it
//! only through the control plane.
//!
//! Test controls: [`AgentDouble::go_offline`]/[`AgentDouble::go_online`] (a partition: the port
//! refuses connections, sandboxes survive), [`AgentDouble::forget`] (what the idle reaper does),
//! [`AgentDouble::fail_next_create`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message as UpMessage;
use wrenn::testing::envd::EnvdProcess;

/// The contract's create body; unknown fields are rejected like the real agent does.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub sandbox_id: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
    pub timeout_sec: u32,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    #[serde(default)]
    pub user: Option<String>,
}

struct Sandbox {
    info: Value,
    envd: EnvdProcess,
}

struct Inner {
    secret: Mutex<String>,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    fail_next_create: AtomicBool,
    creates: AtomicUsize,
    binary: std::path::PathBuf,
    http: Client<HttpConnector, Body>,
}

#[derive(Clone)]
struct Shared(Arc<Inner>);

pub struct AgentDouble {
    shared: Shared,
    pub addr: SocketAddr,
    serving: Mutex<Option<JoinSet<()>>>,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// `Authorization: Bearer <agent secret>` or 401.
struct Authorized;

impl FromRequestParts<Shared> for Authorized {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Shared,
    ) -> Result<Self, Response> {
        let want = format!("Bearer {}", state.0.secret.lock().unwrap());
        match parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            Some(got) if got == want => Ok(Authorized),
            _ => Err(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "bad agent secret",
            )),
        }
    }
}

impl AgentDouble {
    /// Starts on a free loopback port; the secret is set once the host has registered.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Shared(Arc::new(Inner {
            secret: Mutex::new(String::new()),
            sandboxes: Mutex::new(HashMap::new()),
            fail_next_create: AtomicBool::new(false),
            creates: AtomicUsize::new(0),
            binary: Path::new(env!("CARGO_BIN_EXE_wrenn")).to_path_buf(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }));
        let double = Self {
            shared,
            addr,
            serving: Mutex::new(None),
        };
        double.serve(listener);
        double
    }

    pub fn set_secret(&self, secret: &str) {
        *self.shared.0.secret.lock().unwrap() = secret.to_owned();
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn sandbox_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .shared
            .0
            .sandboxes
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// Where the sandbox's envd listens, for calls that bypass the control plane.
    pub fn envd_url(&self, id: &str) -> Option<String> {
        self.shared
            .0
            .sandboxes
            .lock()
            .unwrap()
            .get(id)
            .map(|s| s.envd.url())
    }

    /// Successful and failed create calls received.
    pub fn create_calls(&self) -> usize {
        self.shared.0.creates.load(Ordering::SeqCst)
    }

    pub fn fail_next_create(&self) {
        self.shared.0.fail_next_create.store(true, Ordering::SeqCst);
    }

    /// Drops a sandbox as the idle reaper would.
    pub fn forget(&self, id: &str) -> bool {
        self.shared.0.sandboxes.lock().unwrap().remove(id).is_some()
    }

    /// Adds a sandbox the control plane never asked for (left from an earlier life).
    pub async fn adopt(&self, id: &str) {
        let sandbox = spawn_sandbox(
            &self.shared,
            &CreateBody {
                sandbox_id: id.to_owned(),
                template: "minimal".into(),
                vcpus: 1,
                memory_mb: 512,
                disk_mb: 5120,
                timeout_sec: 0,
                envs: BTreeMap::new(),
                user: None,
            },
        )
        .await;
        self.shared
            .0
            .sandboxes
            .lock()
            .unwrap()
            .insert(id.to_owned(), sandbox);
    }

    /// Stops answering: every open connection is cut and the port refuses new ones.
    pub fn go_offline(&self) {
        if let Some(mut tasks) = self.serving.lock().unwrap().take() {
            tasks.abort_all();
        }
    }

    /// Answers again on the same port, with the sandboxes it had.
    pub async fn go_online(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let router = Router::new()
            .route("/v1/ping", get(ping))
            .route("/v1/sandboxes", post(create).get(list))
            .route("/v1/sandboxes/{id}", get(get_one).delete(destroy))
            .route("/v1/sandboxes/{id}/ping", post(ping_sandbox))
            .route("/v1/sandboxes/{id}/envd/{*path}", any(envd_proxy))
            .with_state(self.shared.clone());
        let mut tasks = JoinSet::new();
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let accepted = connections.clone();
        tasks.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                accepted.lock().unwrap().spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        // Aborting `tasks` drops the accept loop, which owns the connections' JoinSet.
        drop(connections);
        *self.serving.lock().unwrap() = Some(tasks);
    }
}

impl Drop for AgentDouble {
    fn drop(&mut self) {
        self.go_offline();
    }
}

fn info(body: &CreateBody, status: &str) -> Value {
    let now = chrono::Utc::now().to_rfc3339();
    json!({
        "sandbox_id": body.sandbox_id, "status": status, "template": body.template,
        "vcpus": body.vcpus, "memory_mb": body.memory_mb, "disk_mb": body.disk_mb,
        "timeout_sec": body.timeout_sec, "created_at": now, "last_active_at": now,
        "guest_addr": "10.11.0.2",
        "metadata": {"vmm": "double", "vmm_version": "0", "agent_version": "double", "envd_version": env!("CARGO_PKG_VERSION")}
    })
}

async fn spawn_sandbox(shared: &Shared, body: &CreateBody) -> Sandbox {
    let binary = shared.0.binary.clone();
    let envd = tokio::task::spawn_blocking(move || EnvdProcess::start(&binary))
        .await
        .unwrap()
        .expect("envd starts");
    Sandbox {
        info: info(body, "running"),
        envd,
    }
}

async fn ping(_: Authorized, State(shared): State<Shared>) -> Json<Value> {
    let count = shared.0.sandboxes.lock().unwrap().len();
    Json(
        json!({"status": "ok", "host_id": "host-double", "version": "double", "vmm": "double", "sandboxes": count}),
    )
}

async fn create(_: Authorized, State(shared): State<Shared>, body: axum::body::Bytes) -> Response {
    shared.0.creates.fetch_add(1, Ordering::SeqCst);
    let body: CreateBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
    };
    let well_formed = body.sandbox_id.starts_with("cl-")
        && body.sandbox_id.len() == 28
        && body.vcpus > 0
        && body.memory_mb > 0
        && body.disk_mb > 0;
    if !well_formed {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "malformed create request",
        );
    }
    if body.template != "minimal" {
        return error(
            StatusCode::NOT_FOUND,
            "template_not_found",
            "no such template on this host",
        );
    }
    if shared.0.fail_next_create.swap(false, Ordering::SeqCst) {
        return error(
            StatusCode::BAD_GATEWAY,
            "agent_error",
            "boot failed at step `start vmm` (injected)",
        );
    }
    if shared
        .0
        .sandboxes
        .lock()
        .unwrap()
        .contains_key(&body.sandbox_id)
    {
        return error(StatusCode::CONFLICT, "conflict", "sandbox exists");
    }
    let sandbox = spawn_sandbox(&shared, &body).await;
    let info = sandbox.info.clone();
    shared
        .0
        .sandboxes
        .lock()
        .unwrap()
        .insert(body.sandbox_id.clone(), sandbox);
    (StatusCode::CREATED, Json(info)).into_response()
}

async fn list(_: Authorized, State(shared): State<Shared>) -> Json<Value> {
    let sandboxes: Vec<Value> = shared
        .0
        .sandboxes
        .lock()
        .unwrap()
        .values()
        .map(|s| s.info.clone())
        .collect();
    Json(json!({"sandboxes": sandboxes}))
}

async fn get_one(
    _: Authorized,
    State(shared): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match shared.0.sandboxes.lock().unwrap().get(&id) {
        Some(s) => Json(s.info.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "no such sandbox"),
    }
}

async fn destroy(
    _: Authorized,
    State(shared): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match shared.0.sandboxes.lock().unwrap().remove(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "no such sandbox"),
    }
}

async fn ping_sandbox(
    _: Authorized,
    State(shared): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match shared.0.sandboxes.lock().unwrap().get(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "no such sandbox"),
    }
}

/// The transparent proxy to the sandbox's envd, WebSocket upgrades included.
async fn envd_proxy(
    _: Authorized,
    State(shared): State<Shared>,
    UrlPath((id, path)): UrlPath<(String, String)>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    request: Request,
) -> Response {
    let Some(base) = shared
        .0
        .sandboxes
        .lock()
        .unwrap()
        .get(&id)
        .map(|s| s.envd.url())
    else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such sandbox");
    };
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    if let Ok(upgrade) = upgrade {
        let url = format!("{}/{path}{query}", base.replacen("http://", "ws://", 1));
        return upgrade.on_upgrade(move |client| async move {
            let Ok((envd, _)) = tokio_tungstenite::connect_async(url).await else {
                return;
            };
            let (mut envd_tx, mut envd_rx) = envd.split();
            let (mut client_tx, mut client_rx) = client.split();
            let up = async {
                while let Some(Ok(message)) = client_rx.next().await {
                    let message = match message {
                        Message::Text(t) => UpMessage::Text(t.as_str().into()),
                        Message::Binary(b) => UpMessage::Binary(b),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if envd_tx.send(message).await.is_err() {
                        break;
                    }
                }
                let _ = envd_tx.close().await;
            };
            let down = async {
                while let Some(Ok(message)) = envd_rx.next().await {
                    let message = match message {
                        UpMessage::Text(t) => Message::Text(t.as_str().into()),
                        UpMessage::Binary(b) => Message::Binary(b),
                        UpMessage::Close(_) => break,
                        _ => continue,
                    };
                    if client_tx.send(message).await.is_err() {
                        break;
                    }
                }
                let _ = client_tx.close().await;
            };
            tokio::select! { () = up => {}, () = down => {} }
        });
    }
    let (parts, body) = request.into_parts();
    let mut forward = hyper::Request::builder()
        .method(parts.method)
        .uri(format!("{base}/{path}{query}"));
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
    ] {
        if let Some(value) = parts.headers.get(&name) {
            forward = forward.header(name, value);
        }
    }
    match shared.0.http.request(forward.body(body).unwrap()).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            Response::from_parts(parts, Body::new(body.map_err(axum::Error::new)))
        }
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "agent_error",
            &format!("envd unreachable: {e}"),
        ),
    }
}
