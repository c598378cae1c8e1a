//! Per-sandbox networking on the host: one network namespace per sandbox holding the guest's
//! TAP device, a veth pair to the host, NAT for egress, and the nftables rules that keep
//! sandboxes away from each other and from the host's own services.
//!
//! Inside every namespace the guest side is identical — guest `169.254.0.21/30` with MAC
//! `02:FC:00:00:00:05` behind `tap0` (`169.254.0.22/30`, MAC `02:FC:00:00:00:06`) — so a snapshot
//! taken in one slot restores into any other. The agent reaches slot N's guest at the slot's
//! host address (`10.11.0.N` by default), which the namespace DNATs to the guest; guest egress is
//! SNAT'd to the namespace's veth address and masqueraded again on the host's egress interface.
//! Each namespace also holds the sandbox's egress policy (`egress`) and the DNS forwarder all its
//! look-ups go to (`dns`).
//!
//! Slots are allocated first-free under a lock, capped at what the configured ranges hold, and
//! recovered after an agent restart from the names of what exists (`<prefix>-<slot>` namespaces
//! and links, and the nft set elements).
//!
//! Links, addresses and routes are set over rtnetlink and namespaces are made with system calls;
//! the only process a create or destroy spawns is `nft`, for its atomic ruleset transactions.

mod dns;
mod egress;
mod name_guard;
mod netlink;
mod netns;
mod nft;
mod plan;
mod rules;
pub mod sysctl;
mod tap;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;

use crate::config::{AgentConfig, InterfaceName, Ipv4Cidr, Layout};
use crate::egress::EgressPolicy;
use egress::SlotEgress;
use netlink::Netlink;
use netns::{Namespace, NETNS_DIR};
use plan::SlotPlan;
use rules::{HostPolicy, SlotElements, NAMESPACE_UPLINK};

/// The guest's address, the same in every sandbox.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The guest's gateway: the TAP device's address inside the sandbox namespace.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
pub const GUEST_PREFIX_LEN: u8 = 30;
/// The guest NIC's MAC address, given to the VMM.
pub const GUEST_MAC: &str = "02:FC:00:00:00:05";
/// The TAP device's MAC address. Fixed, so that the neighbour entry a guest caches for its
/// gateway stays valid when a snapshot is restored into another slot.
pub const GATEWAY_MAC: &str = "02:FC:00:00:00:06";
const GATEWAY_MAC_BYTES: [u8; 6] = [0x02, 0xfc, 0, 0, 0, 0x06];
/// The guest-facing device inside every sandbox namespace.
pub const TAP_NAME: &str = "tap0";
/// The port envd listens on inside the guest.
pub const ENVD_PORT: u16 = 49983;
/// The kernel command-line argument with which the guest configures `eth0` at boot.
pub const BOOT_IP_ARG: &str = "ip=169.254.0.21::169.254.0.22:255.255.255.252:capsule:eth0:off";

/// The network the guest and the TAP share; host ranges must not overlap it.
fn guest_network() -> Ipv4Cidr {
    Ipv4Cidr::new(Ipv4Addr::new(169, 254, 0, 20), GUEST_PREFIX_LEN).expect("a valid /30")
}

/// Each slot's veth pair is a /31 of the transit range.
const TRANSIT_PREFIX_LEN: u8 = 31;
const TAP_TX_QUEUE_LEN: u32 = 5000;

/// A create step, in the order performed. Used to name a failed step and, in tests, to inject
/// a failure right after a step succeeded so that its rollback is exercised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CreateStep {
    /// The slot's elements in the host nft sets (first, so isolation holds before any link is up).
    HostRules,
    Namespace,
    Veth,
    /// Loopback, the namespace veth, the TAP device and the default route inside the namespace.
    NamespaceLinks,
    /// IPv4 forwarding and the NAT/filter table inside the namespace.
    NamespaceRules,
    /// The egress policy's table inside the namespace and the sandbox's DNS forwarder.
    Egress,
    /// The host-side veth's address, link state and the route of the slot's host address.
    HostLink,
}

