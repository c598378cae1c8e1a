//! The capsule API end to end through the control plane: a real control plane over a real
//! PostgreSQL, hosts registered through the API, and the host agent contract served by
//! `support::agent_double` whose sandboxes are real `wrenn envd` processes. Covers the lifecycle,
//! exec/processes/files/WebSockets through to envd, scheduling, concurrency, team isolation, bad
//! input, failed creates and the reconciler.

mod support;

use std::sync::Arc;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::agent_double::AgentDouble;
use support::schema::Spec;
use support::{assert_error, Auth, TestCp, User};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use wrenn::cp::reconciler;

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const DELETE: Method = Method::DELETE;

struct Stack {
    cp: TestCp,
    admin: User,
}

impl Stack {
    async fn start() -> Self {
        let cp = TestCp::start().await;
        let admin = cp.signup("admin@example.com").await;
        Self { cp, admin }
    }

    /// Registers a regular host served by `double` with the given machine size.
    async fn host(&self, double: &AgentDouble, cores: u32, memory_mb: u64, disk_gb: u64) -> String {
        let (status, created) = self
            .cp
            .call(
                POST,
                "/v1/hosts",
                &self.admin.auth(),
                Some(json!({"type": "regular"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let token = created["registration_token"].as_str().unwrap();
        let body = json!({"token": token, "arch": "x86_64", "cpu_cores": cores, "memory_mb": memory_mb,
                          "disk_gb": disk_gb, "address": double.address(), "versions": {"agent": "double"}});
        let (status, creds) = self
            .cp
            .call(POST, "/v1/hosts/register", &Auth::None, Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{creds}");
        double.set_secret(
            creds["agent_secret"]
                .as_str()
                .expect("registration returns the agent secret"),
        );
        created["host"]["id"].as_str().unwrap().to_owned()
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
        let mut body = Vec::new();
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{path}\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
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
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
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

async fn next_frame(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(20), ws.next())
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

#[tokio::test]
async fn lifecycle_create_list_get_ping_destroy() {
    let stack = Stack::start().await;
    let spec = Spec::reference();
    let double = AgentDouble::start().await;
    let host = stack.host(&double, 8, 16384, 100).await;
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
    assert_eq!(capsule["guest_ip"], "10.11.0.2");
    assert_eq!(capsule["host_ip"], "127.0.0.1");
    assert!(capsule["started_at"].is_string());
    assert_eq!(double.sandbox_ids(), vec![id.clone()]);

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
    assert_eq!(double.sandbox_ids(), vec![second_id.to_owned()]);
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
    assert_eq!(got["metadata"]["vmm"], "double");
    let _ = host;
    stack.cp.stop().await;
}

#[tokio::test]
async fn exec_processes_and_files_reach_envd() {
    let stack = Stack::start().await;
    let double = AgentDouble::start().await;
    stack.host(&double, 8, 16384, 100).await;
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
    let output: Vec<u8> = frames
        .iter()
        .filter(|f| f["type"] == "output")
        .flat_map(|f| {
            base64::engine::general_purpose::STANDARD
                .decode(f["data"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    let output = String::from_utf8_lossy(&output);
    assert!(
        output.contains("42") && output.contains("30 100"),
        "{output}"
    );
    assert_eq!(
        frames.last().unwrap(),
        &json!({"type": "exit", "exit_code": 5})
    );

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
    stack.cp.stop().await;
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

#[tokio::test]
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
    let (a, b) = (AgentDouble::start().await, AgentDouble::start().await);
    stack.host(&a, 4, 1800, 100).await;
    stack.host(&b, 4, 1100, 100).await;
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
    stack.cp.stop().await;
}

#[tokio::test]
async fn eight_concurrent_creates_never_overcommit_a_host() {
    let stack = Arc::new(Stack::start().await);
    let double = AgentDouble::start().await;
    stack.host(&double, 64, 5 * 512, 100).await;
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
    assert_eq!(double.sandbox_ids().len(), 5);
    assert_eq!(
        double.create_calls(),
        5,
        "the agent was never asked beyond capacity"
    );
    let (_, list) = stack.cp.call(GET, "/v1/capsules", &key, None).await;
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["status"] == "running"));
    assert_eq!(list.as_array().unwrap().len(), 5);
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

#[tokio::test]
async fn another_team_cannot_see_or_touch_a_capsule() {
    let stack = Stack::start().await;
    let double = AgentDouble::start().await;
    stack.host(&double, 8, 16384, 100).await;
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
    assert_eq!(double.sandbox_ids(), vec![id]);
    stack.cp.stop().await;
}

#[tokio::test]
async fn bad_input_gets_typed_errors_on_every_route() {
    let stack = Stack::start().await;
    let double = AgentDouble::start().await;
    stack.host(&double, 8, 16384, 100).await;
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
    let body = b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--b\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n/tmp/y\r\n--b--\r\n";
    let (status, value) = stack
        .cp
        .raw(
            POST,
            &format!("/v1/capsules/{id}/files/write"),
            &headers,
            Some("multipart/form-data; boundary=b"),
            body.to_vec(),
        )
        .await;
    assert_error(status, &value, StatusCode::BAD_REQUEST, "invalid_request");
    let body = b"--b\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n/tmp/y\r\n--b--\r\n";
    let (status, value) = stack
        .cp
        .raw(
            POST,
            &format!("/v1/capsules/{id}/files/write"),
            &headers,
            Some("multipart/form-data; boundary=b"),
            body.to_vec(),
        )
        .await;
    assert_error(status, &value, StatusCode::BAD_REQUEST, "invalid_request");
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
    stack.cp.stop().await;
}

#[tokio::test]
async fn failed_or_unreachable_agents_leave_nothing_running() {
    let stack = Stack::start().await;
    let double = AgentDouble::start().await;
    let host = stack.host(&double, 8, 16384, 100).await;
    let key = stack.api_key(&stack.admin).await;

    double.fail_next_create();
    let (status, body) = stack.create(&key, json!({})).await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "agent_error");
    assert!(double.sandbox_ids().is_empty());
    let (_, list) = stack.cp.call(GET, "/v1/capsules", &key, None).await;
    assert_eq!(list, json!([]), "a failed create is not listed");
    let statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM sandboxes")
        .fetch_all(&stack.cp.db)
        .await
        .unwrap();
    assert_eq!(statuses, vec!["error"]);

    // The agent gone: creating and calling into a capsule are agent errors.
    let id = stack.created(&key).await;
    double.go_offline();
    let (status, body) = stack.create(&key, json!({})).await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "agent_error");
    let (status, body) = stack
        .cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/exec"),
            &key,
            Some(json!({"cmd": "/bin/true"})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "agent_error");
    double.go_online().await;

    // A host marked unreachable by its heartbeat: 503 host_unavailable.
    sqlx::query("UPDATE hosts SET status = 'unreachable'")
        .execute(&stack.cp.db)
        .await
        .unwrap();
    let (status, body) = stack
        .cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/exec"),
            &key,
            Some(json!({"cmd": "/bin/true"})),
        )
        .await;
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
    let _ = host;
    stack.cp.stop().await;
}

#[tokio::test]
async fn reconciler_tracks_unreachable_forgotten_and_orphaned_sandboxes() {
    let stack = Stack::start().await;
    let double = AgentDouble::start().await;
    stack.host(&double, 8, 16384, 100).await;
    let key = stack.api_key(&stack.admin).await;
    let (first, second) = (stack.created(&key).await, stack.created(&key).await);
    let status_of = |id: String| {
        let (cp, key) = (&stack.cp, key.clone());
        async move {
            cp.call(GET, &format!("/v1/capsules/{id}"), &key, None)
                .await
                .1["status"]
                .clone()
        }
    };

    // In agreement: nothing changes.
    let report = reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(report, Default::default());

    // The agent stops answering: both capsules are missing, and per-capsule calls say so.
    double.go_offline();
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(status_of(first.clone()).await, "missing");
    assert_eq!(status_of(second.clone()).await, "missing");
    let (status, body) = stack
        .cp
        .call(POST, &format!("/v1/capsules/{first}/ping"), &key, None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");

    // While away, its idle reaper removed the second one; back online, the first is running
    // again and the second stopped.
    double.forget(&second);
    double.go_online().await;
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(status_of(first.clone()).await, "running");
    assert_eq!(status_of(second.clone()).await, "stopped");

    // The agent forgets a running capsule: stopped.
    double.forget(&first);
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(status_of(first.clone()).await, "stopped");

    // A sandbox the control plane does not run (e.g. a create it gave up on) is destroyed.
    let orphan = wrenn::id::SandboxId::new_random().to_string();
    double.adopt(&orphan).await;
    let report = reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(
        report
            .orphans_destroyed
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![orphan]
    );
    assert!(double.sandbox_ids().is_empty());

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
    assert_eq!(status_of(abandoned.clone()).await, "error");
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert!(
        double.sandbox_ids().is_empty(),
        "its VM is removed on the next pass"
    );

    // A host marked unreachable by the monitor: its running capsules go missing without a call.
    let third = stack.created(&key).await;
    sqlx::query("UPDATE hosts SET status = 'unreachable'")
        .execute(&stack.cp.db)
        .await
        .unwrap();
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert_eq!(status_of(third.clone()).await, "missing");
    // Destroying a missing capsule records it stopped; the agent drops it once reachable.
    let (status, _) = stack
        .cp
        .call(DELETE, &format!("/v1/capsules/{third}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    sqlx::query("UPDATE hosts SET status = 'online'")
        .execute(&stack.cp.db)
        .await
        .unwrap();
    reconciler::reconcile_once(&stack.cp.state).await.unwrap();
    assert!(double.sandbox_ids().is_empty());
    stack.cp.stop().await;
}
