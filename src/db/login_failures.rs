//! Queries on `login_failures`: failed password logins per email and per client address, one
//! fixed window per subject, counted atomically so concurrent attempts on any replica see each
//! other.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::{text_enum, DbError};

text_enum! {
    /// What a failure is counted against; `SignupAddress` counts every signup, failed or not.
    LoginScope, "login_failures.scope" {
        Email => "email",
        Address => "address",
        SignupAddress => "signup_address"
    }
}

/// A subject's count right after an attempt was added to it.
#[derive(Debug, Clone, Copy)]
pub struct WindowCount {
    pub failures: i64,
    pub window_ends_at: DateTime<Utc>,
    /// The database's clock at the count, against which `window_ends_at` is measured.
    pub counted_at: DateTime<Utc>,
}

/// Adds one attempt to the subject's window, starting a new `window` when the last one ended,
/// and returns the count including it.
pub async fn count_attempt(
    ex: impl PgExecutor<'_>,
    scope: LoginScope,
    subject: &[u8],
    window: Duration,
) -> Result<WindowCount, DbError> {
    Ok(sqlx::query_as!(
        WindowCount,
        r#"INSERT INTO login_failures AS f (scope, subject, failures, window_ends_at)
           VALUES ($1, $2, 1, now() + make_interval(secs => $3))
           ON CONFLICT (scope, subject) DO UPDATE SET
               failures = CASE WHEN f.window_ends_at <= now() THEN 1 ELSE f.failures + 1 END,
               window_ends_at = CASE WHEN f.window_ends_at <= now()
                                     THEN excluded.window_ends_at ELSE f.window_ends_at END
           RETURNING failures, window_ends_at, now() AS "counted_at!""#,
        scope.as_str(),
        subject,
        window.as_secs_f64(),
    )
    .fetch_one(ex)
    .await?)
}

/// Removes one attempt counted in the window ending at `window_ends_at` (it was no failure);
/// nothing when that window is over.
pub async fn take_back(
    ex: impl PgExecutor<'_>,
    scope: LoginScope,
    subject: &[u8],
    window_ends_at: DateTime<Utc>,
) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE login_failures SET failures = failures - 1
         WHERE scope = $1 AND subject = $2 AND window_ends_at = $3 AND failures > 0",
        scope.as_str(),
        subject,
        window_ends_at,
    )
    .execute(ex)
    .await?;
    Ok(())
}

/// Deletes the rows whose window ended; returns how many.
pub async fn delete_ended(ex: impl PgExecutor<'_>) -> Result<u64, DbError> {
    let done = sqlx::query!("DELETE FROM login_failures WHERE window_ends_at <= now()")
        .execute(ex)
        .await?;
    Ok(done.rows_affected())
}
