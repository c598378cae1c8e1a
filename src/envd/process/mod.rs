//! Processes envd runs for clients: preparing and spawning a command as a user, foreground runs
//! and background processes with their stdin, signals and terminal sizes. The parts live by
//! name: `reaper` (every exit status, orphans included when envd is PID 1), `registry` (live and
//! recently exited processes), `pty` (pseudo-terminals) and `capture` (output over pipes).

mod capture;
mod pty;
mod reaper;
mod registry;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use super::api::{
    ExitInfo, ProcessInfo, ProcessSpec, PtySize, RunRequest, RunResponse, StartRequest,
    REPLAY_BYTES,
};
use super::output::{OutputLog, StreamKind};
use super::users::{resolve_path, Account, Accounts, UserError};
use capture::{encode_output, pump_pipe, receiver, Capture};
use pty::{open_pty, pump_pty, resize_pty, validate_size, write_pty};
use reaper::exit_info;
pub use reaper::Reaper;
pub use registry::Process;
use registry::{watch_exit, Input, Registry};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_RUN_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    User(#[from] UserError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("working directory {0} does not exist or is not a directory")]
    MissingCwd(String),
    #[error("command `{0}` not found")]
    CommandNotFound(String),
    #[error("permission denied running `{cmd}`: {source}")]
    PermissionDenied { cmd: String, source: io::Error },
    #[error("could not start `{cmd}`: {source}")]
    Spawn { cmd: String, source: io::Error },
    #[error("no process with pid or tag `{0}`")]
    NotFound(String),
    #[error("process `{0}` has already exited")]
    Exited(String),
    #[error("tag `{0}` is already used by a running process")]
    TagInUse(String),
    #[error("process `{0}` does not run on a terminal")]
    NotPty(String),
    #[error("stdin of process `{0}` is closed")]
    StdinClosed(String),
    #[error("could not create a pseudo-terminal: {0}")]
    Pty(nix::Error),
    #[error("could not {action} process `{selector}`: {source}")]
    Io {
        action: &'static str,
        selector: String,
        source: io::Error,
    },
}

/// Settings `/init` installs for every later request.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
}

pub fn parse_signal(raw: &str) -> Result<Signal, ProcessError> {
    let invalid = || ProcessError::Invalid(format!("unknown signal `{raw}`"));
    if let Ok(number) = raw.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| invalid());
    }
    let upper = raw.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| invalid())
}

fn validate_tag(tag: &str) -> Result<(), ProcessError> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && !tag.bytes().all(|b| b.is_ascii_digit())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ProcessError::Invalid(format!(
            "tag `{tag}` must be 1-64 letters, digits, `-`, `_` or `.`, and not all digits"
        )))
    }
}

/// Everything needed to spawn: the command with environment, user and directory applied.
struct Prepared {
    command: Command,
    cmd: String,
}

pub struct Processes {
    reaper: Arc<Reaper>,
    registry: Arc<Mutex<Registry>>,
}

impl Processes {
    pub fn new(reaper: Arc<Reaper>) -> Self {
        Self {
            reaper,
            registry: Arc::default(),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn prepare(
        spec: &ProcessSpec,
        defaults: &Defaults,
        pty: bool,
    ) -> Result<Prepared, ProcessError> {
        if spec.cmd.is_empty() || spec.cmd.contains('\0') {
            return Err(ProcessError::Invalid(
                "`cmd` must be a non-empty command".into(),
            ));
        }
        let accounts = Accounts::load()?;
        let account = accounts.effective(spec.user.as_deref().or(defaults.user.as_deref()))?;
        let cwd = match spec.cwd.as_deref().or(defaults.workdir.as_deref()) {
            Some(raw) => {
                let path = resolve_path(raw, &account.home)
                    .ok_or_else(|| ProcessError::Invalid(format!("invalid cwd `{raw}`")))?;
                if !path.is_dir() {
                    return Err(ProcessError::MissingCwd(path.display().to_string()));
                }
                path
            }
            None if account.home.is_dir() => account.home.clone(),
            None => "/".into(),
        };
        if spec.cmd.contains('/') && !resolve_path(&spec.cmd, &cwd).is_some_and(|p| p.exists()) {
            return Err(ProcessError::CommandNotFound(spec.cmd.clone()));
        }

        let mut command = Command::new(&spec.cmd);
        command.args(&spec.args).current_dir(&cwd).env_clear();
        command
            .env("PATH", DEFAULT_PATH)
            .env("HOME", &account.home)
            .env("USER", &account.name)
            .env("LOGNAME", &account.name)
            .env("SHELL", &account.shell);
        if pty {
            command.env("TERM", "xterm-256color");
        }
        command.envs(&defaults.env).envs(&spec.envs);
        install_pre_exec(&mut command, &account, pty);
        Ok(Prepared {
            command,
            cmd: spec.cmd.clone(),
        })
    }

    fn spawn(
        &self,
        prepared: &mut Prepared,
    ) -> Result<(std::process::Child, oneshot::Receiver<WaitStatus>), ProcessError> {
        self.reaper
            .spawn(&mut prepared.command)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => ProcessError::CommandNotFound(prepared.cmd.clone()),
                io::ErrorKind::PermissionDenied => ProcessError::PermissionDenied {
                    cmd: prepared.cmd.clone(),
                    source,
                },
                _ => ProcessError::Spawn {
                    cmd: prepared.cmd.clone(),
                    source,
                },
            })
    }

