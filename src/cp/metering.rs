//! Usage metering: one background task per replica samples what every team reserves at fixed
//! instants of the database's clock (multiples of the sample interval) and rolls each sample
//! into the team's daily usage in the same statement. Every replica samples every instant; the
//! sample's key (team, instant) lets only the first count, so replicas never double-count and
//! any one of them keeps the meter running.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::db::{sandboxes, usage, Db, DbError};

/// How long samples are kept: the 30-day peaks and series, and a day to spare.
pub const SAMPLE_RETENTION_DAYS: i64 = 31;
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The instant of the sample that `now` falls in.
pub fn sample_instant(now: DateTime<Utc>, interval: Duration) -> DateTime<Utc> {
    let step = i64::try_from(interval.as_secs().max(1)).unwrap_or(i64::MAX);
    let start = now.timestamp().div_euclid(step) * step;
    DateTime::from_timestamp(start, 0).unwrap_or(now)
}

/// Samples the instant the database's clock is in, unless this replica already did.
async fn sample_once(
    db: &Db,
    interval: Duration,
    last: &mut Option<DateTime<Utc>>,
) -> Result<(), DbError> {
    let instant = sample_instant(sandboxes::db_now(db).await?, interval);
    if *last == Some(instant) {
        return Ok(());
    }
    let teams = usage::sample(db, instant, interval.as_secs_f64()).await?;
    tracing::trace!(%instant, teams, "usage sampled");
    *last = Some(instant);
    Ok(())
}

/// Runs until `cancel` fires. It looks at the clock four times per interval, so a late tick
/// never skips an instant; database errors are logged and retried on the next look.
pub async fn run(db: Db, interval: Duration, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(interval / 4);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(error) = sample_once(&db, interval, &mut last).await {
            tracing::warn!(%error, "could not sample usage");
        }
        if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            let before = Utc::now() - chrono::Duration::days(SAMPLE_RETENTION_DAYS);
            match usage::prune(&db, before).await {
                Ok(deleted) => {
                    last_prune = Some(tokio::time::Instant::now());
                    if deleted > 0 {
                        tracing::debug!(deleted, "pruned old usage samples");
                    }
                }
                Err(error) => tracing::warn!(%error, "could not prune usage samples"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_multiples_of_the_interval() {
        let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        let ten = Duration::from_secs(10);
        assert_eq!(sample_instant(at(1_000_009), ten), at(1_000_000));
        assert_eq!(sample_instant(at(1_000_010), ten), at(1_000_010));
        let fraction = DateTime::from_timestamp(1_000_005, 999_000_000).unwrap();
        assert_eq!(sample_instant(fraction, ten), at(1_000_000));
        assert_eq!(sample_instant(at(7), Duration::ZERO), at(7));
    }
}
