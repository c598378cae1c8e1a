//! The port proxy: a request whose host is `{port}-{capsule_id}.{domain}` reaches TCP port
//! `port` inside that capsule, through the capsule's agent (`agent::port_proxy`), over
//! HTTP/1.1 with bodies streamed and upgrades (WebSockets) spliced, on any control-plane
//! replica. It is matched on the host name before the API's routes.
//!
//! Who may pass, checked before anything reaches the agent or the guest:
//! - anyone, on a port the capsule made public (`public_ports`);
//! - the holder of the capsule's traffic token (`POST /v1/capsules/{id}/traffic-token`), given
//!   once as `?wrenn_token=` (a `GET` is redirected without it and the token kept in a cookie
//!   scoped to that one host) or as that cookie;
//! - a caller of the capsule's team, by `X-API-Key` or `Authorization: Bearer <JWT>`.
//!
//! Anyone else gets 401, and a caller of another team 404. Wrenn's own credentials never reach
//! the guest: the API key, a Wrenn JWT, the token parameter and the cookie are removed. A paused
//! capsule is resumed by the request, as by any other call.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use super::auth::{AuthTeam, API_KEY_HEADER};
use super::error::ApiError;
use super::services::capsules::{self, ports::PublicPorts, CapsuleError};
use super::state::AppState;
use crate::agent::wire::{port_proxy_path, FORWARDED_AUTHORIZATION, UPSTREAM_HEADER};
use crate::db::sandboxes;
use crate::forward::{remove_hop_headers, wants_upgrade};
use crate::id::SandboxId;

/// The query parameter a traffic token is given in, once.
pub const TOKEN_PARAM: &str = "wrenn_token";
/// The cookie the token is kept in afterwards, scoped to the one host name.
pub const TOKEN_COOKIE: &str = "wrenn_traffic";
/// How long a traffic token lives unless asked otherwise, and at most.
pub const TRAFFIC_TOKEN_TTL: Duration = Duration::from_secs(3600);
pub const TRAFFIC_TOKEN_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// `cp.proxy_domain`: the host names the proxy answers are `{port}-{capsule_id}.<this>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyDomain(String);

#[derive(Debug, thiserror::Error)]
#[error(
    "cp.proxy_domain `{0}` is not a host name (with an optional :port), as `sandboxes.example.com`"
)]
pub struct ProxyDomainError(String);

impl FromStr for ProxyDomain {
    type Err = ProxyDomainError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let bad = || ProxyDomainError(raw.to_owned());
        let authority: http::uri::Authority = raw.trim().parse().map_err(|_| bad())?;
        let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
        let valid = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid || authority.as_str().contains('@') {
            return Err(bad());
        }
        Ok(Self(host))
    }
}

/// The capsule and port a host name names, if it is one of the proxy's.
pub fn target(host: &str, domain: Option<&ProxyDomain>) -> Option<(u16, SandboxId)> {
    let authority: http::uri::Authority = host.parse().ok()?;
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    let (label, rest) = host.split_once('.')?;
    match domain {
        Some(domain) if rest != domain.0 => return None,
        _ if rest.is_empty() => return None,
        _ => {}
    }
    let (port, id) = label.split_once('-')?;
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    Some((port, id.parse().ok()?))
}

/// The middleware in front of the API: proxies the requests for capsules' ports and passes the
/// rest on.
pub async fn route_ports(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    match host.and_then(|h| target(h, state.capsules.proxy_domain.as_ref())) {
        Some((port, id)) => proxy(state, port, id, request)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        None => next.run(request).await,
    }
}

/// How the caller got in, which decides what of its credentials the guest must not see.
enum Access {
    Public,
    /// The traffic token, from the query (to be made a cookie) or from the cookie.
    Token {
        from_query: Option<(String, u64)>,
    },
    Team,
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

/// The query without the token parameter, and the token.
fn split_token(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut token = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((TOKEN_PARAM, value)) => {
                token = Some(value.to_owned());
                false
            }
            _ => *pair != TOKEN_PARAM,
        })
        .collect();
    let rest = (!rest.is_empty()).then(|| rest.join("&"));
    (rest, token)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks a traffic token for capsule `id`; answers its expiry.
fn traffic_token(state: &AppState, id: SandboxId, token: &str) -> Result<u64, ApiError> {
    let claims = state
        .tokens
        .verify_traffic(token)
        .map_err(|e| ApiError::Unauthorized(format!("traffic token rejected: {e}")))?;
    if claims.sub != id {
        return Err(ApiError::Unauthorized(
            "the traffic token is for another capsule".into(),
        ));
    }
    Ok(claims.exp)
}

fn has_team_credentials(parts: &Parts) -> bool {
    parts.headers.contains_key(API_KEY_HEADER)
        || parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "))
}

