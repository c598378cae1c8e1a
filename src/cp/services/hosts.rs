//! The host registry: creating hosts, the registration handshake (with the address checks and
//! the agent's certificate), heartbeats, credential refresh, visibility (BYOC hosts belong to one
//! team) and deletion.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use uuid::Uuid;

use super::input::Tag;
use super::teams::can_manage;
use super::{user_action, Caller, ServiceError};
use crate::config::HostPort;
use crate::cp::ca::{Ca, IssuedCert};
use crate::cp::pagination::{Page, PageRequest};
use crate::cp::tokens::{random_hex, sha256, TokenKeys, REFRESH_TOKEN_TTL, REGISTRATION_TOKEN_TTL};
use crate::db::audit_logs::{self, Entry};
use crate::db::host_refresh_tokens::RefreshToken;
use crate::db::hosts::{self, Host, HostType, NewHost, Registration};
use crate::db::page::Keyset;
use crate::db::sandboxes::SandboxStatus;
use crate::db::{
    host_refresh_tokens, host_registration_tokens, host_tags, sandboxes, teams, Db, DbError,
};
use crate::error_code::ErrorCode;
use crate::id::{HostId, SandboxId, TeamId};

pub struct CreateHost {
    pub host_type: HostType,
    pub team_id: Option<TeamId>,
    pub provider: Option<String>,
    pub availability_zone: Option<String>,
}

/// An agent's report of its machine, from `POST /v1/hosts/register`.
pub struct AgentSpecs {
    pub arch: Option<String>,
    pub cpu_cores: Option<i32>,
    pub memory_mb: Option<i64>,
    pub disk_gb: Option<i64>,
    pub address: HostPort,
    pub versions: Value,
    /// PEM certificate signing request for the agent's TLS key; without one the host gets no
    /// certificate and the control plane cannot call it.
    pub csr: Option<String>,
}

/// Credentials handed to an agent at registration and on refresh.
#[derive(Clone)]
pub struct HostCredentials {
    pub host: Host,
    /// Host JWT for `X-Host-Token`.
    pub token: String,
    /// Single-use; trades for new credentials at `POST /v1/hosts/auth/refresh`.
    pub refresh_token: String,
    /// What the control plane will present when it calls this agent.
    pub agent_secret: String,
    /// The agent's server certificate, when it sent a CSR.
    pub cert: Option<IssuedCert>,
    /// The CA the agent pins: only clients it certified may call the agent.
    pub ca_cert_pem: String,
}

impl std::fmt::Debug for HostCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCredentials")
            .field("host", &HostId(self.host.id))
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

/// Which addresses a host may register with. The control plane dials what a host registers, so
/// a BYOC owner could otherwise point it at the control plane's own machine or the cloud's
/// metadata service.
#[derive(Debug, Clone, Copy, Default)]
pub struct AddressPolicy {
    /// `cp.allow_loopback_hosts`: for stacks where agent and control plane share a machine.
    pub allow_loopback: bool,
}

const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Why the control plane will not dial `ip`, if it will not.
fn refused_because(ip: IpAddr, own: &[IpAddr], policy: AddressPolicy) -> Option<&'static str> {
    let ip = ip.to_canonical();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip == IpAddr::V4(METADATA_V4) || ip == IpAddr::V6(METADATA_V6) {
        Some("the cloud metadata service")
    } else if ip.is_unspecified() || ip.is_multicast() || broadcast {
        Some("not a unicast address")
    } else if ip.is_loopback() {
        (!policy.allow_loopback)
            .then_some("a loopback address (allowed only with cp.allow_loopback_hosts)")
    } else if link_local {
        Some("a link-local address")
    } else if own.iter().any(|o| o.to_canonical() == ip) {
        Some("an address of the control plane's own machine")
    } else {
        None
    }
}

