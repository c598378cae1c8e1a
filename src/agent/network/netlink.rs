//! Links, addresses and routes over rtnetlink, on the host or inside a sandbox namespace.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use nix::errno::Errno;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, AsyncSocket, TokioSocket};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::netns::Namespace;
use super::SystemError;

/// One rtnetlink connection. Its socket belongs to the namespace it was opened in, so every
/// request acts there.
pub(super) struct Netlink {
    handle: Handle,
    /// Where requests act, for error messages: "the host" or "namespace NAME".
    scope: String,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    pub(super) fn host() -> Result<Self, SystemError> {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| SystemError::io("opening a netlink socket on the host", e))?;
        Ok(Self {
            handle,
            scope: "the host".to_owned(),
            connection: tokio::spawn(connection),
        })
    }

    pub(super) async fn inside(namespace: &Namespace) -> Result<Self, SystemError> {
        let runtime = tokio::runtime::Handle::current();
        let scope = format!("namespace {}", namespace.name());
        let action = format!("opening a netlink socket in {scope}");
        let socket = namespace
            .run(move || {
                // The socket registers with the runtime's reactor, reachable from this
                // foreign thread only through the handle.
                let _entered = runtime.enter();
                TokioSocket::new(NETLINK_ROUTE).map_err(|e| SystemError::io(action, e))
            })
            .await?;
        let (connection, handle, _) = rtnetlink::from_socket(socket);
        Ok(Self {
            handle,
            scope,
            connection: tokio::spawn(connection),
        })
    }

    fn failed(&self, what: String) -> impl FnOnce(rtnetlink::Error) -> SystemError + '_ {
        move |error| SystemError::netlink(format!("{what} in {}", self.scope), error)
    }

    /// The index of link `name`; `ENODEV` when there is none.
    pub(super) async fn index(&self, name: &str) -> Result<u32, SystemError> {
        let what = format!("looking up link {name}");
        let link = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await
            .map_err(self.failed(what.clone()))?;
        match link {
            Some(link) => Ok(link.header.index),
            None => Err(SystemError::Os {
                action: format!("{what} in {}", self.scope),
                errno: Errno::ENODEV,
            }),
        }
    }

    /// Names of all links.
    pub(super) async fn link_names(&self) -> Result<Vec<String>, SystemError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(self.failed("listing links".to_owned()))?;
        Ok(links.iter().filter_map(link_name).collect())
    }

    /// Creates the veth pair `name` here and `peer` directly in `peer_namespace`, so the peer's
    /// name never has to be free in this namespace too.
    pub(super) async fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_namespace: &Namespace,
    ) -> Result<(), SystemError> {
        let peer_message = LinkUnspec::new_with_name(peer)
            .setns_by_fd(peer_namespace.as_raw_fd())
            .build();
        let message = LinkVeth::new(name, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message)))
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(self.failed(format!(
                "creating veth pair {name} / {peer} (peer in namespace {})",
                peer_namespace.name()
            )))
    }

    /// Sets link `name` up, first giving it `mac` and `tx_queue_len` when given. Returns its
    /// index.
    pub(super) async fn set_up(
        &self,
        name: &str,
        mac: Option<[u8; 6]>,
        tx_queue_len: Option<u32>,
    ) -> Result<u32, SystemError> {
        let index = self.index(name).await?;
        let mut builder = LinkUnspec::new_with_index(index).up();
        if let Some(mac) = mac {
            builder = builder.address(mac.to_vec());
        }
        if let Some(len) = tx_queue_len {
            builder = builder.txqueuelen(len);
        }
        self.handle
            .link()
            .set(builder.build())
            .execute()
            .await
            .map_err(self.failed(format!("setting link {name} up")))?;
        Ok(index)
    }

    pub(super) async fn add_address(
        &self,
        link: &str,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), SystemError> {
        let index = self.index(link).await?;
        self.handle
            .address()
            .add(index, IpAddr::V4(address), prefix_len)
            .execute()
            .await
            .map_err(self.failed(format!("adding {address}/{prefix_len} to {link}")))
    }

    /// Adds the route `destination` via `gateway` out of link `link`. `onlink` lets the gateway be
    /// used before the link has a carrier; `source` sets the preferred source address.
    pub(super) async fn add_route(
        &self,
        destination: Option<(Ipv4Addr, u8)>,
        gateway: Ipv4Addr,
        link: &str,
        source: Option<Ipv4Addr>,
        onlink: bool,
    ) -> Result<(), SystemError> {
        let index = self.index(link).await?;
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index);
        if let Some((address, prefix_len)) = destination {
            builder = builder.destination_prefix(address, prefix_len);
        }
        if let Some(source) = source {
            builder = builder.pref_source(source);
        }
        if onlink {
            builder = builder.onlink();
        }
        let shown = match destination {
            Some((address, prefix_len)) => format!("{address}/{prefix_len}"),
            None => "default".to_owned(),
        };
        self.handle
            .route()
            .add(builder.build())
            .execute()
            .await
            .map_err(self.failed(format!("adding route {shown} via {gateway} dev {link}")))
    }

    /// Deletes link `name` (a veth takes its peer along). Returns whether it existed.
    pub(super) async fn delete_link(&self, name: &str) -> Result<bool, SystemError> {
        let result = self
            .handle
            .link()
            .del_with_message(LinkUnspec::new_with_name(name).build())
            .execute()
            .await
            .map_err(self.failed(format!("deleting link {name}")));
        match result {
            Ok(()) => Ok(true),
            Err(error) if error.errno() == Some(Errno::ENODEV) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The name of the interface of the first IPv4 default route in the main table.
    pub(super) async fn default_route_interface(&self) -> Result<Option<String>, SystemError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(self.failed("listing IPv4 routes".to_owned()))?;
        let interface = routes
            .iter()
            .filter(|route| {
                route.header.address_family == AddressFamily::Inet
                    && route.header.destination_prefix_length == 0
                    && route_table(route) == u32::from(RouteHeader::RT_TABLE_MAIN)
            })
            .find_map(|route| {
                route
                    .attributes
                    .iter()
                    .find_map(|attribute| match attribute {
                        RouteAttribute::Oif(index) => Some(*index),
                        _ => None,
                    })
            });
        let Some(index) = interface else {
            return Ok(None);
        };
        let link = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(self.failed(format!("looking up link #{index}")))?;
        Ok(link.as_ref().and_then(link_name))
    }
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
}

/// A route's table: the header holds only 8 bits, the attribute the full id when present.
fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}