    /// Runs a process to completion (or its timeout) and returns its output.
    pub async fn run(
        &self,
        request: &RunRequest,
        defaults: &Defaults,
    ) -> Result<RunResponse, ProcessError> {
        let timeout = Duration::from_secs(
            request
                .timeout_sec
                .unwrap_or(DEFAULT_RUN_TIMEOUT_SECS)
                .max(1),
        );
        let mut prepared = Self::prepare(&request.process, defaults, false)?;
        prepared
            .command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let (mut child, mut exit) = self.spawn(&mut prepared)?;
        let io_error = |source| ProcessError::Io {
            action: "read output of",
            selector: request.process.cmd.clone(),
            source,
        };
        let stdout = receiver(child.stdout.take().map(OwnedFd::from)).map_err(io_error)?;
        let stderr = receiver(child.stderr.take().map(OwnedFd::from)).map_err(io_error)?;
        let pid = child.id();
        let mut out = Capture::default();
        let mut err = Capture::default();
        let finished = tokio::time::timeout(timeout, async {
            let (status, (), ()) =
                tokio::join!(&mut exit, out.collect(stdout), err.collect(stderr));
            status
        })
        .await;
        let (status, timed_out) = match finished {
            Ok(status) => (status.ok(), false),
            Err(_) => {
                let _ = signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                (
                    tokio::time::timeout(Duration::from_secs(5), exit)
                        .await
                        .ok()
                        .and_then(Result::ok),
                    true,
                )
            }
        };
        let info = status.as_ref().map(exit_info).unwrap_or(ExitInfo {
            exit_code: -1,
            signal: None,
        });
        let (stdout, stderr, encoding) = encode_output(out.data, err.data);
        Ok(RunResponse {
            stdout,
            stderr,
            exit_code: info.exit_code,
            signal: info.signal,
            duration_ms: started.elapsed().as_millis() as u64,
            encoding,
            timed_out,
            stdout_dropped: out.dropped,
            stderr_dropped: err.dropped,
        })
    }

    /// Starts a process in the background; its output goes to its log until it exits.
    pub fn start(
        &self,
        request: &StartRequest,
        defaults: &Defaults,
    ) -> Result<Arc<Process>, ProcessError> {
        let tag = match &request.tag {
            Some(tag) => {
                validate_tag(tag)?;
                tag.clone()
            }
            None => {
                let prefix = if request.pty.is_some() { "pty" } else { "proc" };
                format!("{prefix}-{:08x}", rand::random::<u32>())
            }
        };
        if self.registry().running().any(|p| p.tag == tag) {
            return Err(ProcessError::TagInUse(tag));
        }
        let mut prepared = Self::prepare(&request.process, defaults, request.pty.is_some())?;
        let output = Arc::new(OutputLog::new(REPLAY_BYTES));
        let mut pumps = Vec::new();
        let (child, exit, input) = match request.pty {
            Some(size) => {
                let pty = open_pty(size)?;
                let slave = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
                let stdio = (slave(&pty.slave), slave(&pty.slave), slave(&pty.slave));
                let (Ok(stdin), Ok(stdout), Ok(stderr)) = stdio else {
                    return Err(ProcessError::Pty(nix::Error::last()));
                };
                prepared.command.stdin(stdin).stdout(stdout).stderr(stderr);
                let spawned = self.spawn(&mut prepared);
                // The parent's copies of the slave must close so the master sees EOF at exit.
                drop(prepared);
                drop(pty.slave);
                let (child, exit) = spawned?;
                // SAFETY: the master descriptor is owned by the AsyncFd for its whole life.
                let registered = unsafe { AsyncFd::register(pty.master) };
                let master = Arc::new(
                    registered.map_err(|e| ProcessError::Pty(errno_of(&e.into_parts().1)))?,
                );
                pumps.push(tokio::spawn(pump_pty(master.clone(), output.clone())));
                (child, exit, Input::Pty(master))
            }
            None => {
                prepared
                    .command
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let (mut child, exit) = self.spawn(&mut prepared)?;
                let selector = child.id().to_string();
                let io_error = |source| ProcessError::Io {
                    action: "attach pipes of",
                    selector: selector.clone(),
                    source,
                };
                let stdin = child
                    .stdin
                    .take()
                    .map(|s| pipe::Sender::from_owned_fd(OwnedFd::from(s)))
                    .transpose()
                    .map_err(io_error)?;
                let stdout = receiver(child.stdout.take().map(OwnedFd::from)).map_err(io_error)?;
                let stderr = receiver(child.stderr.take().map(OwnedFd::from)).map_err(io_error)?;
                pumps.push(tokio::spawn(pump_pipe(
                    stdout,
                    StreamKind::Stdout,
                    output.clone(),
                )));
                pumps.push(tokio::spawn(pump_pipe(
                    stderr,
                    StreamKind::Stderr,
                    output.clone(),
                )));
                (child, exit, Input::Pipe(tokio::sync::Mutex::new(stdin)))
            }
        };
        let process = Arc::new(Process {
            pid: child.id(),
            tag,
            cmd: request.process.cmd.clone(),
            args: request.process.args.clone(),
            input,
            output,
        });
        self.registry().insert(process.clone());
        tokio::spawn(watch_exit(
            process.clone(),
            exit,
            pumps,
            self.registry.clone(),
        ));
        Ok(process)
    }

