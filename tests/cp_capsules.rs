//! The capsule API end to end with real parts: a control plane over a private PostgreSQL, hosts
//! registered through the API and run by real `wrenn agent` processes, and every capsule a
//! QEMU/TCG microVM running `envd`. Covers the lifecycle, exec/processes/files/WebSockets
//! through to envd, 100 MiB streamed each way with the control plane's memory bounded,
//! scheduling over two agents, concurrent creates, team isolation, bad input, failed creates,
//! host loss and the reconciler. Every test ends by showing its agents left nothing behind.

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use support::agent::{add_agent, peak_rss_kib, wait_clean, Agent, VM_TURNS};
use support::schema::Spec;
use support::{assert_error, quiet_capsules, Auth, TestCp, User};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use wrenn::cp::agent_client::{AgentClient, AgentTimeouts};
use wrenn::cp::monitor::MonitorSettings;
use wrenn::cp::reconciler;
use wrenn::cp::state::CapsuleSettings;

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const DELETE: Method = Method::DELETE;
const PUT: Method = Method::PUT;

/// Long enough for a TCG guest booting beside another test's.
const FRAME_WAIT: Duration = Duration::from_secs(60);

struct Stack {
    cp: TestCp,
    admin: User,
    _turn: tokio::sync::SemaphorePermit<'static>,
}

impl Stack {
    async fn start() -> Self {
        Self::start_on(TestCp::start().await).await
    }

    async fn start_on(cp: TestCp) -> Self {
        let turn = VM_TURNS.acquire().await.unwrap();
        let admin = cp.signup("admin@example.com").await;
        Self {
            cp,
            admin,
            _turn: turn,
        }
    }

    /// Registers a regular host run by a real agent.
    async fn host(&self) -> Agent {
        add_agent(&self.cp, &self.admin.auth()).await.0
    }

    /// A host whose machine the scheduler believes to be this size: the test overrides what the
    /// agent registered so that placement and capacity are deterministic.
    async fn host_sized(&self, cores: i32, memory_mb: i64, disk_gb: i64) -> Agent {
        let agent = self.host().await;
        let updated = sqlx::query(
            "UPDATE hosts SET cpu_cores = $1, memory_mb = $2, disk_gb = $3 WHERE address = $4",
        )
        .bind(cores)
        .bind(memory_mb)
        .bind(disk_gb)
        .bind(format!("127.0.0.1:{}", agent.port))
        .execute(&self.cp.db)
        .await
        .unwrap();
        assert_eq!(updated.rows_affected(), 1);
        agent
    }

    /// Sets every host's status, as the heartbeat monitor would.
    async fn set_hosts(&self, status: &str) {
        sqlx::query("UPDATE hosts SET status = $1")
            .bind(status)
            .execute(&self.cp.db)
            .await
            .unwrap();
    }

