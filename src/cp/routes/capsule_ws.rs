//! The capsule WebSocket routes (`exec/stream`, `processes/{selector}/stream`, `pty`): the
//! public JSON frame protocols translated to envd's `/processes/attach` session (text control
//! messages, binary output frames tagged by stream) through the host agent.
//!
//! Authentication: `X-API-Key` or `Authorization: Bearer` on the upgrade request, checked before
//! upgrading (so failures are ordinary HTTP errors); without either, the first frame must be
//! `{"type":"auth","token":"..."}` within five seconds (browsers cannot set headers).

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::response::Response;
use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as UpMessage;

use crate::cp::agent_client::EnvdSocket;
use crate::cp::auth::{AuthTeam, API_KEY_HEADER};
use crate::cp::error::ApiError;
use crate::cp::extract::path_id;
use crate::cp::services::capsules::{self, RunningCapsule};
use crate::cp::state::AppState;
use crate::envd::api::{
    AttachRequest, ClientMessage, ProcessSpec, PtySize, ServerMessage, StartRequest, FRAME_STDERR,
};
use crate::id::SandboxId;

const AUTH_FRAME_WAIT: Duration = Duration::from_secs(5);
const START_FRAME_WAIT: Duration = Duration::from_secs(30);
const PTY_PING_EVERY: Duration = Duration::from_secs(30);

/// The caller as far as the upgrade request tells: authenticated by header, or to be
/// authenticated by the first frame.
pub struct WsCaller(Option<AuthTeam>);

impl FromRequestParts<AppState> for WsCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let has_credentials = parts.headers.contains_key(API_KEY_HEADER)
            || parts.headers.contains_key("authorization");
        if has_credentials {
            Ok(WsCaller(Some(
                AuthTeam::from_request_parts(parts, state).await?,
            )))
        } else {
            Ok(WsCaller(None))
        }
    }
}

/// Authenticates a token from an auth frame exactly as the headers would be: `wrn_` tokens are
/// API keys, anything else a user JWT.
async fn authenticate_token(state: &AppState, token: &str) -> Result<AuthTeam, ApiError> {
    let (name, value) = if token.starts_with("wrn_") {
        (API_KEY_HEADER, token.to_owned())
    } else {
        ("authorization", format!("Bearer {token}"))
    };
    let request = http::Request::builder()
        .header(name, value)
        .body(())
        .map_err(|_| ApiError::Unauthorized("the token is not a valid header value".into()))?;
    let (mut parts, ()) = request.into_parts();
    AuthTeam::from_request_parts(&mut parts, state).await
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AuthFrame {
    Auth { token: String },
}

/// The three WebSocket protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Exec,
    Process,
    Pty,
}

impl Protocol {
    fn error_frame(self, message: &str, fatal: bool) -> Value {
        match self {
            Protocol::Pty => json!({"type": "error", "data": message, "fatal": fatal}),
            Protocol::Exec | Protocol::Process => json!({"type": "error", "data": message}),
        }
    }
}

async fn send_json(socket: &mut WebSocket, value: &Value) -> bool {
    socket
        .send(Message::Text(value.to_string().into()))
        .await
        .is_ok()
}

async fn fail(mut socket: WebSocket, protocol: Protocol, message: &str) {
    let _ = send_json(&mut socket, &protocol.error_frame(message, true)).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 1008,
            reason: "".into(),
        })))
        .await;
}

/// Reads the next text frame, skipping pings; `None` when the client left or sent something else.
async fn next_text(socket: &mut WebSocket, wait: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, socket.recv()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Some(text.to_string()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return None,
        }
    }
}

/// Resolves the capsule for a connection, authenticating by first frame when needed; on failure
/// the client gets an error frame and the socket is closed.
async fn connect_capsule(
    mut socket: WebSocket,
    state: &AppState,
    caller: Option<AuthTeam>,
    id: SandboxId,
    protocol: Protocol,
) -> Option<(WebSocket, RunningCapsule)> {
    let team = match caller {
        Some(auth) => auth.team_id,
        None => {
            let Some(text) = next_text(&mut socket, AUTH_FRAME_WAIT).await else {
                fail(
                    socket,
                    protocol,
                    "expected {\"type\":\"auth\",\"token\":\"...\"} as the first frame",
                )
                .await;
                return None;
            };
            let token = match serde_json::from_str::<AuthFrame>(&text) {
                Ok(AuthFrame::Auth { token }) => token,
                Err(_) => {
                    fail(
                        socket,
                        protocol,
                        "expected {\"type\":\"auth\",\"token\":\"...\"} as the first frame",
                    )
                    .await;
                    return None;
                }
            };
            match authenticate_token(state, &token).await {
                Ok(auth) => auth.team_id,
                Err(error) => {
                    fail(socket, protocol, &error.to_string()).await;
                    return None;
                }
            }
        }
    };
    match capsules::running(state, team, id).await {
        Ok(capsule) => Some((socket, capsule)),
        Err(error) => {
            fail(socket, protocol, &ApiError::from(error).to_string()).await;
            None
        }
    }
}

