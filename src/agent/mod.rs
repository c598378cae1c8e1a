//! The host agent: registers with the control plane and runs this host's microVMs.

pub mod api;
pub mod disk;
pub mod network;
pub mod port_proxy;
pub mod prometheus;
pub mod registration;
pub mod sandbox;
pub mod templates;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use api::ServedCredentials;
use network::{NetworkError, NetworkManager};
use registration::{ControlPlane, HostCredentials, HostSpecs, RegistrationError};
use sandbox::{Limits, SandboxError, SandboxManager, SnapshotUse};

/// Command-line inputs of `wrenn agent`.
#[derive(Debug, Clone, Default)]
pub struct AgentArgs {
    /// One-time registration token from `POST /v1/hosts`.
    pub register: Option<crate::secret::SecretText>,
    /// The address (ip:port) the control plane reaches this agent at.
    pub address: Option<String>,
}

/// The exit status of an agent that cannot continue until an operator registers it again (a new
/// host or registration token): `EX_CONFIG`, so a service manager can be told not to restart it
/// (systemd: `RestartPreventExitStatus=78`).
pub const EXIT_NEEDS_REGISTRATION: u8 = 78;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Layout(#[from] crate::config::LayoutError),
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    #[error("--address is required with --register: the control plane must know where to reach this agent (e.g. --address 10.0.1.5:50051)")]
    AddressRequired,
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Cgroup(#[from] crate::vmm::CgroupError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot find the agent's own executable: {0}")]
    OwnExecutable(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the agent API server failed: {0}")]
    Serve(std::io::Error),
}

impl AgentError {
    pub fn needs_registration(&self) -> bool {
        matches!(self, AgentError::Registration(e) if e.needs_registration())
    }
}

/// Runs the agent until `shutdown` fires or the control plane deletes the host.
pub async fn run(
    config: &Config,
    args: AgentArgs,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let layout = config.layout();
    layout.prepare()?;
    let cp_url = config
        .agent
        .cp_url
        .clone()
        .ok_or(RegistrationError::NoControlPlaneUrl)?;
    registration::check_cp_url(&cp_url, config.agent.allow_plain_http)?;
    let cp = match &config.agent.cp_ca_file {
        Some(path) => {
            let pem =
                std::fs::read_to_string(path).map_err(|e| RegistrationError::CaFileUnreadable {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            ControlPlane::pinned(cp_url, &pem)?
        }
        None => ControlPlane::new(cp_url),
    };
    let creds = obtain_credentials(&cp, &layout, &args).await?;
    tracing::info!(host_id = %creds.host_id, "agent registered with the control plane");
    let served = Arc::new(ServedCredentials::new(&creds)?);
    let tls = served.server_config()?;

    let network = NetworkManager::new(&config.agent).await?;
    let vmm = crate::vmm::from_config(&config.agent);
    let specs = HostSpecs::detect(layout.root());
    let limits = Limits {
        max_vcpus: specs.cpu_cores.clamp(1, 32),
        max_memory_mb: u32::try_from(specs.memory_mb).unwrap_or(u32::MAX),
        max_disk_mb: specs.disk_gb.max(1) << 10,
        envd_ready_timeout: Duration::from_secs(config.agent.envd_ready_timeout_secs.max(1)),
    };
    let confinement = crate::vmm::ConfinementPolicy::from_config(&config.agent)?;
    let store = crate::store::TemplateStore::open(&config.store, &layout)?;
    tracing::info!(store = store.location(), "template store");
    let envd_binary = match &config.agent.envd_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe().map_err(AgentError::OwnExecutable)?,
    };
    let templates = Arc::new(templates::TemplateImages::new(
        layout.clone(),
        store,
        envd_binary,
    ));
    let sandboxes = Arc::new(SandboxManager::new(
        layout.clone(),
        vmm,
        network,
        limits,
        confinement,
        templates,
        SnapshotUse {
            boot_snapshots: config.agent.boot_snapshots,
            // The default store is this host's own directory: a copy there helps no other host.
            store_paused: config.agent.store_paused_sandboxes && config.store.url.is_some(),
        },
    ));
    sandboxes.recover().await?;
    sandboxes.restore_metrics();

    let addr = config.agent.listen_addr.0;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Listen { addr, source })?;
    tracing::info!(%addr, vmm = %sandboxes.vmm_kind(), "agent API listening");
    let app = api::router(api::AgentState::new(
        sandboxes.clone(),
        served.clone(),
        &creds.host_id,
        port_proxy::PortProxySettings::from_config(&config.agent),
    ));
    let stop = shutdown.child_token();
    let metrics_server = match config.agent.metrics_addr.as_ref().map(|a| a.0) {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Listen { addr, source })?;
            tracing::info!(%addr, "agent metrics listening");
            Some(tokio::spawn(prometheus::serve(
                listener,
                sandboxes.clone(),
                config.agent.metrics_token.clone(),
                stop.clone(),
            )))
        }
        None => None,
    };
    let server = tokio::spawn(api::serve_tls(listener, tls, app, stop.clone()));
    let reaper = tokio::spawn(sandboxes.clone().reap_idle(stop.clone()));
    let sampler = tokio::spawn(sandbox::metrics::run(sandboxes.clone(), stop.clone()));

    let interval = Duration::from_secs(config.agent.heartbeat_interval_secs.max(1));
    let outcome = registration::heartbeat_loop(
        cp,
        creds,
        layout.host_token_file(),
        interval,
        served,
        stop.clone(),
    )
    .await
    .map_err(AgentError::from);
    // Whatever ended the heartbeat (a signal, or the host being deleted) ends the agent. Its
    // sandboxes run on for the next agent process to adopt, unless the host is gone or the
    // operator asked otherwise.
    stop.cancel();
    let _ = reaper.await;
    let _ = sampler.await;
    if let Some(metrics_server) = metrics_server {
        let _ = metrics_server.await;
    }
    // No pause or resume starts from here; those in progress run to their end, so no VM is
    // left frozen half way.
    sandboxes.finish_operations().await;
    let host_deleted = matches!(
        outcome,
        Err(AgentError::Registration(
            RegistrationError::HostDeleted { .. }
        ))
    );
    if host_deleted || config.agent.destroy_sandboxes_on_stop {
        sandboxes.destroy_all().await;
    } else {
        tracing::info!(
            sandboxes = sandboxes.list().len(),
            "leaving the sandboxes running for the next agent process"
        );
    }
    sandboxes.leave_host();
    if let Err(join) = server.await {
        return Err(AgentError::Serve(std::io::Error::other(join.to_string())));
    }
    outcome
}

