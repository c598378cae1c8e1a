//! The host agent for real: a control plane over a private PostgreSQL, a host registered with a
//! one-time token, and `wrenn agent` booting microVMs from the `minimal` image under QEMU/TCG.
//! Every test checks that what it created on the host (namespaces, links, nft elements, VMM
//! processes, files) is gone afterwards.
//!
//! The agent owns host-global names (the `wrenn-*` namespaces and nft table), so these tests
//! take turns.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::{Auth, TestCp};
use wrenn::testing::guest;

static ONE_AGENT_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CREATE_TIMEOUT: Duration = Duration::from_secs(240);

struct Agent {
    root: tempfile::TempDir,
    port: u16,
    cp_url: String,
    child: Option<Child>,
    secret: String,
    http: ureq::Agent,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Agent {
    /// A files root whose kernels and images are the shared test builds.
    fn new_root() -> tempfile::TempDir {
        let files = guest::test_files();
        let root = tempfile::Builder::new()
            .prefix("wrenn-agent-")
            .tempdir()
            .unwrap();
        std::os::unix::fs::symlink(files.kernels_dir(), root.path().join("kernels")).unwrap();
        std::os::unix::fs::symlink(files.images_dir(), root.path().join("images")).unwrap();
        root
    }

    fn command(&self, failpoint: Option<&str>) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wrenn"));
        cmd.arg("agent")
            .env("AGENT_FILES_ROOTDIR", self.root.path())
            .env("AGENT_CP_URL", &self.cp_url)
            .env("AGENT_LISTEN_ADDR", format!("127.0.0.1:{}", self.port))
            .env("AGENT_VMM", "qemu")
            .env("AGENT_QEMU_ACCEL", "tcg")
            .env("AGENT_HEARTBEAT_INTERVAL_SECS", "1")
            .env("AGENT_ENVD_READY_TIMEOUT_SECS", "180")
            .env("LOG_LEVEL", "wrenn=info")
            .stdin(Stdio::null());
        if let Some(point) = failpoint {
            cmd.env("FAILPOINTS", format!("{point}=return"));
        }
        cmd
    }

    fn register(cp_url: &str, token: &str) -> Agent {
        let mut agent = Agent {
            root: Self::new_root(),
            port: free_port(),
            cp_url: cp_url.to_owned(),
            child: None,
            secret: String::new(),
            http: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(CREATE_TIMEOUT))
                .build()
                .into(),
        };
        let mut cmd = agent.command(None);
        cmd.args([
            "--register",
            token,
            "--address",
            &format!("127.0.0.1:{}", agent.port),
        ]);
        agent.child = Some(cmd.spawn().unwrap());
        agent.wait_ready();
        agent
    }

    fn restart(&mut self, failpoint: Option<&str>) {
        self.stop();
        self.child = Some(self.command(failpoint).spawn().unwrap());
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(self.root.path().join("host-token")) {
                let creds: Value = serde_json::from_str(&text).unwrap();
                self.secret = creds["agent_secret"].as_str().unwrap().to_owned();
                if self.call(Method::GET, "/v1/ping", None).0 == StatusCode::OK {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited during start-up: {status}");
            }
            assert!(Instant::now() < deadline, "agent did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(self.url(path))
            .header("authorization", format!("Bearer {}", self.secret));
        let result = match body {
            Some(body) => self.http.run(
                request
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&body).unwrap())
                    .unwrap(),
            ),
            None => self.http.run(request.body(()).unwrap()),
        };
        let Ok(mut response) = result else {
            return (StatusCode::SERVICE_UNAVAILABLE, Value::Null);
        };
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn create(&self, id: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"sandbox_id": id, "template": "minimal", "vcpus": 1, "memory_mb": 256, "disk_mb": 256})),
        )
    }

    fn run(&self, id: &str, cmd: &str, args: &[&str]) -> Value {
        let (status, body) = self.call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/envd/processes/run"),
            Some(json!({"process": {"cmd": cmd, "args": args}, "timeout_sec": 60})),
        );
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.root.path().join("sandboxes")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the agent may leave on the host, by name, so a test can show it all went away.
fn host_traces(sandboxes_dir: &Path) -> Vec<String> {
    let mut traces = Vec::new();
    for ns in sh("ip netns list")
        .lines()
        .filter(|l| l.starts_with("wrenn-"))
    {
        traces.push(format!("netns {ns}"));
    }
    for link in sh("ip -o link show")
        .lines()
        .filter(|l| l.contains(": wrenn-"))
    {
        traces.push(format!("link {link}"));
    }
    let ruleset = sh("nft list table inet wrenn 2>/dev/null");
    // The per-slot set elements name the slot's link and addresses; the deny list is static.
    let per_slot = |l: &&str| ["wrenn-", "10.11.", "10.12."].iter().any(|n| l.contains(n));
    for line in ruleset
        .lines()
        .filter(|l| l.contains("elements"))
        .filter(per_slot)
    {
        traces.push(format!("nft {}", line.trim()));
    }
    let dir = sandboxes_dir.display().to_string();
    for process in sh("ps -eo pid,args").lines().filter(|l| l.contains(&dir)) {
        traces.push(format!("process {process}"));
    }
    if let Ok(entries) = std::fs::read_dir(sandboxes_dir) {
        for entry in entries.flatten() {
            traces.push(format!("file {}", entry.path().display()));
        }
    }
    traces
}

