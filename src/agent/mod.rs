//! The host agent: registers with the control plane and runs this host's microVMs.

pub mod disk;
pub mod network;
pub mod registration;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use registration::{ControlPlane, HostCredentials, HostSpecs, RegistrationError};

/// Command-line inputs of `wrenn agent`.
#[derive(Debug, Clone, Default)]
pub struct AgentArgs {
    /// One-time registration token from `POST /v1/hosts`.
    pub register: Option<String>,
    /// The address (ip:port) the control plane reaches this agent at.
    pub address: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Layout(#[from] crate::config::LayoutError),
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    #[error("--address is required with --register: the control plane must know where to reach this agent (e.g. --address 10.0.1.5:50051)")]
    AddressRequired,
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
    let cp = ControlPlane::new(cp_url);
    let creds = obtain_credentials(&cp, &layout, &args).await?;
    tracing::info!(host_id = %creds.host_id, "agent registered with the control plane");

    let interval = Duration::from_secs(config.agent.heartbeat_interval_secs.max(1));
    heartbeat_loop(cp, creds, layout.host_token_file(), interval, shutdown).await
}

async fn obtain_credentials(
    cp: &ControlPlane,
    layout: &crate::config::Layout,
    args: &AgentArgs,
) -> Result<HostCredentials, AgentError> {
    let path = layout.host_token_file();
    let Some(token) = args.register.clone() else {
        if args.address.is_some() {
            tracing::info!("--address is only sent at registration; the saved registration stands");
        }
        return Ok(registration::load_credentials(&path)?);
    };
    let address = args.address.clone().ok_or(AgentError::AddressRequired)?;
    let specs = HostSpecs::detect(layout.root());
    let cp = cp.clone();
    let creds = tokio::task::spawn_blocking(move || cp.register(&token, &address, &specs))
        .await
        .expect("registration task does not panic")?;
    registration::save_credentials(&path, &creds)?;
    Ok(creds)
}

async fn heartbeat_loop(
    cp: ControlPlane,
    mut creds: HostCredentials,
    token_file: std::path::PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let (cp2, c2) = (cp.clone(), creds.clone());
        let beat = tokio::task::spawn_blocking(move || cp2.heartbeat(&c2))
            .await
            .expect("heartbeat task does not panic");
        match beat {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!("host token expired; refreshing credentials");
                let (cp2, c2) = (cp.clone(), creds.clone());
                creds = tokio::task::spawn_blocking(move || cp2.refresh(&c2))
                    .await
                    .expect("refresh task does not panic")?;
                registration::save_credentials(&token_file, &creds)?;
                ticker.reset_immediately();
            }
            Err(error @ RegistrationError::HostDeleted { .. }) => return Err(error.into()),
            Err(error) => tracing::warn!(%error, "heartbeat failed; retrying next interval"),
        }
    }
}