impl CreateStep {
    pub const ALL: [CreateStep; 7] = [
        Self::HostRules,
        Self::Namespace,
        Self::Veth,
        Self::NamespaceLinks,
        Self::NamespaceRules,
        Self::Egress,
        Self::HostLink,
    ];
}

impl fmt::Display for CreateStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HostRules => "adding host firewall elements",
            Self::Namespace => "creating the network namespace",
            Self::Veth => "creating the veth pair",
            Self::HostLink => "configuring the host-side veth and route",
            Self::NamespaceLinks => "configuring links inside the namespace",
            Self::NamespaceRules => "loading NAT rules inside the namespace",
            Self::Egress => "applying the egress policy and starting the DNS forwarder",
        })
    }
}

/// A failed change to, or look at, the kernel's network state. The errno is kept as a value
/// ([`errno`](Self::errno)) so that callers tell "already exists" or "not there" from other
/// failures without reading messages.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// The kernel refused a netlink request or a system call.
    #[error("{action}: {errno}")]
    Os { action: String, errno: Errno },
    /// An I/O failure that carries no errno.
    #[error("{action}: {source}")]
    Io {
        action: String,
        source: std::io::Error,
    },
    /// The netlink exchange itself failed, without an answer from the kernel.
    #[error("{action}: {source}")]
    Netlink {
        action: String,
        // Boxed: it may carry a whole netlink message.
        source: Box<rtnetlink::Error>,
    },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// nft refused a ruleset; its own message points at the offending line.
    #[error("`{command}` failed ({status}): {stderr}")]
    Nft {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("unexpected output from `{command}`: {detail}")]
    Output { command: String, detail: String },
}

impl SystemError {
    /// The errno the kernel answered with, if the failure came from the kernel.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Os { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        let action = action.into();
        match source.raw_os_error() {
            Some(code) => Self::Os {
                action,
                errno: Errno::from_raw(code),
            },
            None => Self::Io { action, source },
        }
    }

    fn netlink(action: String, source: rtnetlink::Error) -> Self {
        match &source {
            rtnetlink::Error::NetlinkError(message) if message.raw_code() != 0 => Self::Os {
                action,
                errno: Errno::from_raw(message.raw_code().abs()),
            },
            _ => Self::Netlink {
                action,
                source: Box::new(source),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid sandbox network settings: {0}")]
    InvalidSettings(String),
    #[error("no free sandbox network slot: all {capacity} slots are in use")]
    SlotsExhausted { capacity: u32 },
    #[error("could not set the host's sysctls for sandbox networking: {0}")]
    HostSysctl(#[from] sysctl::SysctlError),
    #[error("could not load the host firewall table inet {table}: {source}")]
    HostRuleset { table: String, source: SystemError },
    #[error("could not remove the host firewall table inet {table}: {source}")]
    RemoveHostRuleset { table: String, source: SystemError },
    #[error("could not inspect {what}: {source}")]
    Inspect { what: String, source: SystemError },
    #[error("{step} for slot {slot} ({device}) failed: {source}")]
    Create {
        step: CreateStep,
        slot: u32,
        device: String,
        source: SystemError,
    },
    #[error("failure injected after {step} for slot {slot}")]
    Injected { step: CreateStep, slot: u32 },
    #[error("could not apply the egress policy of slot {slot}: {source}")]
    Egress { slot: u32, source: SystemError },
    #[error("slot {0} has no sandbox network")]
    NoSuchSlot(u32),
    #[error("could not remove {device} of slot {slot}: {source}")]
    Teardown {
        slot: u32,
        device: String,
        source: SystemError,
    },
}

/// A sandbox's network, as the VMM and the agent's proxy need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNetwork {
    pub slot: u32,
    pub netns_name: String,
    /// The namespace's bind mount, for `setns` or a VMM's `--netns`.
    pub netns_path: PathBuf,
    pub tap_name: String,
    /// The host-side veth.
    pub host_link: String,
    /// Where the agent dials the guest's ports.
    pub host_addr: Ipv4Addr,
    pub guest_mac: String,
    pub boot_ip_arg: String,
}

impl SandboxNetwork {
    pub fn envd_addr(&self) -> SocketAddr {
        SocketAddr::from((self.host_addr, ENVD_PORT))
    }

    /// The host-side address of any guest port, for a port proxy.
    pub fn guest_port_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.host_addr, port))
    }
}

