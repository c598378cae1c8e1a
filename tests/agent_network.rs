//! Sandbox networking with real namespaces, veth pairs and nftables (run as root).
//!
//! A TAP device carries nothing without a VM behind it, so each test guest is a namespace of its
//! own joined to the sandbox namespace by a veth whose sandbox end takes the gateway address
//! from `tap0` — the guest sees exactly what a VM would: 169.254.0.21/30 with gateway .22.
//! Every test uses its own name prefix and address ranges so tests (and other agents on the
//! host) do not collide.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use wrenn::agent::network::{
    CreateStep, NetworkError, NetworkManager, NetworkOptions, SandboxNetwork, ENVD_PORT,
    GATEWAY_IP, GUEST_IP, GUEST_MAC, GUEST_PREFIX_LEN, TAP_NAME,
};
use wrenn::config::Config;
use wrenn::egress::EgressPolicy;

fn ip(args: &[&str]) {
    run("ip", args);
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes everything carrying a test's prefix, however the test ended.
struct Sweep(String);

impl Drop for Sweep {
    fn drop(&mut self) {
        let prefix = &self.0;
        for link in host_links()
            .into_iter()
            .filter(|l| l.starts_with(prefix.as_str()))
        {
            let _ = Command::new("ip").args(["link", "delete", &link]).output();
        }
        for ns in namespaces()
            .into_iter()
            .filter(|n| n.starts_with(prefix.as_str()))
        {
            let _ = Command::new("ip").args(["netns", "delete", &ns]).output();
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", prefix])
            .output();
    }
}

fn namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn host_links() -> Vec<String> {
    let links: Vec<serde_json::Value> =
        serde_json::from_str(&run("ip", &["-j", "link", "show"])).unwrap();
    links
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect()
}

/// Test `k` owns host addresses 10.201.k.0/24 and transit addresses 10.202.k.0/24.
fn options(prefix: &str, k: u8) -> NetworkOptions {
    // Not the production files root: the record of the host's sysctls goes to a directory of
    // these tests' own, which exists on a fresh machine too.
    let mut agent = Config::default().agent;
    agent.files_rootdir = std::env::temp_dir().join("wrenn-agent-network-tests");
    std::fs::create_dir_all(&agent.files_rootdir).unwrap();
    let mut options = NetworkOptions::from_config(&agent);
    options.name_prefix = prefix.to_owned();
    options.host_range = format!("10.201.{k}.0/24").parse().unwrap();
    options.transit_range = format!("10.202.{k}.0/24").parse().unwrap();
    options
}

fn namespace_veth_addr(k: u8, slot: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, k, (2 * slot + 1) as u8)
}

fn host_veth_addr(k: u8, slot: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, k, (2 * slot) as u8)
}

/// Runs `f` on a thread inside the named network namespace; sockets it creates stay there.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let file = std::fs::File::open(&path).unwrap();
                setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
    })
}

/// Accepts connections forever, answering each with the peer address it sees.
fn serve_peer_address(listener: TcpListener) -> u16 {
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let peer = stream.peer_addr().unwrap().ip().to_string();
            let _ = stream.write_all(peer.as_bytes());
        }
    });
    port
}

/// What the server at `addr` saw as our address, or `None` when it could not be reached.
fn reach(from_ns: Option<&str>, addr: SocketAddr) -> Option<String> {
    let attempt = move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(700)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    };
    match from_ns {
        Some(ns) => in_netns(ns, attempt),
        None => attempt(),
    }
}

/// Asserts that none of `targets` answers from inside `ns`; the probes run in parallel.
fn assert_unreachable(ns: &str, targets: &[SocketAddr], what: &str) {
    let reached: Vec<SocketAddr> = std::thread::scope(|scope| {
        let probes: Vec<_> = targets
            .iter()
            .map(|&addr| scope.spawn(move || (addr, reach(Some(ns), addr))))
            .collect();
        probes
            .into_iter()
            .map(|probe| probe.join().unwrap())
            .filter_map(|(addr, answer)| answer.map(|_| addr))
            .collect()
    });
    assert!(reached.is_empty(), "{ns} reached {what} at {reached:?}");
}

