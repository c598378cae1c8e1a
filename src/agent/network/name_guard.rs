//! The name guard: where a policy admits an address only because an allowed name resolved to it
//! (and refuses by default), TCP connections to it on ports 80 and 443 are redirected here
//! inside the sandbox's namespace, and pass only when the name they ask the server for is an
//! allowed name that this sandbox's own look-ups resolved to that address. That keeps a guest
//! from reaching other names on a shared address (a CDN).
//! - On 443 the name is the TLS ClientHello's SNI. The bytes read to find it are sent on
//!   unchanged and the connection is then spliced; what is inside TLS (an HTTP `Host` that
//!   differs from the SNI: "domain fronting") cannot be seen without decrypting, and passes.
//! - On 80 every request of the connection is checked, by its `Host` and by the authority of an
//!   absolute-form target (which must agree), and forwarded as a request of its own; one
//!   naming another server is answered 403. Upgrades (WebSockets) are spliced after the check.
//!
//! The guard dials the original destination from inside the namespace, so the egress table
//! still checks, counts and limits the connection (its `output`/`input` chains).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nix::sys::socket::{getsockopt, sockopt::OriginalDst};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::egress::SlotEgress;
use super::GATEWAY_IP;
use crate::egress::NameVerdict;
use crate::forward::{splice, wants_upgrade, Activity};

/// The port the guard listens on, on the guest's gateway inside every namespace.
pub(super) const GUARD_PORT: u16 = 50080;
/// The ports whose connections to name-admitted addresses are checked.
pub(super) const GUARDED_PORTS: [u16; 2] = [HTTP_PORT, 443];
const HTTP_PORT: u16 = 80;
/// A client gets this long to say which name it wants.
const FIRST_BYTES_WAIT: Duration = Duration::from_secs(10);
/// A TLS ClientHello larger than this is refused.
const MAX_HELLO: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// An upgraded connection (a WebSocket) through the guard ends after this long without a byte.
const UPGRADED_IDLE: Duration = Duration::from_secs(15 * 60);
/// Connections through the guard at once, per sandbox (each holds two descriptors of the
/// agent's); the policy's `max_connections` counts them too once they dial out, but a guest may
/// open many before naming a server.
const MAX_CONNECTIONS: usize = 256;

pub(super) fn listen_addr() -> SocketAddr {
    SocketAddr::from((GATEWAY_IP, GUARD_PORT))
}

/// Serves one sandbox's guarded connections until the task is aborted, which also ends every
/// connection it carries (they would otherwise outlive the sandbox's namespace).
pub(super) fn serve(slot: Arc<SlotEgress>, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let mut carried = tokio::task::JoinSet::new();
        loop {
            while carried.try_join_next().is_some() {}
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                continue;
            };
            let slot = slot.clone();
            carried.spawn(async move {
                if let Err(reason) = guard(&slot, stream).await {
                    tracing::debug!(%reason, "egress connection refused by the name guard");
                }
                drop(permit);
            });
        }
    })
}

async fn guard(slot: &Arc<SlotEgress>, guest: TcpStream) -> Result<(), String> {
    let destination = original_destination(&guest)?;
    // Straight to the guard's own address is no redirected connection.
    if *destination.ip() == GATEWAY_IP {
        return Err("a connection to the guard itself".into());
    }
    if destination.port() == HTTP_PORT {
        guard_http(slot.clone(), guest, destination).await
    } else {
        guard_tls(slot, guest, destination).await
    }
}

/// Whether `name` may be reached at `destination`: allowed, and resolved there for this sandbox.
async fn admitted(slot: &SlotEgress, name: &str, destination: SocketAddrV4) -> bool {
    let policy = slot.policy();
    policy.name_verdict(name) == NameVerdict::Allowed
        && !policy.denies_address(*destination.ip())
        && slot.resolved(name, *destination.ip()).await
}

