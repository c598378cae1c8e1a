//! The VMM process itself, shared by both backends: spawned in its own session and, when asked,
//! inside the sandbox's network namespace; its stdout is the guest console, drained into a capped
//! log, and its stderr goes to a file in the sandbox directory; it is waited for, killed and
//! reaped here. A VMM an earlier agent process started is adopted here too: the same handle,
//! watching a process that is not its child.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::Pid;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::cgroup::VmCgroup;
use super::console::ConsoleDrain;
use super::firecracker::jail::Jail;
use super::leftovers::{command_line, names_control_socket};
use super::pidfd::PidFd;
use super::{AdoptRefusal, VmFiles, VmSpec, VmmError, VmmExit, VmmKind};
use crate::config::ConsoleLogMaxBytes;

/// How long a freshly spawned VMM may take to open its control socket.
pub(crate) const SOCKET_WAIT: Duration = Duration::from_secs(10);
const SOCKET_POLL: Duration = Duration::from_millis(10);
/// Unix socket paths are limited to `sun_path`, 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// A running VMM process.
#[derive(Debug)]
pub(crate) struct VmmProcess {
    bin: PathBuf,
    handle: Handle,
    pid: u32,
    exit: Option<VmmExit>,
    /// Where the VMM says why it failed: its stderr, then any log of its own.
    diagnostics: Vec<PathBuf>,
    console: ConsoleDrain,
    /// The VM's cgroup, removed once the process has ended.
    cgroup: Option<VmCgroup>,
    /// The jail the VMM runs in, removed once the process has ended.
    jail: Option<Jail>,
}

/// How the end of the process is observed.
#[derive(Debug)]
enum Handle {
    /// Spawned by this process: waited for and reaped here, with its exit status.
    Child(Child),
    /// Started by an earlier agent process: not a child, so its end is seen on a pidfd and
    /// its parent (init) reaps it.
    Adopted(PidFd),
}

/// The first line `bin --version` prints, provided it starts with `expected` (how each VMM
/// names itself); anything else is a typed error quoting what the binary said.
pub(crate) async fn version_line(bin: &Path, expected: &str) -> Result<String, VmmError> {
    let output = Command::new(bin)
        .arg("--version")
        .output()
        .await
        .map_err(|source| VmmError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().next().map(str::trim) {
        Some(line) if output.status.success() && line.starts_with(expected) => Ok(line.to_owned()),
        _ => Err(VmmError::Version {
            bin: bin.to_owned(),
            detail: format!(
                "`--version` exited {} and printed {:?}",
                output.status,
                stdout.trim()
            ),
        }),
    }
}

/// Creates the sandbox directory (private to the agent) and removes the sockets a previous
/// VMM left behind: neither Firecracker nor QEMU can bind over an existing file.
pub(crate) fn prepare_files(files: &VmFiles, sockets: &[&Path]) -> Result<(), VmmError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&files.dir)
        .map_err(|source| VmmError::File {
            what: "failed to create sandbox directory",
            path: files.dir.clone(),
            source,
        })?;
    for socket in sockets {
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmmError::SocketPathTooLong {
                path: socket.to_path_buf(),
            });
        }
        remove_if_present(socket)?;
    }
    Ok(())
}

/// Creates `dir` empty and unwritable, for a VMM that is chrooted into it once it has opened
/// its files: there it finds nothing to read and nowhere to write.
pub(crate) fn prepare_empty_root(dir: &Path) -> Result<(), VmmError> {
    let failed = |source| VmmError::File {
        what: "failed to create the VMM's empty root",
        path: dir.to_path_buf(),
        source,
    };
    match fs::DirBuilder::new().mode(0o555).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if fs::read_dir(dir).map_err(failed)?.next().is_some() {
                return Err(failed(io::Error::new(
                    io::ErrorKind::DirectoryNotEmpty,
                    "it is not empty",
                )));
            }
            Ok(())
        }
        Err(e) => Err(failed(e)),
    }
}

