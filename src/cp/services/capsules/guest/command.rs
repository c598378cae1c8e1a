//! The one parser of a command to run in a capsule. `POST /exec`, the exec stream's `start` frame
//! and the PTY's `start` frame all carry a [`CommandRequest`]; each entry point accepts its own
//! fields of it, and one set of checks turns it into envd's request.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::super::CapsuleError;
use crate::envd::api::{ProcessSpec, PtySize, RunRequest, StartRequest};

/// Foreground commands may run at most a day.
pub const MAX_EXEC_TIMEOUT_SEC: u64 = 24 * 3600;
/// What a PTY runs when its start frame names no command.
pub const DEFAULT_PTY_CMD: &str = "/bin/bash";
/// A PTY's size when its start frame names none (or zero).
pub const DEFAULT_PTY_SIZE: PtySize = PtySize { cols: 80, rows: 24 };

/// Where a command comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// `POST /exec`: `cmd` (required), `args`, `envs`, `cwd`, `timeout_sec`, `background`, `tag`.
    Exec,
    /// The exec stream's `start` frame: `cmd` (required), `args`, `envs`, `cwd`.
    ExecStream,
    /// The PTY's `start` frame, all optional: `cmd`, `args`, `envs`, `cwd`, `user`, `cols`, `rows`.
    Pty,
}

impl Entry {
    fn accepts(self, field: &str) -> bool {
        match self {
            Entry::Exec => matches!(field, "timeout_sec" | "background" | "tag"),
            Entry::ExecStream => false,
            Entry::Pty => matches!(field, "user" | "cols" | "rows"),
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Entry::Exec => "by exec",
            Entry::ExecStream => "in an exec stream's start frame",
            Entry::Pty => "in a PTY's start frame",
        })
    }
}

/// A command as the public API states it. Every field is optional here; which ones an entry
/// point accepts and requires is [`CommandRequest::exec`]'s, [`CommandRequest::stream`]'s and
/// [`CommandRequest::pty`]'s business.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envs: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_sec: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    MissingCmd,
    BlankCmd,
    /// A field another entry point takes.
    NotAccepted {
        field: &'static str,
        entry: Entry,
    },
    TimeoutOutOfRange(i64),
    BadTag(String),
}

impl CommandError {
    /// The field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            CommandError::MissingCmd | CommandError::BlankCmd => "cmd",
            CommandError::NotAccepted { field, .. } => field,
            CommandError::TimeoutOutOfRange(_) => "timeout_sec",
            CommandError::BadTag(_) => "tag",
        }
    }

    /// What is wrong with it.
    pub fn problem(&self) -> String {
        match self {
            CommandError::MissingCmd => "is required".into(),
            CommandError::BlankCmd => "must not be empty".into(),
            CommandError::NotAccepted { entry, .. } => format!("is not accepted {entry}"),
            CommandError::TimeoutOutOfRange(t) => {
                format!("{t} is out of range 1..={MAX_EXEC_TIMEOUT_SEC}")
            }
            CommandError::BadTag(tag) => {
                format!("`{tag}` must be 1-64 characters of A-Z a-z 0-9 - _ . and not only digits")
            }
        }
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field(), self.problem())
    }
}

impl std::error::Error for CommandError {}

impl From<CommandError> for CapsuleError {
    fn from(error: CommandError) -> Self {
        CapsuleError::Invalid {
            field: error.field(),
            message: error.problem(),
        }
    }
}

/// What `POST /exec` asks of envd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exec {
    /// Run and wait for the exit and the output.
    Foreground(RunRequest),
    /// Start and answer at once.
    Background(StartRequest),
}

/// The fields beyond the process itself, for the entry point that takes them.
struct Extras {
    timeout_sec: Option<i64>,
    background: Option<bool>,
    tag: Option<String>,
    cols: Option<u16>,
    rows: Option<u16>,
}

impl CommandRequest {
    /// `POST /exec`: foreground (with `timeout_sec`) unless `background` (with `tag`).
    pub fn exec(self) -> Result<Exec, CommandError> {
        let (process, extras) = self.split(Entry::Exec)?;
        if extras.background.unwrap_or(false) {
            return Ok(Exec::Background(StartRequest {
                process,
                tag: check_tag(extras.tag)?,
                pty: None,
            }));
        }
        let timeout_sec = match extras.timeout_sec {
            None => None,
            Some(t) => Some(
                u64::try_from(t)
                    .ok()
                    .filter(|t| (1..=MAX_EXEC_TIMEOUT_SEC).contains(t))
                    .ok_or(CommandError::TimeoutOutOfRange(t))?,
            ),
        };
        Ok(Exec::Foreground(RunRequest {
            process,
            timeout_sec,
        }))
    }