async fn dial(slot: &SlotEgress, destination: SocketAddrV4) -> Result<TcpStream, String> {
    slot.connect_out(SocketAddr::V4(destination), CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("connecting to {destination}: {e}"))
}

async fn guard_tls(
    slot: &SlotEgress,
    mut guest: TcpStream,
    destination: SocketAddrV4,
) -> Result<(), String> {
    let mut hello = Vec::with_capacity(2048);
    let name = tokio::time::timeout(FIRST_BYTES_WAIT, async {
        let mut chunk = [0; 4096];
        loop {
            let n = guest
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the ClientHello: {e}"))?;
            if n == 0 {
                return Err("closed before naming a server".to_owned());
            }
            hello.extend_from_slice(&chunk[..n]);
            match tls_server_name(&hello) {
                Parsed::Name(name) => return Ok(name),
                Parsed::Refused(reason) => return Err(reason),
                Parsed::Incomplete if hello.len() >= MAX_HELLO => {
                    return Err("no server name in the first 16 KiB".to_owned())
                }
                Parsed::Incomplete => {}
            }
        }
    })
    .await
    .map_err(|_| "the client named no server in time".to_owned())??;
    if !admitted(slot, &name, destination).await {
        return Err(format!("`{name}` is not an allowed name of {destination}"));
    }
    let mut upstream = dial(slot, destination).await?;
    upstream
        .write_all(&hello)
        .await
        .map_err(|e| format!("sending the ClientHello on: {e}"))?;
    let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
    Ok(())
}

type GuardBody = Either<Incoming, Full<Bytes>>;

fn refusal(status: StatusCode, message: String) -> Response<GuardBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(message + "\n"))));
    *response.status_mut() = status;
    response
}

/// Serves the guest's connection as HTTP/1, checking and forwarding each request over one
/// connection to the destination, opened with the first request that passes.
async fn guard_http(
    slot: Arc<SlotEgress>,
    guest: TcpStream,
    destination: SocketAddrV4,
) -> Result<(), String> {
    type Sender = hyper::client::conn::http1::SendRequest<Incoming>;
    let upstream: Arc<tokio::sync::Mutex<Option<Sender>>> = Arc::default();
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let (slot, upstream) = (slot.clone(), upstream.clone());
        async move {
            let Some(name) = request_name(&request) else {
                let message = "egress policy: the request names no single server".to_owned();
                return Ok::<_, hyper::Error>(refusal(StatusCode::FORBIDDEN, message));
            };
            if !admitted(&slot, &name, destination).await {
                let message = format!("egress policy: `{name}` may not be reached here");
                return Ok(refusal(StatusCode::FORBIDDEN, message));
            }
            let mut sender = upstream.lock().await;
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                let connection = match dial(&slot, destination).await {
                    Ok(connection) => connection,
                    Err(reason) => return Ok(refusal(StatusCode::BAD_GATEWAY, reason)),
                };
                let (new_sender, conn) =
                    match hyper::client::conn::http1::handshake(TokioIo::new(connection)).await {
                        Ok(handshake) => handshake,
                        Err(e) => return Ok(refusal(StatusCode::BAD_GATEWAY, e.to_string())),
                    };
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
                *sender = Some(new_sender);
            }
            let sender = sender.as_mut().expect("a sender was just made");
            let guest_upgrade =
                wants_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
            let mut response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(e) => return Ok(refusal(StatusCode::BAD_GATEWAY, e.to_string())),
            };
            if let (StatusCode::SWITCHING_PROTOCOLS, Some(guest_upgrade)) =
                (response.status(), guest_upgrade)
            {
                let server_upgrade = hyper::upgrade::on(&mut response);
                // Outside the sandbox's task set, so bounded by an idle clock instead: a guest
                // that vanished with its namespace sends nothing more.
                tokio::spawn(async move {
                    if let (Ok(guest), Ok(server)) = (guest_upgrade.await, server_upgrade.await) {
                        let activity = Activity::new(UPGRADED_IDLE);
                        splice(TokioIo::new(guest), TokioIo::new(server), activity).await;
                    }
                });
            }
            Ok(response.map(Either::Left))
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(guest), service)
        .with_upgrades()
        .await
        .map_err(|e| format!("serving a guarded HTTP connection: {e}"))
}

