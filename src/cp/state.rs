//! What every request handler shares: the database pool, the token keys, and the capsule
//! machinery (agent client, scheduler settings, reconciler period).

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use super::agent_client::{AgentClient, AgentTimeouts};
use super::scheduler::SchedulerSettings;
use super::tokens::TokenKeys;
use crate::config::Config;
use crate::db::Db;

#[derive(Debug)]
pub struct Shared {
    pub db: Db,
    pub tokens: TokenKeys,
    pub capsules: CapsuleSettings,
}

/// How the control plane reaches agents and places sandboxes.
#[derive(Debug, Clone)]
pub struct CapsuleSettings {
    pub agents: AgentClient,
    pub scheduler: SchedulerSettings,
    /// `cp.host_agent_addr`: dialled instead of every host's registered address.
    pub agent_addr_override: Option<String>,
    pub reconcile_interval: Duration,
}

impl Default for CapsuleSettings {
    fn default() -> Self {
        Self {
            agents: AgentClient::new(AgentTimeouts::default()),
            scheduler: SchedulerSettings::default(),
            agent_addr_override: None,
            reconcile_interval: Duration::from_secs(15),
        }
    }
}

impl CapsuleSettings {
    pub fn from_config(config: &Config) -> Self {
        let cp = &config.cp;
        Self {
            agents: AgentClient::new(AgentTimeouts {
                request: Duration::from_secs(cp.agent_timeout_secs.max(1)),
                create: Duration::from_secs(cp.agent_create_timeout_secs.max(1)),
            }),
            scheduler: SchedulerSettings {
                cpu_overcommit: cp.cpu_overcommit,
                memory_overcommit: cp.memory_overcommit,
                disk_overcommit: cp.disk_overcommit,
            },
            agent_addr_override: cp.host_agent_addr.as_ref().map(ToString::to_string),
            reconcile_interval: Duration::from_secs(cp.reconcile_interval_secs.max(1)),
        }
    }
}

/// Cheap to clone: axum clones it into every request.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(db: Db, tokens: TokenKeys) -> Self {
        Self::with_capsules(db, tokens, CapsuleSettings::default())
    }

    pub fn with_capsules(db: Db, tokens: TokenKeys, capsules: CapsuleSettings) -> Self {
        Self(Arc::new(Shared {
            db,
            tokens,
            capsules,
        }))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
