//! The login-failure pruner: one background task that deletes failed-login counts whose window
//! ended. Every replica runs it; the deletes are idempotent.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::services::login_limits;
use crate::db::Db;

/// How often ended windows are deleted; they are harmless meanwhile (the next failure of their
/// subject starts a new window in the same row), so this only bounds the table's size.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(300);

/// Runs until `cancel` fires. Database errors are logged and retried on the next tick.
pub async fn run(db: Db, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(PRUNE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match login_limits::prune(&db).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "pruned ended failed-login windows"),
            Err(error) => tracing::warn!(%error, "could not prune failed-login windows"),
        }
    }
}
