//! The port proxy: a request whose host is `{port}-{capsule_id}.{domain}` reaches TCP port
//! `port` inside that capsule, through the capsule's agent (`agent::port_proxy`), over
//! HTTP/1.1 with bodies streamed and upgrades (WebSockets) spliced, on any control-plane
//! replica. It is matched on the host name before the API's routes.
//!
//! Who may pass, checked before anything reaches the agent or the guest:
//! - anyone, on a port the capsule made public (`public_ports`);
//! - the holder of the capsule's traffic token (`POST /v1/capsules/{id}/traffic-token`), given
//!   once as `?wrenn_token=` (a `GET` is redirected without it and the token kept in a cookie
//!   scoped to that one host) or as that cookie, from the capsule's own pages only: every
//!   capsule is the same site, so another capsule's page must not ride on it;
//! - a caller of the capsule's team, by `X-API-Key` or `Authorization: Bearer <JWT>`.
//!
//! Anyone else gets 401, whether or not the capsule exists, and a caller of another team 404.
//! Wrenn's own credentials never reach the guest: the API key, any token Wrenn signed, the token
//! parameter and the cookie are removed. A guest cannot set Wrenn's cookie, nor one for another
//! host. A paused capsule is resumed by the request, as by any other call.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use super::auth::{bearer_token, AuthTeam, API_KEY_HEADER};
use super::error::ApiError;
use super::services::capsules::{self, network::PublicPorts, CapsuleError};
use super::state::AppState;
use crate::agent::wire::{port_proxy_path, FORWARDED_AUTHORIZATION, UPSTREAM_HEADER};
use crate::db::sandboxes;
use crate::forward::{remove_hop_headers, splice, wants_upgrade, Activity};
use crate::id::SandboxId;

/// The query parameter a traffic token is given in, once.
pub const TOKEN_PARAM: &str = "wrenn_token";
/// The cookie the token is kept in afterwards, scoped to the one host name; behind HTTPS it has
/// the `__Host-` prefix, which browsers accept only host-only, `Secure` and for `/`.
pub const TOKEN_COOKIE: &str = "wrenn_traffic";
const SECURE_TOKEN_COOKIE: &str = "__Host-wrenn_traffic";
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

/// What a host name is to the proxy.
#[derive(Debug, PartialEq, Eq)]
pub enum ProxyHost {
    /// `{port}-{capsule_id}.<domain>`.
    Port(u16, SandboxId),
    /// Under the configured domain, but no capsule's port: never the API's.
    Unknown,
    /// Not the proxy's: the API.
    Api,
}

/// What `host` names, given the proxy's domain.
pub fn target(host: &str, domain: Option<&ProxyDomain>) -> ProxyHost {
    let Ok(authority) = host.parse::<http::uri::Authority>() else {
        return ProxyHost::Api;
    };
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    let Some((label, rest)) = host.split_once('.') else {
        return ProxyHost::Api;
    };
    let under_domain = match domain {
        Some(domain) if rest == domain.0 => true,
        Some(_) => return ProxyHost::Api,
        None => false,
    };
    let parsed = label.split_once('-').and_then(|(port, id)| {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
        Some((port, id.parse::<SandboxId>().ok()?))
    });
    match parsed {
        Some((port, id)) if !rest.is_empty() => ProxyHost::Port(port, id),
        _ if under_domain => ProxyHost::Unknown,
        _ => ProxyHost::Api,
    }
}

/// The host a request was sent to: `Host`, or an HTTP/2 request's authority.
fn request_host(request: &Request) -> Option<String> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()))
}

/// The middleware in front of the API: proxies the requests for capsules' ports and passes the
/// rest on.
pub async fn route_ports(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(host) = request_host(&request) else {
        return next.run(request).await;
    };
    match target(&host, state.capsules.proxy_domain.as_ref()) {
        ProxyHost::Port(port, id) => proxy(state, host, port, id, request)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        ProxyHost::Unknown => {
            ApiError::NotFound(format!("`{host}` names no capsule's port")).into_response()
        }
        ProxyHost::Api => next.run(request).await,
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

/// Every `name=value` pair of the request's `Cookie` headers.
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
}

fn cookie_name(pair: &str) -> &str {
    pair.split_once('=').map_or(pair, |(name, _)| name).trim()
}

/// Every value of the traffic cookie (under either name) the request carries.
fn token_cookies(headers: &HeaderMap) -> Vec<&str> {
    cookie_pairs(headers)
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| is_token_cookie(key))
        .map(|(_, value)| value)
        .collect()
}

