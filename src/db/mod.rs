//! PostgreSQL access: the connection pool, the embedded migrations, and one module of queries
//! per table. Every query function takes any executor (the pool or an open transaction).

pub mod api_keys;
pub mod audit_logs;
pub mod builds;
pub mod capsule_access;
pub mod channels;
pub mod control_plane_ca;
pub mod events;
pub mod host_refresh_tokens;
pub mod host_registration_tokens;
pub mod host_tags;
pub mod host_templates;
pub mod hosts;
pub mod login_failures;
pub mod migrate;
pub mod page;
pub mod plans;
pub mod sandboxes;
pub mod team_members;
pub mod teams;
pub mod template_reservations;
pub mod templates;
pub mod usage;
pub mod users;

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

/// The handle every query takes: a pool of connections to the control-plane database.
pub type Db = PgPool;

/// How long a request waits for a connection before the database counts as unavailable; short,
/// so an outage turns into prompt 503s instead of piled-up requests.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_CONNECTIONS: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("unique constraint `{constraint}` violated")]
    UniqueViolation { constraint: String },
    #[error("database query failed: {0}")]
    Query(#[source] sqlx::Error),
}

impl From<sqlx::Error> for DbError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => DbError::Unavailable(error),
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if code == "23505" {
                    DbError::UniqueViolation {
                        constraint: db.constraint().unwrap_or_default().to_owned(),
                    }
                } else if code.starts_with("08") || code.starts_with("57P") {
                    // Connection exceptions and operator intervention (shutdown, starting up).
                    DbError::Unavailable(error)
                } else {
                    DbError::Query(error)
                }
            }
            _ => DbError::Query(error),
        }
    }
}

/// A pool that connects on first use, so the control plane starts (and `/health` answers) while
/// the database is down, and recovers by itself when it returns.
pub fn connect_lazy(url: &str) -> Result<Db, DbError> {
    PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(true)
        .connect_lazy(url)
        .map_err(DbError::from)
}

/// Checks that the database answers a trivial query.
pub async fn ping(db: &Db) -> Result<(), DbError> {
    sqlx::query_scalar!("SELECT 1").fetch_one(db).await?;
    Ok(())
}

/// A text column holding a value outside its Rust enum: the schema and the code disagree.
#[derive(Debug, thiserror::Error)]
#[error("unexpected {column} value `{value}` in the database")]
pub struct UnexpectedValue {
    pub column: &'static str,
    pub value: String,
}

/// Enums stored as TEXT: `as_str` for binding, and decoding (with a typed error for values the
/// code does not know) for `AS "column: Type"` overrides in checked queries.
macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident, $column:literal { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),* }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),* }
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::db::UnexpectedValue;

            fn try_from(value: String) -> Result<Self, Self::Error> {
                match value.as_str() {
                    $($text => Ok(Self::$variant),)*
                    _ => Err($crate::db::UnexpectedValue { column: $column, value }),
                }
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <String as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <String as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <String as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(Self::try_from(text)?)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use text_enum;
