//! The QEMU backend booting real guests under TCG: the Debian cloud kernel with a busybox
//! initramfs generated per test.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wrenn::config::{Config, ConsoleLogMaxBytes, Layout, QemuAccel};
use wrenn::vmm::qemu::qmp::QmpClient;
use wrenn::vmm::{
    cgroup, console_tail, find_leftovers, kill_leftover, Accel, AdoptRefusal, AfterFailedPause,
    Cgroups, Confinement, Drive, FirecrackerVmm, Leftover, NetAttachment, QemuVmm, SnapshotError,
    SnapshotFiles, VmCgroup, VmFiles, VmSpec, VmStatus, Vmm, VmmError, VmmExit, VmmKind,
};
use wrenn_test_support::kernel::{self as guest, TestKernel};

/// Generous: a TCG boot takes 2–6 s, but the machine is shared.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    kernel: TestKernel,
    layout: Layout,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let kernel = guest::test_kernel().expect("test kernel");
    let layout = Layout::new(dir.join("root"));
    layout.prepare().unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        kernel,
        layout,
    }
}

impl Fixture {
    fn spec(&self, id: &str, init: &str, modules: &[&str]) -> VmSpec {
        let modules: Vec<PathBuf> = modules.iter().map(|m| self.kernel.module(m)).collect();
        let initrd_dir = self.dir.join(format!("initrd-{id}"));
        std::fs::create_dir_all(&initrd_dir).unwrap();
        let initrd = guest::busybox_initramfs(&initrd_dir, init, &modules).unwrap();
        VmSpec {
            id: id.into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: self.kernel.vmlinux.clone(),
            initrd: Some(initrd),
            extra_boot_args: "quiet".into(),
            drives: vec![],
            net: None,
            vsock_cid: None,
            files: VmFiles::for_sandbox(&self.layout, id),
            confinement: None,
        }
    }
}

fn console_cap() -> ConsoleLogMaxBytes {
    Config::default().agent.console_log_max_bytes
}

fn tcg() -> QemuVmm {
    QemuVmm::new("qemu-system-x86_64".into(), QemuAccel::Tcg, console_cap())
}

fn init(body: &str) -> String {
    format!(
        "#!/bin/busybox sh\nexport PATH=/bin\nmount -t proc proc /proc\nmount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n{body}\n"
    )
}

async fn wait_for_console(path: &Path, needle: &str) -> String {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            started.elapsed() < BOOT_TIMEOUT,
            "`{needle}` never appeared in the console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn guest_boots_prints_to_the_serial_log_and_powers_off() {
    let f = fixture();
    let spec = f.spec("cl-boot", &init("echo WRENN-BOOT-MARKER\npoweroff -f"), &[]);
    let mut vm = tcg().start(&spec).await.unwrap();
    assert_eq!(vm.serial_log(), spec.files.console_log);
    assert!(
        vm.vmm_version().starts_with("QEMU "),
        "{}",
        vm.vmm_version()
    );
    let status = tokio::time::timeout(BOOT_TIMEOUT, vm.wait_exit())
        .await
        .expect("guest powers off")
        .unwrap();
    assert!(status.status().unwrap().success(), "{status}");
    let console = std::fs::read_to_string(&spec.files.console_log).unwrap();
    assert!(console.contains("WRENN-BOOT-MARKER"), "{console}");
    assert!(!spec.files.qmp_socket.exists(), "QMP socket left behind");
}

#[tokio::test]
async fn drives_appear_as_vda_and_vdb_in_spec_order_with_their_modes() {
    let f = fixture();
    let root = f.dir.join("root.img");
    let data = f.dir.join("data.img");
    std::fs::write(&root, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&data, vec![0u8; 2 << 20]).unwrap();
    let body = "for m in virtio_ring virtio virtio_mmio virtio_blk; do insmod /modules/$m.ko; done\n\
                for d in vda vdb; do echo \"DISK $d $(cat /sys/block/$d/size) ro=$(cat /sys/block/$d/ro)\"; done\n\
                echo DISKS-DONE\npoweroff -f";
    let mut spec = f.spec("cl-disks", &init(body), guest::VIRTIO_MODULES);
    spec.drives = vec![
        Drive {
            id: "root".into(),
            path: root,
            read_only: true,
        },
        Drive {
            id: "data".into(),
            path: data,
            read_only: false,
        },
    ];
    let mut vm = tcg().start(&spec).await.unwrap();
    tokio::time::timeout(BOOT_TIMEOUT, vm.wait_exit())
        .await
        .expect("guest powers off")
        .unwrap();
    let console = std::fs::read_to_string(&spec.files.console_log).unwrap();
    assert!(console.contains("DISK vda 2048 ro=1"), "{console}");
    assert!(console.contains("DISK vdb 4096 ro=0"), "{console}");
}