fn is_token_cookie(name: &str) -> bool {
    name == TOKEN_COOKIE || name == SECURE_TOKEN_COOKIE
}

/// Whether a request that carries only the cookie comes from the capsule's own pages, or is a
/// top-level navigation: every capsule's pages are the same site, so a `SameSite` cookie would
/// also go along with another capsule's page's requests and WebSockets.
fn from_own_pages(headers: &HeaderMap, method: &Method, public_host: &str) -> bool {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, host)| host);
        if !origin_host.is_some_and(|host| host.eq_ignore_ascii_case(public_host)) {
            return false;
        }
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match header("sec-fetch-site") {
        None | Some("same-origin") | Some("none") => true,
        Some(_) => {
            header("sec-fetch-mode") == Some("navigate")
                && matches!(*method, Method::GET | Method::HEAD)
        }
    }
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
    parts.headers.contains_key(API_KEY_HEADER) || bearer_token(&parts.headers).is_some()
}

/// Who the capsule is, as far as the caller may learn it.
struct Known {
    /// `None` when there is no such capsule: refused as a private port of another team's is.
    team: Option<uuid::Uuid>,
    public: bool,
}

async fn admit(
    state: &AppState,
    parts: &mut Parts,
    id: SandboxId,
    known: &Known,
    public_host: &str,
    query_token: Option<&str>,
) -> Result<Access, ApiError> {
    if known.public {
        return Ok(Access::Public);
    }
    if let Some(token) = query_token {
        let exp = traffic_token(state, id, token)?;
        return Ok(Access::Token {
            from_query: Some((token.to_owned(), exp)),
        });
    }
    if from_own_pages(&parts.headers, &parts.method, public_host)
        && token_cookies(&parts.headers)
            .into_iter()
            .any(|token| traffic_token(state, id, token).is_ok())
    {
        return Ok(Access::Token { from_query: None });
    }
    if !has_team_credentials(parts) {
        return Err(ApiError::Unauthorized(format!(
            "this port of the capsule is not public: send X-API-Key or Authorization: Bearer \
             <token>, or open it with ?{TOKEN_PARAM}=<traffic token>"
        )));
    }
    let caller = AuthTeam::from_request_parts(parts, state).await?;
    if Some(caller.team_id.uuid()) != known.team {
        return Err(CapsuleError::NotFound.into());
    }
    Ok(Access::Team)
}

/// The `Set-Cookie` that keeps a traffic token for this host until it expires.
fn token_cookie(token: &str, exp: u64, secure: bool) -> HeaderValue {
    let max_age = exp.saturating_sub(now_secs());
    let (name, secure) = if secure {
        (SECURE_TOKEN_COOKIE, "; Secure")
    } else {
        (TOKEN_COOKIE, "")
    };
    HeaderValue::from_str(&format!(
        "{name}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"
    ))
    .expect("JWTs are header-safe")
}

/// A guest's `Set-Cookie` as the browser may take it: host-only (a `Domain` would reach every
/// capsule, and whatever else shares the domain), and never one of Wrenn's names.
fn guest_cookie(value: &HeaderValue) -> Option<HeaderValue> {
    let text = value.to_str().ok()?;
    let mut attributes = text.split(';');
    let pair = attributes.next()?.trim();
    if is_token_cookie(cookie_name(pair)) {
        return None;
    }
    let kept: Vec<&str> = std::iter::once(pair)
        .chain(
            attributes
                .map(str::trim)
                .filter(|a| !a.to_ascii_lowercase().starts_with("domain=")),
        )
        .collect();
    HeaderValue::from_str(&kept.join("; ")).ok()
}