fn wait_clean(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let traces = host_traces(&agent.sandboxes_dir());
        if traces.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {traces:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A control plane with a platform admin and a registered host whose agent is running.
async fn stack() -> (TestCp, Agent, String, Auth) {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (status, body) = cp
        .call(
            Method::POST,
            "/v1/hosts",
            &admin.auth(),
            Some(json!({"type": "regular"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token = body["registration_token"].as_str().unwrap().to_owned();
    let host_id = body["host"]["id"].as_str().unwrap().to_owned();
    let cp_url = format!("http://{}", cp.addr);
    let agent = tokio::task::spawn_blocking(move || Agent::register(&cp_url, &token))
        .await
        .unwrap();
    (cp, agent, host_id, admin.auth())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn boots_runs_commands_moves_files_and_destroys_without_traces() {
    let _turn = ONE_AGENT_AT_A_TIME.lock().await;
    let (cp, agent, host_id, admin) = stack().await;
    let (status, host) = cp
        .call(Method::GET, &format!("/v1/hosts/{host_id}"), &admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(host["status"], "online", "{host}");

    let agent = tokio::task::spawn_blocking(move || {
        let (status, info) = agent.create("cl-e2e-one");
        assert_eq!(status, StatusCode::CREATED, "{info}");
        assert_eq!(info["status"], "running");
        assert!(info["metadata"]["envd_version"].is_string(), "{info}");

        let out = agent.run("cl-e2e-one", "cat", &["/etc/passwd"]);
        assert_eq!(out["exit_code"], 0, "{out}");
        assert!(
            out["stdout"].as_str().unwrap().contains("user:x:1000"),
            "{out}"
        );

        let put = agent
            .http
            .put(agent.url("/v1/sandboxes/cl-e2e-one/envd/files?path=/home/user/notes/hello.txt"))
            .header("authorization", format!("Bearer {}", agent.secret))
            .send("written from the host\n")
            .unwrap();
        assert_eq!(put.status().as_u16(), 200);
        let mut get = agent
            .http
            .get(agent.url("/v1/sandboxes/cl-e2e-one/envd/files?path=/home/user/notes/hello.txt"))
            .header("authorization", format!("Bearer {}", agent.secret))
            .call()
            .unwrap();
        assert_eq!(
            get.body_mut().read_to_string().unwrap(),
            "written from the host\n"
        );
        let out = agent.run("cl-e2e-one", "cat", &["/home/user/notes/hello.txt"]);
        assert_eq!(out["stdout"], "written from the host\n", "{out}");

        let (status, list) = agent.call(Method::GET, "/v1/sandboxes", None);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1, "{list}");

        let (status, body) = agent.call(Method::DELETE, "/v1/sandboxes/cl-e2e-one", None);
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let (status, _) = agent.call(Method::GET, "/v1/sandboxes/cl-e2e-one", None);
        assert_eq!(status, StatusCode::NOT_FOUND);
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_without_the_agent_secret_or_with_bad_input_are_refused() {
    let _turn = ONE_AGENT_AT_A_TIME.lock().await;
    let (cp, mut agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let secret = std::mem::replace(&mut agent.secret, "wrong".into());
        let (status, body) = agent.call(Method::GET, "/v1/ping", None);
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        agent.secret = secret;

        let cases = [
            (json!({"sandbox_id": "../x", "template": "minimal", "vcpus": 1, "memory_mb": 256}), 400),
            (json!({"sandbox_id": "cl-a", "template": "nope", "vcpus": 1, "memory_mb": 256}), 404),
            (json!({"sandbox_id": "cl-a", "template": "minimal", "vcpus": 0, "memory_mb": 256}), 400),
            (json!({"sandbox_id": "cl-a", "template": "minimal", "vcpus": 1, "memory_mb": 1}), 400),
            (json!({"sandbox_id": "cl-a", "template": "minimal", "vcpus": 1, "memory_mb": 256, "x": 1}), 400),
            (json!({"template": "minimal"}), 400),
        ];
        for (body, want) in cases {
            let (status, reply) = agent.call(Method::POST, "/v1/sandboxes", Some(body.clone()));
            assert_eq!(status.as_u16(), want, "{body} -> {reply}");
            assert!(reply["error"]["message"].is_string(), "{reply}");
        }
        let (status, _) = agent.call(Method::DELETE, "/v1/sandboxes/cl-missing", None);
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = agent.call(Method::GET, "/v1/sandboxes/cl-missing/envd/health", None);
        assert_eq!(status, StatusCode::NOT_FOUND);
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sandboxes_cannot_reach_each_other() {
    let _turn = ONE_AGENT_AT_A_TIME.lock().await;
    let (cp, agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let (status, a) = agent.create("cl-e2e-a");
        assert_eq!(status, StatusCode::CREATED, "{a}");
        let (status, b) = agent.create("cl-e2e-b");
        assert_eq!(status, StatusCode::CREATED, "{b}");
        let b_addr = b["guest_addr"].as_str().unwrap();
        // Each guest reaches its own envd over loopback, but not its neighbour's.
        let probe = |addr: &str| {
            let script =
                format!("printf 'GET /health HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {addr} 49983");
            agent.run("cl-e2e-a", "sh", &["-c", &script])
        };
        let own = probe("127.0.0.1");
        // envd answers (and, holding an access token, refuses the anonymous request).
        assert!(
            own["stdout"].as_str().unwrap().starts_with("HTTP/1.0 401"),
            "{own}"
        );
        let other = probe(b_addr);
        assert!(
            !other["stdout"].as_str().unwrap().contains("HTTP/"),
            "A reached B: {other}"
        );
        assert_ne!(other["exit_code"], 0, "A reached B: {other}");
        for id in ["cl-e2e-a", "cl-e2e-b"] {
            let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
            assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        }
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs `--features failpoints` (just test)"
)]
async fn a_failure_after_each_create_step_rolls_back_everything() {
    let _turn = ONE_AGENT_AT_A_TIME.lock().await;
    let (cp, agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        for step in [
            "directory",
            "disk",
            "network",
            "vmm",
            "envd-ready",
            "envd-init",
        ] {
            agent.restart(Some(&format!("agent-create-after-{step}")));
            let (status, body) = agent.create("cl-e2e-fail");
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{step}: {body}");
            assert_eq!(body["error"]["code"], "agent_error", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("injected"),
                "{body}"
            );
            let (_, list) = agent.call(Method::GET, "/v1/sandboxes", None);
            assert_eq!(list["sandboxes"], json!([]), "{step}: {list}");
            wait_clean(&agent);
        }
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_agent_cleans_up_on_restart_and_the_control_plane_hears_it() {
    let _turn = ONE_AGENT_AT_A_TIME.lock().await;
    let (cp, agent, host_id, admin) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        let (status, body) = agent.create("cl-e2e-orphan");
        assert_eq!(status, StatusCode::CREATED, "{body}");
        agent.kill_hard();
        // The VM outlives the agent that started it...
        assert!(!host_traces(&agent.sandboxes_dir()).is_empty());
        // ...until the next agent removes it before it serves anything.
        agent.restart(None);
        let (_, list) = agent.call(Method::GET, "/v1/sandboxes", None);
        assert_eq!(list["sandboxes"], json!([]), "{list}");
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    let (status, host) = cp
        .call(Method::GET, &format!("/v1/hosts/{host_id}"), &admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(host["status"], "online", "{host}");
    assert!(host["last_heartbeat_at"].is_string(), "{host}");
    drop(agent);
    cp.stop().await;
}
