//! Accounts: signup, login, team switching, the profile, and admin bootstrap.

use std::net::IpAddr;

use serde_json::json;
use uuid::Uuid;

use super::input::{DisplayName, Email, Password, TeamName};
use super::login_limits::{self, Attempt, LoginLimits};
use super::passwords::PasswordHashing;
use super::ServiceError;
use crate::config::SignupMode;
use crate::cp::state::Limit;
use crate::cp::tokens::{random_hex, TokenKeys};
use crate::db::audit_logs::{self, Entry, RequestEntry};
use crate::db::page::Keyset;
use crate::db::team_members::{self, Role};
use crate::db::users::{self, NewUser, User, UserStatus};
use crate::db::{teams, Db, DbError};
use crate::error_code::ErrorCode;
use crate::id::{TeamId, UserId};
use crate::secret::SecretText;

/// Name of the team every account gets at signup.
pub const DEFAULT_TEAM_NAME: &str = "Personal";

/// What signup, login and team switching return: a user JWT scoped to one team.
#[derive(Debug, Clone)]
pub struct Session {
    pub token: SecretText,
    pub user_id: UserId,
    pub team_id: TeamId,
    pub email: String,
    pub name: String,
}

pub struct Signup {
    pub email: Email,
    pub password: Password,
    pub name: DisplayName,
}

/// `xxxxxx-yyyyyy`, 12 hex digits: teams are addressed by ID; the slug is for people.
fn new_slug() -> String {
    let hex = random_hex(6);
    format!("{}-{}", &hex[..6], &hex[6..])
}

fn session(tokens: &TokenKeys, user: &User, team: Uuid) -> Session {
    let (user_id, team_id) = (UserId(user.id), TeamId(team));
    Session {
        token: SecretText::new(tokens.issue_user(
            user_id,
            team_id,
            &user.email,
            &user.name,
            user.is_admin,
        )),
        user_id,
        team_id,
        email: user.email.clone(),
        name: user.name.clone(),
    }
}

fn email_taken(error: DbError) -> ServiceError {
    match error {
        DbError::UniqueViolation { .. } => ServiceError::Conflict {
            code: ErrorCode::EmailTaken,
            message: "an account with this email already exists".into(),
        },
        other => other.into(),
    }
}

/// Who made an account, for its audit row.
#[derive(Debug, Clone, Copy)]
pub enum Origin {
    /// Self-service signup from this client address.
    Signup(Option<IpAddr>),
    /// `wrenn cp admin create` on the control plane's host.
    AdminCommand,
}

/// Why a sign-in was refused, as its audit row says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
enum Refusal {
    WrongPassword,
    AccountDisabled,
}

impl From<Refusal> for ServiceError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            // The same answer as for an unknown email, which must not be told apart.
            Refusal::WrongPassword => Self::Unauthorized("invalid email or password".into()),
            Refusal::AccountDisabled => Self::AccountDisabled,
        }
    }
}

/// The audit row of a signup or login of (or, refused, against) `user`, in `team`'s log where
/// its owners and admins see it. A wrong password names nobody as the actor: the caller is
/// whoever tried.
fn sign_in_entry(
    team: Uuid,
    user: &User,
    action: &'static str,
    refused: Option<Refusal>,
    client: Option<IpAddr>,
) -> RequestEntry<'static> {
    let identified = refused != Some(Refusal::WrongPassword);
    let user_id = UserId(user.id).to_string();
    RequestEntry {
        entry: Entry {
            team_id: Some(team),
            actor_type: "user",
            actor_id: identified.then(|| user_id.clone()),
            resource_type: "user",
            resource_id: Some(user_id),
            action,
            metadata: match refused {
                Some(reason) => json!({"reason": <&str>::from(reason)}),
                None => json!({}),
            },
        },
        actor_name: identified.then(|| user.name.clone()),
        status: if refused.is_none() {
            "success"
        } else {
            "error"
        },
        client_address: client.map(|ip| ip.to_string()),
    }
}

/// The audit row of `wrenn cp admin create` acting on `user`.
fn admin_command_entry(
    team: Option<Uuid>,
    user: Uuid,
    action: &'static str,
) -> RequestEntry<'static> {
    RequestEntry {
        entry: Entry {
            team_id: team,
            actor_type: "system",
            actor_id: None,
            resource_type: "user",
            resource_id: Some(UserId(user).to_string()),
            action,
            metadata: json!({"admin": true}),
        },
        actor_name: None,
        status: "success",
        client_address: None,
    }
}

