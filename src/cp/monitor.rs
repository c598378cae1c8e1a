//! The host monitor: one background task that marks hosts `unreachable` once their heartbeat
//! has been silent too long. A later heartbeat brings a host back `online` (see
//! `db::hosts::heartbeat`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::{hosts, Db};

#[derive(Debug, Clone, Copy)]
pub struct MonitorSettings {
    /// How often to look.
    pub interval: Duration,
    /// Heartbeat silence after which a host is unreachable.
    pub unreachable_after: Duration,
}

/// Runs until `cancel` fires. Database errors are logged and retried on the next tick.
pub async fn run(db: Db, settings: MonitorSettings, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match hosts::mark_unreachable(&db, settings.unreachable_after).await {
            Ok(ids) => {
                for id in ids {
                    tracing::warn!(host = %crate::id::HostId(id), "host missed its heartbeats; marked unreachable");
                }
            }
            Err(error) => tracing::warn!(%error, "host monitor could not check heartbeats"),
        }
    }
}
