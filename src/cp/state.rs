//! What every request handler shares: the database pool, the token keys, the capsule machinery
//! (agent client, scheduler settings, reconciler period, derived agent secrets), the CA and
//! the credential guards.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use uuid::Uuid;

use super::agent_client::{AgentClient, AgentTimeouts};
use super::ca::CaHandle;
use super::events::EventHub;
use super::limits::{TeamLimitSettings, TeamLimits};
use super::port_proxy::ProxyDomain;
use super::revocations::Revocations;
use super::scheduler::SchedulerSettings;
use super::services::hosts::AddressPolicy;
use super::services::passwords::PasswordHashing;
use super::tokens::TokenKeys;
use crate::config::{Config, IpCidrList, SignupMode};
use crate::db::Db;
use crate::secret::SecretText;
use crate::store::TemplateStore;

#[derive(Debug)]
pub struct Shared {
    pub db: Db,
    pub tokens: TokenKeys,
    pub capsules: CapsuleSettings,
    pub auth: AuthSettings,
    pub agent_secrets: AgentSecrets,
    pub revocations: Revocations,
    /// This replica's lifecycle-event subscribers.
    pub events: EventHub,
    /// Execs, transfers and sessions each team has in progress.
    pub team_limits: Arc<TeamLimits>,
    /// The permits password hashes and checks run under.
    pub passwords: PasswordHashing,
    /// The CA that certifies agents and this control plane to them; shared with the agent
    /// client's TLS.
    pub ca: CaHandle,
}

/// The secrets presented to agents, by host and generation. Each is a pure function of the two
/// under the CA's agent secret key, so it is derived once instead of on every call into a
/// sandbox; a host keeps only its latest generation.
#[derive(Debug)]
pub struct AgentSecrets {
    ca: CaHandle,
    known: RwLock<HashMap<Uuid, (i32, String)>>,
}

impl AgentSecrets {
    fn new(ca: CaHandle) -> Self {
        Self {
            ca,
            known: RwLock::default(),
        }
    }

    /// `None` until the CA is loaded (`cp::run` loads it before serving).
    pub fn get(&self, host: Uuid, generation: i32) -> Option<String> {
        let known = self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&host)
            .filter(|(g, _)| *g == generation)
            .map(|(_, secret)| secret.clone());
        if let Some(secret) = known {
            return Some(secret);
        }
        let secret = self.ca.get().ok()?.agent_secret(host, generation);
        self.known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(host, (generation, secret.clone()));
        Some(secret)
    }
}

/// At most `max_failures` failed logins per `window`, which starts at the first failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// 0 turns the limit off.
    pub max_failures: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    pub per_email: Limit,
    pub per_address: Limit,
}

/// How credentials are guarded.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// How long after a rotation the token it replaced may be presented once more (the agent
    /// never got the answer) instead of counting as reuse.
    pub host_refresh_grace: Duration,
    pub login_limits: LoginLimits,
    /// Reverse proxies whose `X-Forwarded-For` names the client address.
    pub trusted_proxies: IpCidrList,
    pub signup: SignupMode,
    /// Signups per client address and window (`max_failures` counts every signup here).
    pub signup_per_address: Limit,
    /// Password hashes and checks computed at once (at least 1).
    pub password_hash_permits: usize,
    /// Which addresses hosts may register with.
    pub host_addresses: AddressPolicy,
    /// `cp.metrics_token`: what `GET /metrics` requires, if anything.
    pub metrics_token: Option<SecretText>,
}

/// The configuration's defaults.
impl Default for AuthSettings {
    fn default() -> Self {
        Self::from_config(&Config::default())
    }
}

