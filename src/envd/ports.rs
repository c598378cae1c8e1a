//! The guest's own ports, for the port proxy: a service that listens only on the guest's loopback
//! (`127.0.0.1` or `::1`) cannot be dialled from the host, so the agent asks envd to dial it from
//! inside and to carry the bytes over an upgraded HTTP connection (no socat in the image).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

/// How long envd waits for a loopback service to accept.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("nothing listens on port {0} in the capsule")]
    Closed(u16),
    #[error("port {port} in the capsule did not accept: {reason}")]
    Unreachable { port: u16, reason: String },
}

/// A connection to `port` on the guest's loopback, IPv4 first, then IPv6.
pub async fn dial_loopback(port: u16) -> Result<TcpStream, PortError> {
    let mut last = PortError::Closed(port);
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let addr = SocketAddr::new(ip, port);
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(error))
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
                ) => {}
            Ok(Err(error)) => {
                last = PortError::Unreachable {
                    port,
                    reason: error.to_string(),
                }
            }
            Err(_) => {
                last = PortError::Unreachable {
                    port,
                    reason: format!("no answer within {} s", DIAL_TIMEOUT.as_secs()),
                }
            }
        }
    }
    Err(last)
}
