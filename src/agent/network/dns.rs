//! The DNS forwarder every sandbox's look-ups go to. It listens on the guest's gateway inside
//! the sandbox's namespace (where the egress table redirects port 53 of any resolver), asks the
//! host's resolvers, and applies the sandbox's egress policy to names:
//! - a name a `deny` rule names is answered NXDOMAIN without asking upstream;
//! - the addresses of a name an `allow` rule names are pinned into the sandbox's egress table
//!   before the answer is passed on; an answer that points such a name at loopback, a
//!   link-local network, or a network the host (`agent.egress_deny`) or the policy refuses is a
//!   rebinding attempt and is answered REFUSED, pinning nothing;
//! - under `"default": "deny"` any other name is answered NXDOMAIN without asking upstream too:
//!   its addresses would be refused anyway, and look-ups of arbitrary names are a channel out;
//! - otherwise the answer is passed on untouched.
//!
//! Each sandbox has its own sockets, so the sandbox a query came from is never guessed.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::egress::SlotEgress;
use crate::config::Ipv4Cidr;
use crate::egress::NameVerdict;

pub(super) const DNS_PORT: u16 = 53;

/// The address the forwarder listens on inside every namespace: the guest's gateway.
pub(super) fn listen_addr() -> SocketAddr {
    SocketAddr::from((super::GATEWAY_IP, DNS_PORT))
}

/// How long one upstream server gets to answer before the next is asked.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// A guest's TCP connection to the forwarder is closed after this long without a query.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries in flight per sandbox; beyond it UDP queries are dropped (the guest retries).
const MAX_IN_FLIGHT: usize = 64;
const MAX_TCP_CONNECTIONS: usize = 16;
/// An answer with EDNS may be as large as a UDP datagram.
const MAX_UDP_MESSAGE: usize = 65_535;

/// Where the forwarder asks, and what no sandbox may be pointed at.
#[derive(Debug)]
pub(super) struct Upstream {
    servers: Vec<SocketAddr>,
    host_deny: Vec<Ipv4Cidr>,
}

impl Upstream {
    /// `servers`, or when it is empty the name servers of the host's `/etc/resolv.conf`.
    pub(super) fn new(servers: Vec<SocketAddr>, host_deny: Vec<Ipv4Cidr>) -> Self {
        let servers = if servers.is_empty() {
            std::fs::read_to_string("/etc/resolv.conf")
                .map(|text| resolv_conf_servers(&text))
                .unwrap_or_default()
        } else {
            servers
        };
        if servers.is_empty() {
            tracing::warn!(
                "no DNS servers configured or in /etc/resolv.conf: sandbox look-ups will fail"
            );
        }
        Self { servers, host_deny }
    }

    async fn ask_udp(&self, query: &[u8], id: u16) -> Option<Vec<u8>> {
        for server in &self.servers {
            let bind: SocketAddr = if server.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(socket) = UdpSocket::bind(bind).await else {
                continue;
            };
            if socket.connect(server).await.is_err() || socket.send(query).await.is_err() {
                continue;
            }
            let mut buffer = vec![0; MAX_UDP_MESSAGE];
            let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                loop {
                    let n = socket.recv(&mut buffer).await.ok()?;
                    // A datagram for another query (or a spoofed one) is not the answer.
                    if n >= 2 && u16::from_be_bytes([buffer[0], buffer[1]]) == id {
                        return Some(buffer[..n].to_vec());
                    }
                }
            })
            .await;
            if let Ok(Some(answer)) = answer {
                return Some(answer);
            }
        }
        None
    }

    async fn ask_tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        for server in &self.servers {
            let exchange = async {
                let mut stream = TcpStream::connect(server).await.ok()?;
                let len = u16::try_from(query.len()).ok()?;
                stream.write_all(&len.to_be_bytes()).await.ok()?;
                stream.write_all(query).await.ok()?;
                read_framed(&mut stream).await
            };
            if let Ok(Some(answer)) = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await {
                return Some(answer);
            }
        }
        None
    }
}

async fn read_framed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0; 2];
    stream.read_exact(&mut len).await.ok()?;
    let mut message = vec![0; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await.ok()?;
    Some(message)
}

fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// Serves one sandbox's look-ups until its tasks are aborted (the sandbox's network goes), which
/// also ends every query and connection they carry.
pub(super) fn serve(
    slot: Arc<SlotEgress>,
    upstream: Arc<Upstream>,
    udp: UdpSocket,
    tcp: TcpListener,
) -> [tokio::task::JoinHandle<()>; 2] {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let udp = Arc::new(udp);
    let udp_task = {
        let (slot, upstream) = (slot.clone(), upstream.clone());
        tokio::spawn(async move {
            let mut buffer = vec![0; MAX_UDP_MESSAGE];
            let mut queries = tokio::task::JoinSet::new();
            loop {
                while queries.try_join_next().is_some() {}
                let Ok((n, peer)) = udp.recv_from(&mut buffer).await else {
                    continue;
                };
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    continue;
                };
                let query = buffer[..n].to_vec();
                let (slot, upstream, udp) = (slot.clone(), upstream.clone(), udp.clone());
                queries.spawn(async move {
                    if let Some(reply) = answer(&slot, &upstream, &query, Transport::Udp).await {
                        let _ = udp.send_to(&reply, peer).await;
                    }
                    drop(permit);
                });
            }
        })
    };
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let tcp_task = tokio::spawn(async move {
        let mut carried = tokio::task::JoinSet::new();
        loop {
            while carried.try_join_next().is_some() {}
            let Ok((mut stream, _)) = tcp.accept().await else {
                // Out of descriptors, say: let the condition pass rather than spin on it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                continue;
            };
            let (slot, upstream) = (slot.clone(), upstream.clone());
            carried.spawn(async move {
                while let Ok(Some(query)) =
                    tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await
                {
                    let Some(reply) = answer(&slot, &upstream, &query, Transport::Tcp).await else {
                        break;
                    };
                    let Ok(len) = u16::try_from(reply.len()) else {
                        break;
                    };
                    if stream.write_all(&len.to_be_bytes()).await.is_err()
                        || stream.write_all(&reply).await.is_err()
                    {
                        break;
                    }
                }
                drop(permit);
            });
        }
    });
    [udp_task, tcp_task]
}

/// The reply to one query, or `None` for bytes that are no query at all.
async fn answer(
    slot: &SlotEgress,
    upstream: &Upstream,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let message = Message::from_vec(query).ok()?;
    if message.message_type() != MessageType::Query {
        return None;
    }
    let refuse = |code: ResponseCode| {
        let mut reply = Message::error_msg(message.id(), message.op_code(), code);
        reply.add_queries(message.queries().to_vec());
        reply.set_recursion_desired(message.recursion_desired());
        reply.set_recursion_available(true);
        reply.to_vec().ok()
    };
    let [question] = message.queries() else {
        return refuse(ResponseCode::FormErr);
    };
    let name = question
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let policy = slot.policy();
    let verdict = policy.name_verdict(&name);
    let unlisted_refused =
        verdict == NameVerdict::Unlisted && policy.default == crate::egress::EgressDefault::Deny;
    if verdict == NameVerdict::Denied || unlisted_refused {
        tracing::debug!(%name, "look-up refused by the egress policy");
        return refuse(ResponseCode::NXDomain);
    }
    let reply = match transport {
        Transport::Udp => upstream.ask_udp(query, message.id()).await,
        Transport::Tcp => upstream.ask_tcp(query).await,
    };
    let Some(reply) = reply else {
        return refuse(ResponseCode::ServFail);
    };
    if verdict == NameVerdict::Unlisted {
        return Some(reply);
    }
    let Ok(parsed) = Message::from_vec(&reply) else {
        return refuse(ResponseCode::ServFail);
    };
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for record in parsed.answers() {
        if let RData::A(a) = record.data() {
            addrs.push(a.0);
            ttl = ttl.min(record.ttl());
        }
    }
    if let Some(bad) = addrs
        .iter()
        .find(|addr| !super::egress::pinnable(**addr, &upstream.host_deny, &policy))
    {
        tracing::warn!(%name, address = %bad, "refused a DNS answer pointing an allowed name at a refused address");
        return refuse(ResponseCode::Refused);
    }
    if !addrs.is_empty() {
        match slot
            .pin(&name, &addrs, Duration::from_secs(u64::from(ttl)))
            .await
        {
            Ok(true) => {}
            // The policy changed while upstream answered.
            Ok(false) => return refuse(ResponseCode::Refused),
            Err(error) => {
                // An address the guest could not reach would only look like a broken server.
                tracing::warn!(%name, %error, "could not admit the addresses of an allowed name");
                return refuse(ResponseCode::ServFail);
            }
        }
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_name_servers_are_read() {
        let text = "# comment\nsearch lan\nnameserver 192.0.2.53\nnameserver  2001:db8::53\nnameserver bogus\noptions edns0\n";
        assert_eq!(
            resolv_conf_servers(text),
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }
}
