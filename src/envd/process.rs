//! Processes envd runs for clients: spawning as a user, the registry of live and recently exited
//! processes, their output logs, stdin, signals and pseudo-terminals, and the reaper that collects
//! every exit status (including orphans when envd is PID 1).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::api::{
    Encoding, ExitInfo, ProcessInfo, ProcessSpec, PtySize, RunRequest, RunResponse, StartRequest,
    CHUNK_BYTES, REPLAY_BYTES, RUN_OUTPUT_LIMIT,
};
use super::output::{OutputLog, StreamKind};
use super::users::{resolve_path, Account, Accounts, UserError};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_RUN_TIMEOUT_SECS: u64 = 30;
/// Exited processes kept for late re-attachment (their output tail and exit status).
const EXITED_RETAINED: usize = 64;
/// Output an exited process keeps, so the retained ones cost at most 4 MiB together.
const EXITED_REPLAY_BYTES: usize = 64 << 10;
/// How long output still in the pipes is collected after a process exited; a grandchild that
/// keeps the pipe open must not hold the exit event back forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

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

/// Collects exit statuses with `waitpid(-1)` on every SIGCHLD and hands each to whoever spawned
/// that pid; statuses of processes nobody registered (orphans reparented to PID 1) are dropped,
/// which is what reaping them means.
pub struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>,
}

impl Reaper {
    pub fn start() -> io::Result<Arc<Self>> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let reaper = Arc::new(Self {
            waiting: Mutex::new(HashMap::new()),
        });
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            loop {
                task_reaper.reap_ready();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<i32, oneshot::Sender<WaitStatus>>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn reap_ready(&self) {
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            let Some(pid) = status.pid() else { break };
            if let Some(sender) = self.waiting().remove(&pid.as_raw()) {
                let _ = sender.send(status);
            }
        }
    }

    /// Spawns `command` and registers its pid before the reaper can see its exit. Spawning and
    /// reaping both run on envd's single runtime thread, so std's own wait after a failed exec
    /// never races the reaper.
    pub fn spawn(
        &self,
        command: &mut Command,
    ) -> io::Result<(std::process::Child, oneshot::Receiver<WaitStatus>)> {
        let mut waiting = self.waiting();
        let child = command.spawn()?;
        let (sender, receiver) = oneshot::channel();
        waiting.insert(child.id() as i32, sender);
        Ok((child, receiver))
    }

    /// Whether any child (registered or not) is still alive or unreaped.
    pub fn has_children() -> bool {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter and WNOWAIT leaves the child alone.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        !(rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
    }
}

pub fn exit_info(status: &WaitStatus) -> ExitInfo {
    match status {
        WaitStatus::Exited(_, code) => ExitInfo {
            exit_code: *code,
            signal: None,
        },
        WaitStatus::Signaled(_, sig, _) => ExitInfo {
            exit_code: 128 + *sig as i32,
            signal: Some(sig.as_str().to_owned()),
        },
        _ => ExitInfo {
            exit_code: -1,
            signal: None,
        },
    }
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

enum Input {
    Pipe(tokio::sync::Mutex<Option<pipe::Sender>>),
    Pty(Arc<AsyncFd<OwnedFd>>),
}

pub struct Process {
    pub pid: u32,
    pub tag: String,
    pub cmd: String,
    pub args: Vec<String>,
    input: Input,
    pub output: Arc<OutputLog>,
}

impl Process {
    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.pid,
            tag: self.tag.clone(),
            cmd: self.cmd.clone(),
            args: self.args.clone(),
            pty: matches!(self.input, Input::Pty(_)),
        }
    }

    pub fn is_running(&self) -> bool {
        self.output.exit().is_none()
    }
}

#[derive(Default)]
struct Registry {
    by_pid: HashMap<u32, Arc<Process>>,
    exited: VecDeque<u32>,
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
        if self
            .registry()
            .by_pid
            .values()
            .any(|p| p.tag == tag && p.is_running())
        {
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
        {
            let mut registry = self.registry();
            registry.exited.retain(|pid| *pid != process.pid);
            registry.by_pid.insert(process.pid, process.clone());
        }
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
        let registry = self.registry();
        let found = match selector.parse::<u32>() {
            Ok(pid) => registry.by_pid.get(&pid).cloned(),
            Err(_) => {
                let mut matching: Vec<&Arc<Process>> = registry
                    .by_pid
                    .values()
                    .filter(|p| p.tag == selector)
                    .collect();
                matching.sort_by_key(|p| {
                    (
                        p.is_running(),
                        registry.exited.iter().position(|pid| *pid == p.pid),
                    )
                });
                matching.last().map(|p| (*p).clone())
            }
        };
        found.ok_or_else(|| ProcessError::NotFound(selector.to_owned()))
    }

