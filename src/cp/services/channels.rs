//! Notification channels of a team: members see them, owners and admins change them. Settings
//! are checked per provider and sealed before they are stored; a webhook's signing secret is
//! shown once, when it is generated.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde_json::json;
use uuid::Uuid;

use super::input::ChannelName;
use super::{member_team, user_action, Caller, ServiceError};
use crate::cp::channels::dispatch::SEND_TIMEOUT;
use crate::cp::channels::seal::SealKeys;
use crate::cp::channels::send::{Notification, Sender};
use crate::cp::channels::{self, ChannelConfig, Provider};
use crate::db::channels::{self as rows, Channel, Delivery, NewChannel};
use crate::db::{audit_logs, Db, DbError};
use crate::error_code::ErrorCode;
use crate::id::{ChannelId, TeamId};

/// A test send answers within the SDKs' 5 s timeout.
const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

fn managing_team(caller: &Caller) -> Result<TeamId, ServiceError> {
    let team = member_team(caller)?;
    if caller.role.is_some_and(|r| r.can_manage()) {
        Ok(team)
    } else {
        Err(ServiceError::forbidden(
            "only team owners and admins manage notification channels",
        ))
    }
}

pub fn provider(raw: &str) -> Result<Provider, ServiceError> {
    Provider::from_str(raw).map_err(|_| {
        ServiceError::invalid(
            "provider",
            format!(
                "`{raw}` is not a provider; use one of {}",
                <Provider as strum::VariantNames>::VARIANTS.join(", ")
            ),
        )
    })
}

fn config(
    provider: Provider,
    raw: BTreeMap<String, String>,
) -> Result<(ChannelConfig, Option<String>), ServiceError> {
    ChannelConfig::parse(provider, raw).map_err(|e| ServiceError::invalid("config", e.0))
}

fn event_types(raw: &[String]) -> Result<Vec<String>, ServiceError> {
    channels::event_types(raw).map_err(|e| ServiceError::invalid("events", e.0))
}

fn name_taken(name: &ChannelName) -> ServiceError {
    ServiceError::Conflict {
        code: ErrorCode::Conflict,
        message: format!("the team already has a channel named `{}`", name.as_str()),
    }
}

pub struct NewChannelInput<'a> {
    pub name: ChannelName,
    pub provider: Provider,
    pub config: BTreeMap<String, String>,
    pub events: &'a [String],
}

