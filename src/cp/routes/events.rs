//! `GET /v1/events/stream`: the caller's team's lifecycle events as server-sent events in the
//! 0.3.0 API's `SSEEvent` shape, live from this replica's hub (`cp::events`), after a replay
//! from the table of everything since `Last-Event-ID` when the client sends one.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::capsules::Capsule;
use crate::cp::auth::AuthTeam;
use crate::cp::error::ApiError;
use crate::cp::events::{with_capsules, Delivered};
use crate::cp::limits::Work;
use crate::cp::revocations::Credential;
use crate::cp::state::AppState;
use crate::db::events::{self, EventRow};
use crate::id::public_resource_id;

const KEEPALIVE: Duration = Duration::from_secs(15);
const REPLAY_BATCH: i64 = 500;

#[derive(Debug, Serialize)]
struct SseEvent {
    event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<Resource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<Actor>,
    metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    sandbox: Option<Capsule>,
    timestamp: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Serialize)]
struct Resource {
    /// Absent for a create that failed before its capsule had an ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Serialize)]
struct Actor {
    #[serde(rename = "type")]
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

fn body_of(delivered: &Delivered) -> SseEvent {
    let e: &EventRow = &delivered.event;
    let metadata = match &e.metadata {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    SseEvent {
        event: e.kind.clone(),
        outcome: e.outcome.clone(),
        resource: Some(Resource {
            id: (!e.resource_id.is_empty())
                .then(|| public_resource_id(&e.resource_type, &e.resource_id)),
            kind: e.resource_type.clone(),
        }),
        actor: Some(Actor {
            kind: e.actor_type.clone(),
            id: e.actor_id.clone(),
            name: e.actor_name.clone(),
        }),
        metadata,
        error: e.error.clone(),
        sandbox: delivered.sandbox.clone().map(Capsule::from),
        timestamp: e.created_at,
    }
}

fn sse(delivered: &Delivered) -> Event {
    let data = serde_json::to_string(&body_of(delivered)).expect("events serialize");
    Event::default()
        .id(delivered.event.id.to_string())
        .event(delivered.event.kind.clone())
        .data(data)
}

fn connected() -> Event {
    let body = SseEvent {
        event: "connected".into(),
        outcome: None,
        resource: None,
        actor: None,
        metadata: BTreeMap::new(),
        error: None,
        sandbox: None,
        timestamp: chrono::Utc::now(),
    };
    Event::default()
        .event("connected")
        .data(serde_json::to_string(&body).expect("events serialize"))
}

type Outbox = mpsc::Sender<Result<Event, Infallible>>;

/// Sends the team's events after `after` from the table; returns their IDs, or `None` when the
/// client has gone.
async fn replay(
    state: &AppState,
    team: uuid::Uuid,
    mut after: i64,
    out: &Outbox,
) -> Option<HashSet<i64>> {
    let mut sent = HashSet::new();
    loop {
        let rows = match events::for_team_after(&state.db, team, after, REPLAY_BATCH).await {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "could not replay events");
                return Some(sent);
            }
        };
        let Some(last) = rows.last().map(|r| r.id) else {
            return Some(sent);
        };
        let delivered = match with_capsules(&state.db, rows).await {
            Ok(delivered) => delivered,
            Err(error) => {
                tracing::warn!(%error, "could not replay events");
                return Some(sent);
            }
        };
        for d in &delivered {
            out.send(Ok(sse(d))).await.ok()?;
            sent.insert(d.event.id);
        }
        after = last;
    }
}

async fn feed(
    state: AppState,
    credential: Credential,
    team: uuid::Uuid,
    last_event: Option<i64>,
    mut live: broadcast::Receiver<Arc<Delivered>>,
    out: Outbox,
) {
    if out.send(Ok(connected())).await.is_err() {
        return;
    }
    let replayed = match last_event {
        Some(after) => match replay(&state, team, after, &out).await {
            Some(sent) => sent,
            None => return,
        },
        None => HashSet::new(),
    };
    let closing = state.events.closing();
    let revoked = state.revocations.ended(&state.db, credential);
    tokio::pin!(revoked);
    loop {
        tokio::select! {
            () = out.closed() => return,
            () = closing.cancelled() => return,
            () = &mut revoked => return,
            received = live.recv() => match received {
                Ok(delivered) => {
                    let event = &delivered.event;
                    if event.team_id != team || replayed.contains(&event.id) {
                        continue;
                    }
                    if out.send(Ok(sse(&delivered))).await.is_err() {
                        return;
                    }
                }
                // Fallen behind: the stream ends, and the client resumes from its last ID.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::info!(missed, "an event subscriber fell behind; ending its stream");
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

pub async fn stream(
    State(state): State<AppState>,
    auth: AuthTeam,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last_event = headers
        .get("last-event-id")
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|id| *id >= 0)
                .ok_or_else(|| {
                    ApiError::InvalidRequest(
                        "Last-Event-ID: not the ID of an event this stream sent".into(),
                    )
                })
        })
        .transpose()?;
    // Held by the feed, which ends when the client goes away.
    let permit = state.team_limits.acquire(auth.team_id, Work::EventStream)?;
    // Subscribed before the replay reads the table, so nothing falls between the two.
    let live = state.events.subscribe();
    let (out, receiver) = mpsc::channel(64);
    let credential = auth.credential();
    tokio::spawn(async move {
        let _permit = permit;
        feed(
            state,
            credential,
            auth.team_id.uuid(),
            last_event,
            live,
            out,
        )
        .await;
    });
    let keepalive = KeepAlive::new().interval(KEEPALIVE).text("keepalive");
    Ok(Sse::new(ReceiverStream::new(receiver))
        .keep_alive(keepalive)
        .into_response())
}