/// Everything that shapes a [`NetworkManager`]. Production builds it with
/// [`NetworkOptions::from_config`]; tests change the prefix and ranges so that several managers
/// coexist on one host, and may inject a failure.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    /// Names the namespaces and host links (`<prefix>-<slot>`) and the nft tables.
    pub name_prefix: String,
    pub host_range: Ipv4Cidr,
    pub transit_range: Ipv4Cidr,
    /// `None` uses the interface of the default route found at start-up, if any.
    pub egress_interface: Option<InterfaceName>,
    pub egress_deny: Vec<Ipv4Cidr>,
    /// Where sandboxes' look-ups are forwarded; empty means the host's `/etc/resolv.conf`.
    pub dns_servers: Vec<SocketAddr>,
    /// Makes every create fail right after this step, for rollback tests.
    pub fail_after: Option<CreateStep>,
    /// The host sysctls sandbox networking changes, and where their old values are kept.
    pub sysctls: sysctl::HostSysctls,
}

impl NetworkOptions {
    pub fn from_config(agent: &AgentConfig) -> Self {
        Self {
            name_prefix: agent.network_name_prefix.clone(),
            host_range: agent.sandbox_host_range,
            transit_range: agent.sandbox_transit_range,
            egress_interface: agent.egress_interface.clone(),
            egress_deny: agent.egress_deny.0.clone(),
            dns_servers: agent.dns_servers.0.clone(),
            fail_after: None,
            sysctls: sysctl::HostSysctls::new(
                "/proc/sys",
                Layout::new(&agent.files_rootdir).host_sysctls_record(),
            ),
        }
    }
}

/// Creates and destroys sandbox networks; one per agent.
#[derive(Debug)]
pub struct NetworkManager {
    plan: SlotPlan,
    egress_interface: Option<InterfaceName>,
    egress_deny: Vec<Ipv4Cidr>,
    fail_after: Option<CreateStep>,
    sysctls: sysctl::HostSysctls,
    /// Slots with a network or with leftovers not yet cleaned up.
    in_use: Mutex<BTreeSet<u32>>,
    upstream: Arc<dns::Upstream>,
    /// The egress policy and DNS forwarder of each live slot.
    egress: Mutex<BTreeMap<u32, EgressRuntime>>,
}

impl fmt::Debug for EgressRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressRuntime").finish_non_exhaustive()
    }
}

/// A slot's egress state and the forwarder tasks serving it; dropping it stops the forwarder
/// and closes its sockets, which would otherwise keep a deleted namespace alive.
struct EgressRuntime {
    /// The sandbox the slot belongs to: a slot number read before the sandbox paused may
    /// belong to another sandbox by the time it is used.
    sandbox_id: String,
    slot: Arc<SlotEgress>,
    /// The DNS forwarder's and the name guard's tasks.
    tasks: [tokio::task::JoinHandle<()>; 3],
}

impl Drop for EgressRuntime {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Undo actions for create steps, run in reverse on failure.
#[derive(Debug, Clone, Copy)]
enum Undo {
    StopEgress,
    RemoveHostElements,
    DeleteNamespace,
    DeleteHostLink,
}

impl NetworkManager {
    pub async fn new(agent: &AgentConfig) -> Result<Self, NetworkError> {
        Self::with_options(NetworkOptions::from_config(agent)).await
    }