#[tokio::test]
async fn qmp_reports_running_and_shutdown_forces_a_guest_that_ignores_the_button() {
    let f = fixture();
    let spec = f.spec(
        "cl-stubborn",
        &init("echo GUEST-READY\nwhile true; do sleep 1; done"),
        &[],
    );
    let mut vm = tcg().start(&spec).await.unwrap();
    wait_for_console(&spec.files.console_log, "GUEST-READY").await;
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    let pid = vm.pid();
    vm.shutdown(Duration::from_secs(2)).await.unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} still exists"
    );
    assert!(matches!(vm.status().await.unwrap(), VmStatus::Exited(_)));
    assert!(!spec.files.qmp_socket.exists());
}

#[tokio::test]
async fn shutdown_presses_the_power_button_and_a_cooperative_guest_powers_off() {
    let f = fixture();
    // GUEST-READY only once a reader holds an event device open, so the press cannot come
    // first; the pause after the marker lets the UART send it before the power goes.
    let body = "insmod /modules/evdev.ko\ninsmod /modules/button.ko\n\
                for e in /dev/input/event*; do (head -c 1 $e >/dev/null; echo POWER-BUTTON-PRESSED; sleep 1; poweroff -f) & done\n\
                until ls -l /proc/[0-9]*/fd 2>/dev/null | grep -q /dev/input/event; do sleep 0.1; done\n\
                echo GUEST-READY\nwhile true; do sleep 1; done";
    let spec = f.spec("cl-polite", &init(body), guest::POWER_BUTTON_MODULES);
    let mut vm = tcg().start(&spec).await.unwrap();
    wait_for_console(&spec.files.console_log, "GUEST-READY").await;
    let status = vm.shutdown(BOOT_TIMEOUT).await.unwrap();
    assert!(
        status.status().unwrap().success(),
        "a powered-off guest ends QEMU cleanly: {status}"
    );
    let console = std::fs::read_to_string(&spec.files.console_log).unwrap();
    assert!(console.contains("POWER-BUTTON-PRESSED"), "{console}");
}

/// A network namespace with a TAP device, removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("wrenn-vmm-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ip(&["-n", &ns.0, "link", "set", "tap0", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[tokio::test]
async fn the_vmm_runs_inside_the_sandbox_network_namespace() {
    let f = fixture();
    let netns = Netns::new("ns");
    let mut spec = f.spec(
        "cl-netns",
        &init("echo GUEST-READY\nwhile true; do sleep 1; done"),
        &[],
    );
    spec.net = Some(NetAttachment {
        tap: "tap0".into(),
        mac: "02:FC:00:00:00:05".into(),
        netns: Some(netns.path()),
    });
    let mut vm = tcg().start(&spec).await.unwrap();
    let ns = std::fs::metadata(netns.path()).unwrap();
    let vmm_ns = std::fs::metadata(format!("/proc/{}/ns/net", vm.pid())).unwrap();
    assert_eq!(
        (vmm_ns.dev(), vmm_ns.ino()),
        (ns.dev(), ns.ino()),
        "QEMU is not in the sandbox's netns"
    );
    let own_ns = std::fs::metadata("/proc/self/ns/net").unwrap();
    assert_ne!(own_ns.ino(), vmm_ns.ino());
    // Its own session, so the agent's signals and terminal do not reach it.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", vm.pid())).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[3],
        vm.pid().to_string(),
        "session id is not the VMM's pid: {stat}"
    );
    vm.kill().await.unwrap();
}

#[tokio::test]
async fn a_missing_netns_is_a_typed_error_and_starts_nothing() {
    let f = fixture();
    let mut spec = f.spec("cl-nons", &init("poweroff -f"), &[]);
    spec.net = Some(NetAttachment {
        tap: "tap0".into(),
        mac: "02:FC:00:00:00:05".into(),
        netns: Some("/run/netns/wrenn-does-not-exist".into()),
    });
    let err = tcg().start(&spec).await.err().expect("start fails");
    assert!(matches!(err, VmmError::Netns { .. }), "{err}");
    assert!(err.to_string().contains("wrenn-does-not-exist"), "{err}");
}

#[tokio::test]
async fn a_vmm_that_dies_during_start_up_is_reported_with_its_log_and_cleaned_up() {
    let f = fixture();
    let mut spec = f.spec("cl-baddisk", &init("poweroff -f"), &[]);
    spec.drives = vec![Drive {
        id: "root".into(),
        path: f.dir.join("missing.img"),
        read_only: true,
    }];
    let err = tcg().start(&spec).await.err().expect("start fails");
    assert!(matches!(err, VmmError::ExitedEarly { .. }), "{err}");
    assert!(
        err.to_string().contains("missing.img"),
        "the error quotes QEMU's complaint: {err}"
    );
    assert!(!spec.files.qmp_socket.exists());
}