impl AuthSettings {
    pub fn from_config(config: &Config) -> Self {
        let cp = &config.cp;
        let limit = |max_failures, window_secs: u64| Limit {
            max_failures,
            window: Duration::from_secs(window_secs.max(1)),
        };
        Self {
            host_refresh_grace: Duration::from_secs(cp.host_refresh_grace_secs),
            login_limits: LoginLimits {
                per_email: limit(cp.login_email_max_failures, cp.login_email_window_secs),
                per_address: limit(cp.login_address_max_failures, cp.login_address_window_secs),
            },
            trusted_proxies: cp.trusted_proxies.clone(),
            signup: cp.signup,
            signup_per_address: limit(cp.signup_address_max, cp.signup_address_window_secs),
            password_hash_permits: cp.password_hash_permits.max(1),
            host_addresses: AddressPolicy {
                allow_loopback: cp.allow_loopback_hosts,
            },
            metrics_token: cp.metrics_token.clone(),
        }
    }
}

/// How the control plane reaches agents and places sandboxes.
#[derive(Debug, Clone)]
pub struct CapsuleSettings {
    pub agents: AgentClient,
    pub scheduler: SchedulerSettings,
    /// `cp.host_agent_addr`: dialled instead of every host's registered address.
    pub agent_addr_override: Option<String>,
    pub reconcile_interval: Duration,
    /// `cp.usage_sample_interval_secs`: the metering's sample interval.
    pub usage_sample_interval: Duration,
    /// `cp.channel_retry_secs`: the first retry's delay of a failed channel delivery.
    pub channel_retry_base: Duration,
    /// `cp.channel_allow_private_targets`: whether channels may send to internal addresses.
    pub channel_allow_private: bool,
    pub team_limits: TeamLimitSettings,
    /// The template store, when `store.url` names one the control plane can reach too: it then
    /// confirms what a host says it published, and finds the copies of paused capsules that
    /// can resume on another host. Without it, the host's word is taken and nothing moves.
    pub store: Option<TemplateStore>,
    /// `cp.build_context_max_bytes`: the largest build archive, uploaded and unpacked.
    pub build_context_max_bytes: u64,
    /// `cp.proxy_domain`; `None` proxies `{port}-{capsule_id}.<any domain>`.
    pub proxy_domain: Option<ProxyDomain>,
    /// `cp.port_proxy_idle_timeout_secs`: a proxied upgraded connection silent this long ends.
    pub proxy_idle_timeout: Duration,
}

impl Default for CapsuleSettings {
    fn default() -> Self {
        Self {
            agents: AgentClient::new(AgentTimeouts::default()),
            scheduler: SchedulerSettings::default(),
            agent_addr_override: None,
            reconcile_interval: Duration::from_secs(15),
            usage_sample_interval: Duration::from_secs(10),
            channel_retry_base: Duration::from_secs(10),
            channel_allow_private: false,
            team_limits: TeamLimitSettings::default(),
            store: None,
            build_context_max_bytes: 1 << 30,
            proxy_domain: None,
            proxy_idle_timeout: Duration::from_secs(900),
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
            usage_sample_interval: Duration::from_secs(cp.usage_sample_interval_secs.max(1)),
            // The last retry waits 360 times this: at most about 15 days.
            channel_retry_base: Duration::from_secs(cp.channel_retry_secs.clamp(1, 3600)),
            channel_allow_private: cp.channel_allow_private_targets,
            team_limits: TeamLimitSettings::from_config(config),
            store: None,
            build_context_max_bytes: cp.build_context_max_bytes,
            proxy_domain: None,
            proxy_idle_timeout: Duration::from_secs(cp.port_proxy_idle_timeout_secs.max(1)),
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
        Self::with_settings(db, tokens, capsules, AuthSettings::default())
    }

    pub fn with_settings(
        db: Db,
        tokens: TokenKeys,
        capsules: CapsuleSettings,
        auth: AuthSettings,
    ) -> Self {
        let team_limits = TeamLimits::new(capsules.team_limits);
        let passwords = PasswordHashing::new(auth.password_hash_permits);
        let ca = capsules.agents.ca().clone();
        Self(Arc::new(Shared {
            db,
            tokens,
            capsules,
            auth,
            agent_secrets: AgentSecrets::new(ca.clone()),
            ca,
            revocations: Revocations::default(),
            events: EventHub::default(),
            team_limits,
            passwords,
        }))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
