//! A small QMP client: QEMU's JSON-lines control protocol on a Unix socket. One command is in
//! flight at a time; asynchronous events arriving in between are skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
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
        let greeting = client.read_message("greeting").await?;
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
            loop {
                match self.read_message(command).await? {
                    Message::Return { value } => {
                        return serde_json::from_value(value).map_err(|e| {
                            self.protocol(command, &format!("bad return value: {e}"))
                        });
                    }
                    Message::Error { error } => {
                        return Err(QmpError::Command {
                            command: command.to_owned(),
                            class: error.class,
                            desc: error.desc,
                        });
                    }
                    Message::Event { event } => tracing::debug!(%event, "QMP event"),
                    Message::Greeting { .. } => {
                        return Err(self.protocol(command, "a second greeting"))
                    }
                }
            }
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout {
                path: self.path.clone(),
                command: command.to_owned(),
            }),
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