#[tokio::test]
async fn stale_qmp_socket_is_replaced() {
    let f = fixture();
    let spec = f.spec("cl-stale", &init("echo STALE-OK\npoweroff -f"), &[]);
    std::fs::create_dir_all(&spec.files.dir).unwrap();
    std::fs::write(&spec.files.qmp_socket, b"stale").unwrap();
    let mut vm = tcg().start(&spec).await.unwrap();
    tokio::time::timeout(BOOT_TIMEOUT, vm.wait_exit())
        .await
        .unwrap()
        .unwrap();
    assert!(std::fs::read_to_string(&spec.files.console_log)
        .unwrap()
        .contains("STALE-OK"));
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn auto_accel_probes_kvm_once_and_logs_its_choice() {
    let f = fixture();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // Other tests of this binary hit the same log call sites on their threads at the same time,
    // with no subscriber; their cached "nobody listens" must not silence this thread's.
    tracing::callsite::rebuild_interest_cache();

    let vmm = QemuVmm::new("qemu-system-x86_64".into(), QemuAccel::Auto, console_cap());
    let started = Instant::now();
    let decision = vmm.accel(&f.kernel.vmlinux).await;
    let first = started.elapsed();
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    match decision.accel {
        Accel::Tcg => {
            assert!(
                decision.reason.contains("KVM cannot run a guest"),
                "{decision:?}"
            );
            assert!(
                log.contains("falls back to TCG") && log.contains("KVM cannot run a guest"),
                "{log}"
            );
        }
        Accel::Kvm => assert!(log.contains("QEMU uses KVM"), "{log}"),
    }
    println!("accel decision after {first:?}: {decision:?}");

    assert_eq!(vmm.accel(&f.kernel.vmlinux).await, decision);
    let lines = String::from_utf8(captured.0.lock().unwrap().clone())
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        lines,
        log.lines().count(),
        "the second call probes and logs nothing"
    );

    // TCG configured is said out loud too; `kvm`, production's choice, never falls back.
    tracing::callsite::rebuild_interest_cache();
    let tcg = QemuVmm::new("qemu-system-x86_64".into(), QemuAccel::Tcg, console_cap());
    assert_eq!(tcg.accel(&f.kernel.vmlinux).await.accel, Accel::Tcg);
    let kvm = QemuVmm::new("qemu-system-x86_64".into(), QemuAccel::Kvm, console_cap());
    assert_eq!(kvm.accel(&f.kernel.vmlinux).await.accel, Accel::Kvm);
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("QEMU uses TCG (software emulation), as configured"),
        "{log}"
    );
    assert!(
        log.contains("QEMU uses KVM (configured; no fallback to TCG)"),
        "{log}"
    );
}

#[tokio::test]
async fn a_dropped_vm_keeps_running_and_is_found_as_a_leftover() {
    let f = fixture();
    let spec = f.spec(
        "cl-orphan",
        &init("echo GUEST-READY\nwhile true; do sleep 1; done"),
        &[],
    );
    let vm = tcg().start(&spec).await.unwrap();
    let pid = vm.pid();
    drop(vm);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "dropping the handle must not stop the VM"
    );
    let leftovers = find_leftovers(&f.layout);
    let expected = Leftover {
        sandbox_id: "cl-orphan".into(),
        pid,
        kind: VmmKind::Qemu,
    };
    assert_eq!(leftovers, vec![expected.clone()]);
    assert!(kill_leftover(&expected).await);
    assert!(find_leftovers(&f.layout).is_empty());
}

/// A cap small enough that a TCG guest passes it many times over in a few seconds.
const SMALL_CAP: u64 = 16384;

fn small_cap() -> QemuVmm {
    let cap = ConsoleLogMaxBytes::try_from(SMALL_CAP).unwrap();
    QemuVmm::new("qemu-system-x86_64".into(), QemuAccel::Tcg, cap)
}

/// The bytes of the console log and of the file it rotated to.
fn console_sizes(files: &VmFiles) -> (u64, u64) {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    (size(&files.console_log), size(&files.previous_console_log))
}

fn assert_within_cap(files: &VmFiles) {
    let (current, previous) = console_sizes(files);
    assert!(
        current + previous <= SMALL_CAP,
        "console files hold {current} + {previous} bytes, over the {SMALL_CAP}-byte cap"
    );
}

