//! VMM processes that outlived the agent that started them (VMs run in their own session and
//! survive an agent restart), found by the control socket on their command line, which names
//! the sandbox directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use super::firecracker::jail;
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
            let (sandbox_id, kind) = control_socket_owner(layout, &command_line(&cmdline))?;
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

/// The arguments in the contents of `/proc/<pid>/cmdline`.
pub(crate) fn command_line(cmdline: &[u8]) -> Vec<String> {
    cmdline
        .split(|b| *b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// The control socket a VMM's command line names, and which VMM it is: QEMU's
/// `-qmp unix:PATH,server=on,...` (a comma in PATH written twice) or Firecracker's
/// `--api-sock PATH`.
fn control_socket(args: &[String]) -> Option<(PathBuf, VmmKind)> {
    args.windows(2).find_map(|pair| match pair[0].as_str() {
        "-qmp" => pair[1]
            .strip_prefix("unix:")
            .map(|qmp| (PathBuf::from(unescape_option(qmp)), VmmKind::Qemu)),
        "--api-sock" => Some((PathBuf::from(&pair[1]), VmmKind::Firecracker)),
        _ => None,
    })
}

/// Whether `args` are those of a `kind` VMM whose control socket is `socket`.
pub(crate) fn names_control_socket(args: &[String], kind: VmmKind, socket: &Path) -> bool {
    control_socket(args).is_some_and(|(path, named)| named == kind && path == socket)
}

/// The sandbox and VMM whose control socket a command line names, if any. A jailed
/// Firecracker names its socket inside its jail, so its `--id` and the jail say whose it is.
fn control_socket_owner(layout: &Layout, args: &[String]) -> Option<(String, VmmKind)> {
    let (path, kind) = control_socket(args)?;
    if kind == VmmKind::Firecracker && path == Path::new(jail::API_SOCKET) {
        let id = args
            .windows(2)
            .find_map(|pair| (pair[0] == "--id").then(|| pair[1].clone()))
            .filter(|id| id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))?;
        let jailed = fs::read_dir(layout.jails_dir())
            .ok()?
            .flatten()
            .any(|exec| exec.path().join(&id).join("root").is_dir());
        return jailed.then_some((id, kind));
    }
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

    fn args(line: &[&str]) -> Vec<String> {
        line.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn control_sockets_map_back_to_their_sandbox() {
        let layout = Layout::new("/srv/w,x");
        let fc = layout.firecracker_socket("cl-a");
        let fc_line = args(&[
            "firecracker",
            "--api-sock",
            fc.to_str().unwrap(),
            "--id",
            "cl-a",
        ]);
        assert_eq!(
            control_socket_owner(&layout, &fc_line),
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
        let qemu_line = args(&["qemu-system-x86_64", "-name", "wrenn-cl-b", "-qmp", &qmp]);
        assert_eq!(
            control_socket_owner(&layout, &qemu_line),
            Some(("cl-b".into(), VmmKind::Qemu))
        );
        for other in [
            args(&[
                "firecracker",
                "--api-sock",
                "/srv/other/sandboxes/cl-a/firecracker.sock",
            ]),
            args(&[
                "firecracker",
                "--api-sock",
                "/srv/w,x/sandboxes/cl-a/console.log",
            ]),
            args(&["firecracker", "--api-sock"]),
            // Naming the socket is not enough: it must be the VMM's own control socket.
            args(&["cat", fc.to_str().unwrap()]),
            args(&["qemu-system-x86_64", "-chardev", &qmp]),
        ] {
            assert_eq!(control_socket_owner(&layout, &other), None, "{other:?}");
        }
    }

    #[test]
    fn a_jailed_firecracker_is_known_by_its_id_and_its_jail() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        fs::create_dir_all(layout.jails_dir().join("firecracker/cl-j/root")).unwrap();
        let line = |id: &str| {
            args(&[
                "/firecracker",
                "--id",
                id,
                "--start-time-us",
                "1",
                "--api-sock",
                "/api.sock",
            ])
        };
        assert_eq!(
            control_socket_owner(&layout, &line("cl-j")),
            Some(("cl-j".into(), VmmKind::Firecracker))
        );
        // No jail of that sandbox, or an ID no sandbox can have.
        assert_eq!(control_socket_owner(&layout, &line("cl-k")), None);
        fs::create_dir_all(layout.jails_dir().join("x/../root")).unwrap();
        assert_eq!(control_socket_owner(&layout, &line("..")), None);
        assert_eq!(
            control_socket_owner(&layout, &args(&["/firecracker", "--api-sock", "/api.sock"])),
            None
        );
    }

    #[test]
    fn a_command_line_names_one_vmm_and_socket() {
        let layout = Layout::new("/srv");
        let qmp = layout.qmp_socket("cl-a");
        let line = args(&["qemu", "-qmp", &format!("unix:{},server=on", qmp.display())]);
        assert!(names_control_socket(&line, VmmKind::Qemu, &qmp));
        assert!(!names_control_socket(&line, VmmKind::Firecracker, &qmp));
        assert!(!names_control_socket(
            &line,
            VmmKind::Qemu,
            &layout.qmp_socket("cl-b")
        ));
        assert_eq!(
            command_line(b"qemu\0-qmp\0unix:/s,server=on\0"),
            ["qemu", "-qmp", "unix:/s,server=on", ""]
        );
    }
}