    fn find_running(&self, selector: &str) -> Result<Arc<Process>, ProcessError> {
        let process = self.find(selector)?;
        if !process.is_running() {
            return Err(ProcessError::Exited(selector.to_owned()));
        }
        Ok(process)
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut list: Vec<ProcessInfo> = self
            .registry()
            .by_pid
            .values()
            .filter(|p| p.is_running())
            .map(|p| p.info())
            .collect();
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
        let winsize = winsize(size);
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer on an open pty master.
        let rc = unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
        if rc != 0 {
            return Err(ProcessError::Io {
                action: "resize",
                selector: selector.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Sends `signal` to the process group of every running process.
    pub fn signal_all(&self, signal: Signal) {
        for process in self.registry().by_pid.values().filter(|p| p.is_running()) {
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

fn receiver(fd: Option<OwnedFd>) -> io::Result<pipe::Receiver> {
    let fd = fd.ok_or_else(|| io::Error::other("child pipe missing"))?;
    pipe::Receiver::from_owned_fd(fd)
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

struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

fn validate_size(size: PtySize) -> Result<(), ProcessError> {
    if size.cols == 0 || size.rows == 0 {
        return Err(ProcessError::Invalid(
            "terminal cols and rows must be positive".into(),
        ));
    }
    Ok(())
}

fn winsize(size: PtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn open_pty(size: PtySize) -> Result<Pty, ProcessError> {
    validate_size(size)?;
    let winsize = winsize(size);
    let pair = nix::pty::openpty(Some(&winsize), None).map_err(ProcessError::Pty)?;
    for fd in [&pair.master, &pair.slave] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(ProcessError::Pty)?;
    }
    let flags = nix::fcntl::fcntl(&pair.master, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(ProcessError::Pty)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&pair.master, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(ProcessError::Pty)?;
    Ok(Pty {
        master: pair.master,
        slave: pair.slave,
    })
}

async fn write_pty(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

async fn pump_pty(master: Arc<AsyncFd<OwnedFd>>, output: Arc<OutputLog>) {
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        let Ok(mut guard) = master.readable().await else {
            return;
        };
        match guard
            .try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buffer).map_err(io::Error::from))
        {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => {
                output
                    .push(StreamKind::Pty, Bytes::copy_from_slice(&buffer[..n]))
                    .await
            }
            // EIO: every slave descriptor closed, the terminal's end of output.
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        }
    }
}

async fn pump_pipe(mut pipe: pipe::Receiver, kind: StreamKind, output: Arc<OutputLog>) {
    let mut buffer = BytesMut::with_capacity(CHUNK_BYTES);
    loop {
        if buffer.capacity() < CHUNK_BYTES / 4 {
            buffer.reserve(CHUNK_BYTES);
        }
        match pipe.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => output.push(kind, buffer.split().freeze()).await,
        }
    }
}

async fn watch_exit(
    process: Arc<Process>,
    exit: oneshot::Receiver<WaitStatus>,
    mut pumps: Vec<JoinHandle<()>>,
    registry: Arc<Mutex<Registry>>,
) {
    let info = exit.await.map(|s| exit_info(&s)).unwrap_or(ExitInfo {
        exit_code: -1,
        signal: None,
    });
    let drained = tokio::time::timeout(DRAIN_AFTER_EXIT, async {
        for pump in pumps.iter_mut() {
            let _ = pump.await;
        }
    })
    .await;
    if drained.is_err() {
        pumps.iter().for_each(JoinHandle::abort);
    }
    process.output.finish(info);
    process.output.shrink(EXITED_REPLAY_BYTES);
    let mut registry = registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    registry.exited.push_back(process.pid);
    while registry.exited.len() > EXITED_RETAINED {
        if let Some(pid) = registry.exited.pop_front() {
            registry.by_pid.remove(&pid);
        }
    }
}

/// Output of a foreground run, capped at [`RUN_OUTPUT_LIMIT`]; the excess is counted.
#[derive(Default)]
struct Capture {
    data: Vec<u8>,
    dropped: u64,
}

impl Capture {
    async fn collect(&mut self, mut pipe: impl AsyncRead + Unpin) {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            match pipe.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let room = RUN_OUTPUT_LIMIT.saturating_sub(self.data.len()).min(n);
                    self.data.extend_from_slice(&buffer[..room]);
                    self.dropped += (n - room) as u64;
                }
            }
        }
    }
}

fn encode_output(stdout: Vec<u8>, stderr: Vec<u8>) -> (String, String, Encoding) {
    match (String::from_utf8(stdout), String::from_utf8(stderr)) {
        (Ok(out), Ok(err)) => (out, err, Encoding::Utf8),
        (out, err) => {
            let bytes = |r: Result<String, std::string::FromUtf8Error>| match r {
                Ok(s) => s.into_bytes(),
                Err(e) => e.into_bytes(),
            };
            let engine = base64::engine::general_purpose::STANDARD;
            (
                engine.encode(bytes(out)),
                engine.encode(bytes(err)),
                Encoding::Base64,
            )
        }
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

    #[test]
    fn base64_for_both_streams_when_either_is_binary() {
        let (out, err, encoding) = encode_output(vec![0xff, 0x00], b"ok".to_vec());
        assert_eq!(encoding, Encoding::Base64);
        assert_eq!(out, "/wA=");
        assert_eq!(err, "b2s=");
        let (out, _, encoding) = encode_output(b"hi".to_vec(), vec![]);
        assert_eq!((out.as_str(), encoding), ("hi", Encoding::Utf8));
    }
}
