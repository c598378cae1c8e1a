//! The control plane's Prometheus metrics (`GET /metrics`): requests by route and status with
//! their latencies, capsules by state, scheduler decisions, pool refusals, and the database
//! pool. Counters live in one process-wide registry; the gauges are read when scraped.

use std::sync::LazyLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::scheduler::ScheduleError;
use super::state::AppState;
use crate::db::sandboxes;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    capsules: Family<StateLabels, Gauge>,
    decisions: Family<OutcomeLabels, Counter>,
    pool_refusals: Family<ResourceLabels, Counter>,
    db_connections: Family<StateLabels, Gauge>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("wrenn_cp");
    let requests = Family::<RequestLabels, Counter>::default();
    registry.register(
        "http_requests",
        "API requests answered, by method, route and status",
        requests.clone(),
    );
    let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
        Histogram::new(crate::prometheus::seconds_buckets())
    });
    registry.register(
        "http_request_duration_seconds",
        "Time to answer an API request (until the response head), by method and route",
        latency.clone(),
    );
    let capsules = Family::<StateLabels, Gauge>::default();
    registry.register(
        "capsules",
        "Capsules by state, as the database has them",
        capsules.clone(),
    );
    let decisions = Family::<OutcomeLabels, Counter>::default();
    registry.register(
        "scheduler_decisions",
        "Placements decided: placed, no_hosts, no_room, no_holder, pool_exhausted, error",
        decisions.clone(),
    );
    let pool_refusals = Family::<ResourceLabels, Counter>::default();
    registry.register(
        "pool_refusals",
        "Operations refused because the team's pool had no room, by the resource that ran out",
        pool_refusals.clone(),
    );
    let db_connections = Family::<StateLabels, Gauge>::default();
    registry.register(
        "db_connections",
        "The PostgreSQL connection pool: idle and in use",
        db_connections.clone(),
    );
    Metrics {
        registry,
        requests,
        latency,
        capsules,
        decisions,
        pool_refusals,
        db_connections,
    }
});

/// Counts a scheduler decision (and a pool refusal by its resource), and passes it on.
pub fn scheduled<T>(outcome: Result<T, ScheduleError>) -> Result<T, ScheduleError> {
    let label = match &outcome {
        Ok(_) => "placed",
        Err(ScheduleError::NoHosts) => "no_hosts",
        Err(ScheduleError::NoRoom { .. }) => "no_room",
        Err(ScheduleError::NoHolder(_)) => "no_holder",
        Err(ScheduleError::PoolExhausted(exhausted)) => {
            let resource = exhausted.resource.as_str();
            METRICS
                .pool_refusals
                .get_or_create(&ResourceLabels { resource })
                .inc();
            "pool_exhausted"
        }
        Err(ScheduleError::TeamGone | ScheduleError::Db(_)) => "error",
    };
    METRICS
        .decisions
        .get_or_create(&OutcomeLabels { outcome: label })
        .inc();
    outcome
}

/// The layer (`axum::middleware::from_fn`) that counts and times every routed request.
pub async fn count(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    // Only methods the API serves are labels of their own: anyone can send any method.
    let method = match *request.method() {
        Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE => {
            request.method().as_str().to_owned()
        }
        _ => "OTHER".to_owned(),
    };
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let took = started.elapsed().as_secs_f64();
    METRICS
        .latency
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(took);
    METRICS
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

/// `GET /metrics`.
pub async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let token = state.auth.metrics_token.as_ref();
    if crate::prometheus::authorized(&headers, token) {
        match sandboxes::count_by_status(&state.db).await {
            Ok(counts) => {
                METRICS.capsules.clear();
                for (status, count) in counts {
                    METRICS
                        .capsules
                        .get_or_create(&StateLabels { state: status })
                        .set(count);
                }
            }
            Err(error) => tracing::warn!(%error, "could not count capsules for /metrics"),
        }
        let idle = i64::try_from(state.db.num_idle()).unwrap_or(i64::MAX);
        let size = i64::from(state.db.size());
        for (state_label, value) in [("idle", idle), ("in_use", (size - idle).max(0))] {
            METRICS
                .db_connections
                .get_or_create(&StateLabels {
                    state: state_label.into(),
                })
                .set(value);
        }
    }
    crate::prometheus::scrape(&headers, token, &METRICS.registry)
}
