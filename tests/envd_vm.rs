//! envd as the real guest init: the busybox image booted under QEMU `microvm` (TCG), reached
//! through the forwarded port like a host reaches it, and powered off through its API.
//!
//! Uses the shared test files root (`$WRENN_TEST_FILES_ROOT`, default /var/tmp/wrenn-test-root)
//! and the static binary (`$WRENN_STATIC_BIN`, else `just build-static`), like tests/images.rs.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wrenn::envd::api::{
    AttachRequest, ClientMessage, ErrorCode, InitRequest, ProcessSpec, PtySize, RunRequest,
    StartRequest,
};
use wrenn::envd::client::{EnvdClient, ProcessEvent};
use wrenn_test_support::guest::{self, GuestSpec, GuestVm};

/// Two cores shared with compilers and other TCG guests.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

async fn sh(client: &EnvdClient, script: &str, user: Option<&str>) -> String {
    let mut spec = ProcessSpec::new("sh", &["-c", script]);
    spec.user = user.map(str::to_owned);
    let out = client
        .run(&RunRequest {
            process: spec,
            timeout_sec: Some(60),
        })
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{script}: {out:?}");
    out.stdout
}

fn host_unix_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since_epoch.as_millis()).unwrap()
}

/// How many seconds the guest's wall clock is ahead of the host's.
async fn guest_clock_ahead(client: &EnvdClient) -> i64 {
    let guest: i64 = sh(client, "date +%s", None).await.trim().parse().unwrap();
    guest - host_unix_ms() / 1000
}

fn init_with_clock(unix_ms: i64) -> InitRequest {
    InitRequest {
        wall_clock_unix_ms: Some(unix_ms),
        ..InitRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envd_is_the_guest_init_and_serves_the_host() {
    let layout = tokio::task::spawn_blocking(|| guest::test_files().clone())
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let disk = guest::sandbox_disk(tmp.path(), None).unwrap();
    let port = guest::free_port().unwrap();
    let mut spec = GuestSpec::new(&layout);
    spec.base_image = Some(layout.image_rootfs("busybox"));
    spec.sandbox_disk = Some(disk);
    spec.forward_port = Some(port);
    let mut vm = GuestVm::boot(&spec).unwrap();
    let vm_ready =
        tokio::task::block_in_place(|| vm.wait_for_console("envd listening on tcp", BOOT_TIMEOUT));
    vm_ready.unwrap_or_else(|e| panic!("{e}"));

    let client = EnvdClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
    // QEMU accepts forwarded connections before the guest's listener is reachable.
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.health().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "envd never answered: {}",
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The guest's wall clock follows the host's time given to /init, and only then; a slow TCG
    // guest gets a minute's slack.
    const DAY_SECS: i64 = 86_400;
    let near = |ahead: i64, expected: i64| (ahead - expected).abs() <= 60;
    client
        .init(&init_with_clock(host_unix_ms() + DAY_SECS * 1000))
        .await
        .unwrap();
    let ahead = guest_clock_ahead(&client).await;
    assert!(near(ahead, DAY_SECS), "the guest is {ahead} s ahead");
    client.init(&InitRequest::default()).await.unwrap();
    let ahead = guest_clock_ahead(&client).await;
    assert!(
        near(ahead, DAY_SECS),
        "an init without a time moved the clock: {ahead} s"
    );
    for bad in [-1, i64::MAX] {
        let err = client.init(&init_with_clock(bad)).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidRequest), "{err}");
    }
    client.init(&init_with_clock(host_unix_ms())).await.unwrap();
    let ahead = guest_clock_ahead(&client).await;
    assert!(near(ahead, 0), "the guest is {ahead} s ahead");

    assert_eq!(
        sh(&client, "cat /proc/1/comm; hostname", None).await,
        "wrenn\ncapsule\n"
    );
    assert_eq!(
        sh(&client, "cat /etc/resolv.conf", None).await,
        "nameserver 8.8.8.8\n"
    );
    let mounts = sh(&client, "cut -d' ' -f2,3 /proc/mounts", None).await;
    for mount in [
        "/proc proc",
        "/sys sysfs",
        "/dev devtmpfs",
        "/dev/pts devpts",
        "/dev/shm tmpfs",
        "/run tmpfs",
        "/tmp tmpfs",
    ] {
        assert!(
            mounts.lines().any(|l| l == mount),
            "{mount} missing from {mounts}"
        );
    }
    assert_eq!(
        sh(&client, "id -u; id -un; echo $HOME", Some("user")).await,
        "1000\nuser\n/home/user\n"
    );

    let entry = client
        .write_file_bytes("hello.txt", Some("user"), "from the host")
        .await
        .unwrap();
    assert_eq!(
        (entry.path.as_str(), entry.owner.as_str()),
        ("/home/user/hello.txt", "user")
    );
    assert_eq!(
        sh(&client, "cat ~/hello.txt", Some("user")).await,
        "from the host"
    );
    let metrics = client.metrics().await.unwrap();
    assert!(
        metrics.mem_total > 256 << 20 && metrics.mem_used > 0,
        "{metrics:?}"
    );

    let request = StartRequest {
        process: ProcessSpec::new("sh", &[]),
        tag: Some("term".into()),
        pty: Some(PtySize { cols: 77, rows: 22 }),
    };
    let mut session = client.attach(&AttachRequest::Start(request)).await.unwrap();
    session
        .send(&ClientMessage::Resize {
            cols: 101,
            rows: 33,
        })
        .await
        .unwrap();
    session.send_stdin("stty size; exit 4\n").await.unwrap();
    let mut screen = String::new();
    let exit = loop {
        match session.next_event().await.unwrap().expect("terminal open") {
            ProcessEvent::Pty(data) => screen.push_str(&String::from_utf8_lossy(&data)),
            ProcessEvent::Exit(exit) => break exit,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(screen.contains("33 101"), "{screen}");
    assert_eq!(exit.exit_code, 4);

    sh(&client, "for i in 1 2 3 4; do (sleep 0.2 &); done", None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let states = sh(
        &client,
        "for s in /proc/[0-9]*/stat; do cut -d' ' -f3 $s 2>/dev/null; done",
        None,
    )
    .await;
    assert!(!states.lines().any(|s| s == "Z"), "zombies left: {states}");

    client.shutdown().await.unwrap();
    let status = tokio::task::block_in_place(|| vm.wait_for_exit(Duration::from_secs(120)));
    status.unwrap_or_else(|e| panic!("the VM did not power off: {e}\n{}", vm.console()));
}
