//! A small QMP client: QEMU's JSON-lines control protocol on a Unix socket. One command is in
//! flight at a time; asynchronous events arriving in between are skipped.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long one command may take before the monitor is considered hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP socket {path} closed during `{command}`")]
    Closed { path: PathBuf, command: String },
    #[error("QMP on {path} did not answer `{command}` within {COMMAND_TIMEOUT:?}")]
    Timeout { path: PathBuf, command: String },
    #[error("QMP on {path} sent an unexpected message during `{command}`: {detail}")]
    Protocol {
        path: PathBuf,
        command: String,
        detail: String,
    },
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

#[derive(Serialize)]
struct Execute<'a, A: Serialize> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<A>,
}

/// Every message QEMU sends is one of these.
#[derive(Deserialize)]
#[serde(untagged)]
enum Message {
    Return {
        #[serde(rename = "return")]
        value: serde_json::Value,
    },
    Error {
        error: ErrorBody,
    },
    Event {
        event: String,
    },
    Greeting {
        #[serde(rename = "QMP")]
        _qmp: serde_json::Value,
    },
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

/// `query-status`.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    /// `running`, `paused`, `shutdown`, `guest-panicked`, ...
    pub status: String,
}

/// `query-migrate`: `status` is absent before any migration, then `setup`, `active`, ...,
/// `completed`, `failed` or `cancelled`.
#[derive(Debug, Clone, Deserialize)]
pub struct MigrationInfo {
    pub status: Option<String>,
    #[serde(rename = "error-desc")]
    pub error_desc: Option<String>,
}

/// `query-version`.
#[derive(Debug, Clone, Deserialize)]
pub struct VersionInfo {
    pub qemu: QemuVersion,
    #[serde(default)]
    pub package: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl VersionInfo {
    pub fn describe(&self) -> String {
        let v = &self.qemu;
        let package = self.package.trim();
        if package.is_empty() {
            format!("QEMU {}.{}.{}", v.major, v.minor, v.micro)
        } else {
            format!("QEMU {}.{}.{} ({package})", v.major, v.minor, v.micro)
        }
    }
}

pub struct QmpClient {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl QmpClient {
    /// Reads the greeting and leaves capabilities negotiation mode.
    pub async fn handshake(stream: UnixStream, path: &Path) -> Result<Self, QmpError> {
        let (read, writer) = stream.into_split();
        let mut client = Self {
            path: path.to_path_buf(),
            reader: BufReader::new(read),
            writer,
        };
        // QEMU serves one monitor client at a time: while another holds the monitor (an agent
        // process that is still alive), the greeting never comes.
        let greeting =
            match tokio::time::timeout(COMMAND_TIMEOUT, client.read_message("greeting")).await {
                Ok(message) => message?,
                Err(_) => {
                    return Err(QmpError::Timeout {
                        path: client.path.clone(),
                        command: "greeting".into(),
                    })
                }
            };
        if !matches!(greeting, Message::Greeting { .. }) {
            return Err(client.protocol("greeting", "the first message is not a QMP greeting"));
        }
        client
            .execute::<(), serde::de::IgnoredAny>("qmp_capabilities", None)
            .await?;
        Ok(client)
    }

    pub async fn query_status(&mut self) -> Result<StatusInfo, QmpError> {
        self.execute::<(), _>("query-status", None).await
    }

    pub async fn query_version(&mut self) -> Result<VersionInfo, QmpError> {
        self.execute::<(), _>("query-version", None).await
    }

    /// Presses the ACPI power button; the guest decides whether to power off.
    pub async fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute::<(), serde::de::IgnoredAny>("system_powerdown", None)
            .await
            .map(drop)
    }

    /// Stops the vCPUs; QEMU drains and flushes the block devices before answering.
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute::<(), serde::de::IgnoredAny>("stop", None)
            .await
            .map(drop)
    }

