//! VMM figures on this host: QEMU `microvm` under TCG from `Vmm::start` to a marker on the
//! guest's serial console (spawn, QMP handshake and a full kernel boot into a busybox
//! initramfs), the round-trip latency of QMP `query-status` through `Vm::status`, and pause to
//! disk and restore (`Vm::pause_to`, `Vmm::restore`): pause time, snapshot size on disk
//! (allocated blocks) and restore-to-running time for 256 MiB and 1 GiB guests, idle and with
//! 200 MiB of guest memory dirtied.
//!
//! `cargo bench --bench vmm`; `WRENN_BENCH_BOOTS` sets the number of boots (default 5),
//! `WRENN_BENCH_CYCLES` the pause/restore cycles per guest (default 3), and
//! `WRENN_BENCH_VMM=boot` or `=pause` runs one part only, and `WRENN_BENCH_SNAPSHOT_DIR` is
//! where the snapshots go.

use std::path::Path;
use std::time::{Duration, Instant};

use wrenn::config::{Config, Layout, QemuAccel};
use wrenn::vmm::{QemuVmm, SnapshotFiles, VmFiles, VmSpec, Vmm};
use wrenn_test_support::kernel;

const MARKER: &str = "WRENN-BENCH-MARKER";
const QMP_ROUND_TRIPS: usize = 500;

async fn wait_for_marker(console: &Path, since: Instant) -> Duration {
    loop {
        if std::fs::read_to_string(console).is_ok_and(|t| t.contains(MARKER)) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(300),
            "the guest never printed its marker"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let n = samples.len();
    let mean = samples.iter().sum::<Duration>() / u32::try_from(n).expect("few samples");
    format!(
        "n={n} min={:?} median={:?} mean={mean:?} p99={:?} max={:?}",
        samples[0],
        samples[n / 2],
        samples[(n * 99 / 100).min(n - 1)],
        samples[n - 1]
    )
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: boot nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("vmm benchmark: run it with `cargo bench --bench vmm`");
        return;
    }
    let part = std::env::var("WRENN_BENCH_VMM").unwrap_or_default();
    let vmm = QemuVmm::new(
        "qemu-system-x86_64".into(),
        QemuAccel::Tcg,
        Config::default().agent.console_log_max_bytes,
    );
    if part != "pause" {
        boot_figures(&vmm).await;
    }
    if part != "boot" {
        pause_figures(&vmm).await;
    }
}

