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
    let a = manager.create("sandbox-a").await.unwrap();
    let b = manager.create("sandbox-b").await.unwrap();
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
    let net = manager.create("sb").await.unwrap();
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
    let again = manager.create("sb2").await.unwrap();
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
        let err = manager.create("doomed").await.unwrap_err();
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
    let err = manager.create("blocked").await.unwrap_err();
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
    let err = manager.create("blocked").await.unwrap_err();
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
    let net = manager.create("sb").await.unwrap();
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
        nets.push(crashed.create(id).await.unwrap());
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
    // The agent rebuilds the description of a sandbox it keeps from the slot alone.
    let kept = manager.network(nets[1].slot).unwrap();
    assert_eq!(kept, nets[1]);
    assert_eq!(manager.network(7), None);
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
    let fresh = manager.create("four").await.unwrap();
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
            tokio::spawn(async move { manager.create(&format!("sb{i}")).await })
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
        nets.push(manager.create(&format!("sb{i}")).await.unwrap());
    }
    let err = manager.create("one-too-many").await.unwrap_err();
    assert!(
        matches!(err, NetworkError::SlotsExhausted { capacity: 6 }),
        "{err}"
    );
    for net in &nets {
        manager.destroy(net).await.unwrap();
    }
    assert_nothing_left(prefix, k);
}
