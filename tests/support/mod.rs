//! Shared by the control-plane integration tests: an in-process control plane on a free port
//! over a private PostgreSQL cluster, a small HTTP client, and the OpenAPI schema checker.

#![allow(dead_code)]

pub mod agent;
pub mod schema;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wrenn::cp::ca;
use wrenn::cp::monitor::MonitorSettings;
use wrenn::cp::state::{AppState, AuthSettings, CapsuleSettings};
use wrenn::cp::tokens::TokenKeys;
use wrenn::db::{self, migrate, Db};
use wrenn_test_support::pg::PgCluster;

pub const JWT_SECRET: &[u8] = b"integration-test-secret-0123456789abcdef";

/// Runs `wrenn::cp::run` on `listener` until the returned sender fires; the CA is loaded
/// before this returns, as `run` would load it.
async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    monitor: MonitorSettings,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    state
        .ca
        .install(std::sync::Arc::new(
            ca::load_or_create(&state.db).await.expect("the CA loads"),
        ))
        .unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        wrenn::cp::run(listener, state, monitor, async {
            let _ = rx.await;
        })
        .await
        .expect("server runs");
    });
    (tx, server)
}

pub struct TestCp {
    pub pg: PgCluster,
    pub db: Db,
    pub addr: SocketAddr,
    pub state: AppState,
    client: Client<HttpConnector, Full<Bytes>>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

/// The monitor of a default server: slow enough never to interfere with a test.
pub const QUIET_MONITOR: MonitorSettings = MonitorSettings {
    interval: Duration::from_secs(3600),
    unreachable_after: Duration::from_secs(3600),
};

/// Capsule settings whose reconciler and usage metering never run on their own, so that tests
/// call `reconciler::reconcile_once` and `db::usage::sample` when they choose.
pub fn quiet_capsules() -> CapsuleSettings {
    CapsuleSettings {
        reconcile_interval: Duration::from_secs(3600),
        usage_sample_interval: Duration::from_secs(3600),
        ..CapsuleSettings::default()
    }
}

impl TestCp {
    pub async fn start() -> Self {
        Self::start_with(QUIET_MONITOR).await
    }

    pub async fn start_with(monitor: MonitorSettings) -> Self {
        Self::start_configured(monitor, AuthSettings::default()).await
    }

    pub async fn start_configured(monitor: MonitorSettings, auth: AuthSettings) -> Self {
        Self::start_full(monitor, quiet_capsules(), auth).await
    }

    /// A server with its own agent timeouts, scheduler, reconciler period and login limits. Its
    /// agents run on this machine, so hosts may register loopback addresses.
    pub async fn start_full(
        monitor: MonitorSettings,
        capsules: CapsuleSettings,
        mut auth: AuthSettings,
    ) -> Self {
        auth.host_addresses.allow_loopback = true;
        Self::start_exactly(monitor, capsules, auth).await
    }

    /// A server that refuses loopback host addresses, as in production.
    pub async fn start_refusing_loopback() -> Self {
        Self::start_exactly(QUIET_MONITOR, quiet_capsules(), AuthSettings::default()).await
    }

    async fn start_exactly(
        monitor: MonitorSettings,
        capsules: CapsuleSettings,
        auth: AuthSettings,
    ) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("wrenn=warn")
            .with_test_writer()
            .try_init();
        let pg = tokio::task::spawn_blocking(PgCluster::start)
            .await
            .unwrap()
            .expect("postgres starts");
        let db = db::connect_lazy(&pg.url()).unwrap();
        migrate::up(&db).await.expect("migrations apply");
        let state = AppState::with_settings(
            db.clone(),
            TokenKeys::new(JWT_SECRET).unwrap(),
            capsules,
            auth,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, server) = serve(listener, state.clone(), monitor).await;
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            pg,
            db,
            addr,
            state,
            client,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Restarts the server on the same address and database with other token keys, as an
    /// operator rotating the JWT secret restarts the control plane. Agents keep their saved
    /// URL; the CA stays (it lives in the database).
    pub async fn restart_with_tokens(&mut self, tokens: TokenKeys) {
        self.shutdown_server().await;
        let mut auth = AuthSettings::default();
        auth.host_addresses.allow_loopback = true;
        let state = AppState::with_settings(self.db.clone(), tokens, quiet_capsules(), auth);
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        let (tx, server) = serve(listener, state.clone(), QUIET_MONITOR).await;
        self.state = state;
        self.shutdown = Some(tx);
        self.server = Some(server);
    }

    async fn shutdown_server(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }

    /// The control plane's client identity and CA, for calling its agents directly.
    pub fn agent_tls(&self) -> agent::AgentTls {
        let ca = self.state.ca.get().unwrap();
        let (cert_pem, key_pem) = ca.issue_client_pem().unwrap();
        agent::AgentTls {
            cert_pem,
            key_pem: key_pem.expose().to_owned(),
            ca_pem: ca.cert_pem().to_owned(),
        }
    }