/// Stands a guest up behind the sandbox: a namespace holding the guest address and MAC, wired
/// where the VM's NIC would be, with envd's port answered by a peer-address server.
fn attach_guest(net: &SandboxNetwork, guest_ns: &str) {
    let sandbox = net.netns_name.as_str();
    let gateway = format!("{GATEWAY_IP}/{GUEST_PREFIX_LEN}");
    let guest = format!("{GUEST_IP}/{GUEST_PREFIX_LEN}");
    ip(&["netns", "add", guest_ns]);
    ip(&["-n", sandbox, "addr", "del", &gateway, "dev", TAP_NAME]);
    ip(&[
        "-n", sandbox, "link", "add", "gst0", "type", "veth", "peer", "name", "eth0", "netns",
        guest_ns,
    ]);
    ip(&["-n", sandbox, "addr", "add", &gateway, "dev", "gst0"]);
    ip(&["-n", sandbox, "link", "set", "gst0", "up"]);
    ip(&["-n", guest_ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n", guest_ns, "link", "set", "eth0", "address", GUEST_MAC, "up",
    ]);
    ip(&["-n", guest_ns, "addr", "add", &guest, "dev", "eth0"]);
    ip(&[
        "-n",
        guest_ns,
        "route",
        "add",
        "default",
        "via",
        &GATEWAY_IP.to_string(),
    ]);
    let listener = in_netns(guest_ns, || {
        TcpListener::bind((GUEST_IP, ENVD_PORT)).unwrap()
    });
    serve_peer_address(listener);
}

/// Asserts that nothing of `prefix` is left: namespaces, links, routes into the host range and
/// elements of the manager's nft sets.
fn assert_nothing_left(prefix: &str, k: u8) {
    let ours = |name: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('-'))
    };
    let namespaces: Vec<String> = namespaces().into_iter().filter(|n| ours(n)).collect();
    assert!(namespaces.is_empty(), "namespaces left: {namespaces:?}");
    let links: Vec<String> = host_links().into_iter().filter(|n| ours(n)).collect();
    assert!(links.is_empty(), "links left: {links:?}");
    let routes = run("ip", &["-4", "route", "show"]);
    let host_net = format!("10.201.{k}.");
    assert!(!routes.contains(&host_net), "routes left:\n{routes}");
    for set in ["sandbox_links", "sandbox_sources"] {
        let listed = run("nft", &["-j", "list", "set", "inet", prefix, set]);
        assert!(
            !listed.contains("\"elem\""),
            "nft elements left in {set}: {listed}"
        );
    }
}