async fn admit(
    state: &AppState,
    parts: &mut Parts,
    id: SandboxId,
    team: uuid::Uuid,
    public: bool,
    query_token: Option<&str>,
) -> Result<Access, ApiError> {
    if let Some(token) = query_token {
        let exp = traffic_token(state, id, token)?;
        return Ok(Access::Token {
            from_query: Some((token.to_owned(), exp)),
        });
    }
    if public {
        return Ok(Access::Public);
    }
    if let Some(token) = cookie(&parts.headers, TOKEN_COOKIE) {
        if traffic_token(state, id, token).is_ok() {
            return Ok(Access::Token { from_query: None });
        }
    }
    if !has_team_credentials(parts) {
        return Err(ApiError::Unauthorized(format!(
            "this port of the capsule is not public: send X-API-Key or Authorization: Bearer \
             <token>, or open it with ?{TOKEN_PARAM}=<traffic token>"
        )));
    }
    let caller = AuthTeam::from_request_parts(parts, state).await?;
    if caller.team_id.uuid() != team {
        return Err(CapsuleError::NotFound.into());
    }
    Ok(Access::Team)
}

/// The `Set-Cookie` that keeps a traffic token for this host until it expires.
fn token_cookie(token: &str, exp: u64, secure: bool) -> HeaderValue {
    let max_age = exp.saturating_sub(now_secs());
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{TOKEN_COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"
    ))
    .expect("JWTs are header-safe")
}

/// The client's request made the agent's: Wrenn's credentials removed, the client's own
/// `Authorization` moved aside (the agent secret takes its place), and where it came from added.
fn agent_headers(
    state: &AppState,
    headers: &mut HeaderMap,
    upgrade: bool,
    public_host: &str,
    secure: bool,
    client: Option<SocketAddr>,
) {
    remove_hop_headers(headers, upgrade);
    // The agent is dialled by its own name; the public one travels as `X-Forwarded-Host`.
    headers.remove(header::HOST);
    headers.remove(API_KEY_HEADER);
    headers.remove(FORWARDED_AUTHORIZATION);
    headers.remove(UPSTREAM_HEADER);
    if let Some(authorization) = headers.remove(header::AUTHORIZATION) {
        let wrenn_jwt = authorization
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .is_some_and(|(_, token)| state.tokens.verify_user(token.trim()).is_ok());
        if !wrenn_jwt {
            headers.insert(FORWARDED_AUTHORIZATION, authorization);
        }
    }
    let cookies: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            !pair.is_empty() && pair.split_once('=').map(|(k, _)| k) != Some(TOKEN_COOKIE)
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if let Ok(value) = HeaderValue::from_str(&cookies.join("; ")) {
        if !cookies.is_empty() {
            headers.insert(header::COOKIE, value);
        }
    }
    if let Ok(host) = HeaderValue::from_str(public_host) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if secure { "https" } else { "http" }),
    );
    if let Some(client) = client {
        let chain = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {}", client.ip()),
            None => client.ip().to_string(),
        };
        if let Ok(chain) = HeaderValue::from_str(&chain) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), chain);
        }
    }
}

async fn proxy(
    state: AppState,
    port: u16,
    id: SandboxId,
    request: Request,
) -> Result<Response, ApiError> {
    let public_host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // Behind a TLS-terminating proxy the client's scheme is what that proxy says it was.
    let secure = request
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let (query, query_token) = split_token(request.uri().query());
    let path = request.uri().path().to_owned();
    let path_and_query = match &query {
        Some(query) => format!("{path}?{query}"),
        None => path.clone(),
    };

    let found = sandboxes::proxy_route(&state.db, id.uuid())
        .await?
        .ok_or(CapsuleError::NotFound)?;
    let public = PublicPorts::from_column(&found.public_ports).contains(port);
    let (mut parts, body) = request.into_parts();
    let access = admit(
        &state,
        &mut parts,
        id,
        found.team_id,
        public,
        query_token.as_deref(),
    )
    .await?;
    let set_cookie = match &access {
        Access::Token {
            from_query: Some((token, exp)),
        } => Some(token_cookie(token, *exp, secure)),
        Access::Token { from_query: None } | Access::Public | Access::Team => None,
    };
    // A browser opening a link with the token lands on the same page without it in the URL.
    let safe_method = matches!(parts.method, http::Method::GET | http::Method::HEAD);
    if let (Some(cookie), true) = (&set_cookie, safe_method) {
        let mut response = StatusCode::SEE_OTHER.into_response();
        let location = HeaderValue::from_str(&path_and_query).map_err(|_| {
            ApiError::InvalidRequest("the request's path is not a valid location".into())
        })?;
        response.headers_mut().insert(header::LOCATION, location);
        response
            .headers_mut()
            .insert(header::SET_COOKIE, cookie.clone());
        return Ok(response);
    }

    let capsule = capsules::ready(&state, id, found.route).await?;
    let upgrade = wants_upgrade(&parts.headers);
    let mut request = Request::from_parts(parts, body);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    agent_headers(
        &state,
        &mut parts.headers,
        upgrade,
        &public_host,
        secure,
        client,
    );
    parts.uri = port_proxy_path(id, port, &path_and_query)
        .parse()
        .map_err(|_| ApiError::InvalidRequest("malformed path".into()))?;
    let mut upstream = state
        .capsules
        .agents
        .forward_port(&capsule.target, Request::from_parts(parts, body))
        .await
        .map_err(ApiError::from)?;

    let from_guest = upstream.headers_mut().remove(UPSTREAM_HEADER).is_some();
    if !from_guest && upstream.status() == StatusCode::UNAUTHORIZED {
        // The agent refused the control plane itself: nothing the client can mend.
        return Err(ApiError::AgentFailed(format!(
            "host agent {} refused the control plane's credentials",
            capsule.target.host
        )));
    }
    let switching = upstream.status() == StatusCode::SWITCHING_PROTOCOLS;
    remove_hop_headers(upstream.headers_mut(), switching);
    if let Some(cookie) = set_cookie {
        upstream.headers_mut().append(header::SET_COOKIE, cookie);
    }
    if switching {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ApiError::AgentFailed(
                "the capsule's service switched protocols unasked".into(),
            ));
        };
        let agent_upgrade = hyper::upgrade::on(&mut upstream);
        tokio::spawn(async move {
            let (Ok(client), Ok(agent)) = (client_upgrade.await, agent_upgrade.await) else {
                return;
            };
            let (mut client, mut agent) = (TokioIo::new(client), TokioIo::new(agent));
            let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
        });
    }
    let (parts, body) = upstream.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// A traffic token's lifetime as asked for (`expires_in` seconds), within the allowed range.
