//! VMM figures on this host: QEMU `microvm` under TCG from `Vmm::start` to a marker on the
//! guest's serial console (spawn, QMP handshake and a full kernel boot into a busybox
//! initramfs), and the round-trip latency of QMP `query-status` through `Vm::status`.
//!
//! `cargo bench --bench vmm`; `WRENN_BENCH_BOOTS` sets the number of boots (default 5).

use std::path::Path;
use std::time::{Duration, Instant};

use wrenn::config::{Config, Layout, QemuAccel};
use wrenn::vmm::{QemuVmm, VmFiles, VmSpec, Vmm};
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
    let vmm = QemuVmm::new(
        "qemu-system-x86_64".into(),
        QemuAccel::Tcg,
        Config::default().agent.console_log_max_bytes,
    );
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