pub(crate) fn remove_if_present(path: &Path) -> Result<(), VmmError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmmError::File {
            what: "failed to remove stale socket",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates `path` empty (mode 0600), for a log the VMM opens itself.
pub(crate) fn reset_log(path: &Path) -> Result<(), VmmError> {
    open_log(path, true).map(drop)
}

fn open_log(path: &Path, truncate: bool) -> Result<File, VmmError> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .append(!truncate)
        .truncate(truncate)
        .mode(0o600)
        .open(path)
        .map_err(|source| VmmError::File {
            what: "failed to open log",
            path: path.to_path_buf(),
            source,
        })
}

/// Spawns `bin args` detached from the agent: a new session (no signals from the agent's
/// terminal or process group), stdin closed, and in `netns` when given. Its stdout is the guest
/// console, which starts empty (one VM per sandbox directory) and is kept within `console_cap`;
/// its stderr is appended to the VMM log. A confined `spec` gets its cgroup, which the process
/// joins before it executes `bin` (so all the VMM allocates is charged there) and which is
/// removed when the process has ended, or at once if it could not start.
pub(crate) fn spawn(
    bin: &Path,
    args: &[OsString],
    netns: Option<&Path>,
    spec: &VmSpec,
    console_cap: ConsoleLogMaxBytes,
) -> Result<VmmProcess, VmmError> {
    let cgroup = match &spec.confinement {
        Some(confinement) => {
            let cgroups = &confinement.cgroups;
            Some(cgroups.create(&spec.id, &cgroups.limits(spec.vcpus, spec.memory_mib))?)
        }
        None => None,
    };
    let spawned = spawn_into(bin, args, netns, &spec.files, console_cap, cgroup.clone());
    if let (Err(_), Some(cgroup)) = (&spawned, cgroup) {
        if let Err(error) = cgroup.remove_empty() {
            tracing::warn!(id = %spec.id, %error, "removing the cgroup of a VMM that did not start");
        }
    }
    spawned
}

