//! Reading a team's audit log: every member sees the rows of `team` scope (capsules, templates,
//! builds); owners and admins also those of `admin` scope (keys, members, channels, hosts,
//! plans, the team).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Caller, ServiceError};
use crate::db::audit_logs::{self, LogFilter, LogRow};
use crate::db::Db;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

pub struct PageQuery<'a> {
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: Option<i64>,
    pub resource_type: Option<&'a str>,
    pub action: Option<&'a str>,
}

pub struct LogPage {
    pub rows: Vec<LogRow>,
    /// Whether older rows follow.
    pub more: bool,
}

pub async fn page(db: &Db, caller: &Caller, query: PageQuery<'_>) -> Result<LogPage, ServiceError> {
    let role = caller.role.ok_or_else(|| {
        ServiceError::forbidden("you are no longer a member of this token's team")
    })?;
    for (field, value) in [
        ("resource_type", query.resource_type),
        ("action", query.action),
    ] {
        let bad = value.is_some_and(|v| v.len() > 64 || v.chars().any(char::is_control));
        if bad {
            return Err(ServiceError::invalid(
                field,
                "must be at most 64 characters, none of them control characters",
            ));
        }
    }
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ServiceError::invalid(
            "limit",
            format!("must be 1-{MAX_LIMIT}"),
        ));
    }
    let mut rows = audit_logs::page(
        db,
        LogFilter {
            team: caller.team.uuid(),
            with_admin_scope: role.can_manage(),
            before: query.before,
            resource_type: query.resource_type,
            action: query.action,
            limit: limit + 1,
        },
    )
    .await?;
    let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok(LogPage { rows, more })
}
