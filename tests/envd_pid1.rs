//! envd as PID 1: inside fresh PID, mount, UTS and network namespaces it mounts, names the host,
//! configures `eth0` from `ip=`, writes resolv.conf, reaps orphans and on shutdown stops every
//! process and powers off (which, in a child PID namespace, ends only that namespace). And as an
//! ordinary process, SIGTERM stops its children before it exits.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use wrenn::envd::api::{ProcessSpec, RunRequest, StartRequest};
use wrenn::envd::client::EnvdClient;
use wrenn_test_support::envd::EnvdProcess;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wrenn"))
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip runs");
    assert!(status.success(), "ip {args:?} failed");
}

/// A named network namespace with a veth pair whose inner end is an unconfigured `eth0`.
struct GuestNetwork {
    namespace: String,
    guest: String,
    gateway: String,
}

impl GuestNetwork {
    fn create() -> Self {
        let id = std::process::id();
        let namespace = format!("wrenn-envd-{id}");
        let host_if = format!("wev{}", id % 1_000_000);
        let (a, b) = ((id >> 6) & 0xff, (id & 0x3f) << 2);
        let guest = format!("10.250.{a}.{}", b + 1);
        let gateway = format!("10.250.{a}.{}", b + 2);
        let _ = Command::new("ip")
            .args(["netns", "del", &namespace])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &namespace]);
        let network = Self {
            namespace,
            guest,
            gateway,
        };
        ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &network.namespace,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", network.gateway),
            "dev",
            &host_if,
        ]);
        ip(&["link", "set", &host_if, "up"]);
        network
    }
}

impl Drop for GuestNetwork {
    fn drop(&mut self) {
        // Deleting the namespace destroys eth0 and with it the host end of the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
    }
}

fn run(spec: ProcessSpec) -> RunRequest {
    RunRequest {
        process: spec,
        timeout_sec: Some(20),
    }
}

async fn sh(client: &EnvdClient, script: &str) -> String {
    let out = client
        .run(&run(ProcessSpec::new("sh", &["-c", script])))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{script}: {out:?}");
    out.stdout
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("envd-pid1-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

#[tokio::test]
async fn pid1_boots_the_guest_reaps_orphans_and_powers_off() {
    let network = GuestNetwork::create();
    let dir = scratch();
    let file = |name: &str| -> PathBuf { dir.path().join(name) };
    std::fs::write(
        file("cmdline"),
        format!(
            "console=ttyS0 ip={}::{}:255.255.255.252:capsule-test:eth0:off wrenn.dns=9.9.9.9\n",
            network.guest, network.gateway
        ),
    )
    .unwrap();
    // The namespaces share the host's root filesystem: resolv.conf and hosts are bind-mounted
    // stand-ins so the guest init writes those, never the host's.
    std::fs::write(file("resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
    std::fs::copy("/etc/hosts", file("hosts")).unwrap();
    let script = r#"mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/hosts && exec "$0" envd --cmdline-file "$3" --vsock-port 0"#;
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &network.namespace])
        .args([
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--uts",
            "--mount-proc",
        ])
        .args(["sh", "-c", script])
        .arg(binary())
        .args([file("resolv.conf"), file("hosts"), file("cmdline")]);
    let mut envd =
        EnvdProcess::start_command(command, &network.guest).expect("envd boots as PID 1");
    let client = envd.client();
    assert!(client.health().await.is_ok());

    assert_eq!(sh(&client, "echo $PPID").await, "1\n");
    assert_eq!(sh(&client, "hostname").await, "capsule-test\n");
    assert_eq!(
        std::fs::read_to_string(file("resolv.conf")).unwrap(),
        "nameserver 9.9.9.9\n"
    );
    assert!(std::fs::read_to_string(file("hosts"))
        .unwrap()
        .contains("capsule-test"));
    let routes = sh(&client, "ip route").await;
    assert!(
        routes.contains(&format!("default via {} dev eth0", network.gateway)),
        "{routes}"
    );
    assert!(sh(&client, "ip -o link show lo").await.contains("UP"));
    assert_eq!(sh(&client, "stat -f -c %T /tmp").await, "tmpfs\n");

    // Orphans: each `(sleep &)` leaves a sleep whose parent exits at once, so PID 1 inherits it.
    sh(&client, "for i in 1 2 3 4 5 6 7 8; do (sleep 0.2 &); done").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let states = sh(
        &client,
        "for s in /proc/[0-9]*/stat; do cut -d' ' -f3 $s 2>/dev/null; done",
    )
    .await;
    assert!(!states.lines().any(|s| s == "Z"), "zombies left: {states}");

    let marker = file("terminated");
    let script = format!(
        "trap 'echo term > {}; exit 0' TERM; while :; do sleep 0.05; done",
        marker.display()
    );
    let request = StartRequest {
        process: ProcessSpec::new("sh", &["-c", &script]),
        tag: None,
        pty: None,
    };
    client.start(&request).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.shutdown().await.unwrap();
    let status = envd
        .wait_exit(Duration::from_secs(20))
        .expect("the namespace ends after power-off");
    // reboot(RB_POWER_OFF) in a child PID namespace kills its init with SIGINT; unshare passes
    // that on.
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "term\n");
}

#[tokio::test]
async fn sigterm_stops_children_before_an_ordinary_envd_exits() {
    let mut envd = EnvdProcess::start(binary()).unwrap();
    let client = envd.client();
    let dir = scratch();
    let marker = dir.path().join("terminated");
    let script = format!(
        "trap 'echo term > {}; exit 0' TERM; while :; do sleep 0.05; done",
        marker.display()
    );
    let started = client
        .start(&StartRequest {
            process: ProcessSpec::new("sh", &["-c", &script]),
            tag: None,
            pty: None,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(envd.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = envd.wait_exit(Duration::from_secs(20)).expect("envd exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "term\n");
    assert!(!Path::new(&format!("/proc/{}", started.pid)).exists());
}