/// The server a request names: its `Host`, and the authority of an absolute-form target, which
/// must agree when both are given.
fn request_name<B>(request: &Request<B>) -> Option<String> {
    let normal = |host: &str| host.trim().trim_end_matches('.').to_ascii_lowercase();
    let host = request.headers().get(hyper::header::HOST).map(|h| {
        h.to_str()
            .ok()
            .and_then(|h| h.parse::<hyper::http::uri::Authority>().ok())
    });
    let host = match host {
        Some(Some(authority)) => Some(normal(authority.host())),
        Some(None) => return None,
        None => None,
    };
    let target = request.uri().authority().map(|a| normal(a.host()));
    match (target, host) {
        (Some(target), Some(host)) if target != host => None,
        (Some(name), _) | (None, Some(name)) => Some(name),
        (None, None) => None,
    }
}

fn original_destination(stream: &TcpStream) -> Result<SocketAddrV4, String> {
    let raw = getsockopt(stream, OriginalDst).map_err(|e| format!("SO_ORIGINAL_DST: {e}"))?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
        u16::from_be(raw.sin_port),
    ))
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Name(String),
    Incomplete,
    Refused(String),
}

/// The server name (SNI) in the TLS ClientHello that `bytes` begin with.
fn tls_server_name(bytes: &[u8]) -> Parsed {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    // One call takes in at most a record's worth; a large ClientHello spans several.
    while !reader.is_empty() {
        match acceptor.read_tls(&mut reader) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Parsed::Refused("not a TLS ClientHello".into()),
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => match accepted.client_hello().server_name() {
            Some(name) => Parsed::Name(name.to_ascii_lowercase()),
            None => Parsed::Refused("a ClientHello without a server name".into()),
        },
        Ok(None) => Parsed::Incomplete,
        Err(_) => Parsed::Refused("not a TLS ClientHello".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(name: &str) -> Vec<u8> {
        client_hello_offering(name, Vec::new())
    }

    fn client_hello_offering(name: &str, alpn: Vec<Vec<u8>>) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn;
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        hello
    }

    #[test]
    fn names_come_from_sni_and_host() {
        let hello = client_hello("API.Example.com");
        assert_eq!(
            tls_server_name(&hello),
            Parsed::Name("api.example.com".into())
        );
        assert_eq!(
            tls_server_name(&hello[..hello.len() / 2]),
            Parsed::Incomplete
        );
        // A ClientHello larger than one read of the parser's.
        let protocols = (0..800).map(|i| format!("proto-{i:05}").into_bytes());
        let large = client_hello_offering("big.example.com", protocols.collect());
        assert!(large.len() > 8192, "{}", large.len());
        assert_eq!(
            tls_server_name(&large),
            Parsed::Name("big.example.com".into())
        );
        assert!(matches!(
            tls_server_name(b"\x00\x01garbage"),
            Parsed::Refused(_)
        ));
        assert!(matches!(
            tls_server_name(b"GET / HTTP/1.1\r\n\r\n"),
            Parsed::Refused(_)
        ));

        let request = |target: &str, host: Option<&str>| {
            let mut builder = Request::builder().uri(target);
            if let Some(host) = host {
                builder = builder.header("host", host);
            }
            request_name(&builder.body(()).unwrap())
        };
        assert_eq!(
            request("/", Some("Example.COM:8080")),
            Some("example.com".into())
        );
        assert_eq!(request("http://a.test/x", None), Some("a.test".into()));
        assert_eq!(
            request("http://a.test/x", Some("a.test")),
            Some("a.test".into())
        );
        assert_eq!(request("http://other.test/", Some("a.test")), None);
        assert_eq!(request("/", None), None);
        assert_eq!(request("/", Some("bad host")), None);
    }
}
