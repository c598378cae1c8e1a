//! A capsule's network settings, set at create and read and changed with `GET`/`PUT
//! /v1/capsules/{id}/network`:
//! - `public_ports`, the ports the port proxy (`cp::port_proxy`) serves to anyone; every other
//!   port needs the team's credentials or the capsule's traffic token;
//! - `egress`, where the guest may connect out to ([`EgressPolicy`], enforced by its agent).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::CapsuleError;
use crate::cp::state::AppState;
use crate::db::sandboxes::{self, SandboxStatus};
use crate::db::DbError;
use crate::egress::EgressPolicy;
use crate::id::{SandboxId, TeamId};

/// More than this many public ports is a mistake, not a service.
pub const MAX_PUBLIC_PORTS: usize = 32;

/// A checked set of public ports: TCP ports, not envd's, sorted and without repeats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PublicPorts(Vec<u16>);

impl PublicPorts {
    pub fn parse(ports: &[i64]) -> Result<Self, CapsuleError> {
        if ports.len() > MAX_PUBLIC_PORTS {
            return Err(CapsuleError::invalid(
                "public_ports",
                format!("at most {MAX_PUBLIC_PORTS} ports"),
            ));
        }
        let mut checked = Vec::with_capacity(ports.len());
        for &port in ports {
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    CapsuleError::invalid("public_ports", format!("{port} is not a TCP port"))
                })?;
            if port == crate::envd::api::DEFAULT_PORT {
                return Err(CapsuleError::invalid(
                    "public_ports",
                    format!("port {port} is the guest agent's and is never proxied"),
                ));
            }
            checked.push(port);
        }
        checked.sort_unstable();
        checked.dedup();
        Ok(Self(checked))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.binary_search(&port).is_ok()
    }

    /// As the database keeps them.
    pub fn to_column(&self) -> Vec<i32> {
        self.0.iter().map(|&p| i32::from(p)).collect()
    }

    /// From the database's column, which only ever holds checked ports.
    pub fn from_column(ports: &[i32]) -> Self {
        Self(
            ports
                .iter()
                .filter_map(|&p| u16::try_from(p).ok())
                .collect(),
        )
    }
}

/// The capsule's network settings as the API shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleNetwork {
    pub public_ports: PublicPorts,
    pub egress: EgressPolicy,
}

/// A change to a capsule's network settings: what is left out stays as it is.
#[derive(Debug, Clone, Default)]
pub struct NetworkChange {
    pub public_ports: Option<PublicPorts>,
    pub egress: Option<EgressPolicy>,
}

/// Checks a policy from a request; what the agent enforces is always a normalised one.
pub fn checked_egress(policy: EgressPolicy) -> Result<EgressPolicy, CapsuleError> {
    policy
        .normalised()
        .map_err(|message| CapsuleError::invalid("egress", message))
}

/// The policy a row holds. Rows hold only checked policies; one that no longer parses (written
/// by a newer version) is refused rather than silently opened.
pub fn stored_egress(column: &Value) -> Result<EgressPolicy, CapsuleError> {
    serde_json::from_value(column.clone())
        .map_err(|e| CapsuleError::Db(DbError::Query(sqlx::Error::Decode(e.into()))))
}

pub fn egress_column(policy: &EgressPolicy) -> Value {
    serde_json::to_value(policy).expect("a policy serialises")
}

/// The capsule's egress policy, and a hold that keeps it from changing until dropped: what a
/// resume sends the agent stays the capsule's policy until the agent has it.
pub async fn held_egress(
    state: &AppState,
    id: SandboxId,
) -> Result<(EgressPolicy, EgressHold), CapsuleError> {
    let mut tx = state.db.begin().await.map_err(DbError::from)?;
    sandboxes::lock_egress(&mut *tx, id.uuid()).await?;
    let column = sandboxes::egress(&mut *tx, id.uuid())
        .await?
        .ok_or(CapsuleError::NotFound)?;
    Ok((stored_egress(&column)?, EgressHold { _transaction: tx }))
}

/// Holds off changes of one capsule's egress policy while it lives (a transaction holding the
/// capsule's advisory lock, rolled back when dropped).
pub struct EgressHold {
    _transaction: sqlx::Transaction<'static, sqlx::Postgres>,
}

pub async fn network(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
) -> Result<CapsuleNetwork, CapsuleError> {
    let settings = sandboxes::network(&state.db, team.uuid(), id.uuid())
        .await?
        .ok_or(CapsuleError::NotFound)?;
    Ok(CapsuleNetwork {
        public_ports: PublicPorts::from_column(&settings.public_ports),
        egress: stored_egress(&settings.egress)?,
    })
}

/// Changes the capsule's network settings. Public ports apply to the proxy's next request. A
/// new egress policy is applied by the capsule's agent first (at once while it runs, or to its
/// record while it is paused) and stored only once the agent took it, so a refusal changes
/// nothing; a paused capsule whose host is away gets it with its next resume.
pub async fn set_network(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
    change: NetworkChange,
) -> Result<CapsuleNetwork, CapsuleError> {
    // One change at a time per capsule, and none while a resume carries the policy: otherwise
    // the agent could end up enforcing one policy while the database shows another.
    let mut tx = state.db.begin().await.map_err(DbError::from)?;
    sandboxes::lock_egress(&mut *tx, id.uuid()).await?;
    let current = sandboxes::network(&mut *tx, team.uuid(), id.uuid())
        .await?
        .ok_or(CapsuleError::NotFound)?;
    let current_egress = stored_egress(&current.egress)?;
    let next = CapsuleNetwork {
        public_ports: change
            .public_ports
            .unwrap_or_else(|| PublicPorts::from_column(&current.public_ports)),
        egress: change.egress.unwrap_or_else(|| current_egress.clone()),
    };
    if next.egress != current_egress {
        let route = sandboxes::route_for_team(&mut *tx, team.uuid(), id.uuid())
            .await?
            .ok_or(CapsuleError::NotFound)?;
        match route.status {
            SandboxStatus::Running => {
                let target = super::online_target(state, &route)?;
                state
                    .capsules
                    .agents
                    .set_egress(&target, id, &next.egress)
                    .await?;
            }
            SandboxStatus::Paused => {
                if let Ok(target) = super::online_target(state, &route) {
                    state
                        .capsules
                        .agents
                        .set_egress(&target, id, &next.egress)
                        .await?;
                }
            }
            // Nothing of it runs any more.
            SandboxStatus::Stopped | SandboxStatus::Failed => {}
            busy => return Err(CapsuleError::Busy(busy)),
        }
    }
    let settings = sandboxes::NetworkSettings {
        public_ports: next.public_ports.to_column(),
        egress: egress_column(&next.egress),
    };
    if !sandboxes::set_network(&mut *tx, team.uuid(), id.uuid(), &settings).await? {
        return Err(CapsuleError::NotFound);
    }
    tx.commit().await.map_err(DbError::from)?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ports_are_checked_sorted_and_unique() {
        let ports = PublicPorts::parse(&[8888, 80, 8888, 3000]).unwrap();
        assert_eq!(ports.to_column(), vec![80, 3000, 8888]);
        assert!(ports.contains(3000) && !ports.contains(3001));
        for bad in [0, -1, 65536, 49983] {
            assert!(PublicPorts::parse(&[bad]).is_err(), "{bad}");
        }
        let too_many: Vec<i64> = (1..=33).collect();
        assert!(PublicPorts::parse(&too_many).is_err());
    }
}
