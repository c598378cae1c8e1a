//! Lifecycle events (`GET /v1/events/stream`): recorded in the `events` table (capsule status
//! changes by a trigger in the transaction that makes them, actions by [`record`]), and fanned
//! out by every replica. Each replica runs one [`run`] task: it LISTENs for the table's
//! notifications, reads the rows it has not delivered and broadcasts them, with the capsules
//! they are about, to its own stream subscribers. So an event made on any replica reaches
//! subscribers of every replica, and a client that reconnects anywhere resumes from its last
//! event's ID (the table is the replay).

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::db::events::{self, EventRow, NewEvent};
use crate::db::sandboxes::{self, SandboxRow};
use crate::db::{Db, DbError};

/// The notification channel of `events` inserts (migration 0017).
const CHANNEL: &str = "wrenn_events";
/// How long events are kept for replay.
pub const RETENTION_DAYS: i64 = 7;
/// Events a slow subscriber may fall behind before its stream ends (it then reconnects and
/// resumes from the table).
const BROADCAST_CAPACITY: usize = 4096;
/// Read at least this often, notification or not.
const POLL_EVERY: Duration = Duration::from_secs(2);
/// An event ID skipped this long (its transaction rolled back, or never commits) is given up.
const GAP_WAIT: Duration = Duration::from_secs(30);
const BATCH: i64 = 1000;

/// An event with the capsule it is about, as it was when the event was read.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub event: EventRow,
    pub sandbox: Option<SandboxRow>,
}

/// This replica's subscribers.
#[derive(Debug, Clone)]
pub struct EventHub {
    sender: broadcast::Sender<Arc<Delivered>>,
    /// Fired when the replica starts shutting down: open streams end, so the graceful
    /// shutdown, which waits for open responses, is not held up by them.
    closing: CancellationToken,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(BROADCAST_CAPACITY).0,
            closing: CancellationToken::new(),
        }
    }
}

impl EventHub {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Delivered>> {
        self.sender.subscribe()
    }

    /// Fires when the streams must end.
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// Ends every open stream.
    pub fn close(&self) {
        self.closing.cancel();
    }
}

/// Who did something, as events name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// `user`, `api_key` or `system`.
    pub kind: &'static str,
    pub id: Option<String>,
    pub name: Option<String>,
}

impl Actor {
    /// The control plane itself (the reconciler, the host monitor).
    pub const SYSTEM: Actor = Actor {
        kind: "system",
        id: None,
        name: None,
    };
}