/// Records a refused login to `user`'s account in its default team. Only there: the admins of
/// a team the account merely joined see none of its failed logins (nor their addresses).
async fn record_refused_login(
    db: &Db,
    user: &User,
    refusal: Refusal,
    client: Option<IpAddr>,
) -> Result<(), DbError> {
    let first = teams::page_for_user(db, user.id, Keyset::START, 1).await?;
    let Some(default) = first.into_iter().find(|m| m.is_default) else {
        return Ok(());
    };
    let entry = sign_in_entry(default.team.id, user, "login", Some(refusal), client);
    audit_logs::insert_request(db, entry).await
}

/// Creates a team with `owner` as its owner, inside the caller's transaction.
pub(crate) async fn create_team_owned_by(
    tx: &mut sqlx::PgConnection,
    owner: Uuid,
    name: &TeamName,
    is_default: bool,
) -> Result<teams::Team, ServiceError> {
    let team = teams::insert(&mut *tx, Uuid::new_v4(), name.as_str(), &new_slug()).await?;
    team_members::insert(&mut *tx, team.id, owner, Role::Owner, is_default).await?;
    Ok(team)
}

/// Creates an active account with a default team it owns. The first account on an install
/// becomes platform admin, as does any account made with `make_admin`. The new team's audit
/// log starts with the account's creation.
pub async fn create_account(
    db: &Db,
    passwords: &PasswordHashing,
    signup: Signup,
    make_admin: bool,
    origin: Origin,
) -> Result<(User, teams::Team), ServiceError> {
    let hash = passwords.hash(&signup.password).await?;
    let mut tx = db.begin().await.map_err(DbError::from)?;
    users::lock_admin_bootstrap(&mut *tx).await?;
    let is_admin = make_admin || !users::any_admin(&mut *tx).await?;
    let user = users::insert(
        &mut *tx,
        NewUser {
            id: Uuid::new_v4(),
            email: signup.email.as_str(),
            password_hash: &hash,
            name: signup.name.as_str(),
            is_admin,
        },
    )
    .await
    .map_err(email_taken)?;
    let default_name = TeamName::parse("name", DEFAULT_TEAM_NAME)?;
    let team = create_team_owned_by(&mut tx, user.id, &default_name, true).await?;
    let entry = match origin {
        Origin::Signup(client) => {
            let mut entry = sign_in_entry(team.id, &user, "signup", None, client);
            entry.entry.metadata = json!({"admin": is_admin});
            entry
        }
        Origin::AdminCommand => admin_command_entry(Some(team.id), user.id, "create"),
    };
    audit_logs::insert_request(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok((user, team))
}

/// How signup is allowed: open or closed, and how often per client address.
#[derive(Debug, Clone, Copy)]
pub struct SignupPolicy {
    pub mode: SignupMode,
    pub per_address: Limit,
}

/// A self-service signup from `client`: refused when signup is closed, throttled per client
/// address (every signup counts, so a burst from one address stops before it reaches the
/// password hash).
pub async fn signup(
    db: &Db,
    tokens: &TokenKeys,
    passwords: &PasswordHashing,
    policy: SignupPolicy,
    signup: Signup,
    client: Option<IpAddr>,
) -> Result<Session, ServiceError> {
    match policy.mode {
        SignupMode::Open => {}
        SignupMode::Closed => {
            return Err(ServiceError::forbidden(
                "signup is closed on this installation; an administrator creates accounts",
            ))
        }
    }
    if let Some(client) = client {
        login_limits::count_signup(db, policy.per_address, client).await?;
    }
    let (user, team) = create_account(db, passwords, signup, false, Origin::Signup(client)).await?;
    Ok(session(tokens, &user, team.id))
}

/// A password login from `client`, throttled by `limits` (see `login_limits`): every failure
/// counts against the email and the client address, a correct password against neither.
/// Logins to an existing account, refused or not, go to the audit log: a success in the team
/// the session is for (in its transaction), a refusal in the account's default team.
pub async fn login(
    db: &Db,
    tokens: &TokenKeys,
    passwords: &PasswordHashing,
    limits: &LoginLimits,
    email: &str,
    password: &str,
    client: Option<IpAddr>,
) -> Result<Session, ServiceError> {
    let attempt = Attempt::begin(db, limits, email, client).await?;
    let user = users::by_email(db, email.trim()).await?;
    let hash = user.as_ref().map(|u| u.password_hash.as_str());
    let matches = passwords.matches(hash, password).await?;
    let Some(user) = user else {
        return Err(Refusal::WrongPassword.into());
    };
    let refused = if !matches {
        Some(Refusal::WrongPassword)
    } else if user.status != UserStatus::Active {
        Some(Refusal::AccountDisabled)
    } else {
        None
    };
    if matches {
        attempt.succeeded(db).await?;
    }
    if let Some(refusal) = refused {
        // Recorded off the answer's path, so a wrong password is answered as fast for an
        // account that exists as for one that does not.
        let db = db.clone();
        tokio::spawn(async move {
            if let Err(error) = record_refused_login(&db, &user, refusal, client).await {
                tracing::warn!(%error, "could not record a refused login in the audit log");
            }
        });
        return Err(refusal.into());
    }
    let mut tx = db.begin().await.map_err(DbError::from)?;
    let first = teams::page_for_user(&mut *tx, user.id, Keyset::START, 1).await?;
    let team = match first.into_iter().next() {
        Some(membership) => membership.team.id,
        None => {
            // Every account keeps a team to act in, even after leaving all of its teams.
            let name = TeamName::parse("name", DEFAULT_TEAM_NAME)?;
            create_team_owned_by(&mut tx, user.id, &name, true)
                .await?
                .id
        }
    };
    let entry = sign_in_entry(team, &user, "login", None, client);
    audit_logs::insert_request(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(session(tokens, &user, team))
}

pub async fn switch_team(
    db: &Db,
    tokens: &TokenKeys,
    user: &User,
    team: TeamId,
) -> Result<Session, ServiceError> {
    if teams::by_id(db, team.uuid()).await?.is_none() {
        return Err(ServiceError::NotFound("team"));
    }
    if team_members::role_of(db, team.uuid(), user.id)
        .await?
        .is_none()
    {
        return Err(ServiceError::forbidden("you are not a member of this team"));
    }
    Ok(session(tokens, user, team.uuid()))
}

pub async fn rename(
    db: &Db,
    tokens: &TokenKeys,
    user: &User,
    team: TeamId,
    name: DisplayName,
) -> Result<Session, ServiceError> {
    let user = users::rename(db, user.id, name.as_str())
        .await?
        .ok_or(ServiceError::NotFound("user"))?;
    Ok(session(tokens, &user, team.uuid()))
}

/// What `wrenn cp admin create` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminBootstrap {
    Created(UserId),
    /// The account existed and was made an admin; its password is unchanged.
    Promoted(UserId),
}

/// Makes sure an admin account with this email exists (headless installs have no signup page).
pub async fn ensure_admin(
    db: &Db,
    passwords: &PasswordHashing,
    email: Email,
    password: Password,
) -> Result<AdminBootstrap, ServiceError> {
    if let Some(existing) = users::by_email(db, email.as_str()).await? {
        if !existing.is_admin {
            let mut tx = db.begin().await.map_err(DbError::from)?;
            users::set_admin(&mut *tx, existing.id, true).await?;
            let first = teams::page_for_user(&mut *tx, existing.id, Keyset::START, 1).await?;
            let team = first.into_iter().find(|m| m.is_default).map(|m| m.team.id);
            let entry = admin_command_entry(team, existing.id, "promote");
            audit_logs::insert_request(&mut *tx, entry).await?;
            tx.commit().await.map_err(DbError::from)?;
        }
        return Ok(AdminBootstrap::Promoted(UserId(existing.id)));
    }
    let name = email
        .as_str()
        .split('@')
        .next()
        .unwrap_or("admin")
        .to_owned();
    let name = DisplayName::parse("name", &name)?;
    let (user, _) = create_account(
        db,
        passwords,
        Signup {
            email,
            password,
            name,
        },
        true,
        Origin::AdminCommand,
    )
    .await?;
    Ok(AdminBootstrap::Created(UserId(user.id)))
}