    /// (Re)loads the host table, enables forwarding and adopts every slot that already has a
    /// namespace, link or set element — an agent restarting after a crash must not hand those
    /// out again before [`cleanup_leftovers`](Self::cleanup_leftovers) has dealt with them.
    pub async fn with_options(options: NetworkOptions) -> Result<Self, NetworkError> {
        let plan = SlotPlan::new(
            &options.name_prefix,
            options.host_range,
            options.transit_range,
        )?;
        let egress_interface = match options.egress_interface {
            Some(name) => Some(name),
            None => default_route_interface().await?,
        };
        if egress_interface.is_none() {
            tracing::warn!(
                "no default route: sandboxes get no egress until the agent restarts with one"
            );
        }
        let upstream = Arc::new(dns::Upstream::new(
            options.dns_servers,
            options.egress_deny.clone(),
        ));
        let manager = Self {
            plan,
            egress_interface,
            egress_deny: options.egress_deny,
            fail_after: options.fail_after,
            sysctls: options.sysctls,
            in_use: Mutex::new(BTreeSet::new()),
            upstream,
            egress: Mutex::new(BTreeMap::new()),
        };
        let existing = manager.discover().await?;
        let live: Vec<SlotElements> = existing
            .iter()
            .map(|&slot| manager.elements(slot))
            .collect();
        let ruleset = rules::host_ruleset(&manager.policy(), &live);
        nft::apply(&ruleset, None)
            .await
            .map_err(|source| NetworkError::HostRuleset {
                table: manager.plan.prefix().to_owned(),
                source,
            })?;
        // Only now that the firewall is in place may the host start forwarding.
        manager.sysctls.ensure(sysctl::HOST_SYSCTLS)?;
        tracing::info!(
            adopted = existing.len(),
            egress = manager.egress_interface.as_ref().map(|i| i.as_str()),
            capacity = manager.plan.capacity(),
            "sandbox networking ready"
        );
        *manager.lock_slots() = existing;
        Ok(manager)
    }

    pub fn capacity(&self) -> u32 {
        self.plan.capacity()
    }

    /// The interface sandbox egress leaves through, if any.
    pub fn egress_interface(&self) -> Option<&InterfaceName> {
        self.egress_interface.as_ref()
    }

    /// Slots currently held (live networks and leftovers awaiting cleanup).
    pub fn slots_in_use(&self) -> Vec<u32> {
        self.lock_slots().iter().copied().collect()
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        // The set stays consistent across a panic elsewhere: every mutation is a single call.
        self.in_use
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn policy(&self) -> HostPolicy<'_> {
        HostPolicy {
            table: self.plan.prefix(),
            transit_range: self.plan.transit_range(),
            egress_interface: self.egress_interface.as_ref(),
            egress_deny: &self.egress_deny,
        }
    }

    fn elements(&self, slot: u32) -> SlotElements {
        SlotElements {
            link: self.plan.name(slot),
            source: self.plan.namespace_veth_addr(slot),
        }
    }

