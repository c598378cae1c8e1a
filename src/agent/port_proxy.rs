//! The agent's half of the port proxy: `/v1/sandboxes/{id}/ports/{port}/<path>` from the control
//! plane becomes `<path>` on TCP port `port` in the sandbox, over HTTP/1.1 with both bodies
//! streamed and upgrades (WebSockets) spliced end to end. A service listening on all of the
//! guest's interfaces is dialled directly; one listening only on the guest's loopback is reached
//! through envd (`EnvdClient::connect_port`). Each connection keeps its sandbox active (a paused
//! one is resumed first), counts against the sandbox's connection limit, and ends after a time
//! with no traffic either way.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawPathParams, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::api::{AgentState, ApiError};
use super::wire::{FORWARDED_AUTHORIZATION, UPSTREAM_HEADER};
use crate::agent::network::GUEST_IP;
use crate::config::AgentConfig;
use crate::envd::client::EnvdClientError;
use crate::error_code::ErrorCode;
use crate::forward::{remove_hop_headers, splice, wants_upgrade, Activity, Tracked};

/// How long the guest's port has to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds on what the port proxy holds open for one sandbox.
#[derive(Debug, Clone, Copy)]
pub struct PortProxySettings {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

impl PortProxySettings {
    pub fn from_config(agent: &AgentConfig) -> Self {
        Self {
            max_connections: agent.port_proxy_max_connections.max(1),
            idle_timeout: Duration::from_secs(agent.port_proxy_idle_timeout_secs.max(1)),
        }
    }
}

trait Connection: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Connection for T {}

fn refused(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(status, code, message)
}

/// The port in the path: any TCP port but envd's own, which the proxy must not expose.
fn guest_port(raw: &str) -> Result<u16, ApiError> {
    let port: u16 = raw.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
        refused(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            format!("`{raw}` is not a TCP port"),
        )
    })?;
    if port == crate::envd::api::DEFAULT_PORT {
        return Err(refused(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("port {port} is the guest agent's, not a capsule service's"),
        ));
    }
    Ok(port)
}

/// The path and query the guest sees: what follows `/v1/sandboxes/{id}/ports/{port}`.
fn guest_uri(uri: &Uri, id: &str, port: &str) -> Result<Uri, ApiError> {
    let prefix = format!("/v1/sandboxes/{id}/ports/{port}");
    let rest = uri.path().strip_prefix(&prefix).unwrap_or("");
    let path = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    path_and_query.parse().map_err(|_| {
        refused(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "malformed path",
        )
    })
}

/// The control plane's request made the guest's: the agent's credential goes, the client's own
/// `Authorization` (moved aside by the control plane) comes back, and the guest sees the public
/// host name it was asked for.
fn guest_headers(headers: &mut HeaderMap, upgrade: bool) {
    remove_hop_headers(headers, upgrade);
    headers.remove(header::AUTHORIZATION);
    if let Some(authorization) = headers.remove(FORWARDED_AUTHORIZATION) {
        headers.insert(header::AUTHORIZATION, authorization);
    }
    if let Some(host) = headers.get("x-forwarded-host").cloned() {
        headers.insert(header::HOST, host);
    }
}

/// A `Location` the guest wrote for its own address (`http://localhost:8888/lab`, say) made
/// the public one; paths and other sites are left alone.
fn public_location(
    location: &str,
    port: u16,
    guest: Ipv4Addr,
    public: Option<&str>,
) -> Option<String> {
    let public = public?;
    let uri: Uri = location.parse().ok()?;
    let authority = uri.authority()?;
    // The guest knows itself by its own address; the host reaches it by another.
    let own = [
        "localhost",
        "127.0.0.1",
        "0.0.0.0",
        "[::1]",
        &GUEST_IP.to_string(),
        &guest.to_string(),
    ]
    .contains(&authority.host());
    if !own || authority.port_u16().is_some_and(|p| p != port) {
        return None;
    }
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    Some(format!("{public}{path_and_query}"))
}

