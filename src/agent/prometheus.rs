//! The agent's Prometheus metrics, served on `agent.metrics_addr` apart from its API (which
//! only the control plane may call): sandboxes by phase, VMM processes, create, pause and
//! resume durations (a create also by phase), and the bytes its port proxy carries.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use strum::IntoEnumIterator;
use tokio_util::sync::CancellationToken;

use super::sandbox::SandboxManager;
use super::wire::SandboxPhase;
use crate::secret::SecretText;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CreatePhaseLabels {
    phase: &'static str,
    path: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

struct Metrics {
    registry: Registry,
    sandboxes: Family<PhaseLabels, Gauge>,
    vmm_processes: Gauge,
    operations: Family<OperationLabels, Histogram>,
    create_phases: Family<CreatePhaseLabels, Histogram>,
    proxied: Family<DirectionLabels, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("wrenn_agent");
    let sandboxes = Family::<PhaseLabels, Gauge>::default();
    registry.register("sandboxes", "Sandboxes by phase", sandboxes.clone());
    let vmm_processes = Gauge::default();
    registry.register(
        "vmm_processes",
        "Sandboxes whose VMM process runs (every phase but paused)",
        vmm_processes.clone(),
    );
    let histogram = || Histogram::new(crate::prometheus::seconds_buckets());
    let operations = Family::<OperationLabels, Histogram>::new_with_constructor(histogram);
    registry.register(
        "operation_duration_seconds",
        "Sandbox creates, pauses and resumes, by outcome",
        operations.clone(),
    );
    let create_phases = Family::<CreatePhaseLabels, Histogram>::new_with_constructor(histogram);
    registry.register(
        "create_phase_duration_seconds",
        "The phases of successful creates (disk, network, vmm_spawn, boot_to_envd, envd_init), \
         by create path (cold_boot, boot_snapshot, template_snapshot)",
        create_phases.clone(),
    );
    let proxied = Family::<DirectionLabels, Counter>::default();
    registry.register(
        "proxied_bytes",
        "Bytes the port proxy carried, to and from guests",
        proxied.clone(),
    );
    Metrics {
        registry,
        sandboxes,
        vmm_processes,
        operations,
        create_phases,
        proxied,
    }
});

/// Records how long a create, pause or resume took.
pub fn operation(operation: &'static str, succeeded: bool, took: Duration) {
    let outcome = if succeeded { "success" } else { "error" };
    METRICS
        .operations
        .get_or_create(&OperationLabels { operation, outcome })
        .observe(took.as_secs_f64());
}

/// Records a successful create's phases.
pub fn create_phases(path: &'static str, laps: &[(&'static str, Duration)]) {
    for (phase, took) in laps {
        METRICS
            .create_phases
            .get_or_create(&CreatePhaseLabels { phase, path })
            .observe(took.as_secs_f64());
    }
}

/// Counts bytes the port proxy carried to a guest and back.
pub fn proxied(to_guest: u64, from_guest: u64) {
    for (direction, bytes) in [("to_guest", to_guest), ("from_guest", from_guest)] {
        if bytes > 0 {
            METRICS
                .proxied
                .get_or_create(&DirectionLabels { direction })
                .inc_by(bytes);
        }
    }
}

#[derive(Clone)]
struct ScrapeState {
    sandboxes: Arc<SandboxManager>,
    token: Option<SecretText>,
}

async fn scrape(State(state): State<ScrapeState>, headers: HeaderMap) -> Response {
    if crate::prometheus::authorized(&headers, state.token.as_ref()) {
        let phases: Vec<SandboxPhase> = state.sandboxes.list().iter().map(|s| s.status).collect();
        for phase in SandboxPhase::iter() {
            let count = phases.iter().filter(|p| **p == phase).count();
            METRICS
                .sandboxes
                .get_or_create(&PhaseLabels {
                    phase: phase.to_string(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let live = phases
            .iter()
            .filter(|p| **p != SandboxPhase::Paused)
            .count();
        METRICS
            .vmm_processes
            .set(i64::try_from(live).unwrap_or(i64::MAX));
    }
    crate::prometheus::scrape(&headers, state.token.as_ref(), &METRICS.registry)
}

/// Serves `GET /metrics` on `listener` until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sandboxes: Arc<SandboxManager>,
    token: Option<SecretText>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(ScrapeState { sandboxes, token });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}