#[tokio::test]
async fn a_console_flood_stays_within_the_cap_and_keeps_the_latest_lines() {
    let f = fixture();
    // About 200 KB of numbered lines, over ten times the cap.
    let spec = f.spec(
        "cl-flood",
        &init("seq 1 30000\necho FLOOD-END\npoweroff -f"),
        &[],
    );
    let mut vm = small_cap().start(&spec).await.unwrap();
    // Watched through the process, not QMP: under TCG a guest hammering the serial port holds
    // QEMU's big lock, and monitor commands can wait their turn for seconds on a busy machine.
    let exit = tokio::time::timeout(BOOT_TIMEOUT, vm.wait_exit());
    tokio::pin!(exit);
    let status = loop {
        tokio::select! {
            status = &mut exit => break status.expect("the flood ended").unwrap(),
            () = tokio::time::sleep(Duration::from_millis(50)) => assert_within_cap(&spec.files),
        }
    };
    assert!(status.status().unwrap().success(), "{status}");
    assert_within_cap(&spec.files);
    let (_, previous) = console_sizes(&spec.files);
    assert_eq!(previous, SMALL_CAP / 2, "the log rotated");
    // The exit reported, every byte is in: the newest lines, in order.
    let tail = console_tail(&spec.files, 30);
    let end = tail
        .iter()
        .position(|l| l == "FLOOD-END")
        .expect("FLOOD-END kept");
    let numbers: Vec<String> = (29981..=30000).map(|n| n.to_string()).collect();
    assert_eq!(tail[end - 20..end], numbers[..], "{tail:?}");
    let mut kept = std::fs::read(&spec.files.previous_console_log).unwrap();
    kept.extend(std::fs::read(&spec.files.console_log).unwrap());
    let kept = String::from_utf8_lossy(&kept);
    assert!(
        !kept.lines().any(|l| l == "100"),
        "the oldest output is gone"
    );
}

#[test]
fn a_guest_flooding_its_console_after_the_agent_is_gone_neither_stalls_nor_dies() {
    let f = fixture();
    let spec = f.spec("cl-deaf", &init("echo FLOOD-START\nyes flood"), &[]);
    // The VM is started by a runtime that then goes away, closing the console pipe's read end
    // as a killed agent would.
    let agent = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let pid = agent.block_on(async {
        let vm = small_cap().start(&spec).await.unwrap();
        let started = Instant::now();
        while !console_tail(&spec.files, 3).iter().any(|l| l == "flood") {
            assert_within_cap(&spec.files);
            assert!(started.elapsed() < BOOT_TIMEOUT, "the flood never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        vm.pid()
    });
    drop(agent);

    let test = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    test.block_on(async {
        // The guest floods into a pipe nobody reads: QEMU drops the output (EPIPE, SIGPIPE
        // ignored) and its main loop still answers QMP.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = stat.rsplit_once(')').unwrap().1.split_whitespace().next();
        assert_ne!(state, Some("Z"), "QEMU died: {stat}");
        let socket = &spec.files.qmp_socket;
        let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let mut qmp = tokio::time::timeout(Duration::from_secs(30), async {
            QmpClient::handshake(stream, socket).await.unwrap()
        })
        .await
        .expect("QMP answers");
        let status = qmp.query_status().await.unwrap();
        assert!(status.running, "{status:?}");
        drop(qmp);
        // Nothing writes the log any more, and it stayed within the cap.
        let sizes = console_sizes(&spec.files);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(console_sizes(&spec.files), sizes);
        assert_within_cap(&spec.files);

        let leftover = Leftover {
            sandbox_id: "cl-deaf".into(),
            pid,
            kind: VmmKind::Qemu,
        };
        assert_eq!(find_leftovers(&f.layout), vec![leftover.clone()]);
        assert!(kill_leftover(&leftover).await);
    });
}

// ---- Pause to disk and restore ----------------------------------------------------------

/// A guest that keeps a counter in a shell's memory, a random blob in tmpfs and the same blob
/// on its writable disk, and prints on every tick the counter and checksums of both copies
/// (the disk read past the guest's page cache).
fn ticking_guest(f: &Fixture, id: &str) -> VmSpec {
    let body = "for m in virtio_ring virtio virtio_mmio virtio_blk; do insmod /modules/$m.ko; done\n\
                mkdir -p /mnt/t && mount -t tmpfs tmpfs /mnt/t\n\
                head -c 65536 /dev/urandom > /mnt/t/blob\n\
                dd if=/mnt/t/blob of=/dev/vda bs=65536 count=1 conv=fsync 2>/dev/null\n\
                echo \"BLOB $(md5sum < /mnt/t/blob | cut -c1-8)\"\n\
                i=0\n\
                while true; do\n\
                  i=$((i+1))\n\
                  echo 3 > /proc/sys/vm/drop_caches\n\
                  echo \"TICK $i tmpfs=$(md5sum < /mnt/t/blob | cut -c1-8) disk=$(head -c 65536 /dev/vda | md5sum | cut -c1-8)\"\n\
                  sleep 0.2\n\
                done";
    let mut spec = f.spec(id, &init(body), guest::VIRTIO_MODULES);
    let disk = f.dir.join(format!("{id}-data.img"));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    spec.drives = vec![Drive {
        id: "data".into(),
        path: disk,
        read_only: false,
    }];
    spec
}

/// One `TICK` line: the counter and the two checksums.
fn ticks(console: &str) -> Vec<(u64, String)> {
    // Only whole lines: the guest may be half way through writing the last one.
    let whole = console.rfind('\n').map_or("", |end| &console[..=end]);
    whole
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("TICK ")?;
            let (n, sums) = rest.split_once(' ')?;
            Some((n.parse().ok()?, sums.to_owned()))
        })
        .collect()
}