    /// The exec stream's `start` frame: a process on pipes, its output streamed.
    pub fn stream(self) -> Result<StartRequest, CommandError> {
        let (process, _) = self.split(Entry::ExecStream)?;
        Ok(StartRequest {
            process,
            tag: None,
            pty: None,
        })
    }

    /// The PTY's `start` frame: a process on a terminal, a shell unless told otherwise.
    pub fn pty(self) -> Result<StartRequest, CommandError> {
        let (process, extras) = self.split(Entry::Pty)?;
        Ok(StartRequest {
            process,
            tag: None,
            pty: Some(PtySize {
                cols: extras
                    .cols
                    .filter(|c| *c > 0)
                    .unwrap_or(DEFAULT_PTY_SIZE.cols),
                rows: extras
                    .rows
                    .filter(|r| *r > 0)
                    .unwrap_or(DEFAULT_PTY_SIZE.rows),
            }),
        })
    }

    /// The checks every entry point shares: only its own fields, a command, and empty strings
    /// meaning "not given".
    fn split(self, entry: Entry) -> Result<(ProcessSpec, Extras), CommandError> {
        let given = [
            ("user", self.user.is_some()),
            ("timeout_sec", self.timeout_sec.is_some()),
            ("background", self.background.is_some()),
            ("tag", self.tag.is_some()),
            ("cols", self.cols.is_some()),
            ("rows", self.rows.is_some()),
        ];
        if let Some((field, _)) = given
            .into_iter()
            .find(|(field, given)| *given && !entry.accepts(field))
        {
            return Err(CommandError::NotAccepted { field, entry });
        }
        let cmd = match (self.cmd, entry) {
            (Some(cmd), _) if !cmd.trim().is_empty() => cmd,
            (_, Entry::Pty) => DEFAULT_PTY_CMD.to_owned(),
            (Some(_), Entry::Exec | Entry::ExecStream) => return Err(CommandError::BlankCmd),
            (None, Entry::Exec | Entry::ExecStream) => return Err(CommandError::MissingCmd),
        };
        let process = ProcessSpec {
            cmd,
            args: self.args.unwrap_or_default(),
            envs: self.envs.unwrap_or_default(),
            cwd: self.cwd.filter(|c| !c.is_empty()),
            user: self.user.filter(|u| !u.is_empty()),
        };
        let extras = Extras {
            timeout_sec: self.timeout_sec,
            background: self.background,
            tag: self.tag,
            cols: self.cols,
            rows: self.rows,
        };
        Ok((process, extras))
    }
}

