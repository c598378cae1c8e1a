//! The capsule WebSocket routes (`exec/stream`, `processes/{selector}/stream`, `pty`): the
//! upgrade, the caller's authentication and the capsule's lookup; the protocols themselves (typed
//! frames and their translation to envd's process session) are `services::capsules::guest::ws`.
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

use crate::cp::auth::{AuthTeam, API_KEY_HEADER};
use crate::cp::error::ApiError;
use crate::cp::extract::path_id;
use crate::cp::limits::{Work, WorkPermit};
use crate::cp::revocations::Credential;
use crate::cp::services::capsules::guest;
use crate::cp::services::capsules::guest::ws::{
    self, ClientSocket, Incoming, Protocol, ServerFrame,
};
use crate::cp::services::capsules::{self, CapsuleError, RunningCapsule};
use crate::cp::state::AppState;
use crate::envd::api::AttachRequest;
use crate::id::SandboxId;

const AUTH_FRAME_WAIT: Duration = Duration::from_secs(5);
const START_FRAME_WAIT: Duration = Duration::from_secs(30);

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

/// The client's socket as the protocols see it.
struct Client(WebSocket);

impl ClientSocket for Client {
    async fn recv(&mut self) -> Option<Incoming> {
        loop {
            match self.0.recv().await {
                Some(Ok(Message::Text(text))) => return Some(Incoming::Text(text.to_string())),
                Some(Ok(Message::Binary(data))) => return Some(Incoming::Binary(data.to_vec())),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            }
        }
    }

    async fn send(&mut self, frame: &ServerFrame) -> bool {
        let text = serde_json::to_string(frame).expect("server frames serialize");
        self.0.send(Message::Text(text.into())).await.is_ok()
    }

    async fn send_binary(&mut self, data: bytes::Bytes) -> bool {
        self.0.send(Message::Binary(data)).await.is_ok()
    }

    async fn close(&mut self) {
        let _ = self.0.send(Message::Close(None)).await;
    }
}

impl Client {
    /// Ends the connection with one fatal error frame.
    async fn fail(mut self, protocol: Protocol, message: &str) {
        self.send(&protocol.error_frame(message, true)).await;
        let _ = self
            .0
            .send(Message::Close(Some(CloseFrame {
                code: 1008,
                reason: "".into(),
            })))
            .await;
    }

    /// Reads the next text frame, skipping pings; `Ok(None)` when the client left, took too
    /// long or sent something else, `Err` with why when the frame could not be read (e.g. it
    /// exceeds [`CLIENT_MESSAGE_LIMIT`]).
    async fn next_text(&mut self, wait: Duration) -> Result<Option<String>, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.0.recv()).await {
                Ok(Some(Ok(Message::Text(text)))) => return Ok(Some(text.to_string())),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(Err(error))) => {
                    return Err(format!("the frame could not be read: {error}"))
                }
                _ => return Ok(None),
            }
        }
    }
}

/// A connected session: its client and capsule, the credential it was opened with and its place
/// in the team's session limit.
struct Connected {
    client: Client,
    capsule: RunningCapsule,
    credential: Credential,
    _permit: WorkPermit,
}

/// Resolves the capsule for a connection, authenticating by first frame when needed (and then
/// counting the session against the team's limit, which header callers passed before the
/// upgrade); on failure the client gets an error frame and the socket is closed.
async fn connect_capsule(
    mut client: Client,
    state: &AppState,
    caller: Caller,
    id: SandboxId,
    protocol: Protocol,
) -> Option<Connected> {
    let (auth, permit) = match caller {
        Caller::Header(auth, permit) => (auth, permit),
        Caller::ByFrame => {
            let first = match client.next_text(AUTH_FRAME_WAIT).await {
                Ok(first) => first,
                Err(reason) => {
                    client.fail(protocol, &reason).await;
                    return None;
                }
            };
            let token = match ws::auth_token(first.as_deref()) {
                Ok(token) => token,
                Err(error) => {
                    client.fail(protocol, &error.to_string()).await;
                    return None;
                }
            };
            let auth = match authenticate_token(state, &token).await {
                Ok(auth) => auth,
                Err(error) => {
                    client.fail(protocol, &error.to_string()).await;
                    return None;
                }
            };
            match state.team_limits.acquire(auth.team_id, Work::Session) {
                Ok(permit) => (auth, permit),
                Err(busy) => {
                    client.fail(protocol, &busy.to_string()).await;
                    return None;
                }
            }
        }
    };
    match capsules::running(state, auth.team_id, id).await {
        Ok(capsule) => Some(Connected {
            client,
            capsule,
            credential: auth.credential(),
            _permit: permit,
        }),
        Err(error) => {
            client
                .fail(protocol, &ApiError::from(error).to_string())
                .await;
            None
        }
    }
}

