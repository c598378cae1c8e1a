//! The control plane: the public REST API over PostgreSQL (accounts, teams, API keys, the host
//! registry) and its background tasks.
//!
//! Request path: TCP → hyper → request ID + tower-http trace (`crate::request_id`) + body limit → axum router (`routes`) → auth
//! extractor (`auth`) + body/path parsing (`extract`) → handler → service (`services`) → queries
//! (`crate::db`) → the result, or an error mapped once to the envelope (`error`). Capsule calls
//! continue from their service to the host agent (`agent_client`), placed by `scheduler` and
//! kept honest by `reconciler`.

pub mod agent_client;
pub mod audit;
pub mod auth;
pub mod ca;
pub mod channels;
pub mod error;
pub mod events;
pub mod extract;
pub mod limits;
pub mod metering;
pub mod monitor;
pub mod pagination;
pub mod pool;
pub mod port_proxy;
pub mod prometheus;
pub mod pruner;
pub mod reconciler;
pub mod revocations;
pub mod routes;
pub mod scheduler;
pub mod services;
pub mod state;
pub mod tokens;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{self, DbError};
use crate::store::TemplateStore;
use monitor::MonitorSettings;
use state::AppState;
use tokens::{TokenError, TokenKeys};

/// The largest request body a JSON endpoint accepts.
pub const JSON_BODY_LIMIT: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cp.jwt_secret (JWT_SECRET) is not set; the control plane needs it to sign tokens (at least 32 bytes)")]
    MissingJwtSecret,
    #[error("{key} must be a positive number; it is {value}")]
    BadOvercommit { key: &'static str, value: f64 },
    #[error(transparent)]
    JwtSecret(#[from] TokenError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error(transparent)]
    CaInstall(#[from] ca::CaHandleError),
    #[error("invalid database_url: {0}")]
    Database(#[from] DbError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    ProxyDomain(#[from] port_proxy::ProxyDomainError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Everything `cp serve` needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub monitor: MonitorSettings,
}

impl ServerSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            listen: config.cp.listen_addr.0,
            monitor: MonitorSettings {
                interval: Duration::from_secs(config.cp.host_monitor_interval_secs.max(1)),
                unreachable_after: Duration::from_secs(config.cp.host_unreachable_after_secs),
            },
        }
    }
}

/// Builds the shared state from the configuration; refuses a missing or short JWT secret.
pub fn state_from_config(config: &Config) -> Result<AppState, ServeError> {
    let secret = config
        .cp
        .jwt_secret
        .as_ref()
        .ok_or(ServeError::MissingJwtSecret)?;
    for (key, value) in [
        ("cp.cpu_overcommit", config.cp.cpu_overcommit),
        ("cp.memory_overcommit", config.cp.memory_overcommit),
        ("cp.disk_overcommit", config.cp.disk_overcommit),
    ] {
        if !(value.is_finite() && value > 0.0) {
            return Err(ServeError::BadOvercommit { key, value });
        }
    }
    let previous = config.cp.jwt_previous_secrets.iter().flat_map(|l| &l.0);
    let tokens = TokenKeys::new(secret.expose().as_bytes())?
        .with_previous(previous.map(|s| s.expose().as_bytes()))?;
    let db = db::connect_lazy(&config.database_url.0)?;
    let mut capsules = state::CapsuleSettings::from_config(config);
    capsules.proxy_domain = config
        .cp
        .proxy_domain
        .as_deref()
        .map(str::parse)
        .transpose()?;
    // The default store is a directory on each agent's own files root; only a store named
    // explicitly is one the control plane can see too.
    if config.store.url.is_some() {
        capsules.store = Some(TemplateStore::open(&config.store, &config.layout())?);
    }
    Ok(AppState::with_settings(
        db,
        tokens,
        capsules,
        state::AuthSettings::from_config(config),
    ))
}

/// The complete HTTP application: the port proxy in front of the routes, plus request IDs,
/// tracing and the body limit.
pub fn app(state: AppState) -> Router {
    let api = routes::router(state.clone()).layer(DefaultBodyLimit::max(JSON_BODY_LIMIT));
    let served = Router::new()
        .fallback_service(api)
        .layer(axum::middleware::from_fn_with_state(
            state,
            port_proxy::route_ports,
        ));
    crate::request_id::layer(served)
}

/// Loads (or, on a new database, creates) the CA, then serves on `listener` and runs the
/// background tasks (host monitor, reconciler, login-failure pruner, usage metering, event
/// listener, channel deliveries) until `shutdown` completes,
/// then drains in-flight requests and stops them.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    monitor: MonitorSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    state
        .ca
        .install(std::sync::Arc::new(ca::load_or_create(&state.db).await?))?;
    let cancel = CancellationToken::new();
    let monitor_task = tokio::spawn(monitor::run(state.db.clone(), monitor, cancel.clone()));
    let reconciler_task = tokio::spawn(reconciler::run(state.clone(), cancel.clone()));
    let pruner_task = tokio::spawn(pruner::run(state.db.clone(), cancel.clone()));
    let metering_task = tokio::spawn(metering::run(
        state.db.clone(),
        state.capsules.usage_sample_interval,
        cancel.clone(),
    ));
    let channels_task = tokio::spawn(channels::dispatch::run(
        state.db.clone(),
        state.tokens.seal_keys().clone(),
        state.events.clone(),
        state.capsules.channel_retry_base,
        state.capsules.channel_allow_private,
        cancel.clone(),
    ));
    let events_task = tokio::spawn(events::run(
        state.db.clone(),
        state.events.clone(),
        cancel.clone(),
    ));
    let revocations_task = tokio::spawn(
        state
            .revocations
            .clone()
            .listen(state.db.clone(), cancel.clone()),
    );
    let hub = state.events.clone();
    let app = app(state).into_make_service_with_connect_info::<SocketAddr>();
    let shutdown = async move {
        shutdown.await;
        // Event streams never end by themselves; the graceful shutdown waits for them.
        hub.close();
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    cancel.cancel();
    let _ = monitor_task.await;
    let _ = reconciler_task.await;
    let _ = pruner_task.await;
    let _ = metering_task.await;
    let _ = revocations_task.await;
    let _ = events_task.await;
    let _ = channels_task.await;
    served.map_err(ServeError::Serve)
}

/// `wrenn cp serve`: listens on `cp.listen_addr` until SIGINT or SIGTERM.
pub async fn serve(config: &Config) -> Result<(), ServeError> {
    let state = state_from_config(config)?;
    let settings = ServerSettings::from_config(config);
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.listen,
            source,
        })?;
    tracing::info!(addr = %settings.listen, "control plane listening");
    if config.cp.metrics_token.is_none() {
        tracing::info!("GET /metrics answers without a token; set cp.metrics_token to require one");
    }
    run(listener, state, settings.monitor, shutdown_signal()).await?;
    tracing::info!("control plane stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: draining requests");
}
