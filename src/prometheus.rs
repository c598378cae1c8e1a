//! Prometheus exposition, shared by the control plane's and the agent's `/metrics`: the text
//! format, the optional bearer token that guards it, and the latency buckets.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use subtle::ConstantTimeEq;

use crate::secret::SecretText;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a scrape may read the metrics: anyone when no token is configured, otherwise only
/// `Authorization: Bearer <token>`.
pub fn authorized(headers: &HeaderMap, token: Option<&SecretText>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(token.expose().as_bytes())))
}

/// The answer to a scrape: the registry in the OpenMetrics text format, or 401.
pub fn scrape(headers: &HeaderMap, token: Option<&SecretText>, registry: &Registry) -> Response {
    if !authorized(headers, token) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "metrics need Authorization: Bearer <metrics token>\n",
        )
            .into_response();
    }
    let mut text = String::new();
    if encode(&mut text, registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Latency buckets from 1 ms to about 65 s.
pub fn seconds_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_token_is_required_and_compared_exactly() {
        let mut headers = HeaderMap::new();
        assert!(authorized(&headers, None));
        let token = SecretText::new("s3cret");
        assert!(!authorized(&headers, Some(&token)));
        headers.insert(header::AUTHORIZATION, "Bearer s3cre".parse().unwrap());
        assert!(!authorized(&headers, Some(&token)));
        headers.insert(header::AUTHORIZATION, "bearer s3cret".parse().unwrap());
        assert!(authorized(&headers, Some(&token)));
        headers.insert(header::AUTHORIZATION, "Basic s3cret".parse().unwrap());
        assert!(!authorized(&headers, Some(&token)));
    }
}