/// The saved credentials, or new ones from a registration; either way with a certificate the
/// API can serve with (credentials saved before mTLS refresh to get one). Credentials that
/// cannot be saved are used from memory; the heartbeat retries the save.
async fn obtain_credentials(
    cp: &ControlPlane,
    layout: &crate::config::Layout,
    args: &AgentArgs,
) -> Result<HostCredentials, AgentError> {
    let path = layout.host_token_file();
    let creds = match args.register.clone() {
        None => {
            if args.address.is_some() {
                tracing::info!(
                    "--address is only sent at registration; the saved registration stands"
                );
            }
            let saved = registration::load_credentials(&path)?;
            if saved.tls.is_some() {
                return Ok(saved);
            }
            tracing::info!("the saved credentials predate mTLS; refreshing them for a certificate");
            let cp = cp.clone();
            tokio::task::spawn_blocking(move || cp.refresh(&saved))
                .await
                .expect("refresh task does not panic")?
        }
        Some(token) => {
            let address = args.address.clone().ok_or(AgentError::AddressRequired)?;
            let specs = HostSpecs::detect(layout.root());
            let cp = cp.clone();
            tokio::task::spawn_blocking(move || cp.register(&token, &address, &specs))
                .await
                .expect("registration task does not panic")?
        }
    };
    if let Err(error) = registration::save_credentials(&path, &creds) {
        tracing::error!(%error, "the new credentials stay in memory only; the heartbeat retries the save");
    }
    Ok(creds)
}
