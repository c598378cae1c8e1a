//! Guest kernel and image figures: sizes, cold and up-to-date build times, and boot-to-ready
//! time under QEMU TCG. `just bench-images` runs it; `-- --cold-debian` also makes the
//! minimal and python templates' Debian trees from scratch (minutes) instead of reusing the
//! cached ones.
//!
//! Builds go to a temporary files root and build directory (the kernel package is downloaded
//! again), and the boots use what they built.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use wrenn::config::Layout;
use wrenn::envd::client::EnvdClient;
use wrenn_test_support::guest::{self, GuestSpec, GuestVm};

const BOOTS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(300);

fn static_binary() -> PathBuf {
    if let Ok(path) = std::env::var("WRENN_STATIC_BIN") {
        return PathBuf::from(path);
    }
    let output = Command::new("just")
        .arg("build-static")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("`just build-static` runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    let took = started.elapsed();
    println!("{what:<48} {:>8.1} s", took.as_secs_f64());
    (out, took)
}

fn mib(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    format!(
        "{:>7.1} MiB ({:.1} MiB allocated)",
        meta.len() as f64 / 1048576.0,
        allocated as f64 / 1048576.0
    )
}

/// Runs a rootfs/ script with `build_dir` as WRENN_BUILD_DIR and prints how long it took.
fn timed_script(what: &str, script: &str, args: &[&Path], build_dir: &Path, bin: &Path) {
    let mut cmd = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("rootfs")
            .join(script),
    );
    cmd.args(args)
        .env("WRENN_BUILD_DIR", build_dir)
        .env("WRENN_STATIC_BIN", bin);
    let (output, _) = timed(what, || cmd.output().unwrap());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

const READY_INIT: &str = "#!/bin/sh\necho wrenn-bench-ready\nsync\necho o >/proc/sysrq-trigger\n";

/// Time from starting QEMU to the first line printed by a program on the overlay root.
fn boot_to_userspace(layout: &Layout, template: &str) -> Duration {
    let samples = (0..BOOTS)
        .map(|_| {
            let tmp = tempfile::tempdir().unwrap();
            let mut spec = GuestSpec::new(layout);
            spec.base_image = Some(layout.image_rootfs(template));
            spec.sandbox_disk = Some(guest::sandbox_disk(tmp.path(), Some(READY_INIT)).unwrap());
            spec.extra_cmdline
                .push(format!("wrenn.init={}", guest::TEST_INIT));
            let mut vm = GuestVm::boot(&spec).unwrap();
            let ready = vm
                .wait_for_console("wrenn-bench-ready", TIMEOUT)
                .unwrap_or_else(|e| panic!("{e}"));
            vm.wait_for_exit(TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
            ready
        })
        .collect();
    median(samples)
}

fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("images benchmark: run it with `cargo bench --bench images`");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let cold_debian = args.iter().any(|a| a == "--cold-debian");
    let bin = static_binary();
    println!(
        "wrenn guest images (host TSC {:?} kHz, {} CPUs)",
        guest::host_tsc_khz(),
        num_cpus()
    );

    println!("\n== builds into a fresh files root");
    let cold_root = tempfile::tempdir().unwrap();
    let cold_build = tempfile::tempdir().unwrap();
    let layout = Layout::new(cold_root.path());
    let root = layout.root();
    for pass in ["cold", "up to date"] {
        timed_script(
            &format!("kernel + initramfs ({pass})"),
            "build-kernel.sh",
            &[root],
            cold_build.path(),
            &bin,
        );
    }
    for pass in ["cold", "up to date"] {
        timed_script(
            &format!("image busybox ({pass})"),
            "build-image.sh",
            &[Path::new("busybox"), root],
            cold_build.path(),
            &bin,
        );
    }
    // The Debian trees take a minute or more each to make; by default they come from the shared
    // cache (`--cold-debian` makes them, and downloads their packages, from scratch).
    let shared_build = PathBuf::from("/var/tmp/wrenn-build");
    let (debian_build, debian_cold) = if cold_debian {
        (cold_build.path(), "cold, Debian tree included")
    } else {
        (shared_build.as_path(), "cold, cached Debian tree")
    };
    for template in ["minimal", "python"] {
        for pass in [debian_cold, "up to date"] {
            timed_script(
                &format!("image {template} ({pass})"),
                "build-image.sh",
                &[Path::new(template), root],
                debian_build,
                &bin,
            );
        }
    }

    println!("\n== sizes");
    for (what, path) in [
        ("vmlinux", layout.default_kernel()),
        ("initramfs.cpio.gz", layout.default_initramfs()),
        ("images/busybox/rootfs.ext4", layout.image_rootfs("busybox")),
        ("images/minimal/rootfs.ext4", layout.image_rootfs("minimal")),
        ("images/python/rootfs.ext4", layout.image_rootfs("python")),
    ] {
        println!("{what:<48} {}", mib(&path));
    }

    println!("\n== boot under QEMU microvm with TCG (median of {BOOTS})");
    for template in ["busybox", "minimal", "python"] {
        let first_line = boot_to_userspace(&layout, template);
        println!(
            "{:<48} {:>8.2} s",
            format!("{template}: to init's first line"),
            first_line.as_secs_f64()
        );
        let envd = boot_to_envd(&layout, template);
        println!(
            "{:<48} {:>8.2} s",
            format!("{template}: to envd /health over the network"),
            envd.as_secs_f64()
        );
    }
}

/// Time from starting QEMU to envd's first successful /health through the forwarded port.
fn boot_to_envd(layout: &Layout, template: &str) -> Duration {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let samples = (0..BOOTS)
        .map(|_| {
            let tmp = tempfile::tempdir().unwrap();
            let port = guest::free_port().unwrap();
            let mut spec = GuestSpec::new(layout);
            spec.base_image = Some(layout.image_rootfs(template));
            spec.sandbox_disk = Some(guest::sandbox_disk(tmp.path(), None).unwrap());
            spec.forward_port = Some(port);
            let mut vm = GuestVm::boot(&spec).unwrap();
            let client = EnvdClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
            while runtime.block_on(client.health()).is_err() {
                assert!(
                    vm.since_boot() < TIMEOUT,
                    "envd never answered:\n{}",
                    vm.console()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let ready = vm.since_boot();
            runtime.block_on(client.shutdown()).unwrap();
            vm.wait_for_exit(TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
            ready
        })
        .collect();
    median(samples)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