/// An action's event: `outcome` is its error message if it failed.
pub fn action(
    team: uuid::Uuid,
    kind: &'static str,
    (resource_type, resource_id): (&'static str, String),
    actor: &Actor,
    outcome: Result<(), String>,
) -> NewEvent {
    let sandbox_id = (resource_type == "capsule")
        .then(|| resource_id.parse().ok())
        .flatten();
    NewEvent {
        team_id: team,
        kind,
        outcome: Some(if outcome.is_ok() { "success" } else { "error" }),
        resource_type,
        resource_id,
        actor_type: actor.kind,
        actor_id: actor.id.clone(),
        actor_name: actor.name.clone(),
        metadata: serde_json::json!({}),
        error: outcome.err(),
        sandbox_id,
    }
}

/// Records an action; a failure is logged, never the action's.
pub async fn record(db: &Db, event: NewEvent) {
    if let Err(error) = events::insert(db, &event).await {
        tracing::warn!(%error, kind = event.kind, "could not record an event");
    }
}

/// `rows` with their capsules, read in one query.
pub async fn with_capsules(db: &Db, rows: Vec<EventRow>) -> Result<Vec<Delivered>, DbError> {
    let ids: Vec<uuid::Uuid> = rows.iter().filter_map(|r| r.sandbox_id).collect();
    let capsules: HashMap<uuid::Uuid, SandboxRow> = if ids.is_empty() {
        HashMap::new()
    } else {
        sandboxes::by_ids(db, &ids)
            .await?
            .into_iter()
            .map(|row| (row.id, row))
            .collect()
    };
    Ok(rows
        .into_iter()
        .map(|event| {
            // An action on an ID the caller named may be about another team's capsule.
            let sandbox = event
                .sandbox_id
                .and_then(|id| capsules.get(&id))
                .filter(|row| row.team_id == event.team_id)
                .cloned();
            Delivered { event, sandbox }
        })
        .collect())
}

/// Which event IDs have been delivered: all up to `floor`, and those in `above`. IDs are taken
/// in insert order but committed in any order, so a missing ID is waited for a while before it
/// is given up as never coming.
struct Delivery {
    floor: i64,
    above: BTreeSet<i64>,
    gap_since: Option<Instant>,
}

impl Delivery {
    fn new(floor: i64) -> Self {
        Self {
            floor,
            above: BTreeSet::new(),
            gap_since: None,
        }
    }

    fn is_new(&self, id: i64) -> bool {
        id > self.floor && !self.above.contains(&id)
    }

    /// Whether `id` is new; marks it delivered.
    fn take(&mut self, id: i64) -> bool {
        id > self.floor && self.above.insert(id)
    }

    fn settle(&mut self) {
        loop {
            if self.above.remove(&(self.floor + 1)) {
                self.floor += 1;
                self.gap_since = None;
            } else if self.above.is_empty() {
                self.gap_since = None;
                return;
            } else if self.gap_since.is_some_and(|at| at.elapsed() >= GAP_WAIT) {
                self.floor += 1;
            } else {
                self.gap_since.get_or_insert_with(Instant::now);
                return;
            }
        }
    }
}

async fn deliver_new(db: &Db, hub: &EventHub, delivery: &mut Delivery) -> Result<(), DbError> {
    let mut after = delivery.floor;
    loop {
        let rows = events::after(db, after, BATCH).await?;
        let Some(last) = rows.last().map(|r| r.id) else {
            break;
        };
        let full = rows.len() as i64 == BATCH;
        let fresh: Vec<EventRow> = rows.into_iter().filter(|r| delivery.is_new(r.id)).collect();
        // Marked delivered only once read whole: a failure here leaves them for the next look.
        for delivered in with_capsules(db, fresh).await? {
            delivery.take(delivered.event.id);
            // No subscriber is no error.
            let _ = hub.sender.send(Arc::new(delivered));
        }
        after = last;
        if !full {
            break;
        }
    }
    delivery.settle();
    Ok(())
}

async fn listen(db: &Db) -> Result<PgListener, DbError> {
    let mut listener = PgListener::connect_with(db).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Fans events out to this replica's subscribers until `cancel` fires; also prunes old ones.
pub async fn run(db: Db, hub: EventHub, cancel: CancellationToken) {
    let mut delivery = loop {
        match events::last_id(&db).await {
            Ok(last) => break Delivery::new(last),
            Err(error) => {
                tracing::warn!(%error, "cannot read the events table; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(POLL_EVERY) => {}
                }
            }
        }
    };
    let mut listener: Option<PgListener> = None;
    let mut last_prune: Option<Instant> = None;
    loop {
        if listener.is_none() {
            match listen(&db).await {
                Ok(connected) => listener = Some(connected),
                Err(error) => tracing::warn!(%error, "cannot listen for events; polling"),
            }
        }
        if let Err(error) = deliver_new(&db, &hub, &mut delivery).await {
            tracing::warn!(%error, "could not read new events");
        }
        if last_prune.is_none_or(|at| at.elapsed() >= Duration::from_secs(3600)) {
            let before = chrono::Utc::now() - chrono::Duration::days(RETENTION_DAYS);
            match events::prune(&db, before).await {
                Ok(_) => last_prune = Some(Instant::now()),
                Err(error) => tracing::warn!(%error, "could not prune old events"),
            }
        }
        let woken = async {
            match listener.as_mut() {
                Some(l) => l.recv().await.map(drop),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            outcome = woken => {
                if let Err(error) = outcome {
                    tracing::warn!(%error, "the events listener failed; reconnecting");
                    listener = None;
                }
            }
            () = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_committed_out_of_order_are_each_delivered_once() {
        let mut d = Delivery::new(10);
        assert!(!d.take(10));
        assert!(d.take(12));
        d.settle();
        assert_eq!(d.floor, 10, "11 may still commit");
        assert!(d.take(11));
        assert!(!d.take(12));
        d.settle();
        assert_eq!(d.floor, 12);
        assert!(d.above.is_empty());
    }

    #[test]
    fn a_gap_that_never_fills_is_given_up() {
        let mut d = Delivery::new(0);
        assert!(d.take(2));
        d.settle();
        d.gap_since = Some(Instant::now() - GAP_WAIT);
        d.settle();
        assert_eq!(d.floor, 2);
        assert!(!d.take(1), "too late");
    }
}