/// The largest message a client may send (the default is 64 MiB). Clients send commands,
/// keystrokes and pastes; this is far above any of them and bounds what a client, before it has
/// even authenticated, can make the control plane hold. A larger one closes the socket.
const CLIENT_MESSAGE_LIMIT: usize = 4 << 20;

/// Who the session is for, as far as the upgrade request told.
enum Caller {
    /// Authenticated by header, the session already counted against its team's limit.
    Header(AuthTeam, WorkPermit),
    /// To be authenticated by the first frame.
    ByFrame,
}

/// Checks what can be checked before upgrading: the upgrade itself, the ID and, for header
/// callers, the team's session limit (a plain 429 with `Retry-After`) and the capsule.
async fn prepare(
    state: &AppState,
    caller: WsCaller,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    id: &str,
) -> Result<(WebSocketUpgrade, SandboxId, Caller), ApiError> {
    let upgrade = upgrade
        .map_err(|e| {
            ApiError::InvalidRequest(format!("expected a WebSocket upgrade: {}", e.body_text()))
        })?
        .max_message_size(CLIENT_MESSAGE_LIMIT)
        .max_frame_size(CLIENT_MESSAGE_LIMIT);
    let id: SandboxId = path_id("id", id)?;
    let caller = match caller {
        WsCaller(Some(auth)) => {
            let permit = state
                .team_limits
                .acquire(auth.team_id, Work::Session)
                .map_err(CapsuleError::from)?;
            capsules::running(state, auth.team_id, id).await?;
            Caller::Header(auth, permit)
        }
        WsCaller(None) => Caller::ByFrame,
    };
    Ok((upgrade, id, caller))
}

/// Attaches to envd and relays the session until either side ends it or the credential it was
/// opened with is revoked; a failed attach or a revocation is the client's one fatal frame.
async fn session(
    state: &AppState,
    connected: Connected,
    protocol: Protocol,
    attach: AttachRequest,
) {
    let Connected {
        mut client,
        capsule,
        credential,
        _permit,
    } = connected;
    let session = match guest::attach(state, &capsule, &attach).await {
        Ok(session) => session,
        Err(error) => {
            return client
                .fail(protocol, &ApiError::from(error).to_string())
                .await
        }
    };
    tokio::select! {
        () = ws::relay(&mut client, protocol, session) => {}
        () = state.revocations.ended(&state.db, credential) => {
            client.fail(protocol, REVOKED).await;
        }
    }
}

const REVOKED: &str = "the credentials this session was opened with were revoked";

/// Sessions that start with a frame (exec stream, PTY): reads and checks it, then relays.
async fn opened_session(state: AppState, mut connected: Connected, protocol: Protocol) {
    let first = match connected.client.next_text(START_FRAME_WAIT).await {
        Ok(first) => first,
        Err(reason) => return connected.client.fail(protocol, &reason).await,
    };
    match ws::opening(protocol, first.as_deref()) {
        Ok(attach) => session(&state, connected, protocol, attach).await,
        Err(error) => connected.client.fail(protocol, &error.to_string()).await,
    }
}

pub async fn exec_stream(
    State(state): State<AppState>,
    caller: WsCaller,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (upgrade, id, caller) = prepare(&state, caller, upgrade, &id).await?;
    Ok(upgrade.on_upgrade(move |socket| async move {
        if let Some(connected) =
            connect_capsule(Client(socket), &state, caller, id, Protocol::Exec).await
        {
            opened_session(state, connected, Protocol::Exec).await;
        }
    }))
}

pub async fn process_stream(
    State(state): State<AppState>,
    caller: WsCaller,
    Path((id, selector)): Path<(String, String)>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    guest::check_selector(&selector)?;
    let (upgrade, id, caller) = prepare(&state, caller, upgrade, &id).await?;
    Ok(upgrade.on_upgrade(move |socket| async move {
        if let Some(connected) =
            connect_capsule(Client(socket), &state, caller, id, Protocol::Process).await
        {
            let attach = AttachRequest::Connect { selector };
            session(&state, connected, Protocol::Process, attach).await;
        }
    }))
}

pub async fn pty(
    State(state): State<AppState>,
    caller: WsCaller,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (upgrade, id, caller) = prepare(&state, caller, upgrade, &id).await?;
    Ok(upgrade.on_upgrade(move |socket| async move {
        if let Some(connected) =
            connect_capsule(Client(socket), &state, caller, id, Protocol::Pty).await
        {
            opened_session(state, connected, Protocol::Pty).await;
        }
    }))
}
