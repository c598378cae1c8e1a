//! The name guard: where a policy admits an address only because an allowed name resolved to it
//! (and refuses by default), TCP connections to it on ports 80 and 443 are redirected here
//! inside the sandbox's namespace, and pass only if the name they ask the server for (TLS SNI,
//! or HTTP `Host`) is an allowed name that this sandbox's own look-ups resolved to that address.
//! That stops a guest from reaching other names on a shared address (a CDN, "domain fronting").
//!
//! The guard reads nothing: it peeks at the connection's first bytes, and once it lets the
//! connection pass it dials the original destination from inside the namespace and splices the
//! two, so the server sees the guest's bytes as sent and the egress table still counts and
//! limits the connection (its `output`/`input` chains).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::OriginalDst};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::egress::SlotEgress;
use super::GATEWAY_IP;
use crate::egress::NameVerdict;

/// The port the guard listens on, on the guest's gateway inside every namespace.
pub(super) const GUARD_PORT: u16 = 50080;
/// The ports whose connections to name-admitted addresses are checked.
pub(super) const GUARDED_PORTS: [u16; 2] = [80, 443];
/// A client gets this long to say which name it wants.
const FIRST_BYTES_WAIT: Duration = Duration::from_secs(10);
/// A TLS ClientHello or an HTTP request head larger than this is refused.
const MAX_PEEK: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
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

async fn guard(slot: &SlotEgress, mut guest: TcpStream) -> Result<(), String> {
    let destination = original_destination(&guest)?;
    // Straight to the guard's own address is no redirected connection.
    if *destination.ip() == GATEWAY_IP {
        return Err("a connection to the guard itself".into());
    }
    let name = tokio::time::timeout(FIRST_BYTES_WAIT, requested_name(&guest))
        .await
        .map_err(|_| "the client named no server in time".to_owned())??;
    let policy = slot.policy();
    if policy.name_verdict(&name) != NameVerdict::Allowed
        || policy.denies_address(*destination.ip())
        || !slot.resolved(&name, *destination.ip()).await
    {
        return Err(format!("`{name}` is not an allowed name of {destination}"));
    }
    let mut upstream = slot
        .connect_out(SocketAddr::V4(destination), CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("connecting to {destination}: {e}"))?;
    let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
    Ok(())
}

fn original_destination(stream: &TcpStream) -> Result<SocketAddrV4, String> {
    let raw = getsockopt(stream, OriginalDst).map_err(|e| format!("SO_ORIGINAL_DST: {e}"))?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
        u16::from_be(raw.sin_port),
    ))
}

/// The server name the connection's first bytes ask for, waiting for more bytes while they
/// are an incomplete ClientHello or request head.
async fn requested_name(stream: &TcpStream) -> Result<String, String> {
    let mut buffer = vec![0; MAX_PEEK];
    loop {
        let n = stream
            .peek(&mut buffer)
            .await
            .map_err(|e| format!("reading the first bytes: {e}"))?;
        if n == 0 {
            return Err("closed before naming a server".into());
        }
        match server_name(&buffer[..n]) {
            Parsed::Name(name) => return Ok(name),
            Parsed::Refused(reason) => return Err(reason),
            Parsed::Incomplete if n == MAX_PEEK => {
                return Err("no server name in the first 16 KiB".into())
            }
            Parsed::Incomplete => {}
        }
        // A peek returns at once while any byte is buffered, so more are waited for by time.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Name(String),
    Incomplete,
    Refused(String),
}

/// The server name in a TLS ClientHello (SNI) or an HTTP/1 request head (`Host`).
fn server_name(bytes: &[u8]) -> Parsed {
    const TLS_HANDSHAKE: u8 = 0x16;
    if bytes.first() == Some(&TLS_HANDSHAKE) {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut reader = bytes;
        if acceptor.read_tls(&mut reader).is_err() {
            return Parsed::Refused("not a TLS ClientHello".into());
        }
        return match acceptor.accept() {
            Ok(Some(accepted)) => match accepted.client_hello().server_name() {
                Some(name) => Parsed::Name(name.to_ascii_lowercase()),
                None => Parsed::Refused("a ClientHello without a server name".into()),
            },
            Ok(None) => Parsed::Incomplete,
            Err(_) => Parsed::Refused("a malformed ClientHello".into()),
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            let host = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok());
            match host {
                Some(host) => {
                    let name = host.trim().rsplit_once(':').map_or(host.trim(), |(h, _)| h);
                    Parsed::Name(name.trim_end_matches('.').to_ascii_lowercase())
                }
                None => Parsed::Refused("an HTTP request without Host".into()),
            }
        }
        Ok(httparse::Status::Partial) => Parsed::Incomplete,
        Err(_) => Parsed::Refused("neither TLS nor HTTP".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        hello
    }

    #[test]
    fn names_come_from_sni_and_host() {
        let hello = client_hello("API.Example.com");
        assert_eq!(server_name(&hello), Parsed::Name("api.example.com".into()));
        assert_eq!(server_name(&hello[..hello.len() / 2]), Parsed::Incomplete);
        let get = b"GET / HTTP/1.1\r\nHost: Example.COM:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(server_name(get), Parsed::Name("example.com".into()));
        assert_eq!(server_name(&get[..20]), Parsed::Incomplete);
        assert!(matches!(
            server_name(b"GET / HTTP/1.1\r\n\r\n"),
            Parsed::Refused(_)
        ));
        assert!(matches!(
            server_name(b"\x00\x01garbage"),
            Parsed::Refused(_)
        ));
        assert!(matches!(
            server_name(b"\x16\x03\x01\x00\x05hello"),
            Parsed::Refused(_)
        ));
    }
}
