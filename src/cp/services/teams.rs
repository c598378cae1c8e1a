//! Teams and their members. Roles come from the database on every call, never from the token.

use uuid::Uuid;

use super::accounts::create_team_owned_by;
use super::input::{Email, TeamName};
use super::{user_action, Caller, ServiceError};
use crate::cp::pagination::{Page, PageRequest, MAX_LIMIT};
use crate::cp::revocations::{self, Revoked};
use crate::db::page::Keyset;
use crate::db::sandboxes::SandboxStatus;
use crate::db::team_members::{self, Member, Role};
use crate::db::teams::{self, Team, TeamWithRole};
use crate::db::{api_keys, audit_logs, sandboxes, users, Db, DbError};
use crate::id::{TeamId, UserId};

/// The caller's role in `team`, which must be the team their token is scoped to.
async fn access(db: &Db, caller: &Caller, team: TeamId) -> Result<Role, ServiceError> {
    if team != caller.team {
        if teams::by_id(db, team.uuid()).await?.is_none() {
            return Err(ServiceError::NotFound("team"));
        }
        return Err(ServiceError::forbidden(
            "the token is scoped to another team; switch to this team first",
        ));
    }
    match caller.role {
        Some(role) => Ok(role),
        None if teams::by_id(db, team.uuid()).await?.is_none() => {
            Err(ServiceError::NotFound("team"))
        }
        None => Err(ServiceError::forbidden("you are not a member of this team")),
    }
}

async fn manager(db: &Db, caller: &Caller, team: TeamId) -> Result<Role, ServiceError> {
    let role = access(db, caller, team).await?;
    if !role.can_manage() {
        return Err(ServiceError::forbidden("team owner or admin role required"));
    }
    Ok(role)
}

/// The caller's teams, default team first.
pub async fn list(
    db: &Db,
    caller: &Caller,
    page: PageRequest,
) -> Result<Page<TeamWithRole>, ServiceError> {
    let rows = teams::page_for_user(db, caller.user.uuid(), page.after, page.fetch()).await?;
    Ok(page.page(rows, |t| Keyset {
        later: !t.is_default,
        created_at: t.team.created_at,
        id: t.team.id,
    }))
}

pub async fn create(
    db: &Db,
    caller: &Caller,
    name: TeamName,
) -> Result<TeamWithRole, ServiceError> {
    let mut tx = db.begin().await.map_err(DbError::from)?;
    let team = create_team_owned_by(&mut tx, caller.user.uuid(), &name, false).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(TeamWithRole {
        team,
        role: Role::Owner,
        is_default: false,
    })
}

pub async fn get(
    db: &Db,
    caller: &Caller,
    team: TeamId,
) -> Result<(Team, Vec<Member>), ServiceError> {
    access(db, caller, team).await?;
    let found = teams::by_id(db, team.uuid())
        .await?
        .ok_or(ServiceError::NotFound("team"))?;
    // A team's detail shows its first page of members; `members` pages through the rest.
    let members = team_members::page(
        db,
        team.uuid(),
        Keyset::START,
        i64::try_from(MAX_LIMIT).unwrap_or(i64::MAX),
    )
    .await?;
    Ok((found, members))
}

pub async fn rename(
    db: &Db,
    caller: &Caller,
    team: TeamId,
    name: TeamName,
) -> Result<(), ServiceError> {
    manager(db, caller, team).await?;
    if !teams::rename(db, team.uuid(), name.as_str()).await? {
        return Err(ServiceError::NotFound("team"));
    }
    Ok(())
}