    async fn api_key(&self, user: &User) -> Auth {
        let (status, key) = self
            .cp
            .call(
                POST,
                "/v1/api-keys",
                &user.auth(),
                Some(json!({"name": "sdk"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        Auth::ApiKey(key["key"].as_str().unwrap().to_owned())
    }

    async fn create(&self, auth: &Auth, body: Value) -> (StatusCode, Value) {
        self.cp.call(POST, "/v1/capsules", auth, Some(body)).await
    }

    async fn created(&self, auth: &Auth) -> String {
        let (status, capsule) = self.create(auth, json!({})).await;
        assert_eq!(status, StatusCode::CREATED, "{capsule}");
        capsule["id"].as_str().unwrap().to_owned()
    }

    async fn status_of(&self, auth: &Auth, id: &str) -> Value {
        let (status, capsule) = self
            .cp
            .call(GET, &format!("/v1/capsules/{id}"), auth, None)
            .await;
        assert_eq!(status, StatusCode::OK, "{capsule}");
        capsule["status"].clone()
    }

    /// Waits until capsule `id` has status `want` (the monitor and reconciler run on their own).
    async fn await_status(&self, auth: &Auth, id: &str, want: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.status_of(auth, id).await;
            if status == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} stayed {status}, never {want}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn exec(&self, auth: &Auth, id: &str, script: &str) -> (StatusCode, Value) {
        self.cp
            .call(
                POST,
                &format!("/v1/capsules/{id}/exec"),
                auth,
                Some(json!({"cmd": "/bin/sh", "args": ["-c", script]})),
            )
            .await
    }

    /// Sends a multipart upload of `data` to `path`.
    async fn upload(
        &self,
        auth: &Auth,
        id: &str,
        route: &str,
        path: &str,
        data: &[u8],
    ) -> (StatusCode, Value) {
        let boundary = "wrenn-test-boundary";
        let mut body = multipart_head(boundary, path);
        body.extend_from_slice(data);
        body.extend_from_slice(multipart_tail(boundary).as_bytes());
        let headers = auth_headers(auth);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let content_type = format!("multipart/form-data; boundary={boundary}");
        self.cp
            .raw(
                POST,
                &format!("/v1/capsules/{id}/files/{route}"),
                &headers,
                Some(&content_type),
                body,
            )
            .await
    }

    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.cp.addr)
    }

    /// Destroys what the agents still run, shows nothing is left on the host, and stops.
    async fn finish(self, agents: Vec<Agent>) {
        for agent in &agents {
            for id in agent.sandbox_ids() {
                let (status, body) = agent.call(DELETE, &format!("/v1/sandboxes/{id}"), None);
                assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
            }
            wait_clean(agent);
        }
        drop(agents);
        self.cp.stop().await;
    }
}

fn multipart_head(boundary: &str, path: &str) -> Vec<u8> {
    format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{path}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes()
}

fn multipart_tail(boundary: &str) -> String {
    format!("\r\n--{boundary}--\r\n")
}

fn auth_headers(auth: &Auth) -> Vec<(&'static str, String)> {
    match auth {
        Auth::None => vec![],
        Auth::Bearer(t) => vec![("authorization", format!("Bearer {t}"))],
        Auth::ApiKey(k) => vec![("x-api-key", k.clone())],
        Auth::Host(t) => vec![("x-host-token", t.clone())],
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(url: &str, auth: &Auth) -> Result<Ws, StatusCode> {
    let mut request = url.into_client_request().unwrap();
    for (name, value) in auth_headers(auth) {
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status()),
        Err(other) => panic!("WebSocket failed: {other}"),
    }
}

async fn send(ws: &mut Ws, value: Value) {
    ws.send(Message::Text(value.to_string().into()))
        .await
        .unwrap();
}

/// The server's JSON frames until it closes (ignoring pings), with a deadline.
async fn frames_until_close(ws: &mut Ws) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + FRAME_WAIT;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, ws.next()).await {
        match message {
            Ok(Message::Text(text)) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] != "ping" {
                    out.push(value);
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            _ => {}
        }
    }
    out
}

/// What a terminal printed: its `output` frames' data, decoded and joined.
fn terminal_output(frames: &[Value]) -> String {
    let bytes: Vec<u8> = frames
        .iter()
        .filter(|f| f["type"] == "output")
        .flat_map(|f| {
            base64::engine::general_purpose::STANDARD
                .decode(f["data"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

async fn next_frame(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(FRAME_WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .unwrap();
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] != "ping" {
                return value;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_create_list_get_ping_destroy() {
    let stack = Stack::start().await;
    let spec = Spec::reference();
    let agent = stack.host().await;
    let key = stack.api_key(&stack.admin).await;

    let (status, capsule) = stack
        .create(
            &key,
            json!({"template": "minimal", "vcpus": 2, "memory_mb": 1024, "timeout_sec": 60}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    spec.check_response("post", "/v1/capsules", 201, &capsule);
    let id = capsule["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("cl-") && id.len() == 28, "{id}");
    assert_eq!(capsule["status"], "running");
    assert_eq!(
        (
            capsule["vcpus"].as_i64(),
            capsule["memory_mb"].as_i64(),
            capsule["timeout_sec"].as_i64()
        ),
        (Some(2), Some(1024), Some(60))
    );
    // The guest is reached through an address of the agent's sandbox host range.
    let host_net = agent.host_range().replace(".0/24", ".");
    assert!(
        capsule["guest_ip"].as_str().unwrap().starts_with(&host_net),
        "{capsule}"
    );
    assert_eq!(capsule["host_ip"], "127.0.0.1");
    assert!(capsule["started_at"].is_string());
    assert_eq!(agent.sandbox_ids(), vec![id.clone()]);
    let (status, out) = stack
        .exec(&key, &id, "echo hello from a microVM; nproc; id -un")
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["stdout"], "hello from a microVM\n2\nroot\n", "{out}");

    // Defaults, JWT auth and the aliases.
    let (status, second) = stack.create(&stack.admin.auth(), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_eq!(
        (
            second["template"].as_str(),
            second["vcpus"].as_i64(),
            second["memory_mb"].as_i64(),
            second["timeout_sec"].as_i64()
        ),
        (Some("minimal"), Some(1), Some(512), Some(0))
    );
    let second_id = second["id"].as_str().unwrap();
    // A template's own defaults fill what a request leaves out.
    let (status, small) = stack.create(&key, json!({"template": "busybox"})).await;
    assert_eq!(status, StatusCode::CREATED, "{small}");
    assert_eq!(
        (small["template"].as_str(), small["memory_mb"].as_i64()),
        (Some("busybox"), Some(256))
    );
    let small_id = small["id"].as_str().unwrap();
    let (status, _) = stack
        .cp
        .call(DELETE, &format!("/v1/capsules/{small_id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let (status, list) = stack.cp.call(GET, "/v1/capsules", &key, None).await;
    assert_eq!(status, StatusCode::OK);
    spec.check_response("get", "/v1/capsules", 200, &list);
    assert_eq!(list.as_array().unwrap().len(), 2);
    for prefix in [
        "/v1/capsules",
        "/v1/sandboxes",
        "/api/v1/capsules",
        "/api/v1/sandboxes",
    ] {
        let (status, got) = stack
            .cp
            .call(GET, &format!("{prefix}/{id}"), &key, None)
            .await;
        assert_eq!(status, StatusCode::OK, "{prefix}: {got}");
        assert_eq!(got["id"], id.as_str());
    }
    let (status, got) = stack
        .cp
        .call(GET, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    spec.check_response("get", "/v1/capsules/{id}", status.as_u16(), &got);

    // The reconciler records the template images the host holds; the registry shows their size.
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    let held: Vec<String> = sqlx::query_scalar(
        "SELECT template_name FROM host_templates WHERE size_bytes > 0 ORDER BY 1",
    )
    .fetch_all(&stack.cp.db)
    .await
    .unwrap();
    assert!(
        held.iter().any(|t| t == "busybox") && held.iter().any(|t| t == "minimal"),
        "{held:?}"
    );
    let (_, templates) = stack.cp.call(GET, "/v1/snapshots", &key, None).await;
    assert!(
        templates[0]["size_bytes"].as_i64().unwrap() > 0,
        "{templates}"
    );

    let (status, body) = stack
        .cp
        .call(POST, &format!("/v1/capsules/{id}/ping"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    let (status, body) = stack
        .cp
        .call(DELETE, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(agent.sandbox_ids(), vec![second_id.to_owned()]);
    let (_, got) = stack
        .cp
        .call(GET, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(got["status"], "stopped");
    let (_, list) = stack.cp.call(GET, "/v1/capsules", &key, None).await;
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "stopped capsules are not listed"
    );
    // Destroying again is a no-op; a stopped capsule is not running.
    let (status, _) = stack
        .cp
        .call(DELETE, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = stack
        .cp
        .call(POST, &format!("/v1/capsules/{id}/ping"), &key, None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");

    // The host's agent is reported in the capsule's metadata.
    let (_, got) = stack
        .cp
        .call(GET, &format!("/v1/sandboxes/{second_id}"), &key, None)
        .await;
    assert_eq!(got["metadata"]["vmm"], "qemu", "{got}");
    stack.finish(vec![agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_id_follows_a_call_from_the_control_plane_into_the_agent_log() {
    let stack = Stack::start().await;
    let agent = stack.host().await;
    let key = stack.api_key(&stack.admin).await;
    let auth = auth_headers(&key);
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // The caller's own ID is kept, answered back, and reaches the agent's request span.
    let mut headers = auth.clone();
    headers.push(("x-request-id", "trace-create-7f3a"));
    let (status, answered, capsule) = stack
        .cp
        .raw_with_headers(
            POST,
            "/v1/capsules",
            &headers,
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    assert_eq!(answered["x-request-id"], "trace-create-7f3a");
    let id = capsule["id"].as_str().unwrap().to_owned();
    let lines = agent.log_lines(&["request_id=trace-create-7f3a", "sandbox running", &id]);
    assert_eq!(lines.len(), 1, "{}", agent.log());

    // A request without one gets a fresh ID, passed on the same way.
    let (status, answered, body) = stack
        .cp
        .raw_with_headers(
            DELETE,
            &format!("/v1/capsules/{id}"),
            &auth,
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let generated = answered["x-request-id"].to_str().unwrap().to_owned();
    uuid::Uuid::parse_str(&generated).expect("a generated request ID is a UUID");
    let needle = format!("request_id={generated}");
    let lines = agent.log_lines(&[&needle, "sandbox destroyed", &id]);
    assert_eq!(lines.len(), 1, "{}", agent.log());
    stack.finish(vec![agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_processes_and_files_reach_envd() {
    let stack = Stack::start().await;
    let agent = stack.host().await;
    let key = stack.api_key(&stack.admin).await;
    let id = stack.created(&key).await;
    let exec = format!("/v1/capsules/{id}/exec");

    // Foreground: cwd and envs are honoured; binary output comes back base64.
    let (status, out) = stack
        .cp
        .call(
            POST,
            &exec,
            &key,
            Some(json!({
        "cmd": "/bin/sh", "args": ["-c", "pwd; echo $GREETING; echo oops >&2; exit 3"],
        "cwd": "/tmp", "envs": {"GREETING": "hello"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    Spec::reference().check_response("post", "/v1/capsules/{id}/exec", 200, &out);
    assert_eq!(out["stdout"], "/tmp\nhello\n");
    assert_eq!(out["stderr"], "oops\n");
    assert_eq!(out["exit_code"], 3);
    assert_eq!(out["encoding"], "utf-8");
    assert_eq!(out["sandbox_id"], id.as_str());
    let (_, out) = stack
        .cp
        .call(
            POST,
            &exec,
            &key,
            Some(json!({"cmd": "/usr/bin/printf", "args": ["\\377\\376"]})),
        )
        .await;
    assert_eq!(out["encoding"], "base64", "{out}");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(out["stdout"].as_str().unwrap())
            .unwrap(),
        vec![0xff, 0xfe]
    );

    // Background with a tag, listed, re-attached over WebSocket, killed.
    let (status, bg) = stack.cp.call(POST, &exec, &key, Some(json!({
        "cmd": "/bin/sh", "args": ["-c", "echo started; sleep 30"], "background": true, "tag": "sleeper"}))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{bg}");
    Spec::reference().check_response("post", "/v1/capsules/{id}/exec", 202, &bg);
    assert_eq!(bg["tag"], "sleeper");
    let (status, procs) = stack
        .cp
        .call(GET, &format!("/v1/capsules/{id}/processes"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        procs["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["tag"] == "sleeper" && p["pid"] == bg["pid"]),
        "{procs}"
    );
    let mut ws = ws_connect(
        &stack.ws_url(&format!("/v1/capsules/{id}/processes/sleeper/stream")),
        &key,
    )
    .await
    .unwrap();
    assert_eq!(
        next_frame(&mut ws).await,
        json!({"type": "start", "pid": bg["pid"]})
    );
    assert_eq!(
        next_frame(&mut ws).await,
        json!({"type": "stdout", "data": "started\n"})
    );
    let (status, body) = stack
        .cp
        .call(
            DELETE,
            &format!("/v1/capsules/{id}/processes/sleeper?signal=SIGTERM"),
            &key,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let frames = frames_until_close(&mut ws).await;
    assert_eq!(frames.last().unwrap()["type"], "exit", "{frames:?}");
    // envd keeps an exited process for late readers; killing it again is a conflict.
    let (status, body) = stack
        .cp
        .call(
            DELETE,
            &format!("/v1/capsules/{id}/processes/sleeper"),
            &key,
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "conflict");

    // Exec stream, authenticated by its first frame.
    let mut ws = ws_connect(
        &stack.ws_url(&format!("/v1/capsules/{id}/exec/stream")),
        &Auth::None,
    )
    .await
    .unwrap();
    let Auth::ApiKey(raw_key) = &key else {
        unreachable!()
    };
    send(&mut ws, json!({"type": "auth", "token": raw_key})).await;
    send(&mut ws, json!({"type": "start", "cmd": "/bin/sh", "args": ["-c", "echo out; echo err >&2; exit 4"]})).await;
    let frames = frames_until_close(&mut ws).await;
    assert_eq!(frames[0]["type"], "start", "{frames:?}");
    assert!(
        frames.contains(&json!({"type": "stdout", "data": "out\n"})),
        "{frames:?}"
    );
    assert!(
        frames.contains(&json!({"type": "stderr", "data": "err\n"})),
        "{frames:?}"
    );
    assert_eq!(
        frames.last().unwrap(),
        &json!({"type": "exit", "exit_code": 4})
    );
    // A JWT in the first frame works too; a bad token is refused with an error frame.
    let mut ws = ws_connect(
        &stack.ws_url(&format!("/api/v1/capsules/{id}/exec/stream")),
        &Auth::None,
    )
    .await
    .unwrap();
    send(&mut ws, json!({"type": "auth", "token": stack.admin.token})).await;
    send(
        &mut ws,
        json!({"type": "start", "cmd": "/bin/sleep", "args": ["30"]}),
    )
    .await;
    assert_eq!(next_frame(&mut ws).await["type"], "start");
    send(&mut ws, json!({"type": "stop"})).await;
    let frames = frames_until_close(&mut ws).await;
    assert_eq!(frames.last().unwrap()["type"], "exit", "{frames:?}");
    let mut ws = ws_connect(
        &stack.ws_url(&format!("/v1/capsules/{id}/exec/stream")),
        &Auth::None,
    )
    .await
    .unwrap();
    send(
        &mut ws,
        json!({"type": "auth", "token": "wrn_00000000000000000000000000000000"}),
    )
    .await;
    let frames = frames_until_close(&mut ws).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "error");

    // PTY: start, type, see the echo, exit.
    let mut ws = ws_connect(&stack.ws_url(&format!("/v1/capsules/{id}/pty")), &key)
        .await
        .unwrap();
    send(
        &mut ws,
        json!({"type": "start", "cmd": "/bin/sh", "cols": 100, "rows": 30, "envs": {"PS1": "$ "}}),
    )
    .await;
    let started = next_frame(&mut ws).await;
    assert_eq!(started["type"], "started", "{started}");
    assert!(started["tag"].as_str().unwrap().starts_with("pty-"));
    let typed =
        base64::engine::general_purpose::STANDARD.encode("echo $((6*7)); stty size; exit 5\n");
    send(&mut ws, json!({"type": "input", "data": typed})).await;
    let frames = frames_until_close(&mut ws).await;
    let output = terminal_output(&frames);
    assert!(
        output.contains("42") && output.contains("30 100"),
        "{output}"
    );
    assert_eq!(
        frames.last().unwrap(),
        &json!({"type": "exit", "exit_code": 5})
    );

    // The same as the 0.3 SDK drives it: raw terminal bytes in binary frames both ways, the
    // default shell, and a pong to the server's ping accepted silently.
    let mut ws = ws_connect(&stack.ws_url(&format!("/v1/capsules/{id}/pty")), &key)
        .await
        .unwrap();
    send(
        &mut ws,
        json!({"type": "start", "cmd": "/bin/bash", "cols": 80, "rows": 24}),
    )
    .await;
    let started = next_frame(&mut ws).await;
    assert_eq!(started["type"], "started", "{started}");
    send(&mut ws, json!({"type": "pong"})).await;
    ws.send(Message::Binary(
        b"echo raw-$((6*7)) $BASH_VERSINFO; exit 4\n"
            .to_vec()
            .into(),
    ))
    .await
    .unwrap();
    let mut raw = Vec::new();
    let mut control = Vec::new();
    let deadline = tokio::time::Instant::now() + FRAME_WAIT;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, ws.next()).await {
        match message.unwrap() {
            Message::Binary(bytes) => raw.extend_from_slice(&bytes),
            Message::Text(text) => control.push(serde_json::from_str::<Value>(&text).unwrap()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.contains("raw-42 5"), "{raw}");
    assert_eq!(control, [json!({"type": "exit", "exit_code": 4})], "{raw}");

    // Files: write (both forms), read (both forms), list, mkdir, remove.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (status, body) = stack
        .upload(&key, &id, "write", "/tmp/cp-test/a.bin", &data)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = stack
        .upload(&key, &id, "stream/write", "/tmp/cp-test/b.txt", b"streamed")
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for route in ["read", "stream/read"] {
        let headers = auth_headers(&key);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = stack
            .cp
            .raw(
                POST,
                &format!("/v1/capsules/{id}/files/{route}"),
                &headers,
                Some("application/json"),
                serde_json::to_vec(&json!({"path": "/tmp/cp-test/b.txt"})).unwrap(),
            )
            .await;
        assert_eq!(
            (status, body),
            (StatusCode::OK, json!("streamed")),
            "{route}"
        );
    }
    let read_back = read_bytes(&stack, &key, &id, "/tmp/cp-test/a.bin").await;
    assert!(
        read_back == data,
        "the 300 kB file came back different ({} bytes)",
        read_back.len()
    );
    let (status, list) = stack
        .cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/files/list"),
            &key,
            Some(json!({"path": "/tmp/cp-test"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    Spec::reference().check_response("post", "/v1/capsules/{id}/files/list", 200, &list);
    let names: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{list}");
    assert!(list["entries"][0]["modified_at"].is_i64(), "{list}");
    let (status, made) = stack
        .cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/files/mkdir"),
            &key,
            Some(json!({"path": "/tmp/cp-test/d"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{made}");
    assert_eq!(made["entry"]["type"], "directory");
    let (status, body) = stack
        .cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/files/mkdir"),
            &key,
            Some(json!({"path": "/tmp/cp-test/d"})),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "conflict");
    let (status, _) = stack
        .cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/files/remove"),
            &key,
            Some(json!({"path": "/tmp/cp-test"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = stack
        .cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/files/read"),
            &key,
            Some(json!({"path": "/tmp/cp-test/b.txt"})),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    stack.finish(vec![agent]).await;
}

/// `GET /metrics` from `addr`, with a bearer token or none: the status and the text.
async fn scrape(addr: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer.split(' ').nth(1).unwrap().parse().unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

async fn read_bytes(stack: &Stack, auth: &Auth, id: &str, path: &str) -> Vec<u8> {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let mut request = hyper::Request::builder()
        .method(POST)
        .uri(format!(
            "http://{}/v1/capsules/{id}/files/read",
            stack.cp.addr
        ))
        .header("content-type", "application/json");
    for (name, value) in auth_headers(auth) {
        request = request.header(name, value);
    }
    let body = Full::new(bytes::Bytes::from(
        serde_json::to_vec(&json!({"path": path})).unwrap(),
    ));
    let response = client.request(request.body(body).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

const MIB: usize = 1024 * 1024;
const BIG_FILE_MIB: usize = 100;

/// Chunk `k` of the big test file: a byte pattern that differs per chunk, so a reordered,
/// repeated or dropped chunk changes the digest.
fn big_chunk(k: usize) -> bytes::Bytes {
    (0..MIB)
        .map(|i| ((i * 31 + k * 7) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_mib_stream_each_way_through_a_replica_with_bounded_memory() {
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use sha2::{Digest, Sha256};

    let stack = Stack::start().await;
    let agent = stack.host().await;
    let key = stack.api_key(&stack.admin).await;
    let id = stack.created(&key).await;
    // The transfer goes through a second control plane in its own process, so its peak memory
    // is the control plane's alone.
    let replica = support::CpReplica::start(&stack.cp).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<BoxBody<bytes::Bytes, std::convert::Infallible>>();
    let request = |path: &str, content_type: &str| {
        let mut request = hyper::Request::builder()
            .method(POST)
            .uri(format!("http://{}/v1/capsules/{id}{path}", replica.addr))
            .header("content-type", content_type);
        for (name, value) in auth_headers(&key) {
            request = request.header(name, value);
        }
        request
    };
    let replica_before = peak_rss_kib(replica.pid());
    let agent_before = agent.peak_rss_kib();

    let boundary = "wrenn-big-boundary";
    let mut sent = Sha256::new();
    for k in 0..BIG_FILE_MIB {
        sent.update(big_chunk(k));
    }
    let sent = sent.finalize();
    let parts = std::iter::once(bytes::Bytes::from(multipart_head(
        boundary,
        "/var/tmp/big.bin",
    )))
    .chain((0..BIG_FILE_MIB).map(big_chunk))
    .chain(std::iter::once(bytes::Bytes::from(multipart_tail(
        boundary,
    ))));
    let body = BodyExt::boxed(StreamBody::new(
        futures::stream::iter(parts).map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b))),
    ));
    let response = client
        .request(
            request(
                "/files/stream/write",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (_, out) = stack.exec(&key, &id, "stat -c %s /var/tmp/big.bin").await;
    assert_eq!(out["stdout"], format!("{}\n", BIG_FILE_MIB * MIB), "{out}");

    let body = serde_json::to_vec(&json!({"path": "/var/tmp/big.bin"})).unwrap();
    let response = client
        .request(
            request("/files/stream/read", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)).boxed())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let (mut received, mut length) = (Sha256::new(), 0);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            length += data.len();
            received.update(&data);
        }
    }
    assert_eq!(length, BIG_FILE_MIB * MIB);
    assert!(received.finalize() == sent, "the file came back different");

    // Streaming, not buffering: neither hop grew by anything near the file's size.
    let replica_growth = peak_rss_kib(replica.pid()).saturating_sub(replica_before) / 1024;
    let agent_growth = agent.peak_rss_kib().saturating_sub(agent_before) / 1024;
    println!("peak RSS growth over 2 x {BIG_FILE_MIB} MiB: control plane {replica_growth} MiB, agent {agent_growth} MiB");
    assert!(
        replica_growth < 32,
        "control plane grew {replica_growth} MiB"
    );
    assert!(agent_growth < 32, "agent grew {agent_growth} MiB");
    drop(replica);
    stack.finish(vec![agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduler_places_on_the_least_loaded_host_and_says_when_nothing_fits() {
    let stack = Stack::start().await;
    let key = stack.api_key(&stack.admin).await;
    let (status, body) = stack.create(&key, json!({})).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "no_hosts_available",
    );

    // Host A fits three 512 MiB capsules, host B two (memory is not overcommitted by default);
    // odd sizes keep the free shares from tying.
    let a = stack.host_sized(4, 1800, 100).await;
    let b = stack.host_sized(4, 1100, 100).await;
    let mut placed = Vec::new();
    for _ in 0..5 {
        stack.created(&key).await;
        placed.push((a.sandbox_ids().len(), b.sandbox_ids().len()));
    }
    // Each create goes where the largest share of memory stays free afterwards.
    assert_eq!(placed, vec![(1, 0), (1, 1), (2, 1), (3, 1), (3, 2)]);
    let (status, body) = stack.create(&key, json!({})).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "no_hosts_available",
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 host(s) considered"),
        "{body}"
    );

    // Destroying one frees its room.
    let (_, list) = stack.cp.call(GET, "/v1/capsules", &key, None).await;
    let victim = list[0]["id"].as_str().unwrap();
    let (status, _) = stack
        .cp
        .call(DELETE, &format!("/v1/capsules/{victim}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    stack.created(&key).await;
    // A request larger than any host never fits.
    let (status, body) = stack.create(&key, json!({"memory_mb": 4096})).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "no_hosts_available",
    );
    stack.finish(vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_creates_never_overcommit_a_host() {
    let stack = Arc::new(Stack::start().await);
    let agent = stack.host_sized(64, 5 * 512, 100).await;
    let key = stack.api_key(&stack.admin).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (stack, key) = (stack.clone(), key.clone());
        tasks.push(tokio::spawn(
            async move { stack.create(&key, json!({})).await },
        ));
    }
    let mut created = 0;
    for task in tasks {
        let (status, body) = task.await.unwrap();
        match status {
            StatusCode::CREATED => created += 1,
            _ => assert_error(
                status,
                &body,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_hosts_available",
            ),
        }
    }
    assert_eq!(created, 5, "exactly as many as fit");
    assert_eq!(agent.sandbox_ids().len(), 5);
    // A refused create never got a row, so the agent was never asked beyond capacity.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sandboxes")
        .fetch_one(&stack.cp.db)
        .await
        .unwrap();
    assert_eq!(rows, 5);
    let (_, list) = stack.cp.call(GET, "/v1/capsules", &key, None).await;
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["status"] == "running"));
    assert_eq!(list.as_array().unwrap().len(), 5);
    for capsule in list.as_array().unwrap() {
        let (status, out) = stack
            .exec(&key, capsule["id"].as_str().unwrap(), "hostname")
            .await;
        assert_eq!(
            (status, &out["exit_code"]),
            (StatusCode::OK, &json!(0)),
            "{out}"
        );
    }
    let Ok(stack) = Arc::try_unwrap(stack) else {
        unreachable!("every task has finished")
    };
    stack.finish(vec![agent]).await;
}

#[tokio::test]
async fn byoc_hosts_take_only_their_own_teams_capsules() {
    use std::str::FromStr;
    use wrenn::cp::scheduler::{self, Demand, Placement, SchedulerSettings};
    use wrenn::id::{HostId, TeamId};

    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (alice, bob) = (
        cp.signup("alice@example.com").await,
        cp.signup("bob@example.com").await,
    );
    // Registered machines: placement reads only the database, so no agent runs behind them.
    let register = |creator: User, body: Value| {
        let cp = &cp;
        async move {
            let (id, _) = cp.registered_host(&creator, body).await;
            HostId::from_str(&id).unwrap().uuid()
        }
    };
    let template: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM templates WHERE name = 'minimal'")
            .fetch_one(&cp.db)
            .await
            .unwrap();
    let place = |team: &User| {
        let (db, team) = (cp.db.clone(), TeamId::from_str(&team.team).unwrap().uuid());
        async move {
            scheduler::place(
                &db,
                &SchedulerSettings::default(),
                &Placement {
                    sandbox_id: wrenn::id::SandboxId::new_random().uuid(),
                    team_id: team,
                    template_id: template,
                    template_name: "minimal".into(),
                    template_sha256: None,
                    holders_only: false,
                    timeout_sec: 0,
                    public_ports: Vec::new(),
                    egress: serde_json::json!({}),
                    demand: Demand {
                        vcpus: 1,
                        memory_mb: 512,
                        disk_mb: 5120,
                    },
                },
            )
            .await
            .map(|host| host.id)
        }
    };

    let alices = register(
        alice.clone(),
        json!({"type": "byoc", "team_id": alice.team}),
    )
    .await;
    assert_eq!(place(&alice).await.unwrap(), alices);
    assert!(matches!(
        place(&bob).await,
        Err(scheduler::ScheduleError::NoHosts)
    ));
    // With a regular host as well, Alice's next capsule goes to it (the emptier one); Bob's
    // always do, however loaded it gets.
    let regular = register(admin.clone(), json!({"type": "regular"})).await;
    assert_eq!(place(&alice).await.unwrap(), regular);
    for _ in 0..3 {
        assert_eq!(place(&bob).await.unwrap(), regular);
    }
    cp.stop().await;
}

/// Every capsule route, as (method, path suffix, body) for an existing capsule.
fn capsule_routes() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (GET, "", None),
        (DELETE, "", None),
        (POST, "/ping", None),
        (POST, "/exec", Some(json!({"cmd": "/bin/true"}))),
        (GET, "/processes", None),
        (DELETE, "/processes/1", None),
        (POST, "/files/read", Some(json!({"path": "/etc/hostname"}))),
        (
            POST,
            "/files/stream/read",
            Some(json!({"path": "/etc/hostname"})),
        ),
        (POST, "/files/list", Some(json!({"path": "/"}))),
        (POST, "/files/mkdir", Some(json!({"path": "/tmp/x"}))),
        (POST, "/files/remove", Some(json!({"path": "/tmp/x"}))),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_team_cannot_see_or_touch_a_capsule() {
    let stack = Stack::start().await;
    let agent = stack.host().await;
    let owner = stack.api_key(&stack.admin).await;
    let id = stack.created(&owner).await;
    let stranger = stack.cp.signup("stranger@example.com").await;
    for auth in [stranger.auth(), stack.api_key(&stranger).await] {
        for (method, suffix, body) in capsule_routes() {
            let path = format!("/v1/capsules/{id}{suffix}");
            let (status, value) = stack.cp.call(method.clone(), &path, &auth, body).await;
            assert_error(status, &value, StatusCode::NOT_FOUND, "not_found");
        }
        let (status, value) = stack.upload(&auth, &id, "write", "/tmp/x", b"x").await;
        assert_error(status, &value, StatusCode::NOT_FOUND, "not_found");
        for ws in ["/exec/stream", "/pty", "/processes/1/stream"] {
            let result = ws_connect(&stack.ws_url(&format!("/v1/capsules/{id}{ws}")), &auth).await;
            assert_eq!(result.err(), Some(StatusCode::NOT_FOUND), "{ws}");
        }
        let (_, list) = stack.cp.call(GET, "/v1/capsules", &auth, None).await;
        assert_eq!(list, json!([]));
    }
    // By first frame, the stranger's token gets an error frame instead of a session.
    let mut ws = ws_connect(
        &stack.ws_url(&format!("/v1/capsules/{id}/pty")),
        &Auth::None,
    )
    .await
    .unwrap();
    send(&mut ws, json!({"type": "auth", "token": stranger.token})).await;
    let frames = frames_until_close(&mut ws).await;
    assert_eq!(
        frames,
        vec![json!({"type": "error", "data": "capsule not found", "fatal": true})]
    );
    // Nothing happened to the owner's capsule.
    let (_, got) = stack
        .cp
        .call(GET, &format!("/v1/capsules/{id}"), &owner, None)
        .await;
    assert_eq!(got["status"], "running");
    assert_eq!(agent.sandbox_ids(), vec![id.clone()]);
    let (status, out) = stack.exec(&owner, &id, "echo still mine").await;
    assert_eq!(
        (status, &out["stdout"]),
        (StatusCode::OK, &json!("still mine\n"))
    );
    stack.finish(vec![agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_typed_errors_on_every_route() {
    let stack = Stack::start().await;
    let agent = stack.host().await;
    let key = stack.api_key(&stack.admin).await;
    let id = stack.created(&key).await;

    // No credentials.
    for (method, suffix, body) in capsule_routes() {
        let (status, value) = stack
            .cp
            .call(
                method,
                &format!("/v1/capsules/{id}{suffix}"),
                &Auth::None,
                body,
            )
            .await;
        assert_error(status, &value, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // Malformed IDs.
    for (method, suffix, body) in capsule_routes() {
        let (status, value) = stack
            .cp
            .call(method, &format!("/v1/capsules/cl-nope{suffix}"), &key, body)
            .await;
        assert_error(status, &value, StatusCode::BAD_REQUEST, "invalid_request");
    }
    // Create: out of range, wrong types, unknown fields, unknown template.
    for body in [
        json!({"vcpus": 0}),
        json!({"vcpus": 1000}),
        json!({"memory_mb": 1}),
        json!({"timeout_sec": -1}),
        json!({"vcpus": "two"}),
        json!({"colour": "red"}),
        json!({"template": "../x"}),
    ] {
        let (status, value) = stack.create(&key, body.clone()).await;
        assert_error(status, &value, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let (status, value) = stack
        .create(&key, json!({"template": "no-such-template"}))
        .await;
    assert_error(status, &value, StatusCode::NOT_FOUND, "not_found");
    // Per-route bodies.
    let bad: Vec<(Method, &str, Value)> = vec![
        (POST, "/exec", json!({})),
        (POST, "/exec", json!({"cmd": ""})),
        (POST, "/exec", json!({"cmd": "/bin/true", "timeout_sec": 0})),
        (
            POST,
            "/exec",
            json!({"cmd": "/bin/true", "background": true, "tag": "a/b"}),
        ),
        (POST, "/exec", json!({"cmd": "/bin/true", "unknown": 1})),
        (POST, "/files/read", json!({})),
        (POST, "/files/list", json!({"path": "/", "depth": -1})),
        (POST, "/files/mkdir", json!({"path": ""})),
        (POST, "/files/remove", json!({"path": 7})),
    ];
    for (method, suffix, body) in bad {
        let (status, value) = stack
            .cp
            .call(
                method,
                &format!("/v1/capsules/{id}{suffix}"),
                &key,
                Some(body.clone()),
            )
            .await;
        assert_error(status, &value, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let (status, value) = stack
        .cp
        .call(
            DELETE,
            &format!("/v1/capsules/{id}/processes/1?signal=SIGHUP"),
            &key,
            None,
        )
        .await;
    assert_error(status, &value, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, value) = stack
        .cp
        .call(
            DELETE,
            &format!("/v1/capsules/{id}/processes/999999"),
            &key,
            None,
        )
        .await;
    assert_error(status, &value, StatusCode::NOT_FOUND, "not_found");
    // Multipart: not multipart, file before path, missing file.
    let headers = auth_headers(&key);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, value) = stack
        .cp
        .raw(
            POST,
            &format!("/v1/capsules/{id}/files/write"),
            &headers,
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await;
    assert_error(status, &value, StatusCode::BAD_REQUEST, "invalid_request");
    let file_first = "--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--b\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n/tmp/y\r\n--b--\r\n";
    let no_file = "--b\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n/tmp/y\r\n--b--\r\n";
    for body in [file_first, no_file] {
        let (status, value) = stack
            .cp
            .raw(
                POST,
                &format!("/v1/capsules/{id}/files/write"),
                &headers,
                Some("multipart/form-data; boundary=b"),
                body.as_bytes().to_vec(),
            )
            .await;
        assert_error(status, &value, StatusCode::BAD_REQUEST, "invalid_request");
    }
    // A WebSocket route called without an upgrade; a bad first frame.
    let (status, value) = stack
        .cp
        .call(GET, &format!("/v1/capsules/{id}/pty"), &key, None)
        .await;
    assert_error(status, &value, StatusCode::BAD_REQUEST, "invalid_request");
    let mut ws = ws_connect(
        &stack.ws_url(&format!("/v1/capsules/{id}/exec/stream")),
        &key,
    )
    .await
    .unwrap();
    send(&mut ws, json!({"type": "start"})).await;
    let frames = frames_until_close(&mut ws).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "error");
    let mut ws = ws_connect(&stack.ws_url(&format!("/v1/capsules/{id}/pty")), &key)
        .await
        .unwrap();
    send(&mut ws, json!({"type": "connect", "tag": "pty-missing"})).await;
    let frames = frames_until_close(&mut ws).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(
        (frames[0]["type"].as_str(), frames[0]["fatal"].as_bool()),
        (Some("error"), Some(true))
    );

    // Not running: every per-capsule route but get/destroy answers 409 invalid_state.
    let (status, _) = stack
        .cp
        .call(DELETE, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for (method, suffix, body) in capsule_routes()
        .into_iter()
        .filter(|(_, s, _)| !s.is_empty())
    {
        let (status, value) = stack
            .cp
            .call(method, &format!("/v1/capsules/{id}{suffix}"), &key, body)
            .await;
        assert_error(status, &value, StatusCode::CONFLICT, "invalid_state");
    }
    let result = ws_connect(
        &stack.ws_url(&format!("/v1/capsules/{id}/exec/stream")),
        &key,
    )
    .await;
    assert_eq!(result.err(), Some(StatusCode::CONFLICT));
    stack.finish(vec![agent]).await;
}

/// Opens a terminal in capsule `id` at `url`: authenticated by `auth`'s header, or by the first
/// frame when `auth` is a bearer token sent as `{"type":"auth"}`.
async fn open_pty(url: &str, auth: &Auth, by_frame: bool) -> Ws {
    let mut ws = if by_frame {
        let Auth::Bearer(token) = auth else {
            panic!("frame authentication takes a token")
        };
        let mut ws = ws_connect(url, &Auth::None).await.unwrap();
        send(&mut ws, json!({"type": "auth", "token": token})).await;
        ws
    } else {
        ws_connect(url, auth).await.unwrap()
    };
    send(&mut ws, json!({"type": "start", "cmd": "/bin/sh"})).await;
    let started = next_frame(&mut ws).await;
    assert_eq!(started["type"], "started", "{started}");
    ws
}

/// Revoking what an open session was authenticated with closes it, on every control-plane
/// replica: the sessions here run through a second replica in its own process, and the
/// revocations go through the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_credentials_close_open_sessions_on_every_replica() {
    let stack = Stack::start().await;
    let agent = stack.host().await;
    let cp = &stack.cp;
    let admin = &stack.admin;
    let members = format!("/v1/teams/{}/members", admin.team);
    let mut joined = Vec::new();
    for email in ["bob@example.com", "carol@example.com"] {
        let user = cp.signup(email).await;
        let (status, out) = cp
            .call(POST, &members, &admin.auth(), Some(json!({"email": email})))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{out}");
        joined.push((cp.switch(&user, &admin.team).await, user));
    }
    let [(bob, _), (carol, carol_account)] = <[_; 2]>::try_from(joined).unwrap();
    let kept_key = stack.api_key(admin).await;
    let (status, doomed) = cp
        .call(
            POST,
            "/v1/api-keys",
            &admin.auth(),
            Some(json!({"name": "doomed"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{doomed}");
    let doomed_key = Auth::ApiKey(doomed["key"].as_str().unwrap().to_owned());
    let bob_key = stack.api_key(&bob).await;
    let id = stack.created(&kept_key).await;

    let replica = support::CpReplica::start(cp).await;
    let url = format!("ws://{}/v1/capsules/{id}/pty", replica.addr);
    let mut kept = open_pty(&url, &kept_key, false).await;
    let mut by_doomed_key = open_pty(&url, &doomed_key, false).await;
    let mut by_bob_token = open_pty(&url, &bob.auth(), false).await;
    let mut by_bob_key = open_pty(&url, &bob_key, false).await;
    let mut by_carol_frame = open_pty(&url, &carol.auth(), true).await;

    let ends_revoked = |frames: Vec<Value>| {
        let last = frames.last().cloned().unwrap_or_default();
        assert_eq!(last["type"], "error", "{frames:?}");
        assert!(
            last["data"].as_str().unwrap().contains("revoked"),
            "{frames:?}"
        );
    };
    let (status, out) = cp
        .call(
            DELETE,
            &format!("/v1/api-keys/{}", doomed["id"].as_str().unwrap()),
            &admin.auth(),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{out}");
    ends_revoked(frames_until_close(&mut by_doomed_key).await);

    let (status, out) = cp
        .call(
            DELETE,
            &format!("{members}/{}", bob.id),
            &admin.auth(),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{out}");
    ends_revoked(frames_until_close(&mut by_bob_token).await);
    ends_revoked(frames_until_close(&mut by_bob_key).await);

    let (status, out) = cp
        .call(
            Method::PUT,
            &format!("/v1/admin/users/{}/active", carol_account.id),
            &admin.auth(),
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{out}");
    ends_revoked(frames_until_close(&mut by_carol_frame).await);

    // The session opened with a credential that still stands was never touched.
    let typed = base64::engine::general_purpose::STANDARD.encode("echo alive-$((40+2)); exit\n");
    send(&mut kept, json!({"type": "input", "data": typed})).await;
    let frames = frames_until_close(&mut kept).await;
    assert!(terminal_output(&frames).contains("alive-42"), "{frames:?}");
    drop(replica);
    stack.finish(vec![agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_idle_timeout_spares_open_work_and_pauses_an_idle_capsule_which_a_call_resumes() {
    let stack = Stack::start().await;
    let agent = stack.host().await;
    let key = stack.api_key(&stack.admin).await;
    let (status, capsule) = stack.create(&key, json!({"timeout_sec": 4})).await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();

    // Pings keep it alive.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (status, body) = stack
            .cp
            .call(POST, &format!("/v1/capsules/{id}/ping"), &key, None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    // So does work outlasting the timeout: a long foreground command, and a terminal left open
    // without typing.
    let (status, out) = stack.exec(&key, &id, "sleep 7; echo done").await;
    assert_eq!(
        (status, &out["stdout"]),
        (StatusCode::OK, &json!("done\n")),
        "{out}"
    );
    let mut ws = ws_connect(&stack.ws_url(&format!("/v1/capsules/{id}/pty")), &key)
        .await
        .unwrap();
    send(&mut ws, json!({"type": "start", "cmd": "/bin/sh"})).await;
    assert_eq!(next_frame(&mut ws).await["type"], "started");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let typed = base64::engine::general_purpose::STANDARD.encode("echo still-$((40+2)); exit\n");
    send(&mut ws, json!({"type": "input", "data": typed})).await;
    let output = terminal_output(&frames_until_close(&mut ws).await);
    assert!(output.contains("still-42"), "{output}");

    // Left alone, it is paused on its host, and the reconciler records that.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, info) = agent.call(GET, &format!("/v1/sandboxes/{id}"), None);
        if info["status"] == "paused" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never paused: {info}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let report = reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(report.paused.len(), 1, "{report:?}");
    assert_eq!(stack.status_of(&key, &id).await, "paused");
    // The next call resumes it and runs.
    let (status, out) = stack.exec(&key, &id, "echo awake").await;
    assert_eq!(
        (status, &out["stdout"]),
        (StatusCode::OK, &json!("awake\n")),
        "{out}"
    );
    assert_eq!(stack.status_of(&key, &id).await, "running");
    stack.finish(vec![agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_and_resume_through_the_api_keep_the_guest_and_refuse_the_wrong_state() {
    let stack = Stack::start().await;
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (mut agent, _) = support::agent::add_agent_with_env(
        &stack.cp,
        &stack.admin.auth(),
        &[
            ("AGENT_METRICS_ADDR", &metrics_addr),
            ("AGENT_METRICS_TOKEN", "agent-metrics"),
        ],
    )
    .await;
    let key = stack.api_key(&stack.admin).await;
    let id = stack.created(&key).await;
    let pause = format!("/v1/capsules/{id}/pause");
    let resume = format!("/v1/capsules/{id}/resume");
    let (status, out) = stack
        .exec(
            &key,
            &id,
            "echo kept > /tmp/note; sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/sleeper",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");

    // Resuming a running capsule is refused, as the reference says.
    let (status, body) = stack.cp.call(POST, &resume, &key, None).await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");

    // A host disk too full for the snapshot: 507, and the capsule runs on untouched.
    let snapshots = agent.root.path().join("snapshots");
    let mount = |args: &[&str]| {
        let status = std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap();
        assert!(status.success(), "{args:?}");
    };
    mount(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=1m",
        "wrenn-test-full",
        snapshots.to_str().unwrap(),
    ]);
    let (status, body) = stack.cp.call(POST, &pause, &key, None).await;
    mount(&["umount", snapshots.to_str().unwrap()]);
    assert_error(
        status,
        &body,
        StatusCode::INSUFFICIENT_STORAGE,
        "insufficient_storage",
    );
    assert_eq!(stack.status_of(&key, &id).await, "running");
    let (status, out) = stack.exec(&key, &id, "cat /tmp/note").await;
    assert_eq!(
        (status, &out["stdout"]),
        (StatusCode::OK, &json!("kept\n")),
        "{out}"
    );

    // A pause that fails after the state was written (the agent, restarted with a fail point,
    // adopted the VM): 502, the capsule runs on and nothing is left to resume from.
    agent.kill_hard();
    agent.restart(Some("vmm-pause-after-save=return"));
    let (status, body) = stack.cp.call(POST, &pause, &key, None).await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "agent_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("still running"),
        "{body}"
    );
    assert_eq!(stack.status_of(&key, &id).await, "running");
    let (status, out) = stack.exec(&key, &id, "cat /tmp/note").await;
    assert_eq!(
        (status, &out["stdout"]),
        (StatusCode::OK, &json!("kept\n")),
        "{out}"
    );
    agent.kill_hard();
    agent.restart(None);

    // Two pauses at once: exactly one wins, the other is told the capsule is busy or paused.
    let (first, second) = tokio::join!(
        stack.cp.call(POST, &pause, &key, None),
        stack.cp.call(POST, &pause, &key, None)
    );
    let mut answers = [first, second];
    answers.sort_by_key(|(status, _)| *status);
    assert_eq!(answers[0].0, StatusCode::OK, "{:?}", answers);
    assert_eq!(answers[0].1["status"], "paused", "{:?}", answers);
    Spec::reference().check_component("Capsule", &answers[0].1);
    assert_error(
        answers[1].0,
        &answers[1].1,
        StatusCode::CONFLICT,
        "invalid_state",
    );
    assert_eq!(stack.status_of(&key, &id).await, "paused");
    assert!(agent.sandbox_ids().contains(&id));

    // Pausing a paused capsule is refused; GET and list never resume it.
    let (status, body) = stack.cp.call(POST, &pause, &key, None).await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");
    let (status, list) = stack.cp.call(GET, "/v1/capsules", &key, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list[0]["status"], "paused", "{list}");
    let (status, body) = stack
        .cp
        .call(POST, &format!("/v1/capsules/{id}/ping"), &key, None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");

    // Its host's samples outlive the pause.
    let metrics = format!("/v1/capsules/{id}/metrics");
    let (status, body) = stack
        .cp
        .call(GET, &format!("{metrics}?range=5m"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    Spec::reference().check_response("GET", "/v1/capsules/{id}/metrics", 200, &body);
    assert_eq!(body["sandbox_id"], json!(id));
    assert!(!body["points"].as_array().unwrap().is_empty(), "{body}");
    let (status, body) = stack
        .cp
        .call(GET, &format!("{metrics}?range=1d"), &key, None)
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");

    // Prometheus: the agent's (on its own address, behind its token; counted since its restart
    // above) and the control plane's.
    let (status, _) = scrape(&metrics_addr, None).await;
    assert_eq!(status, 401);
    let (status, text) = scrape(&metrics_addr, Some("agent-metrics")).await;
    assert_eq!(status, 200, "{text}");
    for sample in [
        "wrenn_agent_operation_duration_seconds_count{operation=\"pause\",outcome=\"success\"} ",
        "wrenn_agent_sandboxes{phase=\"paused\"} 1",
        "wrenn_agent_vmm_processes 0",
    ] {
        assert!(text.contains(sample), "{sample} missing from\n{text}");
    }
    let (status, text) = scrape(&stack.cp.addr.to_string(), None).await;
    assert_eq!(status, 200, "{text}");
    // Calls into the guest are in the audit log too, with the key that made them.
    let (execs,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM audit_logs
         WHERE action = 'exec' AND status = 'success' AND actor_type = 'api_key'",
    )
    .fetch_one(&stack.cp.db)
    .await
    .unwrap();
    assert!(execs >= 1, "{execs}");
    for sample in [
        "wrenn_cp_capsules{state=\"paused\"} 1",
        "wrenn_cp_http_requests_total{method=\"POST\",route=\"/v1/capsules/{id}/pause\",status=\"200\"}",
        "wrenn_cp_scheduler_decisions_total{outcome=\"placed\"}",
        "wrenn_cp_db_connections{state=\"idle\"}",
    ] {
        assert!(text.contains(sample), "{sample} missing from\n{text}");
    }

    // A pool that fits one running capsule: the paused one holds no place, so another can be
    // created; then neither a resume (by call or by a file call) nor a third create fits.
    let (status, plan) = stack
        .cp
        .call(
            POST,
            "/v1/admin/plans",
            &stack.admin.auth(),
            Some(json!({"name": "one", "max_capsules": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    let assign = format!("/v1/admin/teams/{}/plan", stack.admin.team);
    let on_plan = |plan: &'static str| {
        let (stack, assign) = (&stack, &assign);
        async move {
            let body = Some(json!({ "plan": plan }));
            let (status, out) = stack.cp.call(PUT, assign, &stack.admin.auth(), body).await;
            assert_eq!(status, StatusCode::OK, "{out}");
        }
    };
    on_plan("one").await;
    let other = stack.created(&key).await;
    let (status, body) = stack.cp.call(POST, &resume, &key, None).await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "pool_exhausted",
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("1 of 1 running capsule(s)"), "{message}");
    let (_, text) = scrape(&stack.cp.addr.to_string(), None).await;
    assert!(
        text.contains("wrenn_cp_pool_refusals_total{resource=\"capsules\"}"),
        "{text}"
    );
    let (_, text) = scrape(&metrics_addr, Some("agent-metrics")).await;
    for sample in [
        "wrenn_agent_operation_duration_seconds_count{operation=\"create\",outcome=\"success\"} 1",
        "wrenn_agent_create_phase_duration_seconds_count{phase=\"boot_to_envd\",path=",
        "wrenn_agent_sandboxes{phase=\"running\"} 1",
    ] {
        assert!(text.contains(sample), "{sample} missing from\n{text}");
    }
    let (status, body) = stack
        .cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/files/list"),
            &key,
            Some(json!({"path": "/tmp"})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "pool_exhausted",
    );
    let (status, body) = stack.create(&key, json!({})).await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "pool_exhausted",
    );
    assert_eq!(stack.status_of(&key, &id).await, "paused");
    let (status, _) = stack
        .cp
        .call(DELETE, &format!("/v1/capsules/{other}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    on_plan("default").await;

    let (status, capsule) = stack.cp.call(POST, &resume, &key, None).await;
    assert_eq!(status, StatusCode::OK, "{capsule}");
    assert_eq!(capsule["status"], "running", "{capsule}");
    Spec::reference().check_component("Capsule", &capsule);
    let (status, out) = stack
        .exec(
            &key,
            &id,
            "cat /tmp/note; kill -0 $(cat /tmp/sleeper) && echo alive",
        )
        .await;
    assert_eq!(
        (status, &out["stdout"]),
        (StatusCode::OK, &json!("kept\nalive\n")),
        "{out}"
    );

    // Pause again, then a file call resumes it by itself; a paused capsule can be destroyed.
    let (status, _) = stack.cp.call(POST, &pause, &key, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, listing) = stack
        .cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/files/list"),
            &key,
            Some(json!({"path": "/tmp"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    assert_eq!(stack.status_of(&key, &id).await, "running");
    // A pause and a destroy at once: one wins, the other is 409; then it is destroyed.
    let destroy = format!("/v1/capsules/{id}");
    let (paused, destroyed) = tokio::join!(
        stack.cp.call(POST, &pause, &key, None),
        stack.cp.call(DELETE, &destroy, &key, None)
    );
    match (paused.0, destroyed.0) {
        (StatusCode::OK, StatusCode::CONFLICT) => {
            assert_error(
                destroyed.0,
                &destroyed.1,
                StatusCode::CONFLICT,
                "invalid_state",
            );
            let (status, _) = stack.cp.call(DELETE, &destroy, &key, None).await;
            assert_eq!(status, StatusCode::NO_CONTENT);
        }
        (StatusCode::CONFLICT, StatusCode::NO_CONTENT) => {
            assert_error(paused.0, &paused.1, StatusCode::CONFLICT, "invalid_state");
        }
        other => panic!("pause {paused:?}, destroy {destroyed:?}: {other:?}"),
    }
    assert_eq!(stack.status_of(&key, &id).await, "stopped");
    assert!(agent.sandbox_ids().is_empty());
    let (status, body) = stack.cp.call(POST, &resume, &key, None).await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");
    stack.finish(vec![agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs `--features failpoints` (just test)"
)]
async fn failed_or_unreachable_agents_leave_nothing_running() {
    let stack = Stack::start().await;
    let mut agent = stack.host().await;
    let key = stack.api_key(&stack.admin).await;

    // The VM boots, then the agent fails: it rolls back, and the row is `error`, never running.
    agent.restart(Some("agent-create-after-vmm=return"));
    let (status, body) = stack.create(&key, json!({})).await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "agent_error");
    assert!(agent.sandbox_ids().is_empty());
    wait_clean(&agent);
    let (_, list) = stack.cp.call(GET, "/v1/capsules", &key, None).await;
    assert_eq!(list, json!([]), "a failed create is not listed");
    let statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM sandboxes")
        .fetch_all(&stack.cp.db)
        .await
        .unwrap();
    assert_eq!(statuses, vec!["error"]);
    agent.restart(None);

    // The agent dies under an open request (its VMs outlive it): that request, new creates and
    // further calls into the capsule are agent errors.
    let id = stack.created(&key).await;
    let (long, ()) = tokio::join!(stack.exec(&key, &id, "sleep 60"), async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        agent.kill_hard();
    });
    assert_error(long.0, &long.1, StatusCode::BAD_GATEWAY, "agent_error");
    let (status, body) = stack.create(&key, json!({})).await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "agent_error");
    let (status, body) = stack.exec(&key, &id, "true").await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "agent_error");
    // Restarted, it adopts the VM it ran: the capsule answers again, and the failed create
    // stays failed.
    agent.restart(None);
    assert_eq!(agent.sandbox_ids(), vec![id.clone()]);
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(stack.status_of(&key, &id).await, "running");
    let (status, out) = stack.exec(&key, &id, "echo adopted").await;
    assert_eq!(
        (status, &out["stdout"]),
        (StatusCode::OK, &json!("adopted\n")),
        "{out}"
    );
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sandboxes WHERE status = 'running'")
            .fetch_one(&stack.cp.db)
            .await
            .unwrap();
    assert_eq!(running, 1);
    let (status, _) = stack
        .cp
        .call(DELETE, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // A host marked unreachable by its heartbeat: 503 host_unavailable.
    let id = stack.created(&key).await;
    stack.set_hosts("unreachable").await;
    let (status, body) = stack.exec(&key, &id, "true").await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "host_unavailable",
    );
    let (status, body) = stack.create(&key, json!({})).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "no_hosts_available",
    );
    stack.finish(vec![agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconciler_tracks_unreachable_forgotten_and_orphaned_sandboxes() {
    let stack = Stack::start().await;
    let agent = stack.host().await;
    let key = stack.api_key(&stack.admin).await;
    let (first, second) = (stack.created(&key).await, stack.created(&key).await);

    // In agreement: nothing changes.
    let report = reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(report, Default::default());
    let (status, body) = stack
        .cp
        .call(POST, &format!("/v1/capsules/{first}/pause"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The agent stops answering (its VMs keep running) and the monitor has marked its host
    // unreachable: both capsules, the paused one too, are missing, and calls say so.
    agent.signal(Signal::SIGSTOP);
    stack.set_hosts("unreachable").await;
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(stack.status_of(&key, &first).await, "missing");
    assert_eq!(stack.status_of(&key, &second).await, "missing");
    let (status, body) = stack
        .cp
        .call(POST, &format!("/v1/capsules/{first}/ping"), &key, None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");

    let (status, body) = stack.exec(&key, &first, "echo back").await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");

    // Back, having lost the second one meanwhile: the first is paused again (and a call
    // resumes it), the second stopped, saying why.
    agent.signal(Signal::SIGCONT);
    let (status, body) = agent.call(DELETE, &format!("/v1/sandboxes/{second}"), None);
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    stack.set_hosts("online").await;
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(stack.status_of(&key, &first).await, "paused");
    assert_eq!(stack.status_of(&key, &second).await, "stopped");
    let (_, stopped) = stack
        .cp
        .call(GET, &format!("/v1/capsules/{second}"), &key, None)
        .await;
    assert!(
        stopped["metadata"]["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains("no longer has it")),
        "{stopped}"
    );
    let (status, out) = stack.exec(&key, &first, "echo back").await;
    assert_eq!((status, &out["stdout"]), (StatusCode::OK, &json!("back\n")));

    // The agent loses a running capsule: stopped.
    let (status, body) = agent.call(DELETE, &format!("/v1/sandboxes/{first}"), None);
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(stack.status_of(&key, &first).await, "stopped");

    // A sandbox the control plane does not run (e.g. a create it gave up on) is destroyed.
    let orphan = wrenn::id::SandboxId::new_random().to_string();
    let (status, body) = agent.create(&orphan);
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let report = reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(
        report
            .orphans_destroyed
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![orphan]
    );
    assert!(agent.sandbox_ids().is_empty());

    // A create abandoned by a control plane that died (its row still `pending` long after the
    // create timeout) is failed, releasing the reservation.
    let abandoned = stack.created(&key).await;
    sqlx::query("UPDATE sandboxes SET status = 'pending', last_updated = now() - interval '1 day' WHERE status = 'running'")
        .execute(&stack.cp.db)
        .await
        .unwrap();
    let report = reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(
        report
            .abandoned
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![abandoned.clone()]
    );
    assert_eq!(stack.status_of(&key, &abandoned).await, "error");
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert!(
        agent.sandbox_ids().is_empty(),
        "its VM is removed on the next pass"
    );

    // A host marked unreachable by the monitor: its running capsules go missing without a call.
    let third = stack.created(&key).await;
    stack.set_hosts("unreachable").await;
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(stack.status_of(&key, &third).await, "missing");
    // Destroying a missing capsule records it stopped; the agent drops it once reachable.
    let (status, _) = stack
        .cp
        .call(DELETE, &format!("/v1/capsules/{third}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    stack.set_hosts("online").await;
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert!(agent.sandbox_ids().is_empty());
    stack.finish(vec![agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_share_the_load_and_survive_losing_a_host() {
    // The monitor and the reconciler run on their own, quickly.
    let monitor = MonitorSettings {
        interval: Duration::from_secs(1),
        unreachable_after: Duration::from_secs(6),
    };
    let capsules = CapsuleSettings {
        agents: AgentClient::new(AgentTimeouts {
            request: Duration::from_secs(10),
            ..AgentTimeouts::default()
        }),
        reconcile_interval: Duration::from_secs(1),
        ..quiet_capsules()
    };
    let stack =
        Stack::start_on(TestCp::start_full(monitor, capsules, Default::default()).await).await;
    let mut a = stack.host().await;
    let b = stack.host().await;
    let key = stack.api_key(&stack.admin).await;

    // Two equal hosts: the second capsule goes where the first did not.
    let first = stack.created(&key).await;
    let second = stack.created(&key).await;
    let (on_a, on_b) = if a.sandbox_ids() == vec![first.clone()] {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(a.sandbox_ids(), vec![on_a.clone()]);
    assert_eq!(b.sandbox_ids(), vec![on_b.clone()]);
    let (status, out) = stack
        .exec(&key, &on_a, "echo remembered > /root/marker")
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");

    // A partition: A's agent stops answering while its VM runs on. Its heartbeat falls silent,
    // the monitor marks the host unreachable and its capsule missing; B carries on and takes
    // the new work.
    a.signal(Signal::SIGSTOP);
    let host_a = format!("127.0.0.1:{}", a.port);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status: String = sqlx::query_scalar("SELECT status FROM hosts WHERE address = $1")
            .bind(&host_a)
            .fetch_one(&stack.cp.db)
            .await
            .unwrap();
        if status == "unreachable" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never went unreachable"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stack.await_status(&key, &on_a, "missing").await;
    let (status, body) = stack.exec(&key, &on_a, "true").await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");
    let third = stack.created(&key).await;
    assert_eq!(b.sandbox_ids().len(), 2);
    assert!(b.sandbox_ids().contains(&third));
    let (status, out) = stack.exec(&key, &on_b, "echo unaffected").await;
    assert_eq!(
        (status, &out["stdout"]),
        (StatusCode::OK, &json!("unaffected\n"))
    );

    // A answers again: its capsule is running, its memory and disk as they were.
    a.signal(Signal::SIGCONT);
    stack.await_status(&key, &on_a, "running").await;
    let (status, out) = stack.exec(&key, &on_a, "cat /root/marker").await;
    assert_eq!(
        (status, &out["stdout"]),
        (StatusCode::OK, &json!("remembered\n"))
    );

    // A is lost for real: its agent dies, and its VMs with it (as in a host reboot). The
    // capsule goes missing; when the agent comes back it reports the VM lost and the capsule
    // is recorded stopped, saying why.
    a.kill_hard();
    for vmm in wrenn::vmm::find_leftovers(&wrenn::config::Layout::new(a.root.path())) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm.pid as i32), Signal::SIGKILL)
            .unwrap();
    }
    stack.await_status(&key, &on_a, "missing").await;
    tokio::task::block_in_place(|| a.restart(None));
    stack.await_status(&key, &on_a, "stopped").await;
    let (_, lost) = stack
        .cp
        .call(GET, &format!("/v1/capsules/{on_a}"), &key, None)
        .await;
    assert!(
        lost["metadata"]["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains("stopped while no agent ran")),
        "{lost}"
    );
    assert!(a.sandbox_ids().is_empty());
    wait_clean(&a);
    assert_eq!(stack.status_of(&key, &on_b).await, "running");
    stack.finish(vec![a, b]).await;
}

/// "The internet" for a capsule: a namespace behind a veth of the host (`name`, the agent's
/// egress interface) at 198.18.81.1/24, holding 198.18.81.2 and .3 with a server on `port` that
/// answers each connection with the address it sees, an HTTP server on 80 that answers each
/// request so, and a DNS server on .53 that knows `api.allowed.test` (.2). Removed on drop.
struct Internet {
    name: String,
    port: u16,
}

impl Internet {
    fn new(name: &str) -> Self {
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", name])
            .output();
        ip(&["netns", "add", name]);
        ip(&[
            "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", name,
        ]);
        ip(&["addr", "add", "198.18.81.1/24", "dev", name]);
        ip(&["link", "set", name, "up"]);
        for addr in ["198.18.81.2/24", "198.18.81.3/24", "198.18.81.53/24"] {
            ip(&["-n", name, "addr", "add", addr, "dev", "eth0"]);
        }
        ip(&["-n", name, "link", "set", "eth0", "up"]);
        let path = format!("/run/netns/{name}");
        let [listener, web] = std::thread::spawn(move || {
            let ns = std::fs::File::open(path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            ["0.0.0.0:0", "0.0.0.0:80"].map(|addr| std::net::TcpListener::bind(addr).unwrap())
        })
        .join()
        .unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::Write;
            for mut stream in listener.incoming().flatten() {
                let peer = stream.peer_addr().unwrap().ip().to_string();
                let _ = stream.write_all(peer.as_bytes());
            }
        });
        wrenn_test_support::peer::serve_http(web);
        wrenn_test_support::dns::serve(
            name,
            std::net::Ipv4Addr::new(198, 18, 81, 53),
            &[("api.allowed.test", [198, 18, 81, 2])],
        );
        Self {
            name: name.to_owned(),
            port,
        }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "delete", &self.name])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_egress_policy_follows_the_capsule_through_changes_and_a_pause() {
    let internet = Internet::new("wrnegress");
    let stack = Stack::start().await;
    let (mut agent, _) = support::agent::add_agent_with_env(
        &stack.cp,
        &stack.admin.auth(),
        &[
            ("AGENT_EGRESS_INTERFACE", "wrnegress"),
            ("AGENT_DNS_SERVERS", "198.18.81.53"),
        ],
    )
    .await;
    let key = stack.api_key(&stack.admin).await;
    let spec = Spec::ours();
    let (status, capsule) = stack
        .create(
            &key,
            json!({"egress": {
                "default": "deny",
                "allow": ["198.18.81.2"],
                "deny": ["blocked.example.com", "*.blocked.example.com"],
                "max_connections": 64,
            }}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();
    let network = format!("/v1/capsules/{id}/network");
    let put_network = |body: Value| {
        let (stack, key, network) = (&stack, &key, &network);
        async move { stack.cp.call(Method::PUT, network, key, Some(body)).await }
    };
    // What the guest gets from one server: its answer, or the shell's failure.
    let fetch = |last: u8| {
        format!(
            "timeout 10 bash -c 'exec 3<>/dev/tcp/198.18.81.{last}/{}; cat <&3' 2>&1 || echo refused",
            internet.port
        )
    };
    let reach = |last: u8| {
        let script = fetch(last);
        let stack = &stack;
        let key = &key;
        let id = &id;
        async move {
            let (status, out) = stack.exec(key, id, &script).await;
            assert_eq!(status, StatusCode::OK, "{out}");
            out["stdout"].as_str().unwrap().trim().to_owned()
        }
    };

    // The allowed address answers (seeing the host's masquerade); the other is refused at once,
    // on a port that is not HTTP's.
    assert_eq!(reach(2).await, "198.18.81.1");
    assert!(reach(3).await.ends_with("refused"));
    // A denied name does not resolve, whichever resolver the guest was given.
    let (_, out) = stack
        .exec(&key, &id, "getent hosts api.blocked.example.com; echo $?")
        .await;
    assert_eq!(out["stdout"], "2\n", "{out}");

    let (status, got) = stack.cp.call(GET, &network, &key, None).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    spec.check_response("get", "/v1/capsules/{id}/network", 200, &got);
    assert_eq!(got["egress"]["allow"], json!(["198.18.81.2"]));
    assert_eq!(
        got["egress"]["deny"],
        json!(["blocked.example.com", "*.blocked.example.com"])
    );

    // Bad rules are refused with the field named, and change nothing.
    for bad in [
        json!({"egress": {"allow": ["10.0.0.1/8"]}}),
        json!({"egress": {"allow": ["not a name"]}}),
        json!({"egress": {"default": "maybe"}}),
        json!({"egress": {"max_connections": 0}}),
    ] {
        let (status, body) = put_network(bad.clone()).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    }
    // Public ports alone leave the policy as it is.
    let (status, set) = put_network(json!({"public_ports": [8080]})).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["egress"], got["egress"]);

    // A runtime change: the other server by network, the first no longer.
    let (status, set) =
        put_network(json!({"egress": {"default": "deny", "allow": ["198.18.81.3/32"]}})).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    spec.check_response("put", "/v1/capsules/{id}/network", 200, &set);
    assert_eq!(reach(3).await, "198.18.81.1");
    assert!(reach(2).await.ends_with("refused"));

    // Changed while paused, the policy holds from the resume on.
    let (status, body) = stack
        .cp
        .call(POST, &format!("/v1/capsules/{id}/pause"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, set) = put_network(json!({"egress": {"deny": ["198.18.81.3"]}})).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    let (status, body) = stack
        .cp
        .call(POST, &format!("/v1/capsules/{id}/resume"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(reach(2).await, "198.18.81.1");
    assert!(reach(3).await.ends_with("refused"));

    // An agent that dies and starts again takes the running capsule over with its policy.
    agent.kill_hard();
    agent.restart(None);
    assert_eq!(reach(2).await, "198.18.81.1");
    assert!(reach(3).await.ends_with("refused"));

    // By name: an allowed name resolves through the agent's forwarder (the guest asks its own
    // resolver) and admits its address, and on port 80 a request must ask for that name.
    let (status, set) =
        put_network(json!({"egress": {"default": "deny", "allow": ["*.allowed.test"]}})).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    let get = |host: &str| {
        let script = format!(
            "exec 3<>/dev/tcp/api.allowed.test/80 || exit 1; \
             printf 'GET / HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
             timeout 10 cat <&3"
        );
        let (stack, key, id) = (&stack, &key, &id);
        async move {
            let (status, out) = stack
                .cp
                .call(
                    POST,
                    &format!("/v1/capsules/{id}/exec"),
                    key,
                    Some(json!({"cmd": "/bin/bash", "args": ["-c", script]})),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{out}");
            out["stdout"].as_str().unwrap().to_owned()
        }
    };
    let allowed = get("api.allowed.test").await;
    assert!(
        allowed.starts_with("HTTP/1.1 200") && allowed.ends_with("\r\n198.18.81.1"),
        "{allowed}"
    );
    let other = get("evil.test").await;
    assert!(
        other.starts_with("HTTP/1.1 403"),
        "another name on the same address: {other}"
    );
    assert!(reach(3).await.ends_with("refused"));

    let (status, _) = stack
        .cp
        .call(DELETE, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    stack.finish(vec![agent]).await;
}