/// The scheme the client used: what a trusted reverse proxy in front says, else plain HTTP
/// (the control plane itself serves no TLS).
fn client_scheme_is_https(headers: &HeaderMap, behind_proxy: bool) -> bool {
    behind_proxy
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// The client's request made the agent's: Wrenn's credentials removed, the client's own
/// `Authorization` moved aside (the agent secret takes its place), and where it came from added.
fn agent_headers(
    state: &AppState,
    headers: &mut HeaderMap,
    upgrade: bool,
    public_host: &str,
    secure: bool,
    peer: Option<IpAddr>,
    behind_proxy: bool,
) {
    remove_hop_headers(headers, upgrade);
    // The agent is dialled by its own name; the public one travels as `X-Forwarded-Host`.
    headers.remove(header::HOST);
    headers.remove(API_KEY_HEADER);
    headers.remove(FORWARDED_AUTHORIZATION);
    headers.remove(UPSTREAM_HEADER);
    // Any token Wrenn signed (expired, of a retired secret, a host's) is Wrenn's.
    let wrenn_token = bearer_token(headers).is_some_and(|token| state.tokens.signed_here(token));
    if let Some(authorization) = headers.remove(header::AUTHORIZATION) {
        if !wrenn_token {
            headers.insert(FORWARDED_AUTHORIZATION, authorization);
        }
    }
    let cookies: Vec<String> = cookie_pairs(headers)
        .filter(|pair| !is_token_cookie(cookie_name(pair)))
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&cookies.join("; ")) {
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
    // A trusted proxy's chain is extended; anyone else's is theirs to invent, and replaced.
    let earlier = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .filter(|_| behind_proxy)
        .map(str::to_owned);
    headers.remove("x-forwarded-for");
    if let Some(peer) = peer {
        let chain = match earlier {
            Some(earlier) => format!("{earlier}, {peer}"),
            None => peer.to_string(),
        };
        if let Ok(chain) = HeaderValue::from_str(&chain) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), chain);
        }
    }
}

