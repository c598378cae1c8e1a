//! Running `ip` and `nft`: one place that spawns them and turns a failure into an error carrying
//! the command line and what the tool printed.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Runs `program args...`, feeding `stdin` when given, and returns its standard output.
pub(super) async fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CommandError> {
    let command = describe(program, args, stdin);
    let spawn_error = |source| CommandError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_error)?;
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
        Err(CommandError::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn describe(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut text = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(input) = stdin {
        // Batches and rulesets are short; showing them makes a failing line findable.
        text.push_str(" <<< ");
        text.push_str(&input.trim().replace('\n', "; "));
    }
    text
}