async fn wait_for_ticks(path: &Path, count: usize) -> Vec<(u64, String)> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let seen = ticks(&text);
        if seen.len() >= count {
            return seen;
        }
        assert!(
            started.elapsed() < BOOT_TIMEOUT,
            "fewer than {count} ticks in the console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn with_netns(mut spec: VmSpec, netns: &Netns) -> VmSpec {
    spec.net = Some(NetAttachment {
        tap: "tap0".into(),
        mac: "02:FC:00:00:00:05".into(),
        netns: Some(netns.path()),
    });
    spec
}

/// A 1 MiB tmpfs, far too small for a snapshot: a full disk. Unmounted on drop.
struct TinyDisk(PathBuf);

impl TinyDisk {
    fn new(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs at {}", path.display());
        Self(path)
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn pause_to_disk_and_restore_continue_the_guest_three_times_and_refuse_bad_snapshots() {
    let f = fixture();
    let vmm = tcg();
    let ns_a = Netns::new("pa");
    let ns_b = Netns::new("pb");
    let spec_a = with_netns(ticking_guest(&f, "cl-pause"), &ns_a);
    let spec_b = with_netns(spec_a.clone(), &ns_b);
    // Snapshots on tmpfs: a pause first checks there is room for the whole guest memory,
    // which the shared test machine's disk may not have.
    let roomy = tempfile::tempdir_in("/dev/shm").unwrap();
    let snap = SnapshotFiles::for_sandbox(&Layout::new(roomy.path()), "cl-pause");
    let mut vm = vmm.start(&spec_a).await.unwrap();
    let console = wait_for_console(&spec_a.files.console_log, "BLOB ").await;
    let blob = console
        .lines()
        .find_map(|l| l.strip_prefix("BLOB "))
        .unwrap()
        .to_owned();
    let expected_sums = format!("tmpfs={blob} disk={blob}");
    wait_for_ticks(&spec_a.files.console_log, 2).await;

    // A pause without room for its snapshot is refused before the guest stops.
    let tiny = TinyDisk::new(f.dir.join("tiny"));
    let full = SnapshotFiles::for_sandbox(&Layout::new(&tiny.0), "cl-pause");
    let err = vm
        .pause_to(&full)
        .await
        .expect_err("a 1 MiB disk is too small");
    assert!(
        matches!(
            err,
            VmmError::PauseFailed {
                after: AfterFailedPause::Running,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_disk_full(), "{err:?}");
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    let leftovers: Vec<_> = std::fs::read_dir(&full.dir).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    drop(tiny);

    // A pause that fails after the guest stopped and its state was written resumes the guest
    // and leaves nothing loadable.
    #[cfg(feature = "failpoints")]
    {
        fail::cfg("vmm-pause-after-save", "return").unwrap();
        let err = vm.pause_to(&snap).await.expect_err("injected failure");
        fail::remove("vmm-pause-after-save");
        assert!(
            matches!(
                err,
                VmmError::PauseFailed {
                    after: AfterFailedPause::Running,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
        let left: Vec<_> = std::fs::read_dir(&snap.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let err = vmm
            .restore(&spec_a, &snap)
            .await
            .err()
            .expect("nothing to load");
        assert!(
            matches!(err, VmmError::Snapshot(SnapshotError::Incomplete { .. })),
            "{err}"
        );
        let seen = ticks(&std::fs::read_to_string(vm.serial_log()).unwrap()).len();
        wait_for_ticks(vm.serial_log(), seen + 1).await;
    }

    let mut last_tick = 0;
    for cycle in 0..3 {
        let spec = if cycle % 2 == 0 { &spec_b } else { &spec_a };
        let pid = vm.pid();
        let meta = vm.pause_to(&snap).await.unwrap();
        assert!(
            gone(pid),
            "cycle {cycle}: QEMU {pid} still runs after the pause"
        );
        assert!(matches!(vm.status().await.unwrap(), VmStatus::Exited(_)));
        assert_eq!(meta.vmm, VmmKind::Qemu);
        assert_eq!(meta.machine.memory_mib, 256);
        assert_eq!(meta.machine.accel.as_deref(), Some("tcg"));
        assert!(snap.meta.is_file() && snap.state.is_file());
        assert!(!Layout::partial(&snap.state).exists());
        let before = ticks(&std::fs::read_to_string(vm.serial_log()).unwrap());
        let (paused_at, _) = before.last().cloned().unwrap();
        assert!(
            paused_at >= last_tick,
            "cycle {cycle}: the counter went back"
        );
        println!(
            "cycle {cycle}: paused at tick {paused_at}, {} KiB on disk",
            snap.allocated_bytes() / 1024
        );

        vm = vmm.restore(spec, &snap).await.unwrap();
        let ns = std::fs::metadata(spec.net.as_ref().unwrap().netns.as_ref().unwrap()).unwrap();
        let vmm_ns = std::fs::metadata(format!("/proc/{}/ns/net", vm.pid())).unwrap();
        assert_eq!((vmm_ns.dev(), vmm_ns.ino()), (ns.dev(), ns.ino()));
        assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
        let after = wait_for_ticks(vm.serial_log(), 2).await;
        let (resumed_at, sums) = &after[0];
        assert!(
            *resumed_at > paused_at && *resumed_at <= paused_at + 2,
            "cycle {cycle}: paused at {paused_at}, resumed at {resumed_at}: {after:?}"
        );
        assert!(
            after.iter().all(|(_, s)| *s == expected_sums),
            "cycle {cycle}: {sums} != {expected_sums}: {after:?}"
        );
        last_tick = after.last().unwrap().0;
    }

    // The snapshot was restored: its guest runs on and writes its disk, so it is not loaded
    // again.
    let err = vmm.restore(&spec_b, &snap).await.err().expect("refused");
    assert!(
        matches!(
            err,
            VmmError::Snapshot(SnapshotError::AlreadyRestored { .. })
        ),
        "{err}"
    );

    // Bad snapshots and mismatches are refused before any process starts.
    vm.pause_to(&snap).await.unwrap();
    let good_meta = std::fs::read(&snap.meta).unwrap();
    let refused = |err: VmmError| {
        assert!(
            find_leftovers(&f.layout).is_empty(),
            "a refused restore started a VMM: {err}"
        );
        err
    };
    let mut edited: serde_json::Value = serde_json::from_slice(&good_meta).unwrap();
    edited["vmm_version"] = "QEMU 6.0.0".into();
    std::fs::write(&snap.meta, edited.to_string()).unwrap();
    let err = refused(vmm.restore(&spec_a, &snap).await.err().expect("refused"));
    assert!(
        matches!(err, VmmError::Snapshot(SnapshotError::VmmVersion { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("QEMU 6.0.0"), "{err}");
    edited["vmm_version"] =
        serde_json::from_slice::<serde_json::Value>(&good_meta).unwrap()["vmm_version"].clone();
    edited["format"] = 2.into();
    std::fs::write(&snap.meta, edited.to_string()).unwrap();
    let err = refused(vmm.restore(&spec_a, &snap).await.err().expect("refused"));
    assert!(
        matches!(
            err,
            VmmError::Snapshot(SnapshotError::Format { found: 2, .. })
        ),
        "{err}"
    );
    std::fs::write(&snap.meta, &good_meta).unwrap();
    let mut bigger = spec_a.clone();
    bigger.memory_mib = 512;
    let err = refused(vmm.restore(&bigger, &snap).await.err().expect("refused"));
    assert!(
        matches!(
            err,
            VmmError::Snapshot(SnapshotError::Machine {
                option: "memory_mib",
                ..
            })
        ),
        "{err}"
    );

    // A stream damaged inside: QEMU refuses it, the process is gone, the snapshot stays.
    let state = std::fs::read(&snap.state).unwrap();
    let mut damaged = state.clone();
    for byte in &mut damaged[4096..] {
        *byte ^= 0x5a;
    }
    std::fs::write(&snap.state, &damaged).unwrap();
    let err = vmm.restore(&spec_a, &snap).await.err().expect("refused");
    assert!(
        matches!(
            err,
            VmmError::ExitedEarly { .. } | VmmError::Migration { .. }
        ),
        "{err}"
    );
    assert!(find_leftovers(&f.layout).is_empty());
    assert!(snap.meta.is_file(), "a failed load keeps the snapshot");
    // A truncated one is caught by its size before QEMU starts.
    std::fs::write(&snap.state, &state[..state.len() / 2]).unwrap();
    let err = refused(vmm.restore(&spec_a, &snap).await.err().expect("refused"));
    assert!(
        matches!(err, VmmError::Snapshot(SnapshotError::Corrupt { .. })),
        "{err}"
    );
    // The intact stream restores after all of that.
    std::fs::write(&snap.state, &state).unwrap();
    let mut vm = vmm.restore(&spec_a, &snap).await.unwrap();
    let after = wait_for_ticks(vm.serial_log(), 1).await;
    assert_eq!(after[0].1, expected_sums);
    vm.kill().await.unwrap();
    // Without its metadata a snapshot is incomplete.
    std::fs::remove_file(&snap.restored_meta).unwrap();
    let err = refused(vmm.restore(&spec_a, &snap).await.err().expect("refused"));
    assert!(
        matches!(err, VmmError::Snapshot(SnapshotError::Incomplete { .. })),
        "{err}"
    );
}

// ---- Adoption: a VMM started by an earlier agent process --------------------------------

/// Ended: gone, or a zombie not reaped yet (this test process is the parent of every QEMU here,
/// and a dropped handle leaves the reaping to tokio in the background).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').unwrap().1.split_whitespace().next() == Some("Z"),
        Err(_) => true,
    }
}

/// Kills the VMMs left running for a layout's sandboxes when dropped: a test that hands VMs over
/// by dropping their handles would otherwise leave them running if it fails, holding the VM-test
/// lock they inherited from `flock`.
struct KillLeftovers<'a>(&'a Layout);

impl Drop for KillLeftovers<'_> {
    fn drop(&mut self) {
        for leftover in find_leftovers(self.0) {
            let pid = nix::unistd::Pid::from_raw(leftover.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn refusal(err: VmmError) -> AdoptRefusal {
    match err {
        VmmError::NotAdoptable { refusal, .. } => refusal,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn an_adopted_vm_drains_its_console_pauses_restores_and_is_killed() {
    let f = fixture();
    let _cleanup = KillLeftovers(&f.layout);
    let vmm = tcg();
    let spec = ticking_guest(&f, "cl-adopt");
    let roomy = tempfile::tempdir_in("/dev/shm").unwrap();
    let snap = SnapshotFiles::for_sandbox(&Layout::new(roomy.path()), "cl-adopt");
    let vm = vmm.start(&spec).await.unwrap();
    wait_for_ticks(&spec.files.console_log, 2).await;
    let pid = vm.pid();
    // As when the agent process dies: the handle goes, QEMU and its guest run on.
    drop(vm);

    // Refused, and left running: the test's own process, this QEMU as another sandbox's VMM,
    // and as a Firecracker.
    let err = vmm
        .adopt(&spec, std::process::id())
        .await
        .err()
        .expect("not a VMM");
    let own_socket = spec.files.qmp_socket.clone();
    assert_eq!(
        refusal(err),
        AdoptRefusal::OtherProcess { socket: own_socket }
    );
    let mut other = spec.clone();
    other.id = "cl-other".into();
    other.files = VmFiles::for_sandbox(&f.layout, "cl-other");
    let err = vmm.adopt(&other, pid).await.err().expect("another sandbox");
    let socket = other.files.qmp_socket.clone();
    assert_eq!(refusal(err), AdoptRefusal::OtherProcess { socket });
    let firecracker = FirecrackerVmm::new("firecracker".into(), console_cap());
    let err = firecracker
        .adopt(&spec, pid)
        .await
        .err()
        .expect("not Firecracker");
    let socket = spec.files.firecracker_socket.clone();
    assert_eq!(refusal(err), AdoptRefusal::OtherProcess { socket });
    assert!(!ended(pid), "a refused adoption touched QEMU");

    let mut vm = vmm.adopt(&spec, pid).await.unwrap();
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.serial_log(), spec.files.console_log);
    assert!(
        vm.vmm_version().starts_with("QEMU "),
        "{}",
        vm.vmm_version()
    );
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    // The guest's output after the adoption continues the same log.
    let seen = ticks(&std::fs::read_to_string(vm.serial_log()).unwrap()).len();
    let all = wait_for_ticks(vm.serial_log(), seen + 2).await;
    assert_eq!(all[0].0, 1, "the log was started again: {all:?}");
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "{all:?}");

    let meta = vm.pause_to(&snap).await.unwrap();
    assert!(ended(pid), "QEMU {pid} still runs after the pause");
    assert_eq!(
        vm.status().await.unwrap(),
        VmStatus::Exited(VmmExit::Unobserved)
    );
    assert_eq!(meta.vmm_version, vm.vmm_version());
    assert_eq!(meta.machine.accel.as_deref(), Some("tcg"));
    // The pause may cut the last line short: its counter is read, not its checksums.
    let (paused_at, _) = ticks(&std::fs::read_to_string(vm.serial_log()).unwrap())
        .last()
        .cloned()
        .unwrap();
    let vm = vmm.restore(&spec, &snap).await.unwrap();
    let after = wait_for_ticks(vm.serial_log(), 1).await;
    assert!(
        after[0].0 > paused_at && after[0].0 <= paused_at + 2,
        "paused at {paused_at}: {after:?}"
    );
    assert_eq!(after[0].1, all[0].1, "the guest's blob changed");

    // Killing an adopted VM ends the process and is seen as its exit.
    let restored = vm.pid();
    drop(vm);
    let mut vm = vmm.adopt(&spec, restored).await.unwrap();
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    assert_eq!(vm.kill().await.unwrap(), VmmExit::Unobserved);
    assert!(ended(restored), "QEMU {restored} still runs after the kill");
    assert_eq!(
        vm.status().await.unwrap(),
        VmStatus::Exited(VmmExit::Unobserved)
    );
    assert!(!spec.files.qmp_socket.exists());
    assert!(find_leftovers(&f.layout).is_empty());
}

/// A field of `/proc/<pid>/status`, e.g. `Seccomp`.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in the status of {pid}"))
        .trim()
        .to_owned()
}

/// Removes a test's cgroup parent from every hierarchy.
struct CgroupParent(PathBuf);

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let root = Path::new(cgroup::DEFAULT_ROOT);
        let mut dirs = vec![root.join(&self.0)];
        if let Ok(hierarchies) = std::fs::read_dir(root) {
            dirs.extend(hierarchies.flatten().map(|h| h.path().join(&self.0)));
        }
        for dir in dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn assert_confined(spec: &VmSpec, pid: u32, cgroup: &VmCgroup) {
    let uid = spec.confinement.as_ref().unwrap().uid.to_string();
    let uids = status_field(pid, "Uid");
    assert!(uids.split_whitespace().all(|u| u == uid), "uids {uids}");
    let gids = status_field(pid, "Gid");
    assert!(gids.split_whitespace().all(|g| g == uid), "gids {gids}");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
    assert_eq!(root, spec.files.vmm_root);
    assert_eq!(cgroup.pids(), [pid]);
    for dir in cgroup.dirs() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|p| p == pid.to_string()),
            "{}: {procs}",
            dir.display()
        );
    }
}

/// A confined QEMU runs as its own unprivileged uid and gid, under seccomp, chrooted into an
/// empty directory, in a cgroup with the VM's limits; it pauses to disk and restores (its
/// writable disk keeps working), is adopted with its cgroup, and its cgroup goes with it.
#[tokio::test]
async fn a_confined_vm_pauses_restores_and_is_adopted_and_its_cgroup_goes_with_it() {
    let f = fixture();
    let _cleanup = KillLeftovers(&f.layout);
    let parent = PathBuf::from(format!("wrenn-tests/vmm-qemu-{}", std::process::id()));
    let _parent = CgroupParent(parent.clone());
    let cgroups = Cgroups::detect(Path::new(cgroup::DEFAULT_ROOT), &parent, None).unwrap();
    let vmm = tcg();
    let mut spec = ticking_guest(&f, "cl-confined");
    spec.vcpus = 2;
    spec.confinement = Some(Confinement {
        uid: 900_000_321,
        gid: 900_000_321,
        cgroups: cgroups.clone(),
    });
    let cgroup = cgroups.vm(&spec.id);
    let roomy = tempfile::tempdir_in("/dev/shm").unwrap();
    let snap = SnapshotFiles::for_sandbox(&Layout::new(roomy.path()), "cl-confined");

    let mut vm = vmm.start(&spec).await.unwrap();
    let first = wait_for_ticks(vm.serial_log(), 2).await;
    assert_confined(&spec, vm.pid(), &cgroup);
    let limits = cgroups.limits(2, 256);
    assert_eq!(limits.cpu_quota_us, 200_000);
    for dir in cgroup.dirs() {
        let read = |file: &str| {
            std::fs::read_to_string(dir.join(file))
                .ok()
                .map(|v| v.trim().to_owned())
        };
        if let Some(max) = read("memory.max").or_else(|| read("memory.limit_in_bytes")) {
            assert_eq!(max, limits.memory_bytes.to_string());
        }
        if let Some(quota) = read("cpu.cfs_quota_us") {
            assert_eq!(quota, "200000");
        }
        if let Some(max) = read("pids.max") {
            assert_eq!(max, limits.pids.to_string());
        }
    }

    vm.pause_to(&snap).await.unwrap();
    assert!(
        cgroup.dirs().iter().all(|d| !d.exists()),
        "a paused VM holds no cgroup"
    );
    let vm = vmm.restore(&spec, &snap).await.unwrap();
    let after = wait_for_ticks(vm.serial_log(), 1).await;
    assert_eq!(
        after[0].1, first[0].1,
        "the guest's tmpfs and disk read back the same"
    );
    assert_confined(&spec, vm.pid(), &cgroup);

    let pid = vm.pid();
    drop(vm);
    let mut vm = vmm.adopt(&spec, pid).await.unwrap();
    assert_confined(&spec, pid, &cgroup);
    assert_eq!(vm.kill().await.unwrap(), VmmExit::Unobserved);
    assert!(
        cgroup.dirs().iter().all(|d| !d.exists()),
        "{:?}",
        cgroup.dirs()
    );
    assert!(cgroups.existing().is_empty());
}