/// Checks what can be checked before upgrading: the upgrade itself, the ID and, for header
/// callers, the capsule.
async fn prepare(
    state: &AppState,
    caller: &WsCaller,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    id: &str,
) -> Result<(WebSocketUpgrade, SandboxId), ApiError> {
    let upgrade = upgrade.map_err(|e| {
        ApiError::InvalidRequest(format!("expected a WebSocket upgrade: {}", e.body_text()))
    })?;
    let id: SandboxId = path_id("id", id)?;
    if let WsCaller(Some(auth)) = caller {
        capsules::running(state, auth.team_id, id).await?;
    }
    Ok((upgrade, id))
}

pub async fn exec_stream(
    State(state): State<AppState>,
    caller: WsCaller,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (upgrade, id) = prepare(&state, &caller, upgrade, &id).await?;
    Ok(upgrade.on_upgrade(move |socket| async move {
        if let Some((socket, capsule)) =
            connect_capsule(socket, &state, caller.0, id, Protocol::Exec).await
        {
            exec_session(socket, state, capsule).await;
        }
    }))
}

pub async fn process_stream(
    State(state): State<AppState>,
    caller: WsCaller,
    Path((id, selector)): Path<(String, String)>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    capsules::check_selector(&selector)?;
    let (upgrade, id) = prepare(&state, &caller, upgrade, &id).await?;
    Ok(upgrade.on_upgrade(move |socket| async move {
        if let Some((socket, capsule)) =
            connect_capsule(socket, &state, caller.0, id, Protocol::Process).await
        {
            let attach = AttachRequest::Connect { selector };
            relay(socket, &state, &capsule, Protocol::Process, attach).await;
        }
    }))
}

