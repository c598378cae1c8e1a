//! The delivery task every replica runs: it claims due deliveries (any replica may take any
//! one; none is sent by two at once), sends them, and records each attempt. A failed attempt is
//! retried with backoff (base × 1, 3, 12, 60, 360: 10 s to 1 h by default) up to six attempts,
//! then the delivery is marked failed. Finished deliveries are kept a week, as the log.

use std::str::FromStr;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::seal::SealKeys;
use super::send::{Notification, Sender};
use super::{ChannelConfig, Provider};
use crate::cp::events::EventHub;
use crate::db::channels::{self, Attempt, Due};
use crate::db::Db;

/// Deliveries claimed and sent at once.
const BATCH: i64 = 16;
/// How long one attempt may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// A claimed delivery is retried after this if its replica never records the attempt.
const LEASE: Duration = Duration::from_secs(60);
/// How often due retries are looked for when no event wakes the task.
const POLL: Duration = Duration::from_secs(1);
const BACKOFF: [u32; 5] = [1, 3, 12, 60, 360];
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
const KEEP_DAYS: i64 = 7;

/// When to try again after attempt number `attempts` failed; `None` after the last one.
pub fn retry_in(attempts: i32, base: Duration) -> Option<Duration> {
    let index = usize::try_from(attempts).ok()?.checked_sub(1)?;
    BACKOFF
        .get(index)
        .map(|factor| base.saturating_mul(*factor))
}

/// Runs until `cancel` fires. Events wake it as soon as the replica's event listener has read
/// them; retries are found by polling.
pub async fn run(
    db: Db,
    keys: SealKeys,
    hub: EventHub,
    retry_base: Duration,
    allow_private: bool,
    cancel: CancellationToken,
) {
    let sender = Sender::new(SEND_TIMEOUT, allow_private);
    let mut wake = hub.subscribe();
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let claimed = match channels::claim_due(&db, BATCH, LEASE).await {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "could not claim channel deliveries");
                Vec::new()
            }
        };
        let full = i64::try_from(claimed.len()).unwrap_or(i64::MAX) >= BATCH;
        let batch = futures::future::join_all(
            claimed
                .into_iter()
                .map(|due| deliver(&db, &keys, &sender, due, retry_base)),
        );
        tokio::select! {
            // Unrecorded attempts are retried when their lease ends.
            () = cancel.cancelled() => return,
            _ = batch => {}
        }
        if full {
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            woken = wake.recv() => {
                if matches!(woken, Err(RecvError::Closed)) {
                    tokio::time::sleep(POLL).await;
                }
            }
            () = tokio::time::sleep(POLL) => {}
            _ = prune.tick() => {
                let before = chrono::Utc::now() - chrono::Duration::days(KEEP_DAYS);
                if let Err(error) = channels::prune(&db, before).await {
                    tracing::warn!(%error, "could not prune the channel delivery log");
                }
            }
        }
    }
}

async fn deliver(db: &Db, keys: &SealKeys, sender: &Sender, due: Due, retry_base: Duration) {
    let outcome = match open(keys, &due) {
        Err(error) => Attempt::Failed {
            status: None,
            error,
            retry_in: None,
        },
        Ok(config) => {
            let notification = Notification::of_event(&due);
            let sender = sender.clone();
            let sent =
                tokio::task::spawn_blocking(move || sender.send(&config, &notification)).await;
            match sent {
                Ok(Ok(status)) => Attempt::Delivered {
                    status: i32::from(status),
                },
                Ok(Err(failed)) => Attempt::Failed {
                    status: failed.status.map(i32::from),
                    error: failed.message,
                    retry_in: retry_in(due.attempts, retry_base),
                },
                Err(error) => Attempt::Failed {
                    status: None,
                    error: format!("the send did not finish: {error}"),
                    retry_in: retry_in(due.attempts, retry_base),
                },
            }
        }
    };
    if let Attempt::Failed {
        error, retry_in, ..
    } = &outcome
    {
        tracing::warn!(
            delivery = due.id,
            channel = %due.channel_id,
            attempt = due.attempts,
            retry_in = ?retry_in,
            error,
            "a channel delivery failed"
        );
    }
    if let Err(error) = channels::finish(db, due.id, due.attempts, &outcome).await {
        tracing::warn!(%error, delivery = due.id, "could not record a channel delivery");
    }
}

fn open(keys: &SealKeys, due: &Due) -> Result<ChannelConfig, String> {
    let provider = Provider::from_str(&due.provider)
        .map_err(|_| format!("`{}` is not a provider", due.provider))?;
    let plain = keys
        .open(due.channel_id, &due.config_sealed)
        .map_err(|e| e.to_string())?;
    ChannelConfig::from_stored(provider, &plain).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_and_end_after_the_sixth_attempt() {
        let base = Duration::from_secs(10);
        let waits: Vec<_> = (1..=7).map(|n| retry_in(n, base)).collect();
        assert_eq!(
            waits,
            [10, 30, 120, 600, 3600]
                .map(|s| Some(Duration::from_secs(s)))
                .into_iter()
                .chain([None, None])
                .collect::<Vec<_>>()
        );
        assert_eq!(retry_in(0, base), None);
    }
}
