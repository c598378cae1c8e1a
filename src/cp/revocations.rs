//! Ending what a revoked credential still holds open. Every REST call checks its credentials
//! again, but a WebSocket session (exec stream, process stream, PTY) is authenticated once, when
//! it opens, and may last for days. So revoking an API key, removing a member, disabling an
//! account or deleting a team is announced with PostgreSQL `NOTIFY`, which is delivered when the
//! revoking transaction commits and reaches every replica; each replica ends the sessions it
//! serves under that credential.
//!
//! Notifications are not durable: a replica whose listening connection dropped may have missed
//! some. When it reconnects it asks every open session to check its credential in the database
//! ([`Notice::Recheck`]), and so does a session that fell behind the broadcast.

use std::future::pending;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use sqlx::PgExecutor;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{Db, DbError};

/// The PostgreSQL notification channel.
const CHANNEL: &str = "wrenn_revocations";
/// Notices a slow session may fall behind by before it has to ask the database instead.
const BACKLOG: usize = 1024;
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// A credential that no longer stands, as announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Revoked {
    ApiKey {
        id: Uuid,
    },
    /// A user removed from (or leaving) a team.
    Member {
        user: Uuid,
        team: Uuid,
    },
    /// A disabled account, in every team.
    User {
        id: Uuid,
    },
    Team {
        id: Uuid,
    },
}

/// What a session was opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    ApiKey { id: Uuid, team: Uuid },
    Member { user: Uuid, team: Uuid },
}

impl Revoked {
    fn ends(self, credential: Credential) -> bool {
        match (self, credential) {
            (Revoked::ApiKey { id }, Credential::ApiKey { id: key, .. }) => id == key,
            (Revoked::Member { user, team }, Credential::Member { user: u, team: t }) => {
                user == u && team == t
            }
            (Revoked::User { id }, Credential::Member { user, .. }) => id == user,
            (Revoked::Team { id }, Credential::ApiKey { team, .. })
            | (Revoked::Team { id }, Credential::Member { team, .. }) => id == team,
            (Revoked::ApiKey { .. }, Credential::Member { .. })
            | (Revoked::Member { .. } | Revoked::User { .. }, Credential::ApiKey { .. }) => false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Notice {
    Revoked(Revoked),
    /// Something may have been missed: every session checks its credential.
    Recheck,
}

/// This replica's fan-out of announcements to its open sessions.
#[derive(Debug, Clone)]
pub struct Revocations {
    notices: broadcast::Sender<Notice>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            notices: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Revocations {
    /// Resolves when `credential` no longer stands; never, while it does. Subscribes first and
    /// then checks the database once, so a revocation that committed while the session was
    /// being set up is not missed either.
    pub async fn ended(&self, db: &Db, credential: Credential) {
        let mut notices = self.notices.subscribe();
        if !stands(db, credential).await {
            return;
        }
        loop {
            match notices.recv().await {
                Ok(Notice::Revoked(revoked)) if revoked.ends(credential) => return,
                Ok(Notice::Revoked(_)) => {}
                Ok(Notice::Recheck) | Err(RecvError::Lagged(_)) => {
                    if !stands(db, credential).await {
                        return;
                    }
                }
                Err(RecvError::Closed) => pending::<()>().await,
            }
        }
    }

    /// Listens for announcements until `cancel`, reconnecting when the connection drops.
    pub async fn listen(self, db: Db, cancel: CancellationToken) {
        loop {
            match self.listen_once(&db, &cancel).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "revocation listener lost; open sessions will recheck")
                }
            }
            let _ = self.notices.send(Notice::Recheck);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(RECONNECT_DELAY) => {}
            }
        }
    }

