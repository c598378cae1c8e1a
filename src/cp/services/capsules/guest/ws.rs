//! The public WebSocket protocols of a capsule (`exec/stream`, `processes/{selector}/stream`,
//! `pty`): their frames both ways as typed enums, and the session that translates them to and
//! from envd's process session (`envd::client::ProcessSession`). The web layer hands a
//! [`ClientSocket`] in; nothing here knows the web framework.
//!
//! envd's output (`ProcessEvent::Stdout`/`Stderr`/`Pty`) becomes `stdout`/`stderr` text frames
//! (never splitting a UTF-8 character) or, on a PTY, base64 `output` frames or raw binary frames
//! (see [`PtyOutput`]); its start, exit and error become `start`/`started`, `exit` and `error`.
//! The client's `stop` (exec) and `kill` (PTY) become envd's `kill`, PTY `input` frames and
//! binary frames stdin bytes, and `resize` envd's `resize`.

use std::future::Future;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::check_selector;
use super::command::{CommandError, CommandRequest};
use crate::envd::api::{AttachRequest, ClientMessage};
use crate::envd::client::{EnvdClientError, ProcessEvent, ProcessSession, SessionInput};
use crate::secret::SecretText;

const PTY_PING_EVERY: Duration = Duration::from_secs(30);
/// How long a PTY's output waits for the client to show, by its first input, which framing it
/// speaks; a client that has not written by then gets the reference's JSON frames.
const PTY_MODE_WAIT: Duration = Duration::from_secs(2);
/// Output held meanwhile; past it, the reference's JSON frames are chosen at once.
const PTY_HOLD_LIMIT: usize = 1 << 20;

/// A frame a client sends. Each stream accepts some of them: the first frame may be `auth`
/// (when the upgrade carried no credentials); then the exec stream takes `start` and `stop`, the
/// PTY `start` or `connect` and then `input`, `resize` and `kill`; a process stream reads only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// An API key (`wrn_...`) or a user JWT.
    Auth {
        token: SecretText,
    },
    Start(CommandRequest),
    /// Re-attach to a PTY by the tag its `started` frame gave.
    Connect {
        tag: String,
    },
    Stop,
    /// Terminal input, base64.
    Input {
        data: String,
    },
    Resize {
        cols: u16,
        rows: u16,
    },
    Kill,
    /// The answer to the server's keep-alive `ping`.
    Pong,
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Exec and process streams: the process runs (or was found).
    Start {
        pid: u32,
    },
    /// PTY: the session runs; `tag` reconnects to it.
    Started {
        tag: String,
        pid: u32,
    },
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// PTY output, base64.
    Output {
        data: String,
    },
    Exit {
        exit_code: i32,
    },
    /// `fatal` (PTY only) tells whether the session is over.
    Error {
        data: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fatal: Option<bool>,
    },
    /// PTY keep-alive.
    Ping,
}

/// The three WebSocket protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Exec,
    Process,
    Pty,
}

impl Protocol {
    pub fn error_frame(self, message: impl Into<String>, fatal: bool) -> ServerFrame {
        ServerFrame::Error {
            data: message.into(),
            fatal: match self {
                Protocol::Pty => Some(fatal),
                Protocol::Exec | Protocol::Process => None,
            },
        }
    }
}