pub async fn pty(
    State(state): State<AppState>,
    caller: WsCaller,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (upgrade, id) = prepare(&state, &caller, upgrade, &id).await?;
    Ok(upgrade.on_upgrade(move |socket| async move {
        if let Some((socket, capsule)) =
            connect_capsule(socket, &state, caller.0, id, Protocol::Pty).await
        {
            pty_session(socket, state, capsule).await;
        }
    }))
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ExecStart {
    Start {
        cmd: String,
        #[serde(default)]
        args: Option<Vec<String>>,
        #[serde(default)]
        envs: Option<std::collections::BTreeMap<String, String>>,
        #[serde(default)]
        cwd: Option<String>,
    },
}

async fn exec_session(mut socket: WebSocket, state: AppState, capsule: RunningCapsule) {
    let Some(text) = next_text(&mut socket, START_FRAME_WAIT).await else {
        fail(socket, Protocol::Exec, "expected a start frame").await;
        return;
    };
    let (cmd, args, envs, cwd) = match serde_json::from_str::<ExecStart>(&text) {
        Ok(ExecStart::Start {
            cmd,
            args,
            envs,
            cwd,
        }) if !cmd.trim().is_empty() => (cmd, args, envs, cwd),
        Ok(_) => {
            fail(
                socket,
                Protocol::Exec,
                "invalid start frame: `cmd` must not be empty",
            )
            .await;
            return;
        }
        Err(error) => {
            fail(
                socket,
                Protocol::Exec,
                &format!("invalid start frame: {error}"),
            )
            .await;
            return;
        }
    };
    let attach = AttachRequest::Start(StartRequest {
        process: ProcessSpec {
            cmd,
            args: args.unwrap_or_default(),
            envs: envs.unwrap_or_default(),
            cwd: cwd.filter(|c| !c.is_empty()),
            user: None,
        },
        tag: None,
        pty: None,
    });
    relay(socket, &state, &capsule, Protocol::Exec, attach).await;
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum PtyFirst {
    Start {
        #[serde(default)]
        cmd: Option<String>,
        #[serde(default)]
        args: Option<Vec<String>>,
        #[serde(default)]
        cols: Option<u16>,
        #[serde(default)]
        rows: Option<u16>,
        #[serde(default)]
        envs: Option<std::collections::BTreeMap<String, String>>,
        #[serde(default)]
        cwd: Option<String>,
        #[serde(default)]
        user: Option<String>,
    },
    Connect {
        tag: String,
    },
}

async fn pty_session(mut socket: WebSocket, state: AppState, capsule: RunningCapsule) {
    let Some(text) = next_text(&mut socket, START_FRAME_WAIT).await else {
        fail(socket, Protocol::Pty, "expected a start or connect frame").await;
        return;
    };
    let attach = match serde_json::from_str::<PtyFirst>(&text) {
        Ok(PtyFirst::Start {
            cmd,
            args,
            cols,
            rows,
            envs,
            cwd,
            user,
        }) => AttachRequest::Start(StartRequest {
            process: ProcessSpec {
                cmd: cmd
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| "/bin/bash".to_owned()),
                args: args.unwrap_or_default(),
                envs: envs.unwrap_or_default(),
                cwd: cwd.filter(|c| !c.is_empty()),
                user: user.filter(|u| !u.is_empty()),
            },
            tag: None,
            pty: Some(PtySize {
                cols: cols.filter(|c| *c > 0).unwrap_or(80),
                rows: rows.filter(|r| *r > 0).unwrap_or(24),
            }),
        }),
        Ok(PtyFirst::Connect { tag }) => {
            if let Err(error) = capsules::check_selector(&tag) {
                fail(socket, Protocol::Pty, &error.to_string()).await;
                return;
            }
            AttachRequest::Connect { selector: tag }
        }
        Err(error) => {
            fail(
                socket,
                Protocol::Pty,
                &format!("invalid first frame: {error}"),
            )
            .await;
            return;
        }
    };
    relay(socket, &state, &capsule, Protocol::Pty, attach).await;
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

/// Translates one envd frame into the public frames it stands for.
struct Translator {
    protocol: Protocol,
    stdout: Utf8Carry,
    stderr: Utf8Carry,
    started: bool,
}

enum Step {
    Send(Vec<Value>),
    /// The process exited (or the session cannot continue): send these, then close.
    Finish(Vec<Value>),
}

impl Translator {
    fn new(protocol: Protocol) -> Self {
        Self {
            protocol,
            stdout: Utf8Carry::default(),
            stderr: Utf8Carry::default(),
            started: false,
        }
    }

    fn output(&mut self, kind: u8, data: &[u8]) -> Vec<Value> {
        if self.protocol == Protocol::Pty {
            let data = base64::engine::general_purpose::STANDARD.encode(data);
            return vec![json!({"type": "output", "data": data})];
        }
        let (name, carry) = if kind == FRAME_STDERR {
            ("stderr", &mut self.stderr)
        } else {
            ("stdout", &mut self.stdout)
        };
        let text = carry.push(data);
        if text.is_empty() {
            Vec::new()
        } else {
            vec![json!({"type": name, "data": text})]
        }
    }

    fn flush(&mut self) -> Vec<Value> {
        let mut frames = Vec::new();
        if let Some(text) = self.stdout.flush() {
            frames.push(json!({"type": "stdout", "data": text}));
        }
        if let Some(text) = self.stderr.flush() {
            frames.push(json!({"type": "stderr", "data": text}));
        }
        frames
    }

    fn upstream(&mut self, message: UpMessage) -> Option<Step> {
        match message {
            UpMessage::Binary(frame) => {
                let (&kind, data) = frame.split_first()?;
                Some(Step::Send(self.output(kind, data)))
            }
            UpMessage::Text(text) => match serde_json::from_str::<ServerMessage>(&text) {
                Ok(ServerMessage::Start { pid, tag }) => {
                    self.started = true;
                    Some(Step::Send(vec![match self.protocol {
                        Protocol::Pty => json!({"type": "started", "tag": tag, "pid": pid}),
                        Protocol::Exec | Protocol::Process => json!({"type": "start", "pid": pid}),
                    }]))
                }
                Ok(ServerMessage::Exit(exit)) => {
                    let mut frames = self.flush();
                    frames.push(json!({"type": "exit", "exit_code": exit.exit_code}));
                    Some(Step::Finish(frames))
                }
                Ok(ServerMessage::Error(detail)) => {
                    let frame = self.protocol.error_frame(&detail.message, !self.started);
                    Some(if self.started {
                        Step::Send(vec![frame])
                    } else {
                        Step::Finish(vec![frame])
                    })
                }
                Ok(ServerMessage::Lost { .. }) => None,
                Err(error) => Some(Step::Send(vec![self.protocol.error_frame(
                    &format!("unexpected message from the capsule: {error}"),
                    false,
                )])),
            },
            UpMessage::Close(_) => {
                let mut frames = self.flush();
                if !self.started {
                    frames.push(
                        self.protocol
                            .error_frame("the capsule closed the session", true),
                    );
                }
                Some(Step::Finish(frames))
            }
            _ => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientFrame {
    Stop,
    Input { data: String },
    Resize { cols: u16, rows: u16 },
    Kill,
}

/// What the client's frame asks of envd, or an error to tell the client.
fn client_frame(protocol: Protocol, text: &str) -> Result<Option<UpMessage>, String> {
    let frame =
        serde_json::from_str::<ClientFrame>(text).map_err(|e| format!("invalid frame: {e}"))?;
    let control = |message: ClientMessage| {
        Some(UpMessage::Text(
            serde_json::to_string(&message)
                .expect("client messages serialize")
                .into(),
        ))
    };
    match (protocol, frame) {
        (Protocol::Exec, ClientFrame::Stop) => Ok(control(ClientMessage::Kill)),
        (Protocol::Pty, ClientFrame::Kill) => Ok(control(ClientMessage::Kill)),
        (Protocol::Pty, ClientFrame::Resize { cols, rows }) if cols > 0 && rows > 0 => {
            Ok(control(ClientMessage::Resize { cols, rows }))
        }
        (Protocol::Pty, ClientFrame::Input { data }) => base64::engine::general_purpose::STANDARD
            .decode(data.as_bytes())
            .map(|bytes| Some(UpMessage::Binary(bytes.into())))
            .map_err(|e| format!("input data is not base64: {e}")),
        (Protocol::Pty, ClientFrame::Resize { .. }) => Err("cols and rows must be positive".into()),
        (Protocol::Process, _) => Ok(None),
        _ => Err("this frame type is not accepted on this stream".into()),
    }
}

async fn connect_upstream(
    state: &AppState,
    capsule: &RunningCapsule,
    attach: &AttachRequest,
) -> Result<EnvdSocket, String> {
    let mut upstream = state
        .capsules
        .agents
        .envd_websocket(&capsule.target, capsule.id, "/processes/attach")
        .await
        .map_err(|e| ApiError::from(e).to_string())?;
    let first = serde_json::to_string(attach).expect("attach requests serialize");
    upstream
        .send(UpMessage::Text(first.into()))
        .await
        .map_err(|e| format!("the capsule's session failed: {e}"))?;
    Ok(upstream)
}

/// Runs one session: envd frames out as public frames, client frames in as envd messages, until
/// the process exits or either side leaves. A client leaving an exec stream stops its process;
/// process streams and PTYs only detach (the process keeps running).
async fn relay(
    mut socket: WebSocket,
    state: &AppState,
    capsule: &RunningCapsule,
    protocol: Protocol,
    attach: AttachRequest,
) {
    let mut upstream = match connect_upstream(state, capsule, &attach).await {
        Ok(upstream) => upstream,
        Err(message) => return fail(socket, protocol, &message).await,
    };
    let mut translator = Translator::new(protocol);
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PTY_PING_EVERY, PTY_PING_EVERY);
    let mut exited = false;
    loop {
        tokio::select! {
            message = upstream.next() => {
                let step = match message {
                    Some(Ok(message)) => translator.upstream(message),
                    Some(Err(error)) => Some(Step::Finish(vec![protocol.error_frame(&format!("the capsule's session failed: {error}"), true)])),
                    None => translator.upstream(UpMessage::Close(None)),
                };
                match step {
                    None => {}
                    Some(Step::Send(frames)) => {
                        for frame in frames {
                            if !send_json(&mut socket, &frame).await {
                                break;
                            }
                        }
                    }
                    Some(Step::Finish(frames)) => {
                        exited = frames.iter().any(|f| f["type"] == "exit");
                        for frame in frames {
                            let _ = send_json(&mut socket, &frame).await;
                        }
                        let _ = socket.send(Message::Close(None)).await;
                        break;
                    }
                }
            }
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => match client_frame(protocol, &text) {
                    Ok(Some(message)) => {
                        if upstream.send(message).await.is_err() {
                            let _ = send_json(&mut socket, &protocol.error_frame("the capsule's session closed", true)).await;
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(message) => {
                        let _ = send_json(&mut socket, &protocol.error_frame(&message, false)).await;
                    }
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = ping.tick(), if protocol == Protocol::Pty => {
                if !send_json(&mut socket, &json!({"type": "ping"})).await {
                    break;
                }
            }
        }
    }
    if protocol == Protocol::Exec && !exited {
        let kill = serde_json::to_string(&ClientMessage::Kill).expect("client messages serialize");
        let _ = upstream.send(UpMessage::Text(kill.into())).await;
    }
    let _ = upstream.close(None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn client_frames_by_protocol() {
        assert!(matches!(
            client_frame(Protocol::Exec, r#"{"type":"stop"}"#),
            Ok(Some(UpMessage::Text(_)))
        ));
        assert!(client_frame(Protocol::Exec, r#"{"type":"input","data":"aGk="}"#).is_err());
        assert!(matches!(
            client_frame(Protocol::Pty, r#"{"type":"input","data":"aGk="}"#),
            Ok(Some(UpMessage::Binary(b))) if &b[..] == b"hi"
        ));
        assert!(client_frame(Protocol::Pty, r#"{"type":"input","data":"!!"}"#).is_err());
        assert!(client_frame(Protocol::Pty, r#"{"type":"resize","cols":0,"rows":5}"#).is_err());
        assert!(client_frame(Protocol::Pty, "not json").is_err());
    }
}
