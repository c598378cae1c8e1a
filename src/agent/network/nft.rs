//! Running `nft`, the one process this module still spawns: `nft -f -` loads a whole ruleset
//! change as one atomic kernel transaction, which is what every create and destroy relies on.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::netns::Namespace;
use super::SystemError;

/// Loads `ruleset` as one transaction, on the host or inside `namespace`.
pub(super) async fn apply(ruleset: &str, namespace: Option<&Namespace>) -> Result<(), SystemError> {
    run(&["-f", "-"], Some(ruleset), namespace).await.map(drop)
}

/// Runs `nft args...` on the host and returns what it printed.
pub(super) async fn output(args: &[&str]) -> Result<String, SystemError> {
    run(args, None, None).await
}

async fn run(
    args: &[&str],
    stdin: Option<&str>,
    namespace: Option<&Namespace>,
) -> Result<String, SystemError> {
    let command = match namespace {
        Some(ns) => format!("nft {} (in namespace {})", args.join(" "), ns.name()),
        None => format!("nft {}", args.join(" ")),
    };
    let spawn_error = |source| SystemError::Spawn {
        command: command.clone(),
        source,
    };
    let mut nft = Command::new("nft");
    nft.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(ns) = namespace {
        // The descriptor stays open until this function returns, so across the fork.
        let fd = ns.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only makes the setns(2)
        // system call, which is async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            nft.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = nft.spawn().map_err(spawn_error)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(input.as_bytes())
            .await
            .map_err(spawn_error)?;
        drop(pipe);
    }
    let output = child.wait_with_output().await.map_err(spawn_error)?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(SystemError::Nft {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