    /// Finds a process by pid (all digits) or tag, preferring a running one.
    pub fn find(&self, selector: &str) -> Result<Arc<Process>, ProcessError> {
        self.registry()
            .find(selector)
            .ok_or_else(|| ProcessError::NotFound(selector.to_owned()))
    }

    fn find_running(&self, selector: &str) -> Result<Arc<Process>, ProcessError> {
        let process = self.find(selector)?;
        if !process.is_running() {
            return Err(ProcessError::Exited(selector.to_owned()));
        }
        Ok(process)
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut list: Vec<ProcessInfo> = self.registry().running().map(|p| p.info()).collect();
        list.sort_by_key(|p| p.pid);
        list
    }

    pub fn signal(&self, selector: &str, signal: Signal) -> Result<(), ProcessError> {
        let process = self.find_running(selector)?;
        signal::kill(Pid::from_raw(process.pid as i32), signal).map_err(|errno| match errno {
            nix::Error::ESRCH => ProcessError::Exited(selector.to_owned()),
            errno => ProcessError::Io {
                action: "signal",
                selector: selector.to_owned(),
                source: errno.into(),
            },
        })
    }

    pub async fn write_stdin(&self, selector: &str, data: &[u8]) -> Result<(), ProcessError> {
        let process = self.find_running(selector)?;
        let io_error = |source| ProcessError::Io {
            action: "write to",
            selector: selector.to_owned(),
            source,
        };
        match &process.input {
            Input::Pipe(stdin) => {
                let mut stdin = stdin.lock().await;
                let sink = stdin
                    .as_mut()
                    .ok_or_else(|| ProcessError::StdinClosed(selector.to_owned()))?;
                match sink.write_all(data).await {
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                        *stdin = None;
                        Err(ProcessError::StdinClosed(selector.to_owned()))
                    }
                    other => other.map_err(io_error),
                }
            }
            Input::Pty(master) => write_pty(master, data).await.map_err(io_error),
        }
    }

    pub async fn close_stdin(&self, selector: &str) -> Result<(), ProcessError> {
        let process = self.find_running(selector)?;
        match &process.input {
            Input::Pipe(stdin) => {
                stdin.lock().await.take();
                Ok(())
            }
            // A terminal has no end of input; the client sends ^D instead.
            Input::Pty(_) => Err(ProcessError::NotPty(selector.to_owned())),
        }
    }

    pub fn resize(&self, selector: &str, size: PtySize) -> Result<(), ProcessError> {
        let process = self.find_running(selector)?;
        let Input::Pty(master) = &process.input else {
            return Err(ProcessError::NotPty(selector.to_owned()));
        };
        validate_size(size)?;
        resize_pty(master, size).map_err(|source| ProcessError::Io {
            action: "resize",
            selector: selector.to_owned(),
            source,
        })
    }

    /// Sends `signal` to the process group of every running process.
    pub fn signal_all(&self, signal: Signal) {
        for process in self.registry().running() {
            let pid = Pid::from_raw(process.pid as i32);
            if signal::killpg(pid, signal).is_err() {
                let _ = signal::kill(pid, signal);
            }
        }
    }
}

fn errno_of(error: &io::Error) -> nix::Error {
    nix::Error::from_raw(error.raw_os_error().unwrap_or(libc::EIO))
}

/// Sets up, in the child between fork and exec, the process group (or session for a terminal)
/// and the identity of `account`.
fn install_pre_exec(command: &mut Command, account: &Account, pty: bool) {
    let groups: Vec<libc::gid_t> = account.groups.clone();
    let (uid, gid) = (account.uid, account.gid);
    let switch_user = nix::unistd::geteuid().is_root() || nix::unistd::geteuid().as_raw() != uid;
    // SAFETY: the closure only makes async-signal-safe system calls on data prepared before fork.
    unsafe {
        command.pre_exec(move || {
            if pty {
                if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::setpgid(0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            if switch_user
                && (libc::setgroups(groups.len(), groups.as_ptr()) == -1
                    || libc::setgid(gid) == -1
                    || libc::setuid(uid) == -1)
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_signal_names_and_numbers() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("kill").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("2").unwrap(), Signal::SIGINT);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("999").is_err());
    }

    #[test]
    fn validates_tags() {
        assert!(validate_tag("proc-0a1b2c3d").is_ok());
        assert!(validate_tag("1234").is_err());
        assert!(validate_tag("").is_err());
        assert!(validate_tag("a b").is_err());
    }
}
