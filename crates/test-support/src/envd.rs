//! A real envd process for tests and benchmarks: started from the `wrenn` binary on a free port
//! (or under any wrapper command, such as `unshare`), killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wrenn::envd::client::EnvdClient;

#[derive(Debug, thiserror::Error)]
pub enum EnvdHarnessError {
    #[error("could not start envd: {0}")]
    Spawn(std::io::Error),
    #[error("envd exited before listening: {0}")]
    NoListenLine(String),
    #[error("envd did not answer /health in time")]
    NotReady,
}

pub struct EnvdProcess {
    child: Child,
    port: u16,
    host: String,
}

impl EnvdProcess {
    /// `wrenn envd` as an ordinary process on 127.0.0.1 and a free port.
    pub fn start(binary: &Path) -> Result<Self, EnvdHarnessError> {
        Self::start_command(Self::command(binary), "127.0.0.1")
    }

    /// The command [`start`](Self::start) runs, for a caller that adds arguments.
    pub fn command(binary: &Path) -> Command {
        let mut command = Command::new(binary);
        command.args([
            "envd",
            "--port",
            "0",
            "--address",
            "127.0.0.1",
            "--vsock-port",
            "0",
        ]);
        command
    }

    /// Any command that ends up running envd; envd's "listening" line on stdout gives the port,
    /// and `host` is where the caller can reach it.
    pub fn start_command(mut command: Command, host: &str) -> Result<Self, EnvdHarnessError> {
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null());
        let mut child = command.spawn().map_err(EnvdHarnessError::Spawn)?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("envd listening on tcp ") {
                        let port = addr.rsplit(':').next().and_then(|p| p.parse().ok());
                        break port.ok_or_else(|| EnvdHarnessError::NoListenLine(line.clone()))?;
                    }
                }
                _ => {
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(EnvdHarnessError::NoListenLine(status));
                }
            }
        };
        // Keep draining stdout so envd never blocks writing to it.
        std::thread::spawn(move || lines.for_each(drop));
        let envd = Self {
            child,
            port,
            host: host.to_owned(),
        };
        envd.wait_ready()?;
        Ok(envd)
    }

    fn wait_ready(&self) -> Result<(), EnvdHarnessError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect((self.host.as_str(), self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(EnvdHarnessError::NotReady)
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    pub fn client(&self) -> EnvdClient {
        EnvdClient::new(&self.url()).expect("the harness URL is valid")
    }

    /// The pid of the started command (envd itself unless a wrapper runs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `/proc/<pid>/status` field in KiB, e.g. `VmHWM` or `VmRSS`.
    pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// Waits for the command to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for EnvdProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
