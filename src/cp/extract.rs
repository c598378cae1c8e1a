//! Request parsing that fails with the error envelope: JSON bodies (naming the offending field),
//! query strings, path IDs, and the client's address.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::state::AppState;
use crate::config::IpCidrList;

/// A JSON request body. Wrong content type, malformed JSON, unknown or missing fields and wrong
/// types are 400 `invalid_request` naming the field; a body over the limit is 413 `too_large`.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim();
                mime.eq_ignore_ascii_case("application/json")
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::InvalidRequest(
                "expected a JSON body (Content-Type: application/json)".into(),
            ));
        }
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge("request body is larger than the limit".into())
            } else {
                ApiError::InvalidRequest(format!("could not read the request body: {rejection}"))
            }
        })?;
        parse_json(&body).map(ApiJson)
    }
}

pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidRequest(
            "request body is empty; expected a JSON object".into(),
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if matches!(
            inner.classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        ) {
            ApiError::InvalidRequest(format!("invalid JSON body: malformed JSON: {inner}"))
        } else if path == "." || path.is_empty() {
            ApiError::InvalidRequest(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::InvalidRequest(format!("invalid field `{path}`: {inner}"))
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: trailing data: {e}")))?;
    Ok(value)
}

/// Query-string parameters.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| ApiError::InvalidRequest(rejection.body_text()))
    }
}

/// Parses a path parameter into a typed ID, naming the parameter when it is malformed.
pub fn path_id<T>(name: &str, raw: &str) -> Result<T, ApiError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    raw.parse()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid path parameter `{name}`: {e}")))
}

/// The address of the client that sent the request: the TCP peer, or when the peer is a trusted
/// reverse proxy (`cp.trusted_proxies`), the address its `X-Forwarded-For` names. `None` when
/// the server runs without connection info (a router driven directly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let forwarded: Vec<&str> = parts
            .headers
            .get_all(FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        Ok(ClientAddr(peer.map(|peer| {
            client_address(peer, &forwarded, &state.auth.trusted_proxies)
        })))
    }
}

const FORWARDED_FOR: &str = "x-forwarded-for";

/// Walks `X-Forwarded-For` from the nearest hop back while each hop is a trusted proxy; the
/// first untrusted hop is the client. Entries left of it were written by the client itself and
/// prove nothing; an unparseable entry ends the walk at the hop that reported it.
fn client_address(peer: IpAddr, forwarded: &[&str], trusted: &IpCidrList) -> IpAddr {
    let mut client = peer.to_canonical();
    for hop in forwarded.iter().rev() {
        if !trusted.contains(client) {
            break;
        }
        let hop = hop.trim();
        let Some(addr) = hop
            .parse::<IpAddr>()
            .ok()
            .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        else {
            break;
        };
        client = addr.to_canonical();
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_counts_only_behind_trusted_proxies() {
        let none = IpCidrList::default();
        let proxies: IpCidrList = "10.0.0.0/8, fd00::/8".parse().unwrap();
        let peer = ip("10.0.0.2");
        // Without trusted proxies the header is the client's to invent.
        assert_eq!(client_address(peer, &["203.0.113.9"], &none), peer);
        assert_eq!(client_address(peer, &[], &proxies), peer);
        assert_eq!(
            client_address(peer, &["203.0.113.9"], &proxies),
            ip("203.0.113.9")
        );
        // A client-supplied prefix is ignored: the walk stops at the first untrusted hop.
        assert_eq!(
            client_address(peer, &["198.51.100.1", "203.0.113.9", "10.0.0.7"], &proxies),
            ip("203.0.113.9")
        );
        // An untrusted peer's header is ignored altogether.
        assert_eq!(
            client_address(ip("192.0.2.1"), &["203.0.113.9"], &proxies),
            ip("192.0.2.1")
        );
        // Ports, IPv4-mapped IPv6 and garbage.
        assert_eq!(
            client_address(peer, &["203.0.113.9:4711"], &proxies),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_address(ip("::ffff:10.0.0.2"), &["[2001:db8::1]:80"], &proxies),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_address(peer, &["203.0.113.9", "unknown", "10.0.0.7"], &proxies),
            ip("10.0.0.7")
        );
        // Only proxies all the way: the farthest one stands for the client.
        assert_eq!(
            client_address(peer, &["10.0.0.9", "10.0.0.7"], &proxies),
            ip("10.0.0.9")
        );
    }
}