    /// Resumes the vCPUs.
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute::<(), serde::de::IgnoredAny>("cont", None)
            .await
            .map(drop)
    }

    /// Lifts the default 32 MiB/s migration bandwidth cap: the stream goes to a local file
    /// while the guest is stopped, so it should go as fast as the disk takes it.
    pub async fn unlimit_migration_bandwidth(&mut self) -> Result<(), QmpError> {
        self.execute::<_, serde::de::IgnoredAny>(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": i64::MAX })),
        )
        .await
        .map(drop)
    }

    /// Sets the `x-ignore-shared` migration capability: RAM in a shared file is left out of
    /// the stream (when saving) and taken from the file as it is (when loading).
    pub async fn set_ignore_shared(&mut self, on: bool) -> Result<(), QmpError> {
        self.execute::<_, serde::de::IgnoredAny>(
            "migrate-set-capabilities",
            Some(serde_json::json!({
                "capabilities": [{ "capability": "x-ignore-shared", "state": on }]
            })),
        )
        .await
        .map(drop)
    }

    /// Hands QEMU an open file under `name` (SCM_RIGHTS on the monitor socket), for `fd:name`
    /// migration URIs.
    pub async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let mut line = serde_json::to_vec(&Execute {
            execute: "getfd",
            arguments: Some(serde_json::json!({ "fdname": name })),
        })
        .expect("commands serialize");
        line.push(b'\n');
        let raw = [fd.as_raw_fd()];
        let socket: &UnixStream = self.writer.as_ref();
        let sent = tokio::time::timeout(COMMAND_TIMEOUT, async {
            loop {
                socket.writable().await?;
                let attempt = socket.try_io(Interest::WRITABLE, || {
                    let iov = [IoSlice::new(&line)];
                    let cmsg = [ControlMessage::ScmRights(&raw)];
                    sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
                        .map_err(std::io::Error::from)
                });
                match attempt {
                    Ok(n) if n == line.len() => return Ok(()),
                    Ok(n) => {
                        return Err(std::io::Error::other(format!(
                            "sent {n} of {} bytes with the descriptor",
                            line.len()
                        )))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(self.io(source)),
            Err(_) => {
                return Err(QmpError::Timeout {
                    path: self.path.clone(),
                    command: "getfd".into(),
                })
            }
        }
        self.read_reply::<serde::de::IgnoredAny>("getfd")
            .await
            .map(drop)
    }

    /// Starts an outgoing migration to `uri`; it completes in the background
    /// ([`QmpClient::query_migrate`]).
    pub async fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute::<_, serde::de::IgnoredAny>("migrate", Some(serde_json::json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// Starts loading an incoming migration from `uri` into a QEMU started with
    /// `-incoming defer`.
    pub async fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute::<_, serde::de::IgnoredAny>(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": uri })),
        )
        .await
        .map(drop)
    }

    pub async fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute::<(), serde::de::IgnoredAny>("migrate_cancel", None)
            .await
            .map(drop)
    }

    pub async fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        self.execute::<(), _>("query-migrate", None).await
    }

    /// Ends QEMU at once. QEMU may close the socket before answering, which counts as done.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self
            .execute::<(), serde::de::IgnoredAny>("quit", None)
            .await
        {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn execute<A: Serialize, R: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<A>,
    ) -> Result<R, QmpError> {
        let mut line = serde_json::to_vec(&Execute {
            execute: command,
            arguments,
        })
        .expect("commands serialize");
        line.push(b'\n');
        let exchange = async {
            self.writer
                .write_all(&line)
                .await
                .map_err(|source| self.io(source))?;
            self.read_reply_untimed(command).await
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout {
                path: self.path.clone(),
                command: command.to_owned(),
            }),
        }
    }

    async fn read_reply<R: DeserializeOwned>(&mut self, command: &str) -> Result<R, QmpError> {
        match tokio::time::timeout(COMMAND_TIMEOUT, self.read_reply_untimed(command)).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout {
                path: self.path.clone(),
                command: command.to_owned(),
            }),
        }
    }

    /// Reads up to the reply to `command`, skipping events.
    async fn read_reply_untimed<R: DeserializeOwned>(
        &mut self,
        command: &str,
    ) -> Result<R, QmpError> {
        loop {
            match self.read_message(command).await? {
                Message::Return { value } => {
                    return serde_json::from_value(value)
                        .map_err(|e| self.protocol(command, &format!("bad return value: {e}")));
                }
                Message::Error { error } => {
                    return Err(QmpError::Command {
                        command: command.to_owned(),
                        class: error.class,
                        desc: error.desc,
                    });
                }
                Message::Event { event } => tracing::debug!(%event, "QMP event"),
                Message::Greeting { .. } => return Err(self.protocol(command, "a second greeting")),
            }
        }
    }

    async fn read_message(&mut self, command: &str) -> Result<Message, QmpError> {
        let mut line = String::new();
        let read = self.reader.read_line(&mut line).await;
        match read {
            Ok(0) => Err(QmpError::Closed {
                path: self.path.clone(),
                command: command.to_owned(),
            }),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| self.protocol(command, &format!("{e}: {}", line.trim()))),
            // QEMU exiting after `quit` may reset the connection instead of closing it.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Err(QmpError::Closed {
                path: self.path.clone(),
                command: command.to_owned(),
            }),
            Err(source) => Err(self.io(source)),
        }
    }

    fn io(&self, source: std::io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn protocol(&self, command: &str, detail: &str) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            command: command.to_owned(),
            detail: detail.to_owned(),
        }
    }
}