#[tokio::test]
async fn guests_are_reachable_isolated_and_nat_their_egress() {
    let prefix = "wnt1";
    let k = 1;
    let _sweep = Sweep(prefix.to_owned());

    // A stand-in for the internet: an uplink namespace with a public-looking server, plus a
    // private address behind it standing for the LAN.
    let uplink_ns = format!("{prefix}up");
    let uplink = format!("{prefix}up");
    ip(&["netns", "add", &uplink_ns]);
    ip(&[
        "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &uplink_ns,
    ]);
    ip(&["addr", "add", "198.18.77.1/30", "dev", &uplink]);
    ip(&["link", "set", &uplink, "up"]);
    ip(&[
        "-n",
        &uplink_ns,
        "addr",
        "add",
        "198.18.77.2/30",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &uplink_ns,
        "addr",
        "add",
        "10.203.77.1/32",
        "dev",
        "lo",
    ]);
    ip(&["-n", &uplink_ns, "link", "set", "eth0", "up"]);
    ip(&["-n", &uplink_ns, "link", "set", "lo", "up"]);
    ip(&["route", "add", "10.203.77.1/32", "via", "198.18.77.2"]);
    let outside = in_netns(&uplink_ns, || TcpListener::bind("0.0.0.0:0").unwrap());
    let outside_port = serve_peer_address(outside);

    // Host services a guest must never reach: agent and control-plane style listeners on every
    // address, and one on loopback; plus a second host address on a spare link.
    let spare = format!("{prefix}spare");
    ip(&[
        "link",
        "add",
        &spare,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{spare}p"),
    ]);
    ip(&["addr", "add", "198.18.78.1/32", "dev", &spare]);
    ip(&["link", "set", &spare, "up"]);
    let agent_port = serve_peer_address(TcpListener::bind("0.0.0.0:0").unwrap());
    let cp_port = serve_peer_address(TcpListener::bind("0.0.0.0:0").unwrap());
    let loopback_port = serve_peer_address(TcpListener::bind("127.0.0.1:0").unwrap());

    let mut opts = options(prefix, k);
    opts.egress_interface = Some(uplink.parse().unwrap());
    let manager = NetworkManager::with_options(opts).await.unwrap();
    let a = manager.create("sandbox-a", &open()).await.unwrap();
    let b = manager.create("sandbox-b", &open()).await.unwrap();
    assert_eq!((a.slot, b.slot), (1, 2));
    assert_eq!(a.host_addr, Ipv4Addr::new(10, 201, k, 1));
    assert_eq!(
        a.netns_path,
        std::path::Path::new("/run/netns").join(format!("{prefix}-1"))
    );
    assert_eq!(a.guest_mac, "02:FC:00:00:00:05");
    assert_eq!(
        a.boot_ip_arg,
        "ip=169.254.0.21::169.254.0.22:255.255.255.252:capsule:eth0:off"
    );
    let guest_a = format!("{prefix}g1");
    let guest_b = format!("{prefix}g2");
    attach_guest(&a, &guest_a);
    attach_guest(&b, &guest_b);

    // The agent reaches each guest's envd through the slot's host address; the guest sees the
    // host end of its veth as the caller.
    assert_eq!(
        reach(None, a.envd_addr()),
        Some(host_veth_addr(k, 1).to_string())
    );
    assert_eq!(
        reach(None, b.envd_addr()),
        Some(host_veth_addr(k, 2).to_string())
    );

    // Egress leaves through the uplink, masqueraded to the uplink's address.
    let internet = SocketAddr::from(([198, 18, 77, 2], outside_port));
    assert_eq!(
        reach(Some(&guest_a), internet),
        Some("198.18.77.1".to_owned())
    );
    assert_eq!(
        reach(Some(&guest_b), internet),
        Some("198.18.77.1".to_owned())
    );
    // The private network behind the uplink is reachable from the host but denied to guests.
    let lan = SocketAddr::from(([10, 203, 77, 1], outside_port));
    assert!(reach(None, lan).is_some());
    assert_eq!(
        reach(Some(&guest_a), lan),
        None,
        "guest reached a denied network"
    );

    // Each sandbox cannot reach the other, by its host address or by either end of its veth.
    for (from, other) in [(&guest_a, 2), (&guest_b, 1)] {
        let targets = [
            SocketAddr::from((Ipv4Addr::new(10, 201, k, other as u8), ENVD_PORT)),
            SocketAddr::from((namespace_veth_addr(k, other), ENVD_PORT)),
            SocketAddr::from((host_veth_addr(k, other), ENVD_PORT)),
        ];
        assert_unreachable(from, &targets, "another sandbox");
    }
    // Neither sandbox reaches the host's services (agent, control plane, loopback-bound) on any
    // host address: both veth ends, a second link's address and the uplink's.
    let host_addrs = [
        host_veth_addr(k, 1),
        host_veth_addr(k, 2),
        Ipv4Addr::new(198, 18, 78, 1),
        Ipv4Addr::new(198, 18, 77, 1),
    ];
    let services: Vec<SocketAddr> = host_addrs
        .iter()
        .flat_map(|&ip| {
            [agent_port, cp_port, loopback_port].map(|port| SocketAddr::from((ip, port)))
        })
        .collect();
    assert_unreachable(&guest_a, &services, "a host service");
    assert_unreachable(&guest_b, &services, "a host service");
    // Positive control: the services do answer on those addresses.
    for target in host_addrs {
        let addr = SocketAddr::from((target, agent_port));
        assert!(reach(None, addr).is_some(), "{addr}");
    }
    assert!(reach(None, SocketAddr::from(([127, 0, 0, 1], loopback_port))).is_some());

    manager.destroy(&a).await.unwrap();
    manager.destroy(&b).await.unwrap();
    assert_eq!(reach(None, a.envd_addr()), None);
    assert_nothing_left(prefix, k);
    ip(&["route", "del", "10.203.77.1/32"]);
}

#[tokio::test]
async fn destroy_removes_everything_and_is_idempotent() {
    let (prefix, k) = ("wnt2", 2);
    let _sweep = Sweep(prefix.to_owned());
    let manager = NetworkManager::with_options(options(prefix, k))
        .await
        .unwrap();
    let net = manager.create("sb", &open()).await.unwrap();
    assert!(net.netns_path.exists());
    assert!(host_links().contains(&net.host_link));
    let inside = run(
        "ip",
        &["-n", &net.netns_name, "-j", "link", "show", TAP_NAME],
    );
    assert!(inside.contains("02:fc:00:00:00:06"), "{inside}");
    let table = run("nft", &["list", "table", "inet", prefix]);
    assert!(table.contains(&format!("\"{}\"", net.host_link)), "{table}");

    manager.destroy(&net).await.unwrap();
    assert_nothing_left(prefix, k);
    manager.destroy(&net).await.unwrap();
    assert!(manager.slots_in_use().is_empty());
    // The slot is free again.
    let again = manager.create("sb2", &open()).await.unwrap();
    assert_eq!(again.slot, net.slot);
    manager.destroy(&again).await.unwrap();
    assert_nothing_left(prefix, k);
}