/// Why a client's frame was refused; the session goes on (or, for the opening frame, ends).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("invalid frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("this frame type is not accepted on this stream")]
    NotAccepted,
    #[error("expected {0}")]
    Expected(&'static str),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{0}")]
    Selector(String),
    #[error("input data is not base64: {0}")]
    NotBase64(#[from] base64::DecodeError),
    #[error("cols and rows must be positive")]
    BadSize,
}

/// The expected first frame of a connection without header credentials: its token.
/// `None` is a client that sent nothing (in time).
pub fn auth_token(text: Option<&str>) -> Result<String, FrameError> {
    match text.map(serde_json::from_str::<ClientFrame>) {
        Some(Ok(ClientFrame::Auth { token })) => Ok(token.into_exposed()),
        Some(Ok(_) | Err(_)) | None => Err(FrameError::Expected(
            "{\"type\":\"auth\",\"token\":\"...\"} as the first frame",
        )),
    }
}

/// The frame that opens an exec stream (`start`) or a PTY (`start` or `connect`), as envd's
/// attach request. `None` is a client that sent nothing (in time).
pub fn opening(protocol: Protocol, text: Option<&str>) -> Result<AttachRequest, FrameError> {
    let expected = match protocol {
        Protocol::Pty => "a start or connect frame",
        Protocol::Exec | Protocol::Process => "a start frame",
    };
    let frame = serde_json::from_str::<ClientFrame>(text.ok_or(FrameError::Expected(expected))?)?;
    match (protocol, frame) {
        (Protocol::Exec, ClientFrame::Start(command)) => {
            Ok(AttachRequest::Start(command.stream()?))
        }
        (Protocol::Pty, ClientFrame::Start(command)) => Ok(AttachRequest::Start(command.pty()?)),
        (Protocol::Pty, ClientFrame::Connect { tag }) => {
            check_selector(&tag).map_err(|e| FrameError::Selector(e.to_string()))?;
            Ok(AttachRequest::Connect { selector: tag })
        }
        (Protocol::Exec | Protocol::Pty, _) => Err(FrameError::Expected(expected)),
        // A process stream attaches by its path; it has no opening frame.
        (Protocol::Process, _) => Err(FrameError::NotAccepted),
    }
}

/// What a client's frame during a session asks of envd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    Control(ClientMessage),
    Stdin(Vec<u8>),
}

/// A client's frame during a session: what to send envd, if anything.
pub fn client_frame(protocol: Protocol, text: &str) -> Result<Option<Upstream>, FrameError> {
    let frame = serde_json::from_str::<ClientFrame>(text)?;
    match (protocol, frame) {
        (Protocol::Exec, ClientFrame::Stop) | (Protocol::Pty, ClientFrame::Kill) => {
            Ok(Some(Upstream::Control(ClientMessage::Kill)))
        }
        (Protocol::Pty, ClientFrame::Resize { cols, rows }) if cols > 0 && rows > 0 => {
            Ok(Some(Upstream::Control(ClientMessage::Resize {
                cols,
                rows,
            })))
        }
        (Protocol::Pty, ClientFrame::Resize { .. }) => Err(FrameError::BadSize),
        (Protocol::Pty, ClientFrame::Input { data }) => Ok(Some(Upstream::Stdin(
            base64::engine::general_purpose::STANDARD.decode(data.as_bytes())?,
        ))),
        (Protocol::Pty, ClientFrame::Pong) => Ok(None),
        // A process stream only reads; whatever its client says changes nothing.
        (Protocol::Process, _) => Ok(None),
        (Protocol::Exec | Protocol::Pty, _) => Err(FrameError::NotAccepted),
    }
}

/// Output bytes as text without splitting a UTF-8 character across frames.
#[derive(Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    fn push(&mut self, data: &[u8]) -> String {
        self.0.extend_from_slice(data);
        let keep = incomplete_tail(&self.0);
        let rest = self.0.split_off(self.0.len() - keep);
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0 = rest;
        text
    }

    fn flush(&mut self) -> Option<String> {
        (!self.0.is_empty())
            .then(|| String::from_utf8_lossy(&std::mem::take(&mut self.0)).into_owned())
    }
}

/// Bytes at the end of `bytes` that start a UTF-8 sequence not yet complete.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let needed = match byte {
            0xF0..=0xF7 => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// What goes to the client: a JSON frame, or raw PTY output in a binary frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    Frame(ServerFrame),
    Binary(Bytes),
}

impl From<ServerFrame> for Outgoing {
    fn from(frame: ServerFrame) -> Self {
        Self::Frame(frame)
    }
}

/// What a client sent during a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary(Vec<u8>),
}

/// How a PTY's output reaches its client. The reference protocol (and the 0.1 SDKs) carries
/// terminal bytes both ways in base64 `input`/`output` JSON frames; the 0.3 SDK in raw binary
/// frames. Both open the session alike, so the client's first input decides, and output waits
/// for it (at most [`PTY_MODE_WAIT`] and [`PTY_HOLD_LIMIT`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyOutput {
    Undecided(Vec<u8>),
    Json,
    Binary,
}

/// What to do with the client after an envd event.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Send(Vec<Outgoing>),
    /// The process exited (or the session cannot continue): send these, then close.
    Finish(Vec<Outgoing>),
}