async fn proxy(
    state: AppState,
    public_host: String,
    port: u16,
    id: SandboxId,
    request: Request,
) -> Result<Response, ApiError> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let behind_proxy = peer.is_some_and(|peer| state.auth.trusted_proxies.contains(peer));
    let secure = client_scheme_is_https(request.headers(), behind_proxy);
    let (query, query_token) = split_token(request.uri().query());
    // One leading slash: `//other.site/` is a path here, but a redirect to another site there.
    let path = format!("/{}", request.uri().path().trim_start_matches('/'));
    let path_and_query = match &query {
        Some(query) => format!("{path}?{query}"),
        None => path.clone(),
    };

    let found = sandboxes::proxy_route(&state.db, id.uuid()).await?;
    let known = Known {
        team: found.as_ref().map(|f| f.team_id),
        public: found
            .as_ref()
            .is_some_and(|f| PublicPorts::from_column(&f.public_ports).contains(port)),
    };
    let (mut parts, body) = request.into_parts();
    let access = admit(
        &state,
        &mut parts,
        id,
        &known,
        &public_host,
        query_token.as_deref(),
    )
    .await?;
    let found = found.ok_or(CapsuleError::NotFound)?;
    let set_cookie = match &access {
        Access::Token {
            from_query: Some((token, exp)),
        } => Some(token_cookie(token, *exp, secure)),
        Access::Token { from_query: None } | Access::Public | Access::Team => None,
    };
    let upgrade = wants_upgrade(&parts.headers);
    // A browser opening a link with the token lands on the same page without it in the URL
    // (a WebSocket cannot follow a redirect: it gets the cookie with its answer instead).
    let navigation = matches!(parts.method, Method::GET | Method::HEAD) && !upgrade;
    if let (Some(cookie), true) = (&set_cookie, navigation) {
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
    let mut request = Request::from_parts(parts, body);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    agent_headers(
        &state,
        &mut parts.headers,
        upgrade,
        &public_host,
        secure,
        peer,
        behind_proxy,
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
    if from_guest {
        let cookies: Vec<HeaderValue> = upstream
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(guest_cookie)
            .collect();
        upstream.headers_mut().remove(header::SET_COOKIE);
        for cookie in cookies {
            upstream.headers_mut().append(header::SET_COOKIE, cookie);
        }
    }
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
        let activity = Activity::new(state.capsules.proxy_idle_timeout);
        tokio::spawn(async move {
            let (Ok(client), Ok(agent)) = (client_upgrade.await, agent_upgrade.await) else {
                return;
            };
            splice(TokioIo::new(client), TokioIo::new(agent), activity).await;
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
            ProxyHost::Port(8888, id)
        );
        let domain: ProxyDomain = "Sandboxes.Example.com".parse().unwrap();
        let host = format!("3000-{ID}.sandboxes.example.com");
        assert_eq!(target(&host, Some(&domain)), ProxyHost::Port(3000, id));
        assert_eq!(
            target(&host.to_uppercase(), Some(&domain)),
            ProxyHost::Port(3000, id)
        );
        for unknown in [
            format!("0-{ID}.sandboxes.example.com"),
            format!("70000-{ID}.sandboxes.example.com"),
            format!("x-{ID}.sandboxes.example.com"),
            "3000-cl-short.sandboxes.example.com".to_owned(),
            "api.sandboxes.example.com".to_owned(),
        ] {
            assert_eq!(
                target(&unknown, Some(&domain)),
                ProxyHost::Unknown,
                "{unknown}"
            );
        }
        for api in [
            format!("3000-{ID}.other.example.com"),
            "sandboxes.example.com".to_owned(),
            format!("3000-{ID}"),
            "not a host".to_owned(),
        ] {
            assert_eq!(target(&api, Some(&domain)), ProxyHost::Api, "{api}");
        }
        assert_eq!(target("127.0.0.1:8000", None), ProxyHost::Api);
        assert_eq!(target("localhost:8000", None), ProxyHost::Api);
        assert_eq!(target("api.example.com", None), ProxyHost::Api);
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
    fn every_traffic_cookie_is_found_under_either_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "theme=dark; wrenn_traffic=planted; __Host-wrenn_traffic=abc.def"
                .parse()
                .unwrap(),
        );
        assert_eq!(token_cookies(&headers), vec!["planted", "abc.def"]);
    }

    #[test]
    fn the_cookie_counts_only_from_the_capsules_own_pages_and_navigations() {
        let host = "8888-cl-x.example.com";
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, value.parse().unwrap());
            }
            headers
        };
        assert!(from_own_pages(&with(&[]), &Method::GET, host));
        let own = with(&[
            ("origin", "https://8888-cl-x.example.com"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(from_own_pages(&own, &Method::POST, host));
        let sibling = with(&[
            ("origin", "https://80-cl-y.example.com"),
            ("sec-fetch-site", "same-site"),
        ]);
        assert!(!from_own_pages(&sibling, &Method::GET, host));
        let sibling_fetch = with(&[("sec-fetch-site", "same-site"), ("sec-fetch-mode", "cors")]);
        assert!(!from_own_pages(&sibling_fetch, &Method::GET, host));
        let link = with(&[
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate"),
        ]);
        assert!(from_own_pages(&link, &Method::GET, host));
        assert!(!from_own_pages(&link, &Method::POST, host));
        assert!(!from_own_pages(
            &with(&[("origin", "null")]),
            &Method::GET,
            host
        ));
    }

    #[test]
    fn guest_cookies_stay_on_their_host_and_off_wrenns_names() {
        let kept = guest_cookie(&HeaderValue::from_static(
            "session=1; Domain=example.com; Path=/; HttpOnly",
        ))
        .unwrap();
        assert_eq!(kept, "session=1; Path=/; HttpOnly");
        for ours in [
            "wrenn_traffic=x; Path=/",
            "__Host-wrenn_traffic=x; Secure; Path=/",
        ] {
            assert_eq!(
                guest_cookie(&HeaderValue::from_static(ours)),
                None,
                "{ours}"
            );
        }
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