#[tokio::test]
async fn a_failure_after_each_create_step_rolls_back_cleanly() {
    let (prefix, k) = ("wnt3", 3);
    let _sweep = Sweep(prefix.to_owned());
    for step in CreateStep::ALL {
        let mut opts = options(prefix, k);
        opts.fail_after = Some(step);
        let manager = NetworkManager::with_options(opts).await.unwrap();
        let err = manager.create("doomed", &open()).await.unwrap_err();
        assert!(
            matches!(err, NetworkError::Injected { step: s, .. } if s == step),
            "{err}"
        );
        assert_nothing_left(prefix, k);
        assert!(
            manager.slots_in_use().is_empty(),
            "slot kept after rollback at {step}"
        );
    }

    // A real failure names the step and the device: a link already holds the slot's veth name.
    let manager = NetworkManager::with_options(options(prefix, k))
        .await
        .unwrap();
    let squatter = format!("{prefix}-1");
    ip(&[
        "link",
        "add",
        &squatter,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{prefix}sq"),
    ]);
    let err = manager.create("blocked", &open()).await.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            err,
            NetworkError::Create {
                step: CreateStep::Veth,
                ..
            }
        ),
        "{message}"
    );
    assert!(
        message.contains("veth pair") && message.contains(&squatter),
        "{message}"
    );
    assert!(
        matches!(&err, NetworkError::Create { source, .. } if source.errno() == Some(Errno::EEXIST)),
        "{message}"
    );
    assert!(!std::path::Path::new("/run/netns").join(&squatter).exists());
    ip(&["link", "delete", &squatter]);
    assert_nothing_left(prefix, k);
}