    /// Sends a request and returns the status and the body parsed as JSON (`Null` when empty,
    /// a JSON string when not JSON).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let (status, _, value) = self
            .raw_with_headers(method, path, headers, content_type, body)
            .await;
        (status, value)
    }

    /// [`TestCp::raw`] with the response headers.
    pub async fn raw_with_headers(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, hyper::HeaderMap, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let response = self
            .client
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let response_headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, response_headers, value)
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        auth: &Auth,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let headers = auth.headers();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match body {
            Some(body) => {
                self.raw(
                    method,
                    path,
                    &headers,
                    Some("application/json"),
                    serde_json::to_vec(&body).unwrap(),
                )
                .await
            }
            None => self.raw(method, path, &headers, None, Vec::new()).await,
        }
    }

    /// Signs up a user and returns their session.
    pub async fn signup(&self, email: &str) -> User {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/auth/signup",
                &Auth::None,
                Some(json!({"email": email, "password": "correct horse battery", "name": "Test User"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        User::from_auth(&body)
    }

    /// Creates a host as `creator` (`body` as for `POST /v1/hosts`) and registers a machine for it
    /// with [`register_body`], without an agent behind it; returns (host id, credentials body).
    pub async fn registered_host(&self, creator: &User, body: Value) -> (String, Value) {
        let (status, created) = self
            .call(Method::POST, "/v1/hosts", &creator.auth(), Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let token = created["registration_token"].as_str().unwrap();
        let creds = self.register(token).await;
        (created["host"]["id"].as_str().unwrap().to_owned(), creds)
    }

    /// Registers a machine with a one-time token; returns the credentials body.
    pub async fn register(&self, registration_token: &str) -> Value {
        let (status, creds) = self
            .call(
                Method::POST,
                "/v1/hosts/register",
                &Auth::None,
                Some(register_body(registration_token)),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{creds}");
        creds
    }

    /// Switches `user` to `team` and returns the new session.
    pub async fn switch(&self, user: &User, team: &str) -> User {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/auth/switch-team",
                &user.auth(),
                Some(json!({"team_id": team})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        User::from_auth(&body)
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub token: String,
    pub id: String,
    pub team: String,
    pub email: String,
}

impl User {
    pub fn from_auth(body: &Value) -> Self {
        Self {
            token: body["token"].as_str().unwrap().to_owned(),
            id: body["user_id"].as_str().unwrap().to_owned(),
            team: body["team_id"].as_str().unwrap().to_owned(),
            email: body["email"].as_str().unwrap().to_owned(),
        }
    }

    pub fn auth(&self) -> Auth {
        Auth::Bearer(self.token.clone())
    }
}

#[derive(Debug, Clone)]
pub enum Auth {
    None,
    Bearer(String),
    ApiKey(String),
    Host(String),
}

impl Auth {
    fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Auth::None => vec![],
            Auth::Bearer(t) => vec![("authorization", format!("Bearer {t}"))],
            Auth::ApiKey(k) => vec![("x-api-key", k.clone())],
            Auth::Host(t) => vec![("x-host-token", t.clone())],
        }
    }
}

/// How a machine of 8 cores, 32 GiB and 500 GB registers with a one-time token.
pub fn register_body(token: &str) -> Value {
    json!({"token": token, "arch": "x86_64", "cpu_cores": 8, "memory_mb": 32768, "disk_gb": 500,
           "address": "10.0.0.5:50051", "versions": {"agent": "0.1.0"}})
}

/// Asserts the error envelope and its code.
pub fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// `wrenn cp serve` as its own process over a test control plane's database: a second replica
/// (the control plane is stateless), whose memory is measured apart from the test's.
pub struct CpReplica {
    pub addr: SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl CpReplica {
    pub async fn start(cp: &TestCp) -> Self {
        Self::start_with_env(cp, &[]).await
    }

    /// A replica with more environment variables (configuration) than the defaults.
    pub async fn start_with_env(cp: &TestCp, env: &[(&str, &str)]) -> Self {
        let addr: SocketAddr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        // An empty working directory, so no stray wrenn.toml is read.
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_wrenn"))
            .args(["cp", "serve"])
            .current_dir(dir.path())
            .env("DATABASE_URL", cp.pg.url())
            .env("JWT_SECRET", std::str::from_utf8(JWT_SECRET).unwrap())
            .env("CP_ALLOW_LOOPBACK_HOSTS", "true")
            .env("CP_LISTEN_ADDR", addr.to_string())
            .env("CP_RECONCILE_INTERVAL_SECS", "3600")
            .env("LOG_LEVEL", "wrenn=warn")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut replica = Self {
            addr,
            child,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let health = cp
                .client
                .request(
                    Request::get(format!("http://{addr}/health"))
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await;
            if health.is_ok_and(|r| r.status() == StatusCode::OK) {
                return replica;
            }
            if let Some(status) = replica.child.try_wait().unwrap() {
                panic!("the control-plane replica exited: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replica did not answer /health"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for CpReplica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