    fn lock_egress(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, EgressRuntime>> {
        self.egress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The namespace's egress table: `<prefix>_egress`, beside its NAT table `<prefix>`.
    fn egress_table(&self) -> String {
        format!("{}_egress", self.plan.prefix())
    }

    /// Loads `policy` into `namespace` and starts the slot's DNS forwarder there.
    async fn start_egress(
        &self,
        sandbox_id: &str,
        namespace: netns::Namespace,
        policy: EgressPolicy,
    ) -> Result<EgressRuntime, SystemError> {
        let (dns_addr, guard_addr) = (dns::listen_addr(), name_guard::listen_addr());
        let (udp, tcp, guard) = namespace
            .run(move || {
                let bound = |what: &str, addr| {
                    let what = format!("binding {what} to {addr}");
                    move |e| SystemError::io(what, e)
                };
                let udp = std::net::UdpSocket::bind(dns_addr)
                    .map_err(bound("the DNS forwarder (udp)", dns_addr))?;
                let tcp = std::net::TcpListener::bind(dns_addr)
                    .map_err(bound("the DNS forwarder (tcp)", dns_addr))?;
                let guard = std::net::TcpListener::bind(guard_addr)
                    .map_err(bound("the name guard", guard_addr))?;
                for nonblocking in [
                    udp.set_nonblocking(true),
                    tcp.set_nonblocking(true),
                    guard.set_nonblocking(true),
                ] {
                    nonblocking.map_err(|e| SystemError::io("making sockets non-blocking", e))?;
                }
                Ok((udp, tcp, guard))
            })
            .await?;
        let adopt = |e| SystemError::io("handing the egress sockets to the runtime", e);
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(adopt)?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(adopt)?;
        let guard = tokio::net::TcpListener::from_std(guard).map_err(adopt)?;
        let slot = SlotEgress::load(namespace, self.egress_table(), policy).await?;
        let [udp_task, tcp_task] = dns::serve(slot.clone(), self.upstream.clone(), udp, tcp);
        let guard_task = name_guard::serve(slot.clone(), guard);
        Ok(EgressRuntime {
            sandbox_id: sandbox_id.to_owned(),
            slot,
            tasks: [udp_task, tcp_task, guard_task],
        })
    }

    /// Replaces the egress policy of a live slot: new connections see it at once, and
    /// established ones it refuses are cut.
    pub async fn set_egress(
        &self,
        slot: u32,
        sandbox_id: &str,
        policy: EgressPolicy,
    ) -> Result<(), NetworkError> {
        let egress = self
            .lock_egress()
            .get(&slot)
            .filter(|runtime| runtime.sandbox_id == sandbox_id)
            .map(|runtime| runtime.slot.clone())
            .ok_or(NetworkError::NoSuchSlot(slot))?;
        egress
            .set(policy)
            .await
            .map_err(|source| NetworkError::Egress { slot, source })
    }

    /// The network of a slot a previous agent process made and whose sandbox this agent keeps
    /// running: its namespace's rules are reloaded (they may be an older agent's) and its egress
    /// policy and DNS forwarder restored.
    pub async fn adopt(
        &self,
        slot: u32,
        sandbox_id: &str,
        egress: &EgressPolicy,
    ) -> Result<SandboxNetwork, NetworkError> {
        if !self.lock_slots().contains(&slot) {
            return Err(NetworkError::NoSuchSlot(slot));
        }
        let name = self.plan.name(slot);
        let failed = |source| NetworkError::Egress { slot, source };
        let namespace = netns::Namespace::open(&name).map_err(failed)?;
        let ns_rules = rules::namespace_ruleset(
            self.plan.prefix(),
            self.plan.host_addr(slot),
            self.plan.namespace_veth_addr(slot),
        );
        nft::apply(&ns_rules, Some(&namespace))
            .await
            .map_err(failed)?;
        let runtime = self
            .start_egress(sandbox_id, namespace, egress.clone())
            .await
            .map_err(failed)?;
        self.lock_egress().insert(slot, runtime);
        Ok(self.describe(slot))
    }

    fn allocate(&self) -> Result<u32, NetworkError> {
        let mut in_use = self.lock_slots();
        let capacity = self.plan.capacity();
        let slot = (1..=capacity)
            .find(|slot| !in_use.contains(slot))
            .ok_or(NetworkError::SlotsExhausted { capacity })?;
        in_use.insert(slot);
        Ok(slot)
    }

    fn release(&self, slot: u32) {
        self.lock_slots().remove(&slot);
    }

    fn describe(&self, slot: u32) -> SandboxNetwork {
        let name = self.plan.name(slot);
        SandboxNetwork {
            slot,
            netns_path: netns::path_of(&name),
            netns_name: name.clone(),
            tap_name: TAP_NAME.to_owned(),
            host_link: name,
            host_addr: self.plan.host_addr(slot),
            guest_mac: GUEST_MAC.to_owned(),
            boot_ip_arg: BOOT_IP_ARG.to_owned(),
        }
    }

    /// Creates the network of a new sandbox. On failure every completed step is undone; if the
    /// undo itself fails the slot stays reserved so it is not reused dirty, and
    /// [`cleanup_leftovers`](Self::cleanup_leftovers) or a later restart reclaims it.
    pub async fn create(
        &self,
        sandbox_id: &str,
        egress: &EgressPolicy,
    ) -> Result<SandboxNetwork, NetworkError> {
        let slot = self.allocate()?;
        let mut done = Vec::new();
        match self.build(slot, sandbox_id, egress, &mut done).await {
            Ok(network) => {
                tracing::debug!(sandbox_id, slot, host_addr = %network.host_addr, "sandbox network created");
                Ok(network)
            }
            Err(error) => {
                tracing::warn!(sandbox_id, slot, %error, "sandbox network creation failed; rolling back");
                let mut clean = true;
                for undo in done.iter().rev() {
                    if let Err(undo_error) = self.undo(slot, *undo).await {
                        tracing::error!(slot, %undo_error, "rollback step failed; slot stays reserved");
                        clean = false;
                    }
                }
                if clean {
                    self.release(slot);
                }
                Err(error)
            }
        }
    }

    async fn build(
        &self,
        slot: u32,
        sandbox_id: &str,
        egress: &EgressPolicy,
        done: &mut Vec<Undo>,
    ) -> Result<SandboxNetwork, NetworkError> {
        let name = self.plan.name(slot);
        let host_addr = self.plan.host_addr(slot);
        let host_veth = self.plan.host_veth_addr(slot);
        let ns_veth = self.plan.namespace_veth_addr(slot);
        let table = self.plan.prefix();

        let add = rules::add_slot(table, &self.elements(slot));
        self.step(slot, CreateStep::HostRules, table, nft::apply(&add, None))
            .await?;
        done.push(Undo::RemoveHostElements);
        self.injected(slot, CreateStep::HostRules)?;

        let namespace = self
            .step(slot, CreateStep::Namespace, &name, Namespace::create(&name))
            .await?;
        done.push(Undo::DeleteNamespace);
        self.injected(slot, CreateStep::Namespace)?;

        let host = self
            .step(slot, CreateStep::Veth, &name, async { Netlink::host() })
            .await?;
        let veth = host.add_veth(&name, NAMESPACE_UPLINK, &namespace);
        self.step(slot, CreateStep::Veth, &name, veth).await?;
        done.push(Undo::DeleteHostLink);
        self.injected(slot, CreateStep::Veth)?;

        // The host end stays down until the last step, so nothing flows into a half-built
        // namespace; `onlink` lets the default route name a gateway whose link has no carrier.
        let inside = async {
            namespace.run(|| tap::create_persistent(TAP_NAME)).await?;
            let inside = Netlink::inside(&namespace).await?;
            inside.set_up("lo", None, None).await?;
            inside
                .add_address(NAMESPACE_UPLINK, ns_veth, TRANSIT_PREFIX_LEN)
                .await?;
            inside.set_up(NAMESPACE_UPLINK, None, None).await?;
            inside
                .set_up(TAP_NAME, Some(GATEWAY_MAC_BYTES), Some(TAP_TX_QUEUE_LEN))
                .await?;
            inside
                .add_address(TAP_NAME, GATEWAY_IP, GUEST_PREFIX_LEN)
                .await?;
            inside
                .add_route(None, host_veth, NAMESPACE_UPLINK, None, true)
                .await
        };
        self.step(slot, CreateStep::NamespaceLinks, &name, inside)
            .await?;
        self.injected(slot, CreateStep::NamespaceLinks)?;

        let ns_rules = rules::namespace_ruleset(table, host_addr, ns_veth);
        let rules = async {
            namespace.write_sysctl("net/ipv4/ip_forward", "1").await?;
            nft::apply(&ns_rules, Some(&namespace)).await
        };
        self.step(slot, CreateStep::NamespaceRules, &name, rules)
            .await?;
        self.injected(slot, CreateStep::NamespaceRules)?;

        let runtime = self.start_egress(sandbox_id, namespace, egress.clone());
        let runtime = self.step(slot, CreateStep::Egress, &name, runtime).await?;
        self.lock_egress().insert(slot, runtime);
        done.push(Undo::StopEgress);
        self.injected(slot, CreateStep::Egress)?;

        // The route goes with the link, so deleting the link undoes this whole step.
        let host_side = async {
            host.add_address(&name, host_veth, TRANSIT_PREFIX_LEN)
                .await?;
            host.set_up(&name, None, None).await?;
            host.add_route(
                Some((host_addr, 32)),
                ns_veth,
                &name,
                Some(host_veth),
                false,
            )
            .await
        };
        self.step(slot, CreateStep::HostLink, &name, host_side)
            .await?;
        self.injected(slot, CreateStep::HostLink)?;

        Ok(self.describe(slot))
    }

    async fn step<T>(
        &self,
        slot: u32,
        step: CreateStep,
        device: &str,
        work: impl std::future::Future<Output = Result<T, SystemError>>,
    ) -> Result<T, NetworkError> {
        work.await.map_err(|source| NetworkError::Create {
            step,
            slot,
            device: device.to_owned(),
            source,
        })
    }

    fn injected(&self, slot: u32, step: CreateStep) -> Result<(), NetworkError> {
        match self.fail_after {
            Some(fail) if fail == step => Err(NetworkError::Injected { step, slot }),
            _ => Ok(()),
        }
    }

    async fn undo(&self, slot: u32, undo: Undo) -> Result<(), NetworkError> {
        let name = self.plan.name(slot);
        let teardown = |device: String| {
            move |source| NetworkError::Teardown {
                slot,
                device,
                source,
            }
        };
        // Each undo accepts that its object is already gone: teardown is idempotent.
        match undo {
            Undo::StopEgress => {
                self.lock_egress().remove(&slot);
            }
            Undo::RemoveHostElements => {
                let text = rules::remove_slot(self.plan.prefix(), &self.elements(slot));
                nft::apply(&text, None)
                    .await
                    .map_err(teardown(format!("host firewall elements of {name}")))?;
            }
            Undo::DeleteNamespace => {
                netns::delete(&name).map_err(teardown(format!("network namespace {name}")))?;
            }
            Undo::DeleteHostLink => {
                let host = Netlink::host().map_err(teardown(format!("veth {name}")))?;
                host.delete_link(&name)
                    .await
                    .map_err(teardown(format!("veth {name}")))?;
            }
        }
        Ok(())
    }

    /// Removes everything of a slot that exists, in the reverse order of creation; the host
    /// firewall elements go last so isolation holds until the links are gone.
    async fn teardown(&self, slot: u32) -> Result<(), NetworkError> {
        let mut first_error = None;
        for undo in [
            Undo::StopEgress,
            Undo::DeleteHostLink,
            Undo::DeleteNamespace,
            Undo::RemoveHostElements,
        ] {
            if let Err(error) = self.undo(slot, undo).await {
                tracing::warn!(slot, %error, "sandbox network teardown step failed");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Removes a sandbox's network. Idempotent: destroying twice, or after a partial failure,
    /// removes whatever is left and succeeds. The slot is freed only once nothing is left.
    pub async fn destroy(&self, network: &SandboxNetwork) -> Result<(), NetworkError> {
        self.teardown(network.slot).await?;
        self.release(network.slot);
        tracing::debug!(slot = network.slot, "sandbox network destroyed");
        Ok(())
    }

    /// Removes this manager's host firewall table once no sandbox network is left, so a stopped
    /// agent leaves the host's ruleset as it found it. While any slot remains the table stays:
    /// its rules still isolate that slot's namespace.
    pub async fn remove_host_table(&self) -> Result<(), NetworkError> {
        if !self.slots_in_use().is_empty() {
            return Ok(());
        }
        let table = self.plan.prefix();
        nft::output(&["delete", "table", "inet", table])
            .await
            .map_err(|source| NetworkError::RemoveHostRuleset {
                table: table.to_owned(),
                source,
            })?;
        Ok(())
    }

    /// Puts back the host sysctls this agent (or an earlier process of it) changed, once this
    /// agent holds no network and no other namespace on the host may rely on them.
    pub fn restore_host_sysctls(&self) {
        if !self.slots_in_use().is_empty() {
            return;
        }
        if sysctl::other_namespaces_exist(std::path::Path::new(NETNS_DIR)) {
            tracing::info!(
                "other network namespaces remain on the host; host sysctls stay as they are"
            );
            return;
        }
        if let Err(error) = self.sysctls.restore() {
            tracing::warn!(%error, "could not restore the host's sysctls");
        }
    }

    /// Removes every namespace, link and firewall element of this manager's prefix whose slot is
    /// not in `keep` (the sandboxes the agent still runs), e.g. after a crash. Routes go with
    /// their links. Returns the slots that were cleaned.
    pub async fn cleanup_leftovers(&self, keep: &[u32]) -> Result<Vec<u32>, NetworkError> {
        let leftovers: Vec<u32> = self
            .discover()
            .await?
            .into_iter()
            .filter(|slot| !keep.contains(slot))
            .collect();
        let mut first_error = None;
        let mut cleaned = Vec::new();
        for &slot in &leftovers {
            match self.teardown(slot).await {
                Ok(()) => {
                    self.release(slot);
                    cleaned.push(slot);
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if !cleaned.is_empty() {
            tracing::info!(?cleaned, "removed leftover sandbox networks");
        }
        first_error.map_or(Ok(cleaned), Err)
    }

    /// Slots that have a namespace, a host link or an nft element under this prefix.
    async fn discover(&self) -> Result<BTreeSet<u32>, NetworkError> {
        let mut slots = BTreeSet::new();
        match std::fs::read_dir(NETNS_DIR) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    if let Some(slot) = entry
                        .file_name()
                        .to_str()
                        .and_then(|n| self.plan.slot_of(n))
                    {
                        slots.insert(slot);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(NetworkError::Inspect {
                    what: NETNS_DIR.to_owned(),
                    source: SystemError::io(format!("listing {NETNS_DIR}"), e),
                })
            }
        }
        let inspect = |what: String| move |source| NetworkError::Inspect { what, source };
        let host = Netlink::host().map_err(inspect("host links".to_owned()))?;
        let links = host
            .link_names()
            .await
            .map_err(inspect("host links".to_owned()))?;
        slots.extend(links.iter().filter_map(|n| self.plan.slot_of(n)));
        let table = self.plan.prefix();
        let table_exists = nft::output(&["list", "tables", "inet"])
            .await
            .map_err(inspect("nft tables".to_owned()))?
            .lines()
            .any(|line| line.trim() == format!("table inet {table}"));
        if table_exists {
            let what = format!("nft set inet {table} {}", rules::LINKS_SET_NAME);
            let args = ["-j", "list", "set", "inet", table, rules::LINKS_SET_NAME];
            let json = nft::output(&args).await.map_err(inspect(what.clone()))?;
            let links = rules::parse_links_set(&json).map_err(|detail| NetworkError::Inspect {
                what,
                source: SystemError::Output {
                    command: format!("nft {}", args.join(" ")),
                    detail,
                },
            })?;
            slots.extend(links.iter().filter_map(|n| self.plan.slot_of(n)));
        }
        Ok(slots)
    }
}

/// The interface of the host's IPv4 default route, if there is one.
async fn default_route_interface() -> Result<Option<InterfaceName>, NetworkError> {
    let inspect = |source| NetworkError::Inspect {
        what: "the default route".to_owned(),
        source,
    };
    let host = Netlink::host().map_err(inspect)?;
    let name = host.default_route_interface().await.map_err(inspect)?;
    Ok(name.and_then(|name| name.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_arg_matches_the_guest_constants() {
        let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(GUEST_PREFIX_LEN)));
        assert_eq!(
            BOOT_IP_ARG,
            format!("ip={GUEST_IP}::{GATEWAY_IP}:{mask}:capsule:eth0:off")
        );
        assert_eq!(guest_network().index_of(GUEST_IP), Some(1));
        assert_eq!(guest_network().index_of(GATEWAY_IP), Some(2));
        let mac: Vec<String> = GATEWAY_MAC_BYTES
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        assert_eq!(mac.join(":"), GATEWAY_MAC);
    }

    #[test]
    fn kernel_refusals_keep_their_errno() {
        let refused = SystemError::io(
            "creating network namespace wrenn-1",
            std::io::Error::from_raw_os_error(libc::EEXIST),
        );
        assert_eq!(refused.errno(), Some(Errno::EEXIST));
        assert!(refused.to_string().contains("wrenn-1"), "{refused}");
        let mut nack = rtnetlink::packet_core::ErrorMessage::default();
        nack.code = std::num::NonZeroI32::new(-libc::ENODEV);
        let refused = SystemError::netlink(
            "deleting link wrenn-1".to_owned(),
            rtnetlink::Error::NetlinkError(nack),
        );
        assert_eq!(refused.errno(), Some(Errno::ENODEV));
        let other = SystemError::netlink("x".to_owned(), rtnetlink::Error::RequestFailed);
        assert_eq!(other.errno(), None);
    }
}