#[tokio::test]
async fn kernel_refusals_are_typed_and_missing_objects_are_not_errors() {
    let (prefix, k) = ("wnt6", 6);
    let _sweep = Sweep(prefix.to_owned());
    let manager = NetworkManager::with_options(options(prefix, k))
        .await
        .unwrap();

    // A namespace of the slot's name that the manager did not make is refused, not adopted,
    // and survives the rollback.
    let squatter = format!("{prefix}-1");
    ip(&["netns", "add", &squatter]);
    let err = manager.create("blocked", &open()).await.unwrap_err();
    let message = err.to_string();
    match &err {
        NetworkError::Create {
            step: CreateStep::Namespace,
            slot: 1,
            device,
            source,
        } => {
            assert_eq!(device, &squatter);
            assert_eq!(source.errno(), Some(Errno::EEXIST), "{message}");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(message.contains(&squatter), "{message}");
    assert!(namespaces().contains(&squatter));
    assert!(manager.slots_in_use().is_empty());
    ip(&["netns", "delete", &squatter]);
    assert_nothing_left(prefix, k);

    // Someone removed the host link and the namespace behind the manager's back: destroy still
    // succeeds and frees the slot.
    let net = manager.create("sb", &open()).await.unwrap();
    ip(&["link", "delete", &net.host_link]);
    ip(&["netns", "delete", &net.netns_name]);
    manager.destroy(&net).await.unwrap();
    assert!(manager.slots_in_use().is_empty());
    assert_nothing_left(prefix, k);
}

#[tokio::test]
async fn cleanup_removes_what_a_crashed_manager_left() {
    let (prefix, k) = ("wnt4", 4);
    let _sweep = Sweep(prefix.to_owned());
    let crashed = NetworkManager::with_options(options(prefix, k))
        .await
        .unwrap();
    let mut nets = Vec::new();
    for id in ["one", "two", "three"] {
        nets.push(crashed.create(id, &open()).await.unwrap());
    }
    drop(crashed);
    // A create interrupted after its veth: a link with no namespace.
    let half = format!("{prefix}-9");
    ip(&[
        "link",
        "add",
        &half,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{prefix}half"),
    ]);

    let manager = NetworkManager::with_options(options(prefix, k))
        .await
        .unwrap();
    assert_eq!(manager.slots_in_use(), vec![1, 2, 3, 9]);
    // The agent rebuilds the description of a sandbox it keeps from the slot alone, and puts
    // its egress table and DNS forwarder back.
    let kept = manager.adopt(nets[1].slot, "two", &open()).await.unwrap();
    assert_eq!(kept, nets[1]);
    let egress = run(
        "ip",
        &[
            "netns",
            "exec",
            &kept.netns_name,
            "nft",
            "list",
            "table",
            "ip",
            &format!("{prefix}_egress"),
        ],
    );
    assert!(egress.contains("redirect to :53"), "{egress}");
    assert!(matches!(
        manager.adopt(7, "seven", &open()).await,
        Err(NetworkError::NoSuchSlot(7))
    ));
    let cleaned = manager.cleanup_leftovers(&[kept.slot]).await.unwrap();
    assert_eq!(cleaned, vec![1, 3, 9]);
    assert_eq!(manager.slots_in_use(), vec![2]);
    for gone in [&nets[0], &nets[2]] {
        assert!(!gone.netns_path.exists());
        assert!(!host_links().contains(&gone.host_link));
    }
    assert!(!host_links().contains(&half));
    // The kept sandbox is intact and the freed slots are reused.
    assert!(kept.netns_path.exists());
    let table = run("nft", &["list", "table", "inet", prefix]);
    assert!(
        table.contains(&format!("\"{}\"", kept.host_link)),
        "{table}"
    );
    assert!(
        !table.contains(&format!("\"{}\"", nets[0].host_link)),
        "{table}"
    );
    let fresh = manager.create("four", &open()).await.unwrap();
    assert_eq!(fresh.slot, 1);

    manager.destroy(&fresh).await.unwrap();
    manager.destroy(&kept).await.unwrap();
    assert_nothing_left(prefix, k);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_get_distinct_slots_up_to_capacity() {
    let (prefix, k) = ("wnt5", 5);
    let _sweep = Sweep(prefix.to_owned());
    let manager = Arc::new(
        NetworkManager::with_options(options(prefix, k))
            .await
            .unwrap(),
    );
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let manager = manager.clone();
            tokio::spawn(async move { manager.create(&format!("sb{i}"), &open()).await })
        })
        .collect();
    let mut nets = Vec::new();
    for task in tasks {
        nets.push(task.await.unwrap().unwrap());
    }
    let mut slots: Vec<u32> = nets.iter().map(|n| n.slot).collect();
    slots.sort_unstable();
    assert_eq!(slots, (1..=8).collect::<Vec<_>>());
    let routes = run("ip", &["-4", "route", "show"]);
    for net in &nets {
        assert!(
            routes.contains(&format!("{} via", net.host_addr)),
            "{routes}"
        );
    }
    let tasks: Vec<_> = nets
        .into_iter()
        .map(|net| {
            let manager = manager.clone();
            tokio::spawn(async move { manager.destroy(&net).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_nothing_left(prefix, k);

    // A /29 of host addresses holds six slots; the seventh create is refused cleanly.
    let mut small = options(prefix, k);
    small.host_range = format!("10.201.{k}.0/29").parse().unwrap();
    let manager = NetworkManager::with_options(small).await.unwrap();
    assert_eq!(manager.capacity(), 6);
    let mut nets = Vec::new();
    for i in 0..6 {
        nets.push(manager.create(&format!("sb{i}"), &open()).await.unwrap());
    }
    let err = manager.create("one-too-many", &open()).await.unwrap_err();
    assert!(
        matches!(err, NetworkError::SlotsExhausted { capacity: 6 }),
        "{err}"
    );
    for net in &nets {
        manager.destroy(net).await.unwrap();
    }
    assert_nothing_left(prefix, k);
}

fn open() -> EgressPolicy {
    EgressPolicy::default()
}

fn policy(json: serde_json::Value) -> EgressPolicy {
    serde_json::from_value::<EgressPolicy>(json)
        .unwrap()
        .normalised()
        .unwrap()
}

/// Looks `name` up from inside `ns` at `server` (over TCP when `tcp`): the answer's code and
/// addresses, or `None` when nothing answered.
fn lookup(
    ns: &str,
    server: Ipv4Addr,
    name: &str,
    tcp: bool,
) -> Option<(hickory_proto::op::ResponseCode, Vec<Ipv4Addr>)> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut query = Message::new();
    query.set_id(rand::random());
    query.set_recursion_desired(true);
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let bytes = query.to_vec().unwrap();
    let reply = in_netns(ns, move || -> Option<Vec<u8>> {
        let timeout = Some(Duration::from_secs(3));
        if tcp {
            let mut stream =
                TcpStream::connect_timeout(&(server, 53).into(), Duration::from_secs(3)).ok()?;
            stream.set_read_timeout(timeout).ok()?;
            stream.write_all(&(bytes.len() as u16).to_be_bytes()).ok()?;
            stream.write_all(&bytes).ok()?;
            let mut len = [0; 2];
            stream.read_exact(&mut len).ok()?;
            let mut reply = vec![0; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut reply).ok()?;
            Some(reply)
        } else {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            socket.set_read_timeout(timeout).ok()?;
            socket.send_to(&bytes, (server, 53)).ok()?;
            let mut buffer = [0; 1500];
            let n = socket.recv(&mut buffer).ok()?;
            Some(buffer[..n].to_vec())
        }
    })?;
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.id(), query.id());
    let addrs = reply
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Some((reply.response_code(), addrs))
}

/// A server that echoes what it reads, to hold connections open.
fn serve_echo(listener: TcpListener) -> u16 {
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut &stream);
            });
        }
    });
    port
}

