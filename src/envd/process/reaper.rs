//! The reaper: collects every child's exit status on SIGCHLD, hands each to whoever spawned
//! that pid, and (as PID 1) reaps orphans nobody registered.

use std::collections::HashMap;
use std::io;
use std::process::Command;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::sync::oneshot;

use crate::envd::api::ExitInfo;

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