/// A connection to `port` in the sandbox: direct when the guest listens on its interface,
/// through envd when it listens on its loopback only.
async fn dial(
    guest: Ipv4Addr,
    port: u16,
    envd: &crate::envd::client::EnvdClient,
) -> Result<Box<dyn Connection>, ApiError> {
    let addr = SocketAddr::from((guest, port));
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            return Ok(Box::new(stream));
        }
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {}
        Ok(Err(error)) => {
            return Err(refused(
                StatusCode::BAD_GATEWAY,
                ErrorCode::PortClosed,
                format!("port {port} in the capsule: {error}"),
            ))
        }
        Err(_) => {
            return Err(refused(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::PortClosed,
                format!(
                    "port {port} in the capsule did not accept within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            ))
        }
    }
    match envd.connect_port(port).await {
        Ok(tunnel) => Ok(Box::new(TokioIo::new(tunnel))),
        Err(EnvdClientError::Api { detail, .. }) if detail.code == ErrorCode::PortClosed => {
            Err(refused(
                StatusCode::BAD_GATEWAY,
                ErrorCode::PortClosed,
                detail.message,
            ))
        }
        Err(error) => Err(refused(
            StatusCode::BAD_GATEWAY,
            ErrorCode::AgentError,
            format!("envd: {error}"),
        )),
    }
}

/// `/v1/sandboxes/{id}/ports/{port}[/<path>]`: the request forwarded to the guest's port.
pub(super) async fn proxy_port(
    State(state): State<AgentState>,
    params: RawPathParams,
    request: Request,
) -> Response {
    // Raw: the rest of the path is the guest's to decode (or not), whatever bytes it holds.
    let param = |name: &str| {
        params
            .iter()
            .find_map(|(key, value)| (key == name).then(|| value.to_owned()))
            .unwrap_or_default()
    };
    match forward(state, &param("id"), &param("port"), request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn forward(
    state: AgentState,
    raw_id: &str,
    raw_port: &str,
    mut request: Request,
) -> Result<Response, ApiError> {
    let id = super::api::sandbox_id(raw_id)?;
    let port = guest_port(raw_port)?;
    let settings = state.port_proxy;
    let route = state
        .sandboxes
        .port_route(&id.to_string(), settings.max_connections)
        .await?;
    let upgrade = wants_upgrade(request.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let public = request
        .headers()
        .get("x-forwarded-host")
        .and_then(|h| h.to_str().ok())
        .map(|host| {
            let scheme = request
                .headers()
                .get("x-forwarded-proto")
                .and_then(|p| p.to_str().ok())
                .filter(|p| *p == "https")
                .unwrap_or("http");
            format!("{scheme}://{host}")
        });

    let (mut parts, body) = request.into_parts();
    let body = Body::new(body.map_frame(|frame| {
        if let Some(data) = frame.data_ref() {
            super::prometheus::proxied(data.len() as u64, 0);
        }
        frame
    }));
    parts.uri = guest_uri(&parts.uri, raw_id, raw_port)?;
    guest_headers(&mut parts.headers, upgrade);

    // One clock for the whole exchange: the guest's connection, and after an upgrade the
    // client's too. A guest that stops answering, or a client that stops reading (so the guest
    // is no longer read either), ends it at the idle time, with its slot and lease.
    let activity = Activity::new(settings.idle_timeout);
    let connection = dial(route.guest, port, &route.envd).await?;
    let connection = TokioIo::new(Tracked::new(connection, activity.clone()));
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(connection)
        .await
        .map_err(|e| {
            refused(
                StatusCode::BAD_GATEWAY,
                ErrorCode::PortClosed,
                format!("port {port} in the capsule: {e}"),
            )
        })?;
    let idled = activity.clone().idled();
    tokio::spawn(async move {
        tokio::select! {
            ended = conn.with_upgrades() => if let Err(error) = ended {
                tracing::debug!(%error, "a proxied connection to a capsule's port ended");
            },
            () = idled => tracing::debug!("a proxied connection to a capsule's port went idle"),
        }
    });
    let idle = activity.idle_timeout().as_secs();
    let silent = || {
        refused(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::PortClosed,
            format!("port {port} in the capsule did not answer within {idle} s"),
        )
    };
    let mut upstream = activity
        .clone()
        .unless_idle(sender.send_request(Request::from_parts(parts, body)))
        .await
        .ok_or_else(silent)?
        .map_err(|e| {
            // The connection's own watchdog may have closed it first.
            if activity.is_idle() {
                return silent();
            }
            refused(
                StatusCode::BAD_GATEWAY,
                ErrorCode::PortClosed,
                format!("port {port} in the capsule did not answer: {e}"),
            )
        })?;

    let switching = upstream.status() == StatusCode::SWITCHING_PROTOCOLS;
    remove_hop_headers(upstream.headers_mut(), switching);
    if let Some(location) = upstream
        .headers()
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| public_location(l, port, route.guest, public.as_deref()))
        .and_then(|l| HeaderValue::from_str(&l).ok())
    {
        upstream.headers_mut().insert(header::LOCATION, location);
    }
    upstream.headers_mut().insert(
        HeaderName::from_static(UPSTREAM_HEADER),
        HeaderValue::from_static("guest"),
    );

    if switching {
        let Some(client_upgrade) = client_upgrade else {
            return Err(refused(
                StatusCode::BAD_GATEWAY,
                ErrorCode::AgentError,
                "the capsule's service switched protocols unasked",
            ));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut upstream);
        tokio::spawn(async move {
            let _route = route;
            let (Ok(client), Ok(server)) = (client_upgrade.await, upstream_upgrade.await) else {
                return;
            };
            let (to_guest, from_guest) =
                splice(TokioIo::new(client), TokioIo::new(server), activity).await;
            super::prometheus::proxied(to_guest, from_guest);
        });
        let (parts, body) = upstream.into_parts();
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    // The route (the sandbox's activity lease and connection slot) lives as long as the body:
    // a server-sent event stream is a connection in use for as long as it lasts.
    let (parts, body) = upstream.into_parts();
    let body = body.map_frame(move |frame| {
        let _route = &route;
        if let Some(data) = frame.data_ref() {
            super::prometheus::proxied(0, data.len() as u64);
        }
        frame
    });
    Ok(Response::from_parts(parts, Body::new(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_sees_the_path_after_the_port() {
        let id = "cl-0000000000000000000000001";
        let uri: Uri = format!("/v1/sandboxes/{id}/ports/8888/api/kernels?x=1")
            .parse()
            .unwrap();
        assert_eq!(guest_uri(&uri, id, "8888").unwrap(), "/api/kernels?x=1");
        let root: Uri = format!("/v1/sandboxes/{id}/ports/8888").parse().unwrap();
        assert_eq!(guest_uri(&root, id, "8888").unwrap(), "/");
    }

    #[test]
    fn ports_are_checked_and_envds_is_not_served() {
        assert_eq!(guest_port("8888").unwrap(), 8888);
        for bad in ["0", "65536", "-1", "http", ""] {
            assert!(guest_port(bad).is_err(), "{bad}");
        }
        let error = guest_port("49983").unwrap_err();
        assert_eq!(error.into_response().status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn the_agents_secret_never_reaches_the_guest_and_the_clients_authorization_does() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "Bearer agent-secret".parse().unwrap(),
        );
        headers.insert(FORWARDED_AUTHORIZATION, "Basic dTpw".parse().unwrap());
        headers.insert(header::HOST, "127.0.0.1:7000".parse().unwrap());
        headers.insert("x-forwarded-host", "8888-cl-x.example.com".parse().unwrap());
        guest_headers(&mut headers, false);
        assert_eq!(headers[header::AUTHORIZATION], "Basic dTpw");
        assert_eq!(headers[header::HOST], "8888-cl-x.example.com");
        assert!(!headers.contains_key(FORWARDED_AUTHORIZATION));
    }

    #[test]
    fn locations_for_the_guests_own_address_become_public() {
        let guest = Ipv4Addr::new(10, 11, 0, 2);
        let public = Some("https://8888-cl-x.example.com");
        for own in [
            "http://localhost:8888/lab?x=1",
            "http://127.0.0.1:8888/lab?x=1",
            "http://10.11.0.2:8888/lab?x=1",
            "http://169.254.0.21:8888/lab?x=1",
        ] {
            assert_eq!(
                public_location(own, 8888, guest, public).as_deref(),
                Some("https://8888-cl-x.example.com/lab?x=1"),
                "{own}"
            );
        }
        for theirs in ["/lab", "https://github.com/login", "http://localhost:9000/"] {
            assert_eq!(
                public_location(theirs, 8888, guest, public),
                None,
                "{theirs}"
            );
        }
    }
}
