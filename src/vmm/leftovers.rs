//! VMM processes that outlived the agent that started them (VMs run in their own session and
//! survive an agent restart), found by the control socket on their command line, which names
//! the sandbox directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use super::VmmKind;
use crate::config::Layout;

/// A VMM process still running for a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub sandbox_id: String,
    pub pid: u32,
    pub kind: VmmKind,
}

/// Every running Firecracker or QEMU whose control socket lies in a sandbox directory of
/// `layout`.
pub fn find_leftovers(layout: &Layout) -> Vec<Leftover> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<Leftover> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let (sandbox_id, kind) = cmdline
                .split(|b| *b == 0)
                .filter_map(|arg| std::str::from_utf8(arg).ok())
                .find_map(|arg| control_socket_owner(layout, arg))?;
            Some(Leftover {
                sandbox_id,
                pid,
                kind,
            })
        })
        .collect();
    found.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id).then(a.pid.cmp(&b.pid)));
    found
}

/// The sandbox and VMM a command-line argument names as its control socket, if any.
fn control_socket_owner(layout: &Layout, arg: &str) -> Option<(String, VmmKind)> {
    let (path, kind) = match arg.strip_prefix("unix:") {
        // QEMU's `-qmp unix:PATH,server=on,...`, where a comma in PATH is written twice.
        Some(qmp) => (PathBuf::from(unescape_option(qmp)), VmmKind::Qemu),
        None => (PathBuf::from(arg), VmmKind::Firecracker),
    };
    let sandbox_id = path.parent()?.file_name()?.to_str()?.to_owned();
    let expected = match kind {
        VmmKind::Qemu => layout.qmp_socket(&sandbox_id),
        VmmKind::Firecracker => layout.firecracker_socket(&sandbox_id),
    };
    (path == expected).then_some((sandbox_id, kind))
}

/// The first value of a QEMU option string: up to the first single comma, `,,` meaning `,`.
fn unescape_option(value: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
            } else {
                break;
            }
        }
        out.push(c);
    }
    out
}

/// How long a SIGKILLed leftover may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Kills a leftover VMM and waits until it has exited. The process is not the agent's child,
/// so its exit is observed in /proc rather than reaped.
pub async fn kill_leftover(leftover: &Leftover) -> bool {
    let Ok(raw) = i32::try_from(leftover.pid) else {
        return false;
    };
    if signal::kill(Pid::from_raw(raw), Signal::SIGKILL).is_err() {
        return !alive(leftover.pid);
    }
    let started = Instant::now();
    while alive(leftover.pid) {
        if started.elapsed() > KILL_WAIT {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Running, as opposed to gone or a zombie awaiting its parent.
fn alive(pid: u32) -> bool {
    let stat = fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"));
    match stat {
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_sockets_map_back_to_their_sandbox() {
        let layout = Layout::new("/srv/w,x");
        let fc = layout.firecracker_socket("cl-a");
        assert_eq!(
            control_socket_owner(&layout, fc.to_str().unwrap()),
            Some(("cl-a".into(), VmmKind::Firecracker))
        );
        let qmp = format!(
            "unix:{},server=on,wait=off",
            layout
                .qmp_socket("cl-b")
                .display()
                .to_string()
                .replace(',', ",,")
        );
        assert_eq!(
            control_socket_owner(&layout, &qmp),
            Some(("cl-b".into(), VmmKind::Qemu))
        );
        assert_eq!(
            control_socket_owner(&layout, "/srv/other/sandboxes/cl-a/firecracker.sock"),
            None
        );
        assert_eq!(
            control_socket_owner(&layout, "/srv/w,x/sandboxes/cl-a/console.log"),
            None
        );
        assert_eq!(control_socket_owner(&layout, "--api-sock"), None);
    }
}