fn spawn_into(
    bin: &Path,
    args: &[OsString],
    netns: Option<&Path>,
    files: &VmFiles,
    console_cap: ConsoleLogMaxBytes,
    cgroup: Option<VmCgroup>,
) -> Result<VmmProcess, VmmError> {
    let vmm_log = open_log(&files.vmm_log, false)?;
    let netns_fd = netns
        .map(|path| {
            File::open(path).map_err(|source| VmmError::Netns {
                path: path.to_path_buf(),
                source,
            })
        })
        .transpose()?;
    let cgroup_procs = match &cgroup {
        Some(cgroup) => cgroup.join_handles()?,
        None => Vec::new(),
    };
    let cgroup_raw: Vec<i32> = cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect();

    // Should spawning fail, dropping the command closes the pipe and the drain ends by itself.
    let (console, console_pipe) = ConsoleDrain::start(files, console_cap)?;
    let mut command = Command::new(bin);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(console_pipe)
        .stderr(vmm_log)
        .kill_on_drop(false);
    let netns_raw = netns_fd.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe system calls write(2), setsid(2), sigaction(2) and setns(2); it
    // allocates nothing (the descriptors were collected before the fork).
    unsafe {
        command.pre_exec(move || {
            for &raw in &cgroup_raw {
                // `0` is the writing process: the child moves itself before it runs the VMM.
                // SAFETY: the parent holds `cgroup_procs` open until `spawn` returns.
                let fd = BorrowedFd::borrow_raw(raw);
                nix::unistd::write(fd, b"0")?;
            }
            nix::unistd::setsid()?;
            // A VMM that outlives the agent writes its console into a pipe nobody reads: it
            // must get EPIPE and drop the output, not die of SIGPIPE (an ignored signal stays
            // ignored across exec).
            signal::signal(Signal::SIGPIPE, SigHandler::SigIgn)?;
            if let Some(raw) = netns_raw {
                // SAFETY: `netns_fd` is held open by the parent until `spawn` returns, and the
                // child has its own copy of the descriptor table until exec.
                let fd = BorrowedFd::borrow_raw(raw);
                nix::sched::setns(fd, CloneFlags::CLONE_NEWNET)?;
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| VmmError::Spawn {
        bin: bin.to_path_buf(),
        source,
    })?;
    drop(netns_fd);
    drop(cgroup_procs);
    let pid = child.id().expect("a just-spawned child has a pid");
    tracing::debug!(bin = %bin.display(), pid, "VMM process started");
    Ok(VmmProcess {
        bin: bin.to_path_buf(),
        handle: Handle::Child(child),
        pid,
        exit: None,
        diagnostics: vec![files.vmm_log.clone()],
        console,
        cgroup,
        jail: None,
    })
}

/// Takes over `pid` as the `kind` VMM of `spec`, provided its command line names `socket` as
/// its control socket, and drains its console again; returns it with that command line. The
/// process is checked through a pidfd opened first, so a pid reused after the check cannot be
/// taken for it. A confined VMM keeps the cgroup it runs in, removed when it ends.
pub(crate) fn adopt(
    bin: &Path,
    pid: u32,
    kind: VmmKind,
    spec: &VmSpec,
    socket: &Path,
    console_cap: ConsoleLogMaxBytes,
) -> Result<(VmmProcess, Vec<String>), VmmError> {
    let refused = |refusal| VmmError::NotAdoptable {
        pid,
        id: spec.id.clone(),
        kind,
        refusal,
    };
    let wait_failed = |source| VmmError::Wait { pid, source };
    let pidfd = match PidFd::open(pid) {
        Ok(pidfd) => pidfd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(refused(AdoptRefusal::Gone)),
        Err(e) => return Err(wait_failed(e)),
    };
    let cmdline = match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            return Err(refused(AdoptRefusal::Gone))
        }
        Err(e) => return Err(wait_failed(e)),
    };
    // A process that ended has an empty command line; one running after the read is the
    // pidfd's, so the command line read was its own.
    if pidfd.ended().map_err(wait_failed)? {
        return Err(refused(AdoptRefusal::Gone));
    }
    let args = command_line(&cmdline);
    // A jailed Firecracker's socket is named inside its jail, the same for every VM: its
    // `--id` says whose it is.
    let other_id = args
        .windows(2)
        .any(|pair| pair[0] == "--id" && pair[1] != spec.id);
    if !names_control_socket(&args, kind, socket) || other_id {
        return Err(refused(AdoptRefusal::OtherProcess {
            socket: socket.to_path_buf(),
        }));
    }
    let console = ConsoleDrain::attach(&spec.files, console_cap)?;
    tracing::debug!(bin = %bin.display(), pid, "VMM process adopted");
    let process = VmmProcess {
        bin: bin.to_path_buf(),
        handle: Handle::Adopted(pidfd),
        pid,
        exit: None,
        diagnostics: vec![spec.files.vmm_log.clone()],
        console,
        cgroup: spec.confinement.as_ref().map(|c| c.cgroup(spec)),
        jail: None,
    };
    Ok((process, args))
}

impl VmmProcess {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Polls until `socket` accepts a connection, failing early when the process exits.
    pub(crate) async fn wait_for_socket(&mut self, socket: &Path) -> Result<UnixStream, VmmError> {
        let started = Instant::now();
        loop {
            if let Ok(stream) = UnixStream::connect(socket).await {
                return Ok(stream);
            }
            if let Some(status) = self.try_exit().await? {
                return Err(self.exited_early(status));
            }
            if started.elapsed() > SOCKET_WAIT {
                return Err(VmmError::SocketTimeout {
                    bin: self.bin.clone(),
                    path: socket.to_path_buf(),
                    waited: SOCKET_WAIT,
                });
            }
            tokio::time::sleep(SOCKET_POLL).await;
        }
    }

    /// Makes the process's jail go with it.
    pub(crate) fn with_jail(mut self, jail: Jail) -> Self {
        self.jail = Some(jail);
        self
    }

    /// Adds a log the VMM writes itself to those quoted when it fails.
    pub(crate) fn with_diagnostics_log(mut self, path: PathBuf) -> Self {
        self.diagnostics.push(path);
        self
    }

    /// The error for a process that died while being set up, quoting the end of the last of
    /// its logs that has anything in it.
    pub(crate) fn exited_early(&self, status: VmmExit) -> VmmError {
        let (log, tail) = self
            .diagnostics
            .iter()
            .rev()
            .find_map(|path| log_tail(path).map(|tail| (path.clone(), tail)))
            .unwrap_or_else(|| (self.diagnostics[0].clone(), "(nothing)".to_owned()));
        VmmError::ExitedEarly {
            bin: self.bin.clone(),
            status,
            log,
            tail,
        }
    }

    /// The exit, without waiting, once the process has exited; its console output is then all
    /// in the log.
    pub(crate) async fn try_exit(&mut self) -> Result<Option<VmmExit>, VmmError> {
        if self.exit.is_none() {
            self.exit = match &mut self.handle {
                Handle::Child(child) => child.try_wait().map(|s| s.map(VmmExit::Status)),
                Handle::Adopted(pidfd) => pidfd
                    .ended()
                    .map(|ended| ended.then_some(VmmExit::Unobserved)),
            }
            .map_err(|source| VmmError::Wait {
                pid: self.pid,
                source,
            })?;
        }
        if self.exit.is_some() {
            self.console.finish().await;
            self.release().await;
        }
        Ok(self.exit)
    }

    /// Removes the cgroup and jail of a process that has ended; what cannot be removed is left
    /// to the next agent's clean-up.
    async fn release(&mut self) {
        if let Some(cgroup) = self.cgroup.take() {
            if let Err(error) = cgroup.remove().await {
                tracing::warn!(pid = self.pid, %error, "could not remove an ended VMM's cgroup");
            }
        }
        if let Some(jail) = self.jail.take() {
            if let Err(error) = jail.remove() {
                tracing::warn!(pid = self.pid, %error, "could not remove an ended VMM's jail");
            }
        }
    }

    /// Waits for the process to exit and for its console output to reach the log.
    pub(crate) async fn wait(&mut self) -> Result<VmmExit, VmmError> {
        let exit = match self.exit {
            Some(exit) => exit,
            None => {
                let exit = match &mut self.handle {
                    Handle::Child(child) => child.wait().await.map(VmmExit::Status),
                    Handle::Adopted(pidfd) => pidfd.wait().await.map(|()| VmmExit::Unobserved),
                }
                .map_err(|source| VmmError::Wait {
                    pid: self.pid,
                    source,
                })?;
                self.exit = Some(exit);
                exit
            }
        };
        self.console.finish().await;
        self.release().await;
        Ok(exit)
    }

    /// Waits up to `limit`; `None` when the process is still running.
    pub(crate) async fn wait_for(&mut self, limit: Duration) -> Result<Option<VmmExit>, VmmError> {
        match tokio::time::timeout(limit, self.wait()).await {
            Ok(exit) => exit.map(Some),
            Err(_) => Ok(None),
        }
    }

    pub(crate) async fn kill(&mut self) -> Result<VmmExit, VmmError> {
        if let Some(exit) = self.try_exit().await? {
            return Ok(exit);
        }
        let sent = match &self.handle {
            // The pid cannot have been reused: the child is not reaped until `wait` below.
            Handle::Child(_) => {
                let pid = Pid::from_raw(i32::try_from(self.pid).expect("pids fit in i32"));
                signal::kill(pid, Signal::SIGKILL).map_err(io::Error::from)
            }
            // Through the pidfd, which names this process and never a later one with its pid.
            Handle::Adopted(pidfd) => pidfd.signal(Signal::SIGKILL),
        };
        if let Err(error) = sent {
            tracing::warn!(pid = self.pid, %error, "SIGKILL to VMM failed");
        }
        self.wait().await
    }
}

/// The last lines of a log, for error messages; `None` when it is empty or unreadable.
pub(crate) fn log_tail(path: &Path) -> Option<String> {
    const TAIL_BYTES: u64 = 2048;
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
        .ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes).trim().to_owned();
    (!text.is_empty()).then_some(text)
}