/// A background process's tag: envd picks one when none (or an empty one) is given.
fn check_tag(tag: Option<String>) -> Result<Option<String>, CommandError> {
    let Some(tag) = tag.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let valid = tag.len() <= 64
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !tag.chars().all(|c| c.is_ascii_digit());
    if valid {
        Ok(Some(tag))
    } else {
        Err(CommandError::BadTag(tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> CommandRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn exec_runs_in_the_foreground_or_starts_in_the_background() {
        let foreground = request(serde_json::json!({
            "cmd": "/bin/sh", "args": ["-c", "true"], "envs": {"A": "1"}, "cwd": "",
            "timeout_sec": 5
        }));
        assert_eq!(
            foreground.exec().unwrap(),
            Exec::Foreground(RunRequest {
                process: ProcessSpec {
                    cmd: "/bin/sh".into(),
                    args: vec!["-c".into(), "true".into()],
                    envs: BTreeMap::from([("A".into(), "1".into())]),
                    cwd: None,
                    user: None,
                },
                timeout_sec: Some(5),
            })
        );
        let background = request(serde_json::json!({
            "cmd": "sleep", "background": true, "tag": "sleeper", "cwd": "/tmp",
            "timeout_sec": 0
        }));
        assert_eq!(
            background.exec().unwrap(),
            Exec::Background(StartRequest {
                process: ProcessSpec {
                    cwd: Some("/tmp".into()),
                    ..ProcessSpec::new("sleep", &[])
                },
                tag: Some("sleeper".into()),
                pty: None,
            })
        );
        let untagged = request(serde_json::json!({"cmd": "x", "background": true, "tag": ""}));
        assert!(matches!(
            untagged.exec(),
            Ok(Exec::Background(StartRequest { tag: None, .. }))
        ));
    }

    #[test]
    fn each_bad_command_gets_its_error() {
        use CommandError::*;
        let cases = [
            (serde_json::json!({}), Entry::Exec, MissingCmd),
            (serde_json::json!({"cmd": " "}), Entry::Exec, BlankCmd),
            (serde_json::json!({}), Entry::ExecStream, MissingCmd),
            (serde_json::json!({"cmd": ""}), Entry::ExecStream, BlankCmd),
            (
                serde_json::json!({"cmd": "x", "timeout_sec": 0}),
                Entry::Exec,
                TimeoutOutOfRange(0),
            ),
            (
                serde_json::json!({"cmd": "x", "timeout_sec": 86401}),
                Entry::Exec,
                TimeoutOutOfRange(86401),
            ),
            (
                serde_json::json!({"cmd": "x", "background": true, "tag": "a/b"}),
                Entry::Exec,
                BadTag("a/b".into()),
            ),
            (
                serde_json::json!({"cmd": "x", "background": true, "tag": "123"}),
                Entry::Exec,
                BadTag("123".into()),
            ),
            (
                serde_json::json!({"cmd": "x", "user": "root"}),
                Entry::Exec,
                NotAccepted {
                    field: "user",
                    entry: Entry::Exec,
                },
            ),
            (
                serde_json::json!({"cmd": "x", "cols": 80}),
                Entry::Exec,
                NotAccepted {
                    field: "cols",
                    entry: Entry::Exec,
                },
            ),
            (
                serde_json::json!({"cmd": "x", "background": true}),
                Entry::ExecStream,
                NotAccepted {
                    field: "background",
                    entry: Entry::ExecStream,
                },
            ),
            (
                serde_json::json!({"timeout_sec": 5}),
                Entry::Pty,
                NotAccepted {
                    field: "timeout_sec",
                    entry: Entry::Pty,
                },
            ),
            (
                serde_json::json!({"tag": "t"}),
                Entry::Pty,
                NotAccepted {
                    field: "tag",
                    entry: Entry::Pty,
                },
            ),
        ];
        for (json, entry, want) in cases {
            let parsed = request(json.clone());
            let got = match entry {
                Entry::Exec => parsed.exec().map(drop),
                Entry::ExecStream => parsed.stream().map(drop),
                Entry::Pty => parsed.pty().map(drop),
            };
            assert_eq!(got, Err(want), "{json} {entry:?}");
        }
        assert!(serde_json::from_value::<CommandRequest>(
            serde_json::json!({"cmd": "x", "colour": 1})
        )
        .is_err());
        assert!(serde_json::from_value::<CommandRequest>(serde_json::json!({"cmd": 7})).is_err());
    }

    #[test]
    fn errors_name_their_field() {
        assert_eq!(
            CommandError::BlankCmd.to_string(),
            "invalid cmd: must not be empty"
        );
        assert_eq!(
            CommandError::TimeoutOutOfRange(0).to_string(),
            "invalid timeout_sec: 0 is out of range 1..=86400"
        );
        let capsule: CapsuleError = CommandError::MissingCmd.into();
        assert!(matches!(
            capsule,
            CapsuleError::Invalid { field: "cmd", .. }
        ));
    }

    #[test]
    fn a_pty_defaults_to_a_shell_of_80_by_24() {
        assert_eq!(
            CommandRequest::default().pty().unwrap(),
            StartRequest {
                process: ProcessSpec::new(DEFAULT_PTY_CMD, &[]),
                tag: None,
                pty: Some(DEFAULT_PTY_SIZE),
            }
        );
        let sized = request(serde_json::json!({
            "cmd": "/bin/sh", "cols": 100, "rows": 0, "user": "", "envs": {"PS1": "$ "}
        }));
        let start = sized.pty().unwrap();
        assert_eq!(
            start.pty,
            Some(PtySize {
                cols: 100,
                rows: 24
            })
        );
        assert_eq!(
            (start.process.cmd.as_str(), start.process.user),
            ("/bin/sh", None)
        );
    }

    #[test]
    fn a_stream_runs_on_pipes() {
        let start = request(serde_json::json!({"cmd": "tail", "args": ["-f", "/x"]}))
            .stream()
            .unwrap();
        assert_eq!(
            start,
            StartRequest {
                process: ProcessSpec::new("tail", &["-f", "/x"]),
                tag: None,
                pty: None,
            }
        );
    }
}