async fn boot_figures(vmm: &QemuVmm) {
    let boots: usize = std::env::var("WRENN_BENCH_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let kernel = kernel::test_kernel().expect("test kernel");
    let tmp = tempfile::tempdir().unwrap();
    let init = format!("#!/bin/busybox sh\n/bin/busybox echo {MARKER}\nwhile true; do /bin/busybox sleep 1; done\n");
    let initrd = kernel::busybox_initramfs(tmp.path(), &init, &[]).unwrap();
    let layout = Layout::new(tmp.path().join("root"));
    layout.prepare().unwrap();
    println!(
        "{} under TCG, kernel {}",
        vmm.version().await.unwrap(),
        kernel.release
    );

    let mut to_ready = Vec::new();
    let mut to_marker = Vec::new();
    let mut rtts = Vec::new();
    for i in 0..boots {
        let id = format!("cl-bench{i}");
        let spec = VmSpec {
            id: id.clone(),
            vcpus: 1,
            memory_mib: 256,
            kernel: kernel.vmlinux.clone(),
            initrd: Some(initrd.clone()),
            extra_boot_args: "quiet".into(),
            drives: vec![],
            net: None,
            vsock_cid: None,
            files: VmFiles::for_sandbox(&layout, &id),
            confinement: None,
        };
        let started = Instant::now();
        let mut vm = vmm.start(&spec).await.unwrap();
        to_ready.push(started.elapsed());
        to_marker.push(wait_for_marker(&spec.files.console_log, started).await);
        if i == 0 {
            for _ in 0..QMP_ROUND_TRIPS {
                let t = Instant::now();
                vm.status().await.unwrap();
                rtts.push(t.elapsed());
            }
        }
        vm.kill().await.unwrap();
    }
    println!(
        "start() returns (process spawned, QMP connected): {}",
        summary(to_ready)
    );
    println!(
        "start() to serial marker (TCG boot):              {}",
        summary(to_marker)
    );
    println!(
        "QMP query-status round trip (Vm::status):         {}",
        summary(rtts)
    );
}

const DIRTY_MIB: u32 = 200;

/// Pause and restore figures for each guest size, idle and with memory dirtied: one guest per
/// case, paused and restored `WRENN_BENCH_CYCLES` times.
async fn pause_figures(vmm: &QemuVmm) {
    let cycles: usize = std::env::var("WRENN_BENCH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let kernel = kernel::test_kernel().expect("test kernel");
    // `WRENN_BENCH_SNAPSHOT_DIR` picks the filesystem (default: the system temp directory);
    // a pause needs room for the whole guest memory there.
    let tmp = match std::env::var_os("WRENN_BENCH_SNAPSHOT_DIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .unwrap();
    let layout = Layout::new(tmp.path().join("root"));
    layout.prepare().unwrap();
    println!("pause to disk and restore, {cycles} cycles per guest (median, min..max):");
    for memory_mib in [256, 1024] {
        for dirty in [false, true] {
            // The fill is non-zero data in a tmpfs, i.e. guest page cache that must be saved;
            // zero pages would be skipped.
            // A 256 MiB guest keeps room for its kernel and shell.
            let dirty_mib = DIRTY_MIB.min(memory_mib - 80);
            let fill = if dirty {
                format!(
                    "yes wrenn-bench-dirty-page | head -c 1048576 > /one\n\
                     for i in $(seq {dirty_mib}); do cat /one; done > /mnt/fill\n\
                     echo FILLED $(du -k /mnt/fill)\n"
                )
            } else {
                String::new()
            };
            let init = format!(
                "#!/bin/busybox sh\nexport PATH=/bin\nmount -t proc proc /proc\n\
                 mkdir -p /mnt && mount -t tmpfs -o size=90% tmpfs /mnt\n{fill}\
                 echo {MARKER}\ni=0\nwhile true; do i=$((i+1)); echo TICK $i; sleep 0.2; done\n"
            );
            let id = format!("cl-p{memory_mib}{}", if dirty { "d" } else { "i" });
            let dir = tmp.path().join(&id);
            std::fs::create_dir_all(&dir).unwrap();
            let initrd = kernel::busybox_initramfs(&dir, &init, &[]).unwrap();
            let spec = VmSpec {
                id: id.clone(),
                vcpus: 1,
                memory_mib,
                kernel: kernel.vmlinux.clone(),
                initrd: Some(initrd),
                extra_boot_args: "quiet".into(),
                drives: vec![],
                net: None,
                vsock_cid: None,
                files: VmFiles::for_sandbox(&layout, &id),
                confinement: None,
            };
            let snapshot = SnapshotFiles::for_sandbox(&layout, &id);
            let mut vm = vmm.start(&spec).await.unwrap();
            wait_for_marker(&spec.files.console_log, Instant::now()).await;
            if dirty {
                let console = std::fs::read_to_string(&spec.files.console_log).unwrap();
                let filled = console.lines().find(|l| l.starts_with("FILLED"));
                assert!(
                    filled.is_some(),
                    "the guest did not fill its memory:\n{console}"
                );
            }
            let (mut pause, mut restore, mut to_tick) = (Vec::new(), Vec::new(), Vec::new());
            let mut sizes = Vec::new();
            let mut rss_kib = 0;
            for _ in 0..cycles {
                let t = Instant::now();
                vm.pause_to(&snapshot).await.unwrap();
                pause.push(t.elapsed());
                sizes.push(snapshot.allocated_bytes());
                let t = Instant::now();
                vm = vmm.restore(&spec, &snapshot).await.unwrap();
                restore.push(t.elapsed());
                wait_for_tick(vm.serial_log(), t).await;
                to_tick.push(t.elapsed());
                rss_kib = rss(vm.pid());
            }
            vm.kill().await.unwrap();
            sizes.sort_unstable();
            let what = if dirty {
                format!("{dirty_mib} MiB dirtied")
            } else {
                "idle".to_owned()
            };
            println!(
                "  {memory_mib:>4} MiB guest, {what:<16} pause {}  snapshot {:.1} MiB on disk  \
                 restore to running {}  to the guest's next tick {}  restored QEMU RSS {} MiB",
                spread(pause),
                mib(sizes[sizes.len() / 2]),
                spread(restore),
                spread(to_tick),
                rss_kib / 1024
            );
        }
    }
}

/// Waits for a `TICK` line in a restored guest's (new) console log.
async fn wait_for_tick(console: &Path, since: Instant) {
    loop {
        if std::fs::read_to_string(console).is_ok_and(|t| t.contains("TICK ")) {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_secs(300),
            "the restored guest never ticked"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn spread(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "{:.2?} ({:.2?}..{:.2?})",
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1]
    )
}