/// Soft-deletes the team (its slug stays reserved), revokes its API keys and stops its
/// capsules' records.
pub async fn delete(db: &Db, caller: &Caller, team: TeamId) -> Result<(), ServiceError> {
    if access(db, caller, team).await? != Role::Owner {
        return Err(ServiceError::forbidden(
            "only the team owner can delete the team",
        ));
    }
    if team == TeamId::PLATFORM {
        return Err(ServiceError::forbidden(
            "the platform team cannot be deleted",
        ));
    }
    let mut tx = db.begin().await.map_err(DbError::from)?;
    if !teams::soft_delete(&mut *tx, team.uuid()).await? {
        return Err(ServiceError::NotFound("team"));
    }
    let keys = api_keys::delete_for_team(&mut *tx, team.uuid()).await?;
    let stopped =
        sandboxes::transition_for_team(&mut *tx, team.uuid(), SandboxStatus::Stopped).await?;
    let metadata = serde_json::json!({"revoked_api_keys": keys, "stopped_capsules": stopped.len()});
    let entry = user_action(
        caller,
        Some(team.uuid()),
        "team",
        team.to_string(),
        "delete",
        metadata,
    );
    audit_logs::insert(&mut *tx, entry).await?;
    revocations::announce(&mut *tx, Revoked::Team { id: team.uuid() }).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

pub async fn members(
    db: &Db,
    caller: &Caller,
    team: TeamId,
    page: PageRequest,
) -> Result<Page<Member>, ServiceError> {
    access(db, caller, team).await?;
    let rows = team_members::page(db, team.uuid(), page.after, page.fetch()).await?;
    Ok(page.page(rows, |m| Keyset::of(m.joined_at, m.user_id)))
}

pub async fn add_member(
    db: &Db,
    caller: &Caller,
    team: TeamId,
    email: Email,
) -> Result<Member, ServiceError> {
    manager(db, caller, team).await?;
    let user = users::by_email(db, email.as_str())
        .await?
        .ok_or(ServiceError::NotFound("account with that email"))?;
    match team_members::insert(db, team.uuid(), user.id, Role::Member, false).await {
        Ok(()) => {}
        Err(DbError::UniqueViolation { .. }) => {
            return Err(ServiceError::invalid(
                "email",
                "that user is already a member of this team",
            ));
        }
        Err(other) => return Err(other.into()),
    }
    team_members::get(db, team.uuid(), user.id)
        .await?
        .ok_or(ServiceError::NotFound("member"))
}

async fn target_member(db: &Db, team: TeamId, user: UserId) -> Result<Member, ServiceError> {
    let member = team_members::get(db, team.uuid(), user.uuid())
        .await?
        .ok_or(ServiceError::NotFound("member"))?;
    if member.role == Role::Owner {
        return Err(ServiceError::forbidden(
            "the team owner's membership cannot be changed",
        ));
    }
    Ok(member)
}

pub async fn set_member_role(
    db: &Db,
    caller: &Caller,
    team: TeamId,
    user: UserId,
    role: Role,
) -> Result<(), ServiceError> {
    manager(db, caller, team).await?;
    if role == Role::Owner {
        return Err(ServiceError::invalid("role", "must be `admin` or `member`"));
    }
    target_member(db, team, user).await?;
    team_members::set_role(db, team.uuid(), user.uuid(), role).await?;
    Ok(())
}

pub async fn remove_member(
    db: &Db,
    caller: &Caller,
    team: TeamId,
    user: UserId,
) -> Result<(), ServiceError> {
    manager(db, caller, team).await?;
    target_member(db, team, user).await?;
    end_membership(db, team, user).await
}

/// Removes `user` from `team` with the API keys they created there, and ends their open
/// sessions in it.
async fn end_membership(db: &Db, team: TeamId, user: UserId) -> Result<(), ServiceError> {
    let mut tx = db.begin().await.map_err(DbError::from)?;
    team_members::remove(&mut *tx, team.uuid(), user.uuid()).await?;
    let keys = api_keys::delete_created_by(&mut *tx, user.uuid(), Some(team.uuid())).await?;
    let member = Revoked::Member {
        user: user.uuid(),
        team: team.uuid(),
    };
    for revoked in keys.into_iter().map(|id| Revoked::ApiKey { id }) {
        revocations::announce(&mut *tx, revoked).await?;
    }
    revocations::announce(&mut *tx, member).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

pub async fn leave(db: &Db, caller: &Caller, team: TeamId) -> Result<(), ServiceError> {
    if access(db, caller, team).await? == Role::Owner {
        return Err(ServiceError::forbidden(
            "the owner cannot leave the team; delete it instead",
        ));
    }
    end_membership(db, team, caller.user).await
}

/// Whether `user` may manage (own or administer) `team`: used for BYOC hosts.
pub async fn can_manage(db: &Db, user: Uuid, team: Uuid) -> Result<bool, ServiceError> {
    Ok(team_members::role_of(db, team, user)
        .await?
        .is_some_and(Role::can_manage))
}