    async fn listen_once(&self, db: &Db, cancel: &CancellationToken) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(db).await?;
        listener.listen(CHANNEL).await?;
        // Anything announced before LISTEN took effect was not heard.
        let _ = self.notices.send(Notice::Recheck);
        loop {
            let notification = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                notification = listener.try_recv() => notification?,
            };
            let Some(notification) = notification else {
                // The connection dropped; the next receive reconnects.
                let _ = self.notices.send(Notice::Recheck);
                continue;
            };
            match serde_json::from_str::<Revoked>(notification.payload()) {
                Ok(revoked) => {
                    let _ = self.notices.send(Notice::Revoked(revoked));
                }
                Err(error) => tracing::warn!(
                    %error,
                    payload = notification.payload(),
                    "unreadable revocation notice; open sessions will recheck"
                ),
            }
        }
    }
}

/// Announces `revoked` to every replica when the transaction `ex` belongs to commits.
pub async fn announce(ex: impl PgExecutor<'_>, revoked: Revoked) -> Result<(), DbError> {
    let payload = serde_json::to_string(&revoked).expect("revocations serialize");
    sqlx::query!(
        r#"SELECT 1 AS "sent!" FROM pg_notify($1, $2)"#,
        CHANNEL,
        payload
    )
    .fetch_one(ex)
    .await?;
    Ok(())
}

/// Whether `credential` still stands in the database. A database that cannot answer keeps the
/// session: an outage must not close every terminal.
async fn stands(db: &Db, credential: Credential) -> bool {
    let standing = match credential {
        Credential::ApiKey { id, team } => {
            sqlx::query_scalar!(
                r#"SELECT EXISTS (
                   SELECT 1 FROM team_api_keys k JOIN teams t ON t.id = k.team_id
                   WHERE k.id = $1 AND k.team_id = $2 AND t.deleted_at IS NULL
               ) AS "stands!""#,
                id,
                team
            )
            .fetch_one(db)
            .await
        }
        Credential::Member { user, team } => {
            sqlx::query_scalar!(
                r#"SELECT EXISTS (
                   SELECT 1 FROM team_members m
                   JOIN users u ON u.id = m.user_id
                   JOIN teams t ON t.id = m.team_id
                   WHERE m.user_id = $1 AND m.team_id = $2
                     AND u.status = 'active' AND t.deleted_at IS NULL
               ) AS "stands!""#,
                user,
                team
            )
            .fetch_one(db)
            .await
        }
    };
    standing.unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot check a session's credential; keeping the session");
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_revocation_ends_exactly_its_sessions() {
        let (key, other_key) = (Uuid::new_v4(), Uuid::new_v4());
        let (user, other_user) = (Uuid::new_v4(), Uuid::new_v4());
        let (team, other_team) = (Uuid::new_v4(), Uuid::new_v4());
        let by_key = Credential::ApiKey { id: key, team };
        let by_member = Credential::Member { user, team };
        let cases = [
            (Revoked::ApiKey { id: key }, by_key, true),
            (Revoked::ApiKey { id: other_key }, by_key, false),
            (Revoked::ApiKey { id: key }, by_member, false),
            (Revoked::Member { user, team }, by_member, true),
            (
                Revoked::Member {
                    user,
                    team: other_team,
                },
                by_member,
                false,
            ),
            (
                Revoked::Member {
                    user: other_user,
                    team,
                },
                by_member,
                false,
            ),
            (Revoked::Member { user, team }, by_key, false),
            (Revoked::User { id: user }, by_member, true),
            (Revoked::User { id: other_user }, by_member, false),
            (Revoked::User { id: user }, by_key, false),
            (Revoked::Team { id: team }, by_key, true),
            (Revoked::Team { id: team }, by_member, true),
            (Revoked::Team { id: other_team }, by_member, false),
        ];
        for (revoked, credential, ends) in cases {
            assert_eq!(
                revoked.ends(credential),
                ends,
                "{revoked:?} vs {credential:?}"
            );
        }
    }

    #[test]
    fn announcements_read_back() {
        let revoked = Revoked::Member {
            user: Uuid::nil(),
            team: Uuid::max(),
        };
        let text = serde_json::to_string(&revoked).unwrap();
        assert_eq!(serde_json::from_str::<Revoked>(&text).unwrap(), revoked);
    }
}