/// The addresses of this machine's interfaces.
fn own_addresses() -> Vec<IpAddr> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    interfaces
        .filter_map(|i| i.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

/// Refuses an address the control plane must not dial; a name is checked by every address it
/// resolves to now.
pub async fn check_address(address: &HostPort, policy: AddressPolicy) -> Result<(), ServiceError> {
    let ips: Vec<IpAddr> = match address.host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((address.host.as_str(), address.port))
            .await
            .map_err(|e| {
                ServiceError::invalid("address", format!("{address} does not resolve: {e}"))
            })?
            .map(|a| a.ip())
            .collect(),
    };
    let own = own_addresses();
    for ip in ips {
        if let Some(reason) = refused_because(ip, &own, policy) {
            return Err(ServiceError::invalid(
                "address",
                format!(
                    "{address} is {reason}; register the agent with an address of its own host"
                ),
            ));
        }
    }
    Ok(())
}

fn expires(ttl: std::time::Duration) -> chrono::DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(ttl).expect("token lifetimes fit in chrono")
}

/// Whether `caller` may manage `host`'s kind of host for `team`: platform admins always; team
/// owners and admins for their team's BYOC hosts.
async fn may_manage(
    db: &Db,
    caller: &Caller,
    host_type: HostType,
    team: Option<Uuid>,
) -> Result<bool, ServiceError> {
    if caller.is_admin {
        return Ok(true);
    }
    match (host_type, team) {
        (HostType::Byoc, Some(team)) => can_manage(db, caller.user.uuid(), team).await,
        (HostType::Byoc, None) | (HostType::Regular, _) => Ok(false),
    }
}

/// A host the caller can see: platform admins see every host; members see their current team's
/// BYOC hosts. Hosts the caller cannot see are "not found", so their existence does not leak.
async fn visible(db: &Db, caller: &Caller, id: HostId) -> Result<Host, ServiceError> {
    let host = hosts::by_id(db, id.uuid())
        .await?
        .ok_or(ServiceError::NotFound("host"))?;
    let member_of_team = host.team_id == Some(caller.team.uuid()) && caller.role.is_some();
    if caller.is_admin || member_of_team {
        Ok(host)
    } else {
        Err(ServiceError::NotFound("host"))
    }
}

async fn manageable(db: &Db, caller: &Caller, id: HostId) -> Result<Host, ServiceError> {
    let host = visible(db, caller, id).await?;
    if !may_manage(db, caller, host.host_type, host.team_id).await? {
        return Err(ServiceError::forbidden(
            "platform admin or team owner/admin required",
        ));
    }
    Ok(host)
}

async fn issue_registration_token(
    conn: &mut sqlx::PgConnection,
    host: Uuid,
    created_by: Uuid,
) -> Result<String, ServiceError> {
    let token = random_hex(32);
    host_registration_tokens::retire_unused(&mut *conn, host).await?;
    host_registration_tokens::insert(
        &mut *conn,
        host,
        &sha256(&token),
        created_by,
        expires(REGISTRATION_TOKEN_TTL),
    )
    .await?;
    Ok(token)
}

