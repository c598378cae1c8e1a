//! A real host agent for tests and benchmarks: `wrenn agent` registered with a test control
//! plane, running QEMU/TCG sandboxes from the shared test images, and a census of what it
//! leaves on the host.
//!
//! Every agent gets its own files root, port, network name prefix and address ranges, so
//! several run side by side on this machine like agents on separate hosts.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use wrenn_test_support::guest;

use super::{Auth, TestCp};

/// What calling an agent directly takes: the control plane's client certificate and key, and
/// the CA the agent's certificate chains to.
#[derive(Clone)]
pub struct AgentTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl AgentTls {
    /// A blocking client presenting this identity and trusting only this CA.
    pub fn ureq(&self, timeout: Duration) -> ureq::Agent {
        use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
        let cert = Certificate::from_pem(self.cert_pem.as_bytes()).unwrap();
        let key = PrivateKey::from_pem(self.key_pem.as_bytes()).unwrap();
        let ca = Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        let tls = TlsConfig::builder()
            .client_cert(Some(ClientCert::new_with_certs(&[cert], key)))
            .root_certs(RootCerts::Specific(std::sync::Arc::new(vec![ca])))
            .build();
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .tls_config(tls)
            .build()
            .into()
    }

    /// The same for async clients (envd's through the agent's proxy).
    pub fn rustls(&self) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let roots = wrenn::tls::roots(&self.ca_pem).unwrap();
        let certs = wrenn::tls::certificates(&self.cert_pem).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(wrenn::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .unwrap();
        std::sync::Arc::new(config)
    }
}

/// TCG guests are CPU-bound and this machine has two cores: tests that boot VMs take turns in
/// pairs so boots stay well inside the agent's envd-ready timeout.
pub static VM_TURNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The agent's create steps: the name in each one's fail point (`agent-create-after-<name>`) and
/// how the agent's messages describe it.
pub const CREATE_STEPS: [(&str, &str); 6] = [
    ("directory", "creating the sandbox directory"),
    ("disk", "creating the writable disk"),
    ("network", "creating the network"),
    ("vmm", "starting the VMM"),
    ("envd-ready", "waiting for envd"),
    ("envd-init", "initialising envd"),
];

/// Numbers the agents of one test process; each number owns a name prefix and two /24s.
static NEXT_AGENT: AtomicU8 = AtomicU8::new(0);

const CREATE_TIMEOUT: Duration = Duration::from_secs(240);