/// Translates envd's events of one session into public frames.
pub struct Translator {
    protocol: Protocol,
    stdout: Utf8Carry,
    stderr: Utf8Carry,
    pty: PtyOutput,
    exited: bool,
}

impl Translator {
    pub fn new(protocol: Protocol) -> Self {
        Self {
            protocol,
            stdout: Utf8Carry::default(),
            stderr: Utf8Carry::default(),
            pty: PtyOutput::Undecided(Vec::new()),
            exited: false,
        }
    }

    /// Whether a PTY's output still waits for the client's framing.
    pub fn pty_undecided(&self) -> bool {
        self.protocol == Protocol::Pty && matches!(self.pty, PtyOutput::Undecided(_))
    }

    /// Settles a PTY's framing (the first decision stands) and releases the output held.
    pub fn decide(&mut self, mode: PtyOutput) -> Vec<Outgoing> {
        let PtyOutput::Undecided(held) = &mut self.pty else {
            return Vec::new();
        };
        let held = std::mem::take(held);
        self.pty = mode;
        if held.is_empty() {
            Vec::new()
        } else {
            self.pty_output(&held)
        }
    }

    fn pty_output(&mut self, data: &[u8]) -> Vec<Outgoing> {
        match &mut self.pty {
            PtyOutput::Json => vec![Outgoing::Frame(ServerFrame::Output {
                data: base64::engine::general_purpose::STANDARD.encode(data),
            })],
            PtyOutput::Binary => vec![Outgoing::Binary(Bytes::copy_from_slice(data))],
            PtyOutput::Undecided(held) => {
                held.extend_from_slice(data);
                if held.len() > PTY_HOLD_LIMIT {
                    self.decide(PtyOutput::Json)
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// The frame announcing the attached process.
    pub fn started(&self, pid: u32, tag: String) -> ServerFrame {
        match self.protocol {
            Protocol::Pty => ServerFrame::Started { tag, pid },
            Protocol::Exec | Protocol::Process => ServerFrame::Start { pid },
        }
    }

    /// Whether the process's exit was seen.
    pub fn exited(&self) -> bool {
        self.exited
    }

    fn output(&mut self, stderr: bool, data: &[u8]) -> Vec<Outgoing> {
        if self.protocol == Protocol::Pty {
            return self.pty_output(data);
        }
        let text = if stderr {
            self.stderr.push(data)
        } else {
            self.stdout.push(data)
        };
        match (text.is_empty(), stderr) {
            (true, _) => Vec::new(),
            (false, true) => vec![ServerFrame::Stderr { data: text }.into()],
            (false, false) => vec![ServerFrame::Stdout { data: text }.into()],
        }
    }

    /// What is still held back, before the session ends.
    fn flush(&mut self) -> Vec<Outgoing> {
        let mut frames = if self.protocol == Protocol::Pty {
            self.decide(PtyOutput::Json)
        } else {
            Vec::new()
        };
        if let Some(data) = self.stdout.flush() {
            frames.push(ServerFrame::Stdout { data }.into());
        }
        if let Some(data) = self.stderr.flush() {
            frames.push(ServerFrame::Stderr { data }.into());
        }
        frames
    }

    /// The frames for envd's next event; `Ok(None)` is envd ending the session.
    pub fn event(&mut self, event: Result<Option<ProcessEvent>, EnvdClientError>) -> Step {
        match event {
            Ok(Some(ProcessEvent::Stdout(data) | ProcessEvent::Pty(data))) => {
                Step::Send(self.output(false, &data))
            }
            Ok(Some(ProcessEvent::Stderr(data))) => Step::Send(self.output(true, &data)),
            Ok(Some(ProcessEvent::Exit(exit))) => {
                self.exited = true;
                let mut frames = self.flush();
                frames.push(
                    ServerFrame::Exit {
                        exit_code: exit.exit_code,
                    }
                    .into(),
                );
                Step::Finish(frames)
            }
            Ok(Some(ProcessEvent::Error(detail))) => Step::Send(vec![self
                .protocol
                .error_frame(detail.message, false)
                .into()]),
            Ok(Some(ProcessEvent::Lost(_))) => Step::Send(Vec::new()),
            Ok(None) => Step::Finish(self.flush()),
            Err(EnvdClientError::Decode(reason)) => Step::Send(vec![self
                .protocol
                .error_frame(
                    format!("unexpected message from the capsule: {reason}"),
                    false,
                )
                .into()]),
            Err(error) => {
                let mut frames = self.flush();
                frames.push(
                    self.protocol
                        .error_frame(format!("the capsule's session failed: {error}"), true)
                        .into(),
                );
                Step::Finish(frames)
            }
        }
    }
}

/// The client's end of a session, as the web layer provides it.
pub trait ClientSocket: Send {
    /// The client's next text or binary frame (others are skipped); `None` once it left. Must
    /// be cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Option<Incoming>> + Send;
    /// Sends a frame; `false` once the client is gone.
    fn send(&mut self, frame: &ServerFrame) -> impl Future<Output = bool> + Send;
    /// Sends raw PTY output in a binary frame; `false` once the client is gone.
    fn send_binary(&mut self, data: Bytes) -> impl Future<Output = bool> + Send;
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// Sends `items` in order; `false` once the client is gone.
async fn deliver(client: &mut impl ClientSocket, items: Vec<Outgoing>) -> bool {
    for item in items {
        let sent = match item {
            Outgoing::Frame(frame) => client.send(&frame).await,
            Outgoing::Binary(data) => client.send_binary(data).await,
        };
        if !sent {
            return false;
        }
    }
    true
}

async fn send_upstream(
    input: &mut SessionInput,
    upstream: Upstream,
) -> Result<(), EnvdClientError> {
    match upstream {
        Upstream::Control(message) => input.send(&message).await,
        Upstream::Stdin(bytes) => input.send_stdin(bytes).await,
    }
}

/// Runs one attached session: envd's events out as public frames, the client's frames in as
/// envd messages, until the process exits or either side leaves. A client leaving an exec
/// stream stops its process; process streams and PTYs only detach (the process keeps running).
pub async fn relay(client: &mut impl ClientSocket, protocol: Protocol, session: ProcessSession) {
    let mut translator = Translator::new(protocol);
    let started = translator.started(session.pid, session.tag.clone());
    let (mut input, mut output) = session.split();
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PTY_PING_EVERY, PTY_PING_EVERY);
    let mode_wait = tokio::time::sleep(PTY_MODE_WAIT);
    tokio::pin!(mode_wait);
    if client.send(&started).await {
        loop {
            tokio::select! {
                event = output.next_event() => match translator.event(event) {
                    Step::Send(items) => {
                        if !deliver(client, items).await {
                            break;
                        }
                    }
                    Step::Finish(items) => {
                        deliver(client, items).await;
                        client.close().await;
                        break;
                    }
                },
                incoming = client.recv() => {
                    let upstream = match incoming {
                        None => break,
                        Some(Incoming::Binary(bytes)) if protocol == Protocol::Pty => {
                            let held = translator.decide(PtyOutput::Binary);
                            if !deliver(client, held).await {
                                break;
                            }
                            Ok(Some(Upstream::Stdin(bytes)))
                        }
                        // Exec and process streams take no raw bytes.
                        Some(Incoming::Binary(_)) => Ok(None),
                        Some(Incoming::Text(text)) => {
                            let frame = client_frame(protocol, &text);
                            if matches!(frame, Ok(Some(Upstream::Stdin(_)))) {
                                let held = translator.decide(PtyOutput::Json);
                                if !deliver(client, held).await {
                                    break;
                                }
                            }
                            frame
                        }
                    };
                    match upstream {
                        Ok(Some(upstream)) => {
                            if send_upstream(&mut input, upstream).await.is_err() {
                                client.send(&protocol.error_frame("the capsule's session closed", true)).await;
                                break;
                            }
                        }
                        Ok(None) => {}
                        Err(error) => {
                            client.send(&protocol.error_frame(error.to_string(), false)).await;
                        }
                    }
                },
                () = &mut mode_wait, if translator.pty_undecided() => {
                    let held = translator.decide(PtyOutput::Json);
                    if !deliver(client, held).await {
                        break;
                    }
                }
                _ = ping.tick(), if protocol == Protocol::Pty => {
                    if !client.send(&ServerFrame::Ping).await {
                        break;
                    }
                }
            }
        }
    }
    if protocol == Protocol::Exec && !translator.exited() {
        let _ = input.send(&ClientMessage::Kill).await;
    }
    let _ = input.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envd::api::{ErrorBody, ErrorCode, ExitInfo, ProcessSpec, PtySize, StartRequest};
    use bytes::Bytes;
    use serde_json::json;

    #[test]
    fn utf8_is_never_split_across_frames() {
        let mut carry = Utf8Carry::default();
        let euro = "€".as_bytes();
        assert_eq!(carry.push(&[b'a', euro[0]]), "a");
        assert_eq!(carry.push(&euro[1..2]), "");
        assert_eq!(carry.push(&euro[2..]), "€");
        assert_eq!(carry.push(&[0xff, b'b']), "\u{fffd}b");
        assert_eq!(carry.push(&[0xe2]), "");
        assert_eq!(carry.flush().as_deref(), Some("\u{fffd}"));
    }

    /// Every client frame as the reference documents it.
    #[test]
    fn client_frames_round_trip() {
        let cases = [
            (
                json!({"type": "auth", "token": "wrn_x"}),
                ClientFrame::Auth {
                    token: SecretText::new("wrn_x"),
                },
            ),
            (
                json!({"type": "start", "cmd": "tail", "args": ["-f", "/var/log/syslog"]}),
                ClientFrame::Start(CommandRequest {
                    cmd: Some("tail".into()),
                    args: Some(vec!["-f".into(), "/var/log/syslog".into()]),
                    ..CommandRequest::default()
                }),
            ),
            (
                json!({"type": "start", "cmd": "/bin/bash", "args": [], "cols": 80, "rows": 24,
                       "envs": {"TERM": "xterm-256color"}, "cwd": "/home/user", "user": "user"}),
                ClientFrame::Start(CommandRequest {
                    cmd: Some("/bin/bash".into()),
                    args: Some(Vec::new()),
                    cols: Some(80),
                    rows: Some(24),
                    envs: Some([("TERM".into(), "xterm-256color".into())].into()),
                    cwd: Some("/home/user".into()),
                    user: Some("user".into()),
                    ..CommandRequest::default()
                }),
            ),
            (
                json!({"type": "start"}),
                ClientFrame::Start(CommandRequest::default()),
            ),
            (
                json!({"type": "connect", "tag": "pty-abc123de"}),
                ClientFrame::Connect {
                    tag: "pty-abc123de".into(),
                },
            ),
            (json!({"type": "stop"}), ClientFrame::Stop),
            (
                json!({"type": "input", "data": "aGk="}),
                ClientFrame::Input {
                    data: "aGk=".into(),
                },
            ),
            (
                json!({"type": "resize", "cols": 120, "rows": 40}),
                ClientFrame::Resize {
                    cols: 120,
                    rows: 40,
                },
            ),
            (json!({"type": "kill"}), ClientFrame::Kill),
        ];
        for (wire, frame) in cases {
            assert_eq!(
                serde_json::from_value::<ClientFrame>(wire.clone()).unwrap(),
                frame,
                "{wire}"
            );
            assert_eq!(serde_json::to_value(&frame).unwrap(), wire);
        }
        for bad in [
            json!({"type": "start", "colour": "red"}),
            json!({"type": "resize", "cols": 1}),
            json!({"type": "connect", "tag": "t", "extra": 1}),
            json!({"type": "dance"}),
        ] {
            assert!(
                serde_json::from_value::<ClientFrame>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    /// Every server frame as the reference documents it.
    #[test]
    fn server_frames_round_trip() {
        let cases = [
            (
                json!({"type": "start", "pid": 1234}),
                ServerFrame::Start { pid: 1234 },
            ),
            (
                json!({"type": "started", "tag": "pty-abc123de", "pid": 42}),
                ServerFrame::Started {
                    tag: "pty-abc123de".into(),
                    pid: 42,
                },
            ),
            (
                json!({"type": "stdout", "data": "line of output\n"}),
                ServerFrame::Stdout {
                    data: "line of output\n".into(),
                },
            ),
            (
                json!({"type": "stderr", "data": "warning message\n"}),
                ServerFrame::Stderr {
                    data: "warning message\n".into(),
                },
            ),
            (
                json!({"type": "output", "data": "aGk="}),
                ServerFrame::Output {
                    data: "aGk=".into(),
                },
            ),
            (
                json!({"type": "exit", "exit_code": 0}),
                ServerFrame::Exit { exit_code: 0 },
            ),
            (
                json!({"type": "error", "data": "description of error"}),
                ServerFrame::Error {
                    data: "description of error".into(),
                    fatal: None,
                },
            ),
            (
                json!({"type": "error", "data": "description", "fatal": true}),
                ServerFrame::Error {
                    data: "description".into(),
                    fatal: Some(true),
                },
            ),
            (json!({"type": "ping"}), ServerFrame::Ping),
        ];
        for (wire, frame) in cases {
            assert_eq!(serde_json::to_value(&frame).unwrap(), wire);
            assert_eq!(
                serde_json::from_value::<ServerFrame>(wire.clone()).unwrap(),
                frame,
                "{wire}"
            );
        }
        assert_eq!(
            Protocol::Exec.error_frame("x", true),
            ServerFrame::Error {
                data: "x".into(),
                fatal: None
            }
        );
    }

    #[test]
    fn opening_frames_by_protocol() {
        assert_eq!(
            opening(
                Protocol::Exec,
                Some(r#"{"type":"start","cmd":"ls","args":["-l"]}"#)
            )
            .unwrap(),
            AttachRequest::Start(StartRequest {
                process: ProcessSpec::new("ls", &["-l"]),
                tag: None,
                pty: None,
            })
        );
        assert!(matches!(
            opening(Protocol::Exec, Some(r#"{"type":"start"}"#)),
            Err(FrameError::Command(CommandError::MissingCmd))
        ));
        assert!(matches!(
            opening(Protocol::Exec, Some(r#"{"type":"connect","tag":"x"}"#)),
            Err(FrameError::Expected(_))
        ));
        assert!(matches!(
            opening(Protocol::Exec, Some("not json")),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            opening(Protocol::Pty, Some(r#"{"type":"start","cols":100}"#)),
            Ok(AttachRequest::Start(StartRequest {
                pty: Some(PtySize {
                    cols: 100,
                    rows: 24
                }),
                ..
            }))
        ));
        assert_eq!(
            opening(Protocol::Pty, Some(r#"{"type":"connect","tag":"pty-1"}"#)).unwrap(),
            AttachRequest::Connect {
                selector: "pty-1".into()
            }
        );
        assert!(matches!(
            opening(Protocol::Pty, Some(r#"{"type":"connect","tag":"a/b"}"#)),
            Err(FrameError::Selector(_))
        ));
        assert_eq!(
            auth_token(Some(r#"{"type":"auth","token":"t"}"#)).unwrap(),
            "t"
        );
        assert!(auth_token(None).is_err());
        assert!(matches!(
            opening(Protocol::Pty, None),
            Err(FrameError::Expected("a start or connect frame"))
        ));
        assert!(auth_token(Some(r#"{"type":"stop"}"#)).is_err());
    }

    #[test]
    fn client_frames_by_protocol() {
        assert_eq!(
            client_frame(Protocol::Exec, r#"{"type":"stop"}"#).unwrap(),
            Some(Upstream::Control(ClientMessage::Kill))
        );
        assert!(matches!(
            client_frame(Protocol::Exec, r#"{"type":"input","data":"aGk="}"#),
            Err(FrameError::NotAccepted)
        ));
        assert_eq!(
            client_frame(Protocol::Pty, r#"{"type":"input","data":"aGk="}"#).unwrap(),
            Some(Upstream::Stdin(b"hi".to_vec()))
        );
        assert_eq!(
            client_frame(Protocol::Pty, r#"{"type":"resize","cols":3,"rows":5}"#).unwrap(),
            Some(Upstream::Control(ClientMessage::Resize {
                cols: 3,
                rows: 5
            }))
        );
        assert!(matches!(
            client_frame(Protocol::Pty, r#"{"type":"input","data":"!!"}"#),
            Err(FrameError::NotBase64(_))
        ));
        assert!(matches!(
            client_frame(Protocol::Pty, r#"{"type":"resize","cols":0,"rows":5}"#),
            Err(FrameError::BadSize)
        ));
        assert!(matches!(
            client_frame(Protocol::Pty, "not json"),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(
            client_frame(Protocol::Process, r#"{"type":"kill"}"#).unwrap(),
            None
        );
    }

    fn frames(frames: Vec<ServerFrame>) -> Vec<Outgoing> {
        frames.into_iter().map(Outgoing::from).collect()
    }

    #[test]
    fn envd_events_become_public_frames() {
        let mut exec = Translator::new(Protocol::Exec);
        assert_eq!(
            exec.started(7, "proc-1".into()),
            ServerFrame::Start { pid: 7 }
        );
        let euro = "€".as_bytes();
        assert_eq!(
            exec.event(Ok(Some(ProcessEvent::Stdout(Bytes::from(vec![
                b'a', euro[0]
            ]))))),
            Step::Send(frames(vec![ServerFrame::Stdout { data: "a".into() }]))
        );
        assert_eq!(
            exec.event(Ok(Some(ProcessEvent::Stderr(Bytes::from_static(b"e"))))),
            Step::Send(frames(vec![ServerFrame::Stderr { data: "e".into() }]))
        );
        assert_eq!(
            exec.event(Ok(Some(ProcessEvent::Error(ErrorBody {
                code: ErrorCode::InvalidRequest,
                message: "no".into()
            })))),
            Step::Send(frames(vec![ServerFrame::Error {
                data: "no".into(),
                fatal: None
            }]))
        );
        assert!(!exec.exited());
        assert_eq!(
            exec.event(Ok(Some(ProcessEvent::Exit(ExitInfo {
                exit_code: 3,
                signal: None
            })))),
            Step::Finish(frames(vec![
                ServerFrame::Stdout {
                    data: "\u{fffd}".into()
                },
                ServerFrame::Exit { exit_code: 3 }
            ]))
        );
        assert!(exec.exited());

        let mut pty = Translator::new(Protocol::Pty);
        assert_eq!(
            pty.started(9, "pty-1".into()),
            ServerFrame::Started {
                tag: "pty-1".into(),
                pid: 9
            }
        );
        assert_eq!(pty.decide(PtyOutput::Json), Vec::new());
        assert_eq!(
            pty.event(Ok(Some(ProcessEvent::Pty(Bytes::from_static(b"hi"))))),
            Step::Send(frames(vec![ServerFrame::Output {
                data: "aGk=".into()
            }]))
        );
        assert_eq!(pty.event(Ok(None)), Step::Finish(Vec::new()));
        assert!(matches!(
            pty.event(Err(EnvdClientError::WebSocket("reset".into()))),
            Step::Finish(items) if items == frames(vec![ServerFrame::Error {
                data: "the capsule's session failed: envd WebSocket failed: reset".into(),
                fatal: Some(true)
            }])
        ));
    }

    #[test]
    fn pty_output_waits_for_the_clients_framing_and_keeps_it() {
        let output = |bytes: &'static [u8]| Ok(Some(ProcessEvent::Pty(Bytes::from_static(bytes))));
        // A client that writes raw bytes gets raw bytes, the prompt held until then included.
        let mut raw = Translator::new(Protocol::Pty);
        assert!(raw.pty_undecided());
        assert_eq!(raw.event(output(b"$ ")), Step::Send(Vec::new()));
        assert_eq!(
            raw.decide(PtyOutput::Binary),
            [Outgoing::Binary(Bytes::from_static(b"$ "))]
        );
        assert_eq!(
            raw.decide(PtyOutput::Json),
            Vec::new(),
            "the first decision stands"
        );
        assert_eq!(
            raw.event(output(b"ok")),
            Step::Send(vec![Outgoing::Binary(Bytes::from_static(b"ok"))])
        );
        // A process that ends before any input: what was held goes out as JSON, then the exit.
        let mut quiet = Translator::new(Protocol::Pty);
        assert_eq!(quiet.event(output(b"bye")), Step::Send(Vec::new()));
        assert_eq!(
            quiet.event(Ok(Some(ProcessEvent::Exit(ExitInfo {
                exit_code: 0,
                signal: None
            })))),
            Step::Finish(frames(vec![
                ServerFrame::Output {
                    data: "Ynll".into()
                },
                ServerFrame::Exit { exit_code: 0 }
            ]))
        );
        // Output past the hold limit does not wait for the client.
        let mut flood = Translator::new(Protocol::Pty);
        let big = vec![b'x'; PTY_HOLD_LIMIT + 1];
        let Step::Send(items) = flood.event(Ok(Some(ProcessEvent::Pty(Bytes::from(big))))) else {
            panic!("a flood is sent");
        };
        assert_eq!(items.len(), 1);
        assert!(!flood.pty_undecided());
        assert_eq!(
            client_frame(Protocol::Pty, r#"{"type":"pong"}"#).unwrap(),
            None
        );
    }
}