/// Creates a `pending` host and its one-hour, single-use registration token.
pub async fn create(
    db: &Db,
    caller: &Caller,
    req: CreateHost,
) -> Result<(Host, String), ServiceError> {
    let team = match (req.host_type, req.team_id) {
        (HostType::Regular, None) => None,
        (HostType::Regular, Some(_)) => {
            return Err(ServiceError::invalid(
                "team_id",
                "only BYOC hosts belong to a team",
            ));
        }
        (HostType::Byoc, None) => {
            return Err(ServiceError::invalid(
                "team_id",
                "is required for BYOC hosts",
            ))
        }
        (HostType::Byoc, Some(team)) => {
            if teams::by_id(db, team.uuid()).await?.is_none() {
                return Err(ServiceError::NotFound("team"));
            }
            Some(team.uuid())
        }
    };
    if !may_manage(db, caller, req.host_type, team).await? {
        return Err(ServiceError::forbidden(match req.host_type {
            HostType::Regular => "only platform admins can create regular hosts",
            HostType::Byoc => "only the team's owners and admins can create its BYOC hosts",
        }));
    }
    let mut tx = db.begin().await.map_err(DbError::from)?;
    let host = hosts::insert(
        &mut *tx,
        NewHost {
            id: Uuid::new_v4(),
            host_type: req.host_type,
            team_id: team,
            provider: req.provider.as_deref(),
            availability_zone: req.availability_zone.as_deref(),
            created_by: caller.user.uuid(),
        },
    )
    .await?;
    let token = issue_registration_token(&mut tx, host.id, caller.user.uuid()).await?;
    let metadata = serde_json::json!({"type": host.host_type});
    let entry = user_action(
        caller,
        host.team_id,
        "host",
        HostId(host.id).to_string(),
        "create",
        metadata,
    );
    audit_logs::insert(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok((host, token))
}

/// A fresh registration token for a host whose agent holds no live credentials: it never
/// registered, or its refresh tokens were revoked (reuse detected) or expired. Older unused
/// registration tokens stop working.
pub async fn regenerate_token(
    db: &Db,
    caller: &Caller,
    id: HostId,
) -> Result<(Host, String), ServiceError> {
    let host = manageable(db, caller, id).await?;
    let mut tx = db.begin().await.map_err(DbError::from)?;
    let locked = hosts::by_id_for_update(&mut *tx, host.id)
        .await?
        .ok_or(ServiceError::NotFound("host"))?;
    if host_refresh_tokens::any_live(&mut *tx, locked.id).await? {
        return Err(ServiceError::Conflict {
            code: ErrorCode::InvalidState,
            message: format!(
                "host is {} and its agent holds live credentials; it has already registered",
                locked.status
            ),
        });
    }
    let token = issue_registration_token(&mut tx, host.id, caller.user.uuid()).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok((locked, token))
}

fn invalid_token(what: &str) -> ServiceError {
    ServiceError::Unauthorized(format!("invalid, expired or already used {what}"))
}

fn reregister(host: Uuid) -> String {
    format!(
        "every refresh token of host {} is revoked; issue a new registration token with \
         POST /v1/hosts/{}/token and start the agent again with --register",
        HostId(host),
        HostId(host)
    )
}

/// Stores a new refresh token of `family` and returns it with its row ID.
async fn issue_refresh_token(
    conn: &mut sqlx::PgConnection,
    host: Uuid,
    family: Uuid,
) -> Result<(String, Uuid), ServiceError> {
    let token = random_hex(32);
    let id = host_refresh_tokens::insert(
        &mut *conn,
        host,
        family,
        &sha256(&token),
        expires(REFRESH_TOKEN_TTL),
    )
    .await?;
    Ok((token, id))
}

/// Trades a registration token for host credentials and brings the host online. The token is
/// consumed in the same transaction, so of two concurrent registrations exactly one succeeds.
/// Each registration starts a new refresh-token family. A refused address leaves the token
/// unused.
pub async fn register(
    db: &Db,
    tokens: &TokenKeys,
    ca: &Ca,
    policy: AddressPolicy,
    token: &str,
    specs: AgentSpecs,
) -> Result<HostCredentials, ServiceError> {
    check_address(&specs.address, policy).await?;
    let mut tx = db.begin().await.map_err(DbError::from)?;
    let host_id = host_registration_tokens::consume(&mut *tx, &sha256(token))
        .await?
        .ok_or_else(|| invalid_token("registration token"))?;
    let host = hosts::by_id_for_update(&mut *tx, host_id)
        .await?
        .ok_or_else(|| invalid_token("registration token"))?;
    let generation = host.agent_secret_generation + 1;
    let agent_secret = ca.agent_secret(host.id, generation);
    let cert = specs
        .csr
        .as_deref()
        .map(|csr| ca.issue_agent_cert(HostId(host.id), &specs.address, csr))
        .transpose()?;
    let address = specs.address.to_string();
    let host = hosts::complete_registration(
        &mut *tx,
        host.id,
        Registration {
            arch: specs.arch.as_deref(),
            cpu_cores: specs.cpu_cores,
            memory_mb: specs.memory_mb,
            disk_gb: specs.disk_gb,
            address: &address,
            versions: specs.versions,
            agent_secret_generation: generation,
            agent_secret_hash: &sha256(&agent_secret),
        },
    )
    .await?
    .ok_or_else(|| invalid_token("registration token (the host has already registered)"))?;
    let family = Uuid::new_v4();
    let (refresh_token, _) = issue_refresh_token(&mut tx, host.id, family).await?;
    let entry = Entry {
        team_id: host.team_id,
        actor_type: "host",
        actor_id: Some(HostId(host.id).to_string()),
        resource_type: "host",
        resource_id: Some(HostId(host.id).to_string()),
        action: "register",
        metadata: serde_json::json!({"address": address}),
    };
    audit_logs::insert(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    let token = tokens.issue_host(HostId(host.id), family);
    Ok(HostCredentials {
        host,
        token,
        refresh_token,
        agent_secret,
        cert,
        ca_cert_pem: ca.cert_pem().to_owned(),
    })
}

/// How a refresh treats the token it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presented {
    /// The family's current token: rotate it.
    Current,
    /// The token rotated just before the current one, within the grace window, while its
    /// successor is still unused: the agent never received the rotation's answer (a timeout, or
    /// a retry racing the first attempt) and tries again. The unused successor is superseded.
    RetriedRotation { unused_successor: Uuid },
    /// A token the family has moved past: a copy is in someone else's hands.
    Reused,
}

fn classify(
    presented: &RefreshToken,
    successor: Option<&RefreshToken>,
    grace: Duration,
) -> Presented {
    if presented.is_live() {
        return Presented::Current;
    }
    match successor {
        Some(next) if presented.rotated_within(grace) && next.is_live() => {
            Presented::RetriedRotation {
                unused_successor: next.id,
            }
        }
        _ => Presented::Reused,
    }
}

/// Rotates a host's credentials: the presented refresh token is retired and a new one of the
/// same family issued with a new host JWT, and the agent's certificate renewed from `csr`. The
/// agent secret stays the same unless the key it derives from changed.
///
/// Reuse detection: presenting a token its family has already moved past revokes every live
/// token of the family (so both the thief and the real agent must register again, and the
/// family's host JWTs stop working) and takes the host out of scheduling. The one exception is
/// the token rotated immediately before the current one, within `grace` of its rotation and
/// while its successor is unused: that is the agent retrying a rotation whose answer it never
/// got, and refusing it would force a re-registration after every lost response.
pub async fn refresh(
    db: &Db,
    tokens: &TokenKeys,
    ca: &Ca,
    grace: Duration,
    refresh_token: &str,
    csr: Option<&str>,
    client: Option<IpAddr>,
) -> Result<HostCredentials, ServiceError> {
    let hash = sha256(refresh_token);
    let found = host_refresh_tokens::by_hash(db, &hash)
        .await?
        .ok_or_else(|| invalid_token("refresh token"))?;
    let mut tx = db.begin().await.map_err(DbError::from)?;
    let mut host = hosts::by_id_for_update(&mut *tx, found.host_id)
        .await?
        .ok_or_else(|| invalid_token("refresh token"))?;
    // Read again under the host's lock: a concurrent refresh may have rotated it meanwhile.
    let presented = host_refresh_tokens::by_hash(&mut *tx, &hash)
        .await?
        .filter(|t| !t.is_expired())
        .ok_or_else(|| invalid_token("refresh token"))?;
    let successor = match presented.replaced_by {
        Some(next) => host_refresh_tokens::by_id(&mut *tx, next).await?,
        None => None,
    };
    let family = presented.family_id;
    match classify(&presented, successor.as_ref(), grace) {
        Presented::Current => {}
        Presented::RetriedRotation { unused_successor } => {
            tracing::info!(host = %HostId(host.id), client = ?client,
                "refresh retried with the previous token within the grace window; its unused successor is superseded");
            host_refresh_tokens::revoke(&mut *tx, unused_successor).await?;
        }
        Presented::Reused => {
            let revoked = host_refresh_tokens::revoke_family(&mut *tx, family).await?;
            if revoked == 0 {
                // The family is already dead: nothing left to protect, and nothing worth a log
                // line an outsider could repeat at will.
                tracing::debug!(host = %HostId(host.id), "refresh with a token of a revoked family");
                return Err(ServiceError::Unauthorized(format!(
                    "refresh token revoked: {}",
                    reregister(host.id)
                )));
            }
            hosts::mark_one_unreachable(&mut *tx, host.id).await?;
            let client_text = client.map(|c| c.to_string());
            let entry = Entry {
                team_id: host.team_id,
                actor_type: "system",
                actor_id: None,
                resource_type: "host",
                resource_id: Some(HostId(host.id).to_string()),
                action: "revoke_credentials",
                metadata: serde_json::json!({
                    "reason": "refresh_token_reuse",
                    "revoked_refresh_tokens": revoked,
                    "client": client_text,
                }),
            };
            audit_logs::insert(&mut *tx, entry).await?;
            tx.commit().await.map_err(DbError::from)?;
            tracing::warn!(
                host = %HostId(host.id),
                client = ?client,
                revoked,
                "refresh token reuse detected: an already rotated refresh token was presented; \
                 every refresh token and host JWT of this registration is revoked and the host \
                 must register again"
            );
            return Err(ServiceError::Unauthorized(format!(
                "refresh token reuse detected (this token was already rotated): {}",
                reregister(host.id)
            )));
        }
    }
    let mut agent_secret = ca.agent_secret(host.id, host.agent_secret_generation);
    if host.agent_secret_hash.as_deref() != Some(sha256(&agent_secret).as_slice()) {
        let generation = host.agent_secret_generation + 1;
        agent_secret = ca.agent_secret(host.id, generation);
        host = hosts::set_agent_secret(&mut *tx, host.id, generation, &sha256(&agent_secret))
            .await?
            .ok_or_else(|| invalid_token("refresh token"))?;
    }
    let cert = match (csr, host.address.as_deref()) {
        (Some(csr), Some(address)) => {
            let address: HostPort =
                address
                    .parse()
                    .map_err(|e: String| ServiceError::Conflict {
                        code: ErrorCode::InvalidState,
                        message: format!("the host's registered address is unusable: {e}"),
                    })?;
            Some(ca.issue_agent_cert(HostId(host.id), &address, csr)?)
        }
        (Some(_), None) | (None, _) => None,
    };
    let (new_refresh, new_id) = issue_refresh_token(&mut tx, host.id, family).await?;
    host_refresh_tokens::mark_rotated(&mut *tx, presented.id, new_id).await?;
    host_refresh_tokens::delete_expired(&mut *tx, host.id).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(HostCredentials {
        token: tokens.issue_host(HostId(host.id), family),
        host,
        refresh_token: new_refresh,
        agent_secret,
        cert,
        ca_cert_pem: ca.cert_pem().to_owned(),
    })
}

pub async fn heartbeat(db: &Db, caller: HostId, id: HostId) -> Result<(), ServiceError> {
    if caller != id {
        return Err(ServiceError::forbidden(
            "the host token belongs to another host",
        ));
    }
    match hosts::heartbeat(db, id.uuid()).await? {
        Some(_) => Ok(()),
        None => Err(ServiceError::NotFound("host")),
    }
}

/// Admins page through every host; others through their team's BYOC hosts.
pub async fn list(db: &Db, caller: &Caller, page: PageRequest) -> Result<Page<Host>, ServiceError> {
    let rows = if caller.is_admin {
        hosts::page_all(db, page.after, page.fetch()).await?
    } else if caller.role.is_none() {
        Vec::new()
    } else {
        hosts::page_for_team(db, caller.team.uuid(), page.after, page.fetch()).await?
    };
    Ok(page.page(rows, |h| Keyset::of(h.created_at, h.id)))
}

pub async fn get(db: &Db, caller: &Caller, id: HostId) -> Result<Host, ServiceError> {
    visible(db, caller, id).await
}

pub async fn delete_preview(
    db: &Db,
    caller: &Caller,
    id: HostId,
) -> Result<(Host, Vec<SandboxId>), ServiceError> {
    let host = manageable(db, caller, id).await?;
    let ids = sandboxes::live_on_host(db, host.id).await?;
    Ok((host, ids.into_iter().map(SandboxId).collect()))
}

/// Deletes a host with its tokens and tags. Refused while capsules are active on it, unless
/// `force`, which stops their records first.
pub async fn delete(db: &Db, caller: &Caller, id: HostId, force: bool) -> Result<(), ServiceError> {
    let host = manageable(db, caller, id).await?;
    let mut tx = db.begin().await.map_err(DbError::from)?;
    hosts::by_id_for_update(&mut *tx, host.id)
        .await?
        .ok_or(ServiceError::NotFound("host"))?;
    let active = sandboxes::live_on_host(&mut *tx, host.id).await?;
    if !active.is_empty() {
        if !force {
            return Err(ServiceError::HostHasSandboxes(
                active.into_iter().map(SandboxId).collect(),
            ));
        }
        sandboxes::transition_on_host(&mut *tx, host.id, SandboxStatus::Stopped).await?;
    }
    hosts::delete(&mut *tx, host.id).await?;
    let stopped: Vec<String> = active
        .into_iter()
        .map(|id| SandboxId(id).to_string())
        .collect();
    let metadata = serde_json::json!({"stopped_capsules": stopped});
    let entry = user_action(
        caller,
        host.team_id,
        "host",
        id.to_string(),
        "delete",
        metadata,
    );
    audit_logs::insert(&mut *tx, entry).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

pub async fn tags(db: &Db, caller: &Caller, id: HostId) -> Result<Vec<String>, ServiceError> {
    let host = visible(db, caller, id).await?;
    Ok(host_tags::list(db, host.id).await?)
}

/// The most tags a host holds, which bounds `GET /v1/hosts/{id}/tags` without pages.
pub const MAX_HOST_TAGS: i64 = 64;

pub async fn add_tag(db: &Db, caller: &Caller, id: HostId, tag: Tag) -> Result<(), ServiceError> {
    let host = manageable(db, caller, id).await?;
    // The host's row lock makes concurrent adds count one after another.
    let mut tx = db.begin().await.map_err(DbError::from)?;
    hosts::by_id_for_update(&mut *tx, host.id)
        .await?
        .ok_or(ServiceError::NotFound("host"))?;
    if !host_tags::add_bounded(&mut *tx, host.id, tag.as_str(), MAX_HOST_TAGS).await? {
        return Err(ServiceError::Conflict {
            code: ErrorCode::Conflict,
            message: format!("a host holds at most {MAX_HOST_TAGS} tags; remove one first"),
        });
    }
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

pub async fn remove_tag(
    db: &Db,
    caller: &Caller,
    id: HostId,
    tag: &str,
) -> Result<(), ServiceError> {
    let host = manageable(db, caller, id).await?;
    host_tags::remove(db, host.id, tag).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_the_control_plane_must_not_dial_are_refused() {
        let strict = AddressPolicy::default();
        let local = AddressPolicy {
            allow_loopback: true,
        };
        let own: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap()];
        let refused = |ip: &str, policy| refused_because(ip.parse().unwrap(), &own, policy);
        for ip in [
            "169.254.169.254",
            "fd00:ec2::254",
            "169.254.1.1",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.7",
            "::ffff:192.0.2.7",
        ] {
            assert!(refused(ip, local).is_some(), "{ip}");
        }
        for ip in ["127.0.0.1", "127.8.0.1", "::1", "::ffff:127.0.0.1"] {
            assert!(refused(ip, strict).is_some(), "{ip}");
            assert_eq!(refused(ip, local), None, "{ip}");
        }
        for ip in ["10.0.0.5", "203.0.113.9", "2001:db8::5", "fd00::5"] {
            assert_eq!(refused(ip, strict), None, "{ip}");
        }
    }
}
