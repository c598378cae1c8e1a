//! Request IDs that follow one call across hops. The control plane gives every API request an
//! `x-request-id` (the caller's own, or a fresh UUID) and sends it with each agent call it makes
//! while serving that request; the agent's proxy passes it on to envd; each of the three records
//! it in its request span, so one call can be followed through cp → agent → envd logs.

use std::time::Duration;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use http::{HeaderName, HeaderValue};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static CURRENT: HeaderValue;
}

/// The ID of the request the current task is serving, for clients that call the next hop.
/// A task spawned off a request (a WebSocket session, a background loop) has none.
pub fn current() -> Option<HeaderValue> {
    CURRENT.try_with(HeaderValue::clone).ok()
}

/// Gives every request an ID, serves it inside a span that records the ID, makes the ID
/// [`current`] for the handler, and returns it in the response.
pub fn layer(router: Router) -> Router {
    router
        .layer(axum::middleware::from_fn(scope))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(span)
                .on_response(on_response),
        )
        .layer(PropagateRequestIdLayer::new(HEADER))
        .layer(SetRequestIdLayer::new(HEADER, MakeRequestUuid))
}

async fn scope(request: Request, next: Next) -> Response {
    match request.headers().get(&HEADER).cloned() {
        Some(id) => CURRENT.scope(id, next.run(request)).await,
        None => next.run(request).await,
    }
}

fn span<B>(request: &http::Request<B>) -> Span {
    let id = request
        .headers()
        .get(&HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %id,
    )
}

/// An access log line, off unless `wrenn::request_id=debug` is asked for: envd is polled every
/// 100 ms while a guest boots.
fn on_response<B>(response: &http::Response<B>, latency: Duration, _span: &Span) {
    tracing::debug!(
        status = response.status().as_u16(),
        latency_ms = latency.as_millis() as u64,
        "request finished"
    );
}
