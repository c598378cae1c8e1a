//! The registry of live and recently exited processes: what a client can find by pid or tag,
//! and the task that records a process's exit and retires old ones.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::wait::WaitStatus;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::reaper::exit_info;
use crate::envd::api::{ExitInfo, ProcessInfo};
use crate::envd::output::OutputLog;

/// Exited processes kept for late re-attachment (their output tail and exit status).
const EXITED_RETAINED: usize = 64;
/// Output an exited process keeps, so the retained ones cost at most 4 MiB together.
const EXITED_REPLAY_BYTES: usize = 64 << 10;
/// How long output still in the pipes is collected after a process exited; a grandchild that
/// keeps the pipe open must not hold the exit event back forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

pub(super) enum Input {
    Pipe(tokio::sync::Mutex<Option<pipe::Sender>>),
    Pty(Arc<AsyncFd<OwnedFd>>),
}

pub struct Process {
    pub pid: u32,
    pub tag: String,
    pub cmd: String,
    pub args: Vec<String>,
    pub(super) input: Input,
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
pub(super) struct Registry {
    by_pid: HashMap<u32, Arc<Process>>,
    /// Pids of exited processes still kept, oldest first.
    exited: VecDeque<u32>,
}

impl Registry {
    pub(super) fn insert(&mut self, process: Arc<Process>) {
        self.exited.retain(|pid| *pid != process.pid);
        self.by_pid.insert(process.pid, process);
    }

    pub(super) fn running(&self) -> impl Iterator<Item = &Arc<Process>> {
        self.by_pid.values().filter(|p| p.is_running())
    }

    /// A process by pid (all digits) or tag, preferring a running one, then the latest exited.
    pub(super) fn find(&self, selector: &str) -> Option<Arc<Process>> {
        match selector.parse::<u32>() {
            Ok(pid) => self.by_pid.get(&pid).cloned(),
            Err(_) => {
                let mut matching: Vec<&Arc<Process>> =
                    self.by_pid.values().filter(|p| p.tag == selector).collect();
                matching.sort_by_key(|p| {
                    (
                        p.is_running(),
                        self.exited.iter().position(|pid| *pid == p.pid),
                    )
                });
                matching.last().map(|p| (*p).clone())
            }
        }
    }

    /// Records an exit and forgets the oldest exited processes beyond what is retained.
    fn retire(&mut self, pid: u32) {
        self.exited.push_back(pid);
        while self.exited.len() > EXITED_RETAINED {
            if let Some(pid) = self.exited.pop_front() {
                self.by_pid.remove(&pid);
            }
        }
    }
}

pub(super) async fn watch_exit(
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
    registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .retire(process.pid);
}