/// Whether a held connection still carries an echo.
fn echoes(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut got = [0; 4];
    stream.write_all(b"ping").is_ok() && stream.read_exact(&mut got).is_ok() && &got == b"ping"
}

/// Downloads from a server that sends `bytes` bytes; how long it took.
fn serve_bytes(listener: TcpListener, bytes: usize) -> u16 {
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let chunk = vec![7u8; 64 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if stream.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    port
}

// The test's probes block their thread; the DNS forwarder needs a runtime thread of its own.
/// What a server at `addr` answers to `request` sent from inside `ns`; empty when the connection
/// was refused, reset or closed without an answer.
fn exchange(ns: &str, addr: SocketAddr, request: Vec<u8>) -> String {
    in_netns(ns, move || {
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return String::new();
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        if stream.write_all(&request).is_err() {
            return String::new();
        }
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
}

/// The first flight of a TLS client asking for `name`.
fn client_hello(name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(wrenn::tls::provider())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policies_hold_by_network_and_by_name_and_change_at_runtime() {
    let (prefix, k) = ("wnt7", 7);
    let _sweep = Sweep(prefix.to_owned());
    // "The internet": a namespace behind the uplink holding three servers and a DNS server,
    // on addresses the host's own egress refusals leave alone.
    let internet = format!("{prefix}up");
    ip(&["netns", "add", &internet]);
    ip(&[
        "link", "add", &internet, "type", "veth", "peer", "name", "eth0", "netns", &internet,
    ]);
    ip(&["addr", "add", "198.18.79.1/24", "dev", &internet]);
    ip(&["link", "set", &internet, "up"]);
    for addr in ["198.18.79.2/24", "198.18.79.3/24", "198.18.79.53/24"] {
        ip(&["-n", &internet, "addr", "add", addr, "dev", "eth0"]);
    }
    ip(&["-n", &internet, "link", "set", "eth0", "up"]);
    ip(&["-n", &internet, "link", "set", "lo", "up"]);
    let port = serve_peer_address(in_netns(&internet, || {
        TcpListener::bind("0.0.0.0:0").unwrap()
    }));
    let echo = serve_echo(in_netns(&internet, || {
        TcpListener::bind("0.0.0.0:0").unwrap()
    }));
    serve_peer_address(in_netns(&internet, || {
        TcpListener::bind("0.0.0.0:443").unwrap()
    }));
    wrenn_test_support::peer::serve_http(in_netns(&internet, || {
        TcpListener::bind("0.0.0.0:80").unwrap()
    }));
    const DOWNLOAD: usize = 5 << 20;
    let download = serve_bytes(
        in_netns(&internet, || TcpListener::bind("0.0.0.0:0").unwrap()),
        DOWNLOAD,
    );
    let dns = Ipv4Addr::new(198, 18, 79, 53);
    wrenn_test_support::dns::serve(
        &internet,
        dns,
        &[
            ("api.allowed.test", [198, 18, 79, 2]),
            ("denied.test", [198, 18, 79, 3]),
            ("other.test", [198, 18, 79, 3]),
            ("rebind.allowed.test", [10, 201, 7, 2]),
            ("loop.allowed.test", [127, 0, 0, 1]),
        ],
    );
    let allowed_server = SocketAddr::from(([198, 18, 79, 2], port));
    let other_server = SocketAddr::from(([198, 18, 79, 3], port));

    let mut opts = options(prefix, k);
    opts.egress_interface = Some(internet.parse().unwrap());
    opts.dns_servers = vec![SocketAddr::from((dns, 53))];
    let manager = NetworkManager::with_options(opts).await.unwrap();
    let strict = policy(serde_json::json!({
        "default": "deny",
        "allow": ["*.allowed.test"],
        "deny": ["denied.test"],
    }));
    let locked = manager.create("locked", &strict).await.unwrap();
    let free = manager.create("free", &open()).await.unwrap();
    let (guest, free_guest) = (format!("{prefix}g1"), format!("{prefix}g2"));
    attach_guest(&locked, &guest);
    attach_guest(&free, &free_guest);
    use hickory_proto::op::ResponseCode;

    // Nothing is admitted before a look-up: the default refuses, on any port.
    assert_unreachable(&guest, &[allowed_server, other_server], "the internet");
    // The other sandbox, without a policy, reaches both: one sandbox's rules are its own.
    assert!(reach(Some(&free_guest), allowed_server).is_some());
    assert!(reach(Some(&free_guest), other_server).is_some());

    // An allowed name's answer admits its address, whichever resolver the guest asked and over
    // either transport; the guest reaches it on a port that is not HTTP's.
    for (server, tcp) in [
        (GATEWAY_IP, false),
        (Ipv4Addr::new(8, 8, 8, 8), false),
        (dns, true),
    ] {
        let answer = lookup(&guest, server, "api.allowed.test", tcp);
        assert_eq!(
            answer,
            Some((ResponseCode::NoError, vec![Ipv4Addr::new(198, 18, 79, 2)])),
            "via {server} tcp={tcp}"
        );
    }
    assert_eq!(
        reach(Some(&guest), allowed_server),
        Some("198.18.79.1".to_owned()),
        "an allowed name's address is reachable (and masqueraded)"
    );
    // Web ports of an address admitted only by name pass the name guard only when they ask for
    // an allowed name that this sandbox's look-ups resolved to that address: TLS by its SNI
    // (another name on the same address is cut), HTTP request by request (another name gets
    // 403, even on a connection an allowed request opened, or in an absolute-form target).
    let web = |port: u16, request: Vec<u8>| {
        exchange(&guest, SocketAddr::from(([198, 18, 79, 2], port)), request)
    };
    assert_eq!(web(443, client_hello("api.allowed.test")), "198.18.79.1");
    assert_eq!(web(443, client_hello("evil.test")), "");
    assert_eq!(web(443, client_hello("www.allowed.test")), "");
    let get = |target: &str, host: &str, close: bool| {
        let close = if close { "Connection: close\r\n" } else { "" };
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{close}\r\n")
    };
    let allowed = web(80, get("/", "api.allowed.test", true).into_bytes());
    assert!(
        allowed.starts_with("HTTP/1.1 200") && allowed.ends_with("\r\n198.18.79.1"),
        "{allowed}"
    );
    let other = web(80, get("/", "evil.test:80", true).into_bytes());
    assert!(other.starts_with("HTTP/1.1 403"), "{other}");
    let both = get("/", "api.allowed.test", false) + &get("/", "evil.test", true);
    let both = web(80, both.into_bytes());
    assert!(
        both.starts_with("HTTP/1.1 200") && both.contains("198.18.79.1HTTP/1.1 403"),
        "{both}"
    );
    let fronted = web(
        80,
        get("http://evil.test/", "api.allowed.test", true).into_bytes(),
    );
    assert!(fronted.starts_with("HTTP/1.1 403"), "{fronted}");
    let garbage = web(80, b"\x00 not a request\r\n\r\n".to_vec());
    assert!(!garbage.contains("198.18.79.1"), "{garbage}");

    // Unlisted and denied names do not resolve: under a default of deny an unlisted name's
    // addresses would be refused anyway, and look-ups of arbitrary names are a way out. The
    // other sandbox, without a policy, resolves it.
    assert_eq!(
        lookup(&guest, GATEWAY_IP, "other.test", false),
        Some((ResponseCode::NXDomain, vec![]))
    );
    assert_eq!(
        lookup(&free_guest, GATEWAY_IP, "other.test", false),
        Some((ResponseCode::NoError, vec![Ipv4Addr::new(198, 18, 79, 3)]))
    );
    assert_eq!(
        lookup(&guest, GATEWAY_IP, "denied.test", false),
        Some((ResponseCode::NXDomain, vec![]))
    );
    assert_unreachable(&guest, &[other_server], "an unlisted name's address");
    // Rebinding: an allowed name pointed at the host's side or at loopback is refused whole.
    for name in ["rebind.allowed.test", "loop.allowed.test"] {
        assert_eq!(
            lookup(&guest, GATEWAY_IP, name, false),
            Some((ResponseCode::Refused, vec![])),
            "{name}"
        );
    }

    // A runtime change applies to the next connection: admit the other server by address.
    let mut widened = strict.clone();
    widened.allow.push("198.18.79.3".parse().unwrap());
    manager
        .set_egress(locked.slot, "locked", widened)
        .await
        .unwrap();
    assert!(reach(Some(&guest), other_server).is_some());
    // Pins of names the new policy still allows survive the change.
    assert!(reach(Some(&guest), allowed_server).is_some());

    // Established connections to a destination a change refuses are cut.
    let echo_addr = SocketAddr::from(([198, 18, 79, 3], echo));
    let mut held = in_netns(&guest, || TcpStream::connect(echo_addr).unwrap());
    assert!(echoes(&mut held));
    manager
        .set_egress(locked.slot, "locked", strict.clone())
        .await
        .unwrap();
    assert!(
        !echoes(&mut held),
        "an established connection outlived its refusal"
    );
    // ...while one admitted by name survives a change that keeps its name (its conntrack mark
    // derives from the name rules alone)...
    let allowed_echo = SocketAddr::from(([198, 18, 79, 2], echo));
    let mut kept = in_netns(&guest, || TcpStream::connect(allowed_echo).unwrap());
    assert!(echoes(&mut kept));
    manager
        .set_egress(locked.slot, "locked", strict.clone())
        .await
        .unwrap();
    assert!(
        echoes(&mut kept),
        "a change that still admits a flow must not cut it"
    );
    // ...and not one that drops the name.
    let no_names = policy(serde_json::json!({ "default": "deny" }));
    manager
        .set_egress(locked.slot, "locked", no_names)
        .await
        .unwrap();
    assert!(
        !echoes(&mut kept),
        "a flow outlived the name that admitted it"
    );
    drop((held, kept));

    // Connection limit: with at most two at once, a third is refused until one closes.
    let limited = policy(serde_json::json!({ "max_connections": 2 }));
    manager
        .set_egress(locked.slot, "locked", limited)
        .await
        .unwrap();
    let mut two: Vec<TcpStream> = (0..2)
        .map(|_| in_netns(&guest, || TcpStream::connect(echo_addr).unwrap()))
        .collect();
    for stream in &mut two {
        assert!(echoes(stream));
    }
    let third = in_netns(&guest, || {
        TcpStream::connect_timeout(&echo_addr, Duration::from_secs(2))
    });
    assert!(third.is_err(), "a third connection passed a limit of two");
    // A change that keeps the limit keeps the count.
    let widened_limit = policy(serde_json::json!({
        "max_connections": 2, "deny": ["203.0.113.0/24"],
    }));
    manager
        .set_egress(locked.slot, "locked", widened_limit)
        .await
        .unwrap();
    let third = in_netns(&guest, || {
        TcpStream::connect_timeout(&echo_addr, Duration::from_secs(2))
    });
    assert!(third.is_err(), "a policy change reset the connection count");
    drop(two);
    // Closed connections leave the count once conntrack has seen them close.
    let mut admitted = false;
    for _ in 0..50 {
        if in_netns(&guest, || {
            TcpStream::connect_timeout(&echo_addr, Duration::from_secs(1))
        })
        .is_ok()
        {
            admitted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        admitted,
        "the limit did not free up after connections closed"
    );

    // Bandwidth: 8 Mbit/s is 1 MB/s. The kernel's bucket lets a second of the rate and an
    // eighth of it more through at once, so 5 MiB cannot arrive in under 4 s; unlimited it
    // takes milliseconds.
    let fetch = |ns: &str| {
        let to = SocketAddr::from(([198, 18, 79, 3], download));
        in_netns(ns, move || {
            let started = std::time::Instant::now();
            let mut stream = TcpStream::connect(to).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut sink = Vec::new();
            stream.read_to_end(&mut sink).unwrap();
            assert_eq!(sink.len(), DOWNLOAD);
            started.elapsed()
        })
    };
    manager
        .set_egress(
            locked.slot,
            "locked",
            policy(serde_json::json!({ "bandwidth_mbps": 8 })),
        )
        .await
        .unwrap();
    let limited = fetch(&guest);
    let unlimited = fetch(&free_guest);
    assert!(
        limited >= Duration::from_millis(3500),
        "5 MiB at 8 Mbit/s took {limited:?}"
    );
    eprintln!("5 MiB: {limited:?} at 8 Mbit/s, {unlimited:?} unlimited");

    manager.destroy(&locked).await.unwrap();
    manager.destroy(&free).await.unwrap();
    assert!(matches!(
        manager.set_egress(locked.slot, "locked", open()).await,
        Err(NetworkError::NoSuchSlot(_))
    ));
    assert_nothing_left(prefix, k);
}
