//! Which of a capsule's ports the port proxy (`cp::port_proxy`) serves to anyone: `public_ports`
//! at create, read and replaced with `GET`/`PUT /v1/capsules/{id}/network`. Every other port
//! needs the team's credentials or the capsule's traffic token.

use serde::{Deserialize, Serialize};

use super::CapsuleError;
use crate::cp::state::AppState;
use crate::db::sandboxes;
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
}

pub async fn network(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
) -> Result<CapsuleNetwork, CapsuleError> {
    let ports = sandboxes::public_ports(&state.db, team.uuid(), id.uuid())
        .await?
        .ok_or(CapsuleError::NotFound)?;
    Ok(CapsuleNetwork {
        public_ports: PublicPorts::from_column(&ports),
    })
}

/// Replaces the capsule's network settings; the proxy applies them to the next request.
pub async fn set_network(
    state: &AppState,
    team: TeamId,
    id: SandboxId,
    network: CapsuleNetwork,
) -> Result<CapsuleNetwork, CapsuleError> {
    let column = network.public_ports.to_column();
    if !sandboxes::set_public_ports(&state.db, team.uuid(), id.uuid(), &column).await? {
        return Err(CapsuleError::NotFound);
    }
    Ok(network)
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
