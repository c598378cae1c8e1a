//! A real host agent for tests and benchmarks: `wrenn agent` registered with a test control
//! plane, running QEMU/TCG sandboxes from the shared test images, and a census of what it
//! leaves on the host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use wrenn::testing::guest;

use super::{Auth, TestCp};

/// The agent owns host-global names (the `wrenn-*` namespaces and nft table), so tests in one
/// binary that run agents take turns.
pub static ONE_AGENT_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CREATE_TIMEOUT: Duration = Duration::from_secs(240);

pub struct Agent {
    pub root: tempfile::TempDir,
    pub port: u16,
    cp_url: String,
    pub child: Option<Child>,
    pub secret: String,
    pub http: ureq::Agent,
    /// Configuration variables on top of the test defaults, kept across restarts.
    env: Vec<(String, String)>,
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
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Some(point) = failpoint {
            cmd.env("FAILPOINTS", format!("{point}=return"));
        }
        cmd
    }

    pub fn register(cp_url: &str, token: &str, env: Vec<(String, String)>) -> Agent {
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
            env,
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

    pub fn restart(&mut self, failpoint: Option<&str>) {
        self.stop();
        self.child = Some(self.command(failpoint).spawn().unwrap());
        self.wait_ready();
    }

    pub fn wait_ready(&mut self) {
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

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
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

    pub fn create(&self, id: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"sandbox_id": id, "template": "minimal", "vcpus": 1, "memory_mb": 256, "disk_mb": 256})),
        )
    }

    pub fn run(&self, id: &str, cmd: &str, args: &[&str]) -> Value {
        let (status, body) = self.call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/envd/processes/run"),
            Some(json!({"process": {"cmd": cmd, "args": args}, "timeout_sec": 60})),
        );
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn stop(&mut self) {
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

    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.path().join("sandboxes")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the agent may leave on the host, by name, so a test can show it all went away.
pub fn host_traces(sandboxes_dir: &Path) -> Vec<String> {
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

pub fn wait_clean(agent: &Agent) {
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
pub async fn stack() -> (TestCp, Agent, String, Auth) {
    stack_with_env(&[]).await
}

/// [`stack`] with configuration variables for the agent, e.g. a smaller console cap.
pub async fn stack_with_env(env: &[(&str, &str)]) -> (TestCp, Agent, String, Auth) {
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
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let agent = tokio::task::spawn_blocking(move || Agent::register(&cp_url, &token, env))
        .await
        .unwrap();
    (cp, agent, host_id, admin.auth())
}
