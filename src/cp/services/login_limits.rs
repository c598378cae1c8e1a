//! Login throttling: failed password logins are counted per email and per client address in
//! PostgreSQL, so every control-plane replica enforces the same limits with no state of its own.
//!
//! An attempt is counted *before* its password is checked and taken back when the password was
//! right, so however many attempts run at once, at most `max_failures` wrong passwords per
//! subject and window ever reach the (deliberately slow) password check. An attempt refused
//! with 429 is not counted anywhere, so a blocked address cannot spend an email's budget.
//!
//! What each limit means for the legitimate user: the email limit blocks logins to that account
//! from every address until its window ends; that is what stops guessing spread over many
//! addresses, and an attacker can cause it for at most one window at a time. The address limit
//! blocks only that address (IPv6: its /64): failures from elsewhere never block a user's own
//! address, and a correct password is never counted against either.

use std::net::IpAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::ServiceError;
pub use crate::cp::state::{Limit, LoginLimits};
use crate::db::login_failures::{self, LoginScope, WindowCount};
use crate::db::Db;

/// What a counted attempt was counted against, to take it back.
#[derive(Debug)]
struct Counted {
    scope: LoginScope,
    subject: Vec<u8>,
    count: WindowCount,
}

/// A login attempt counted against its email and address while its password is checked. Dropping
/// it leaves it counted as a failure; [`Attempt::succeeded`] takes it back.
#[derive(Debug)]
#[must_use = "an attempt whose password was right must be taken back with `succeeded`"]
pub struct Attempt {
    counted: Vec<Counted>,
}

fn email_subject(email: &str) -> Vec<u8> {
    Sha256::digest(email.trim().to_lowercase().as_bytes()).to_vec()
}

/// One subject per client: an IPv4 address, or the /64 of an IPv6 one (what one site or
/// customer usually gets, and what an attacker could otherwise rotate through freely).
fn address_subject(addr: IpAddr) -> Vec<u8> {
    match addr.to_canonical() {
        IpAddr::V4(v4) => Sha256::digest(v4.octets()).to_vec(),
        IpAddr::V6(v6) => Sha256::digest(&v6.octets()[..8]).to_vec(),
    }
}

fn time_left(count: &WindowCount) -> Duration {
    (count.window_ends_at - count.counted_at)
        .to_std()
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

impl Attempt {
    /// Counts a login attempt for `email` from `client`; 429 (`ServiceError::RateLimited`) when
    /// either has reached its limit in the current window.
    pub async fn begin(
        db: &Db,
        limits: &LoginLimits,
        email: &str,
        client: Option<IpAddr>,
    ) -> Result<Attempt, ServiceError> {
        let mut subjects = Vec::with_capacity(2);
        if limits.per_email.max_failures > 0 {
            subjects.push((LoginScope::Email, email_subject(email), limits.per_email));
        }
        if let Some(addr) = client.filter(|_| limits.per_address.max_failures > 0) {
            subjects.push((
                LoginScope::Address,
                address_subject(addr),
                limits.per_address,
            ));
        }
        let mut attempt = Attempt {
            counted: Vec::with_capacity(subjects.len()),
        };
        let mut blocked: Option<(LoginScope, Duration)> = None;
        for (scope, subject, limit) in subjects {
            let count = login_failures::count_attempt(db, scope, &subject, limit.window).await?;
            if count.failures > i64::from(limit.max_failures) && blocked.is_none() {
                blocked = Some((scope, time_left(&count)));
            }
            attempt.counted.push(Counted {
                scope,
                subject,
                count,
            });
        }
        let Some((scope, retry_after)) = blocked else {
            return Ok(attempt);
        };
        attempt.take_back(db).await?;
        let whose = match scope {
            LoginScope::Email => "for this email",
            LoginScope::Address | LoginScope::SignupAddress => "from this address",
        };
        Err(ServiceError::RateLimited {
            message: format!(
                "too many failed logins {whose}; try again in {} seconds",
                retry_after.as_secs()
            ),
            retry_after,
        })
    }

    /// The password was right: the attempt is no failure.
    pub async fn succeeded(self, db: &Db) -> Result<(), ServiceError> {
        self.take_back(db).await
    }

    async fn take_back(self, db: &Db) -> Result<(), ServiceError> {
        for counted in self.counted {
            login_failures::take_back(
                db,
                counted.scope,
                &counted.subject,
                counted.count.window_ends_at,
            )
            .await?;
        }
        Ok(())
    }
}

/// Counts a signup from `client` against its address's signup window; 429
/// (`ServiceError::RateLimited`) once the address has had `limit.max_failures` signups in it.
/// Refused signups count too: an address hammering signup stays blocked until its window ends.
pub async fn count_signup(db: &Db, limit: Limit, client: IpAddr) -> Result<(), ServiceError> {
    if limit.max_failures == 0 {
        return Ok(());
    }
    let subject = address_subject(client);
    let count =
        login_failures::count_attempt(db, LoginScope::SignupAddress, &subject, limit.window)
            .await?;
    if count.failures <= i64::from(limit.max_failures) {
        return Ok(());
    }
    let retry_after = time_left(&count);
    Err(ServiceError::RateLimited {
        message: format!(
            "too many signups from this address; try again in {} seconds",
            retry_after.as_secs()
        ),
        retry_after,
    })
}

/// Deletes the counts whose window ended; the next failure of such a subject starts afresh
/// anyway, so only the space is reclaimed.
pub async fn prune(db: &Db) -> Result<u64, ServiceError> {
    Ok(login_failures::delete_ended(db).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_one_subject_whatever_their_case_and_ipv6_clients_by_their_64() {
        assert_eq!(
            email_subject(" Ada@Example.COM "),
            email_subject("ada@example.com")
        );
        assert_ne!(
            email_subject("ada@example.com"),
            email_subject("bob@example.com")
        );
        let addr = |s: &str| address_subject(s.parse().unwrap());
        assert_eq!(addr("2001:db8:1:2::1"), addr("2001:db8:1:2:ffff::9"));
        assert_ne!(addr("2001:db8:1:2::1"), addr("2001:db8:1:3::1"));
        assert_eq!(addr("::ffff:192.0.2.1"), addr("192.0.2.1"));
        assert_ne!(addr("192.0.2.1"), addr("192.0.2.2"));
    }
}