pub fn traffic_token_ttl(expires_in: Option<i64>) -> Result<Duration, ApiError> {
    match expires_in {
        None => Ok(TRAFFIC_TOKEN_TTL),
        Some(secs) => u64::try_from(secs)
            .ok()
            .filter(|s| (60..=TRAFFIC_TOKEN_MAX_TTL.as_secs()).contains(s))
            .map(Duration::from_secs)
            .ok_or_else(|| {
                ApiError::InvalidRequest(format!(
                    "expires_in must be 60..={} seconds",
                    TRAFFIC_TOKEN_MAX_TTL.as_secs()
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "cl-00000000000000000000000ab";

    #[test]
    fn proxy_hosts_name_a_port_and_a_capsule() {
        let id: SandboxId = ID.parse().unwrap();
        assert_eq!(
            target(&format!("8888-{ID}.localhost:8000"), None),
            Some((8888, id))
        );
        let domain: ProxyDomain = "Sandboxes.Example.com".parse().unwrap();
        let host = format!("3000-{ID}.sandboxes.example.com");
        assert_eq!(target(&host, Some(&domain)), Some((3000, id)));
        assert_eq!(
            target(&host.to_uppercase(), Some(&domain)),
            Some((3000, id))
        );
        for not_ours in [
            format!("3000-{ID}.other.example.com"),
            format!("0-{ID}.sandboxes.example.com"),
            format!("70000-{ID}.sandboxes.example.com"),
            format!("x-{ID}.sandboxes.example.com"),
            "3000-cl-short.sandboxes.example.com".to_owned(),
            "api.sandboxes.example.com".to_owned(),
            "sandboxes.example.com".to_owned(),
            format!("3000-{ID}"),
        ] {
            assert_eq!(target(&not_ours, Some(&domain)), None, "{not_ours}");
        }
        assert_eq!(target("127.0.0.1:8000", None), None);
        assert_eq!(target("localhost:8000", None), None);
    }

    #[test]
    fn proxy_domains_are_host_names() {
        assert_eq!(
            "localhost:8000".parse::<ProxyDomain>().unwrap(),
            ProxyDomain("localhost".into())
        );
        for bad in [
            "",
            "https://x.com",
            "a..b",
            "x.com/path",
            "user@x.com",
            "*.x.com",
        ] {
            assert!(bad.parse::<ProxyDomain>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_token_parameter_is_taken_out_of_the_query() {
        assert_eq!(split_token(None), (None, None));
        assert_eq!(
            split_token(Some("a=1&wrenn_token=T&b=2")),
            (Some("a=1&b=2".into()), Some("T".into()))
        );
        assert_eq!(split_token(Some("wrenn_token=T")), (None, Some("T".into())));
        assert_eq!(split_token(Some("a=1")), (Some("a=1".into()), None));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "theme=dark; wrenn_traffic=abc.def; x=y".parse().unwrap(),
        );
        assert_eq!(cookie(&headers, TOKEN_COOKIE), Some("abc.def"));
        assert_eq!(cookie(&headers, "missing"), None);
    }

    #[test]
    fn traffic_token_lifetimes_are_bounded() {
        assert_eq!(traffic_token_ttl(None).unwrap(), TRAFFIC_TOKEN_TTL);
        assert_eq!(traffic_token_ttl(Some(600)).unwrap().as_secs(), 600);
        for bad in [-1, 0, 59, 7 * 24 * 3600 + 1] {
            assert!(traffic_token_ttl(Some(bad)).is_err(), "{bad}");
        }
    }
}
