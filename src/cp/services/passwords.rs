//! Password hashing and checking (argon2), a few at a time. Each hash takes about 19 MiB and a
//! core for tens of milliseconds; without a bound, a burst of signups or logins would each get
//! a blocking thread (up to 512) and take gigabytes. Callers beyond `cp.password_hash_permits`
//! wait their turn instead.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use tokio::sync::Semaphore;

use super::input::Password;
use super::ServiceError;
use crate::cp::tokens::random_hex;

#[derive(Debug)]
pub struct PasswordHashing {
    permits: Arc<Semaphore>,
}

impl PasswordHashing {
    pub fn new(permits: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(permits.max(1))),
        }
    }

    /// Runs `work` on the blocking pool once a permit is free. The permit goes with the work, so
    /// a caller that gives up (its client left) does not free it before the hash is done.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ServiceError> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|e| ServiceError::PasswordHash(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            // Tests observe here how many hashes run at once.
            fail::fail_point!("cp-password-hash");
            let done = work();
            drop(permit);
            done
        })
        .await
        .map_err(|e| ServiceError::PasswordHash(e.to_string()))
    }

    pub async fn hash(&self, password: &Password) -> Result<String, ServiceError> {
        let password = password.as_str().to_owned();
        self.run(move || {
            let salt = SaltString::encode_b64(random_hex(16).as_bytes())
                .map_err(|e| ServiceError::PasswordHash(e.to_string()))?;
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| ServiceError::PasswordHash(e.to_string()))
        })
        .await?
    }

    /// Whether `password` matches `hash`; `None` for an unknown account, which is checked
    /// against a throwaway hash anyway so response time does not reveal which emails have
    /// accounts.
    pub async fn matches(&self, hash: Option<&str>, password: &str) -> Result<bool, ServiceError> {
        let (hash, password) = (hash.map(str::to_owned), password.to_owned());
        self.run(move || {
            let (hash, known): (&str, bool) = match &hash {
                Some(hash) => (hash, true),
                None => (unknown_account_hash(), false),
            };
            let matched = PasswordHash::new(hash).is_ok_and(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            });
            matched && known
        })
        .await
    }
}

/// A valid argon2 hash of a random password, computed once, for logins with an unknown email.
fn unknown_account_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let salt =
            SaltString::encode_b64(random_hex(16).as_bytes()).expect("16 bytes is a valid salt");
        Argon2::default()
            .hash_password(random_hex(16).as_bytes(), &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}