/// Creates a channel; returns it with the webhook secret when one was generated.
pub async fn create(
    db: &Db,
    keys: &SealKeys,
    caller: &Caller,
    input: NewChannelInput<'_>,
) -> Result<(Channel, Option<String>), ServiceError> {
    let team = managing_team(caller)?;
    let (config, secret) = config(input.provider, input.config)?;
    let events = event_types(input.events)?;
    let id = Uuid::new_v4();
    let sealed = keys.seal(id, &config.to_json());
    let mut tx = db.begin().await.map_err(DbError::from)?;
    let channel = match rows::insert(
        &mut *tx,
        NewChannel {
            id,
            team_id: team.uuid(),
            name: input.name.as_str(),
            provider: input.provider.as_ref(),
            config_sealed: &sealed,
            event_types: &events,
        },
    )
    .await
    {
        Err(DbError::UniqueViolation { .. }) => return Err(name_taken(&input.name)),
        other => other?,
    };
    let entry = user_action(
        caller,
        Some(team.uuid()),
        "channel",
        ChannelId(id).to_string(),
        "create",
        json!({"name": channel.name, "provider": channel.provider, "events": events}),
    );
    audit_logs::insert(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok((channel, secret))
}

pub async fn list(db: &Db, caller: &Caller) -> Result<Vec<Channel>, ServiceError> {
    let team = member_team(caller)?;
    Ok(rows::list(db, team.uuid()).await?)
}

pub async fn get(db: &Db, caller: &Caller, id: ChannelId) -> Result<Channel, ServiceError> {
    let team = member_team(caller)?;
    rows::get(db, team.uuid(), id.uuid())
        .await?
        .ok_or(ServiceError::NotFound("channel"))
}

pub async fn update(
    db: &Db,
    caller: &Caller,
    id: ChannelId,
    name: ChannelName,
    events: &[String],
) -> Result<Channel, ServiceError> {
    let team = managing_team(caller)?;
    let events = event_types(events)?;
    let mut tx = db.begin().await.map_err(DbError::from)?;
    let channel = match rows::update(&mut *tx, team.uuid(), id.uuid(), name.as_str(), &events).await
    {
        Err(DbError::UniqueViolation { .. }) => return Err(name_taken(&name)),
        other => other?.ok_or(ServiceError::NotFound("channel"))?,
    };
    let entry = user_action(
        caller,
        Some(team.uuid()),
        "channel",
        id.to_string(),
        "update",
        json!({"name": channel.name, "events": events}),
    );
    audit_logs::insert(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(channel)
}

/// Replaces the channel's settings; returns the webhook secret when one was generated.
pub async fn rotate_config(
    db: &Db,
    keys: &SealKeys,
    caller: &Caller,
    id: ChannelId,
    raw: BTreeMap<String, String>,
) -> Result<(Channel, Option<String>), ServiceError> {
    let team = managing_team(caller)?;
    let current = rows::get(db, team.uuid(), id.uuid())
        .await?
        .ok_or(ServiceError::NotFound("channel"))?;
    let (config, secret) = config(provider(&current.provider)?, raw)?;
    let sealed = keys.seal(id.uuid(), &config.to_json());
    let mut tx = db.begin().await.map_err(DbError::from)?;
    let channel = rows::set_config(&mut *tx, team.uuid(), id.uuid(), &sealed)
        .await?
        .ok_or(ServiceError::NotFound("channel"))?;
    let entry = user_action(
        caller,
        Some(team.uuid()),
        "channel",
        id.to_string(),
        "rotate_config",
        json!({"name": channel.name}),
    );
    audit_logs::insert(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok((channel, secret))
}

pub async fn delete(db: &Db, caller: &Caller, id: ChannelId) -> Result<(), ServiceError> {
    let team = managing_team(caller)?;
    let mut tx = db.begin().await.map_err(DbError::from)?;
    if !rows::delete(&mut *tx, team.uuid(), id.uuid()).await? {
        return Err(ServiceError::NotFound("channel"));
    }
    let entry = user_action(
        caller,
        Some(team.uuid()),
        "channel",
        id.to_string(),
        "delete",
        json!({}),
    );
    audit_logs::insert(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

/// Sends a test notification with `raw` settings, storing nothing; a receiver that refuses or
/// cannot be reached is the caller's configuration to fix (400).
pub async fn test(
    caller: &Caller,
    provider: Provider,
    raw: BTreeMap<String, String>,
    allow_private: bool,
) -> Result<(), ServiceError> {
    let team = managing_team(caller)?;
    let (config, _) = config(provider, raw)?;
    let notification = Notification::test(team, chrono::Utc::now());
    let sent = tokio::task::spawn_blocking(move || {
        Sender::new(TEST_TIMEOUT.min(SEND_TIMEOUT), allow_private).send(&config, &notification)
    })
    .await
    .map_err(|e| ServiceError::invalid("config", format!("the test send failed: {e}")))?;
    sent.map(|_| ()).map_err(|e| {
        ServiceError::invalid(
            "config",
            format!("the test notification was not delivered: {e}"),
        )
    })
}

/// Up to `limit` of the channel's deliveries before delivery `before`, newest first.
pub async fn deliveries(
    db: &Db,
    caller: &Caller,
    id: ChannelId,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Delivery>, ServiceError> {
    let channel = get(db, caller, id).await?;
    Ok(rows::deliveries(db, channel.id, before, limit).await?)
}
