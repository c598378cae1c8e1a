//! What a team's capsules reserve, as the 0.3.0 API shows it: `GET /v1/capsules/stats` (now,
//! the 30-day peaks and a series over a range) and `GET /v1/capsules/usage` (vCPU- and
//! memory-minutes per UTC day). The samples behind both are taken by `cp::metering`.

use chrono::{DateTime, Duration as ChronoDuration, NaiveDate, Utc};

use super::ServiceError;
use crate::db::usage::{self, DailyUsage, Reservation};
use crate::db::{sandboxes, Db};
use crate::id::TeamId;

/// The windows `stats` draws its series over, each with its own bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsRange {
    FiveMinutes,
    OneHour,
    SixHours,
    OneDay,
    ThirtyDays,
}

impl StatsRange {
    pub const ALL: [StatsRange; 5] = [
        StatsRange::FiveMinutes,
        StatsRange::OneHour,
        StatsRange::SixHours,
        StatsRange::OneDay,
        StatsRange::ThirtyDays,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StatsRange::FiveMinutes => "5m",
            StatsRange::OneHour => "1h",
            StatsRange::SixHours => "6h",
            StatsRange::OneDay => "24h",
            StatsRange::ThirtyDays => "30d",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, ServiceError> {
        Self::ALL
            .into_iter()
            .find(|range| range.as_str() == raw)
            .ok_or_else(|| {
                ServiceError::invalid(
                    "range",
                    format!("must be one of 5m, 1h, 6h, 24h, 30d; got `{raw}`"),
                )
            })
    }

    /// The width of one point of the series, in seconds.
    fn bucket_secs(self) -> i64 {
        match self {
            StatsRange::FiveMinutes => 10,
            StatsRange::OneHour => 60,
            StatsRange::SixHours => 300,
            StatsRange::OneDay => 900,
            StatsRange::ThirtyDays => 6 * 3600,
        }
    }

    /// How many points the series has.
    fn points(self) -> i64 {
        match self {
            StatsRange::FiveMinutes => 30,
            StatsRange::OneHour => 60,
            StatsRange::SixHours => 72,
            StatsRange::OneDay => 96,
            StatsRange::ThirtyDays => 120,
        }
    }
}

/// How far back the peaks look.
pub const PEAK_WINDOW_DAYS: i64 = 30;

pub struct Stats {
    pub range: StatsRange,
    /// When `current` was read, by the database's clock.
    pub at: DateTime<Utc>,
    pub current: Reservation,
    pub peaks: Reservation,
    /// One point per bucket, oldest first, the last holding now; a bucket without samples is
    /// zero.
    pub series: Vec<(DateTime<Utc>, Reservation)>,
}

pub async fn stats(db: &Db, team: TeamId, range: StatsRange) -> Result<Stats, ServiceError> {
    let now = sandboxes::db_now(db).await?;
    let current = usage::reserved_now(db, team.uuid()).await?;
    let recorded = usage::peaks(
        db,
        team.uuid(),
        now - ChronoDuration::days(PEAK_WINDOW_DAYS),
    )
    .await?;
    let peaks = Reservation {
        running: recorded.running.max(current.running),
        vcpus: recorded.vcpus.max(current.vcpus),
        memory_mb: recorded.memory_mb.max(current.memory_mb),
    };
    let bucket = range.bucket_secs();
    let last = now.timestamp().div_euclid(bucket) * bucket;
    let first = last - (range.points() - 1) * bucket;
    let since = DateTime::from_timestamp(first, 0).unwrap_or(now);
    let mut series: Vec<(DateTime<Utc>, Reservation)> = (0..range.points())
        .map(|i| {
            let at = DateTime::from_timestamp(first + i * bucket, 0).unwrap_or(now);
            (at, Reservation::default())
        })
        .collect();
    for (at, reservation) in usage::series(db, team.uuid(), since, bucket as f64).await? {
        let index = (at.timestamp() - first).div_euclid(bucket);
        if let Some(point) = usize::try_from(index).ok().and_then(|i| series.get_mut(i)) {
            point.1 = reservation;
        }
    }
    Ok(Stats {
        range,
        at: now,
        current,
        peaks,
        series,
    })
}

/// The longest span `usage` answers, in days.
pub const MAX_USAGE_DAYS: i64 = 92;
/// The span `usage` answers without `from`, in days (today included).
pub const DEFAULT_USAGE_DAYS: i64 = 30;

pub struct Usage {
    pub from: NaiveDate,
    pub to: NaiveDate,
    /// Every day from `from` to `to`, zero where nothing ran.
    pub points: Vec<DailyUsage>,
}

/// The team's usage per UTC day from `from` (default: 29 days before `to`) to `to` (default:
/// today), today's up to the last sample.
pub async fn usage(
    db: &Db,
    team: TeamId,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> Result<Usage, ServiceError> {
    let today = sandboxes::db_now(db).await?.date_naive();
    let to = to.unwrap_or(today);
    let from = from.unwrap_or(to - ChronoDuration::days(DEFAULT_USAGE_DAYS - 1));
    if from > to {
        return Err(ServiceError::invalid(
            "from",
            format!("{from} is after `to` ({to})"),
        ));
    }
    let days = (to - from).num_days() + 1;
    if days > MAX_USAGE_DAYS {
        return Err(ServiceError::invalid(
            "to",
            format!("the range spans {days} days; at most {MAX_USAGE_DAYS} are answered at once"),
        ));
    }
    let recorded = usage::daily(db, team.uuid(), from, to).await?;
    let points = from
        .iter_days()
        .take_while(|day| *day <= to)
        .map(|day| {
            recorded
                .iter()
                .find(|point| point.day == day)
                .copied()
                .unwrap_or(DailyUsage {
                    day,
                    cpu_minutes: 0.0,
                    ram_mb_minutes: 0.0,
                })
        })
        .collect();
    Ok(Usage { from, to, points })
}

/// Parses a `YYYY-MM-DD` query value.
pub fn parse_day(field: &'static str, raw: &str) -> Result<NaiveDate, ServiceError> {
    use chrono::Datelike;
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .filter(|day| (2000..=9999).contains(&day.year()))
        .ok_or_else(|| {
            ServiceError::invalid(
                field,
                format!("`{raw}` is not a date (YYYY-MM-DD) between the years 2000 and 9999"),
            )
        })
}