/// Where a registering agent finds its one-time token.
pub enum TokenFrom<'a> {
    Env(&'a str),
    File(&'a std::path::Path),
}

pub struct Agent {
    pub root: tempfile::TempDir,
    /// Apart from the files root, so that a test filling that disk still has the log.
    logs: tempfile::TempDir,
    pub port: u16,
    /// `agent.network_name_prefix`: names its namespaces, host links and nft table.
    pub prefix: String,
    number: u8,
    cp_url: String,
    pub child: Option<Child>,
    pub secret: String,
    /// Presents the control plane's client certificate, as only the control plane may call.
    pub http: ureq::Agent,
    pub tls: AgentTls,
    /// Configuration variables on top of the test defaults, kept across restarts.
    env: Vec<(String, String)>,
}

/// The sandbox ID a test calls by a readable name (the agent takes only real sandbox IDs).
pub fn sid(name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let bytes: [u8; 16] = digest[..16].try_into().unwrap();
    wrenn::id::SandboxId(uuid::Uuid::from_bytes(bytes)).to_string()
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
    pub fn new_root() -> tempfile::TempDir {
        let root = tempfile::Builder::new()
            .prefix("wrenn-agent-")
            .tempdir()
            .unwrap();
        Self::link_test_files(root.path());
        root
    }

    /// A files root with an images directory of its own, for tests that build or import
    /// templates: they land there, not among the shared test images, which it links one by one.
    pub fn new_root_with_own_images() -> tempfile::TempDir {
        let root = tempfile::Builder::new()
            .prefix("wrenn-agent-")
            .tempdir()
            .unwrap();
        let files = guest::test_files();
        std::os::unix::fs::symlink(files.kernels_dir(), root.path().join("kernels")).unwrap();
        let images = root.path().join("images");
        std::fs::create_dir(&images).unwrap();
        for entry in std::fs::read_dir(files.images_dir()).unwrap() {
            let entry = entry.unwrap();
            std::os::unix::fs::symlink(entry.path(), images.join(entry.file_name())).unwrap();
        }
        root
    }

    /// Links the shared test kernels and images into a files root.
    pub fn link_test_files(root: &std::path::Path) {
        let files = guest::test_files();
        std::os::unix::fs::symlink(files.kernels_dir(), root.join("kernels")).unwrap();
        std::os::unix::fs::symlink(files.images_dir(), root.join("images")).unwrap();
    }

    fn command(&self, failpoints: Option<&str>) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wrenn"));
        cmd.arg("agent")
            .env("AGENT_FILES_ROOTDIR", self.root.path())
            .env("AGENT_CP_URL", &self.cp_url)
            .env("AGENT_LISTEN_ADDR", format!("127.0.0.1:{}", self.port))
            .env("AGENT_VMM", "qemu")
            .env("AGENT_QEMU_ACCEL", "tcg")
            .env("AGENT_HEARTBEAT_INTERVAL_SECS", "1")
            .env("AGENT_NETWORK_NAME_PREFIX", &self.prefix)
            .env("AGENT_CGROUP_PARENT", self.cgroup_parent())
            .env("AGENT_SANDBOX_HOST_RANGE", self.host_range())
            .env("AGENT_SANDBOX_TRANSIT_RANGE", self.transit_range())
            .env("AGENT_ENVD_READY_TIMEOUT_SECS", "180")
            // Images the agent imports get the static build the test images carry.
            .env("AGENT_ENVD_BINARY", guest::static_binary())
            // A test's VMs end with its agent unless the test is about outliving it.
            .env("AGENT_DESTROY_SANDBOXES_ON_STOP", "true")
            // Making a boot snapshot boots one more VM after a test's first create, which the
            // two CI cores cannot spare for every test; the tests about them turn it on.
            .env("AGENT_BOOT_SNAPSHOTS", "false")
            .env("LOG_LEVEL", "wrenn=info")
            // Plain text, so tests can search the log file.
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_path())
                    .unwrap(),
            );
        if let Some(failpoints) = failpoints {
            cmd.env("FAILPOINTS", failpoints);
        }
        cmd
    }

    /// Starts an agent in `root` that registers with the token from `token`.
    pub fn register_in(
        root: tempfile::TempDir,
        cp_url: &str,
        token: TokenFrom<'_>,
        tls: AgentTls,
        env: Vec<(String, String)>,
    ) -> Agent {
        let number = NEXT_AGENT.fetch_add(1, Ordering::Relaxed);
        let mut agent = Agent {
            root,
            logs: tempfile::Builder::new()
                .prefix("wrenn-agent-log-")
                .tempdir()
                .unwrap(),
            port: free_port(),
            // Unique per test binary; binaries run one after another, and an agent cleans up
            // what a crashed predecessor with its prefix left.
            prefix: format!("wt{number}"),
            number,
            cp_url: cp_url.to_owned(),
            child: None,
            secret: String::new(),
            http: tls.ureq(CREATE_TIMEOUT),
            tls,
            env,
        };
        let mut cmd = agent.command(None);
        // Never on the command line, which every local user can read.
        match token {
            TokenFrom::Env(token) => cmd.env("WRENN_REGISTER_TOKEN", token),
            TokenFrom::File(path) => cmd.arg("--register-file").arg(path),
        };
        cmd.args(["--address", &format!("127.0.0.1:{}", agent.port)]);
        agent.child = Some(cmd.spawn().unwrap());
        agent.wait_ready();
        agent
    }

    /// `agent.cgroup_parent`: the VMs' cgroups are `<parent>/<sandbox id>`, its own like its
    /// prefix.
    pub fn cgroup_parent(&self) -> String {
        format!("wrenn-tests/{}", self.prefix)
    }

    /// Restarts the agent, with fail points armed by a `FAILPOINTS` value
    /// (`name=action;...`, as the `fail` crate reads it).
    pub fn restart(&mut self, failpoints: Option<&str>) {
        self.stop();
        self.child = Some(self.command(failpoints).spawn().unwrap());
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

    pub fn host_range(&self) -> String {
        format!("10.100.{}.0/24", self.number)
    }

    pub fn transit_range(&self) -> String {
        format!("10.101.{}.0/24", self.number)
    }

    /// Sends `signal` to the agent process, e.g. SIGSTOP/SIGCONT for a partition during which
    /// its sandboxes keep running.
    pub fn signal(&self, signal: Signal) {
        let child = self.child.as_ref().expect("the agent runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    }

    /// The IDs of the sandboxes the agent reports, sorted.
    pub fn sandbox_ids(&self) -> Vec<String> {
        let (status, list) = self.call(Method::GET, "/v1/sandboxes", None);
        assert_eq!(status, StatusCode::OK, "{list}");
        let mut ids: Vec<String> = list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sandbox_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    }

    /// Peak resident memory of the agent process so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(self.child.as_ref().expect("the agent runs").id())
    }

    /// What this agent may leave on the host, by name, so a test can show it all went away.
    pub fn traces(&self) -> Vec<String> {
        let mut traces = Vec::new();
        let own = format!("{}-", self.prefix);
        for ns in sh("ip netns list").lines().filter(|l| l.starts_with(&own)) {
            traces.push(format!("netns {ns}"));
        }
        let link = format!(": {own}");
        for line in sh("ip -o link show").lines().filter(|l| l.contains(&link)) {
            traces.push(format!("link {line}"));
        }
        let ruleset = sh(&format!("nft list table inet {} 2>/dev/null", self.prefix));
        // The per-slot set elements name the slot's link and addresses; the deny list is static.
        let (host, transit) = (
            format!("10.100.{}.", self.number),
            format!("10.101.{}.", self.number),
        );
        let per_slot = |l: &&str| {
            [&own, &host, &transit]
                .iter()
                .any(|n| l.contains(n.as_str()))
        };
        for line in ruleset
            .lines()
            .filter(|l| l.contains("elements"))
            .filter(per_slot)
        {
            traces.push(format!("nft {}", line.trim()));
        }
        let dir = self.sandboxes_dir().display().to_string();
        for process in sh("ps -eo pid,args").lines().filter(|l| l.contains(&dir)) {
            traces.push(format!("process {process}"));
        }
        if let Ok(entries) = std::fs::read_dir(self.sandboxes_dir()) {
            for entry in entries.flatten() {
                traces.push(format!("file {}", entry.path().display()));
            }
        }
        for cgroup in self.vm_cgroups() {
            traces.push(format!("cgroup {}", cgroup.display()));
        }
        traces
    }

    /// The VMs' cgroups under this agent's parent, in every hierarchy (v2, or each v1
    /// controller's).
    pub fn vm_cgroups(&self) -> Vec<PathBuf> {
        let root = std::path::Path::new("/sys/fs/cgroup");
        let mut parents = vec![root.join(self.cgroup_parent())];
        if let Ok(hierarchies) = std::fs::read_dir(root) {
            parents.extend(
                hierarchies
                    .flatten()
                    .map(|h| h.path().join(self.cgroup_parent())),
            );
        }
        parents
            .iter()
            .filter_map(|parent| std::fs::read_dir(parent).ok())
            .flat_map(|entries| entries.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
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

    /// A call a hostile guest may never answer, or answer without end: gives up after
    /// `timeout` and reads at most `read_limit` bytes of the body. `None` when no answer came.
    pub fn call_bounded(
        &self,
        method: Method,
        path: &str,
        body: Value,
        timeout: Duration,
        read_limit: u64,
    ) -> Option<StatusCode> {
        use std::io::Read;
        let http = self.tls.ureq(timeout);
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(self.url(path))
            .header("authorization", format!("Bearer {}", self.secret))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .unwrap();
        let mut response = http.run(request).ok()?;
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let mut reader = response.body_mut().as_reader().take(read_limit);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
        Some(status)
    }

    pub fn create(&self, id: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"sandbox_id": id, "template": "busybox", "vcpus": 1, "memory_mb": 256, "disk_mb": 256})),
        )
    }

    /// envd's typed client for sandbox `id`, through this agent's proxy (as the control plane
    /// reaches it).
    pub fn envd(&self, id: &str) -> wrenn::envd::client::EnvdClient {
        let tls = self.tls.rustls();
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.enforce_http(false);
        wrenn::envd::client::EnvdClient::through_proxy(
            wrenn::envd::client::pool(connector, tls.clone()),
            &self.url(&format!("/v1/sandboxes/{id}/envd/")),
            &self.secret,
            tls,
        )
        .unwrap()
    }

    /// Runs `script` with `sh -c` as root in the guest and asserts that it succeeded.
    pub fn run_as_root(&self, id: &str, script: &str) -> Value {
        let (status, body) = self.call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/envd/processes/run"),
            Some(
                json!({"process": {"cmd": "sh", "args": ["-c", script], "user": "root"},
                        "timeout_sec": 120}),
            ),
        );
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["exit_code"], 0, "{body}");
        body
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
            // A stopped agent (a simulated partition) must run again to hear SIGTERM.
            let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
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

    /// Where the agent's log goes (its stderr), across restarts.
    fn log_path(&self) -> PathBuf {
        self.logs.path().join("agent.log")
    }

    /// What the agent has logged so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The log lines that contain every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // An agent that keeps its sandboxes on stop leaves their VMs running; a test that
        // failed before destroying them must not leave them behind.
        for leftover in wrenn::vmm::find_leftovers(&wrenn::config::Layout::new(self.root.path())) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(leftover.pid as i32),
                Signal::SIGKILL,
            );
        }
        // The log goes to a file so tests can read it; a failing test shows it.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(200)..];
            eprintln!(
                "--- agent {} log (tail) ---\n{}",
                self.prefix,
                tail.join("\n")
            );
        }
    }
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn wait_clean(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let traces = agent.traces();
        if traces.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {traces:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Peak resident memory of process `pid` so far, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Creates a regular host as `admin` and starts a real agent registering as it; returns the
/// agent and the host's ID.
pub async fn add_agent(cp: &TestCp, admin: &Auth) -> (Agent, String) {
    add_agent_with_env(cp, admin, &[]).await
}

/// [`add_agent`] with the agent's files root given.
pub async fn add_agent_in(
    cp: &TestCp,
    admin: &Auth,
    root: tempfile::TempDir,
    env: &[(&str, &str)],
) -> (Agent, String) {
    let (status, body) = cp
        .call(
            Method::POST,
            "/v1/hosts",
            admin,
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
    let tls = cp.agent_tls();
    let agent = tokio::task::spawn_blocking(move || {
        Agent::register_in(root, &cp_url, TokenFrom::Env(&token), tls, env)
    })
    .await
    .unwrap();
    (agent, host_id)
}

/// [`add_agent`] with configuration variables for the agent, e.g. a smaller console cap.
pub async fn add_agent_with_env(
    cp: &TestCp,
    admin: &Auth,
    env: &[(&str, &str)],
) -> (Agent, String) {
    // Linking the test files may build them first: off the runtime's threads.
    let root = tokio::task::spawn_blocking(Agent::new_root).await.unwrap();
    add_agent_in(cp, admin, root, env).await
}

/// A control plane with a platform admin and a registered host whose agent is running.
pub async fn stack() -> (TestCp, Agent, String, Auth) {
    stack_with_env(&[]).await
}

/// [`stack`] with configuration variables for the agent.
pub async fn stack_with_env(env: &[(&str, &str)]) -> (TestCp, Agent, String, Auth) {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (agent, host_id) = add_agent_with_env(&cp, &admin.auth(), env).await;
    (cp, agent, host_id, admin.auth())
}
