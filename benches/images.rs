//! Guest kernel and image figures: sizes, cold and up-to-date build times, and boot-to-ready
//! time under QEMU TCG. `just bench-images` runs it; `-- --cold-python` also rebuilds the
//! python template's Debian tree from scratch (minutes) instead of reusing the cached one.
//!
//! Cold builds go to a temporary files root and build directory (the kernel package is
//! downloaded again); boots use the files root in /var/tmp/wrenn-test-root shared with the tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use wrenn::config::Layout;
use wrenn::testing::guest::{self, GuestSpec, GuestVm};

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

/// Builds into `layout` with `build_dir` as WRENN_BUILD_DIR, timing a cold and an up-to-date run.
fn build_figures(layout: &Layout, build_dir: &Path, bin: &Path, templates: &[&str]) {
    let run = |script: &str, args: &[&Path]| {
        let mut cmd = Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("rootfs")
                .join(script),
        );
        cmd.args(args)
            .env("WRENN_BUILD_DIR", build_dir)
            .env("WRENN_STATIC_BIN", bin);
        let output = cmd.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    for pass in ["cold", "up to date"] {
        timed(&format!("kernel + initramfs build ({pass})"), || {
            run("build-kernel.sh", &[layout.root()])
        });
        for template in templates {
            timed(&format!("image {template} build ({pass})"), || {
                run("build-image.sh", &[Path::new(template), layout.root()])
            });
        }
    }
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
    let args: Vec<String> = std::env::args().collect();
    let cold_python = args.iter().any(|a| a == "--cold-python");
    let bin = static_binary();
    println!(
        "wrenn guest images (host TSC {:?} kHz, {} CPUs)",
        guest::host_tsc_khz(),
        num_cpus()
    );

    println!("\n== builds: kernel + minimal + python into a fresh files root");
    let cold_root = tempfile::tempdir().unwrap();
    let cold_build = tempfile::tempdir().unwrap();
    let cold_layout = Layout::new(cold_root.path());
    let shared_build = PathBuf::from("/var/tmp/wrenn-build");
    let python_build_dir = if cold_python {
        cold_build.path()
    } else {
        shared_build.as_path()
    };
    build_figures(&cold_layout, cold_build.path(), &bin, &["minimal"]);
    if !cold_python {
        println!(
            "(python reuses the cached Debian tree in {}; --cold-python rebuilds it)",
            shared_build.display()
        );
    }
    build_figures(&cold_layout, python_build_dir, &bin, &["python"]);

    println!("\n== sizes");
    for (what, path) in [
        ("vmlinux", cold_layout.default_kernel()),
        ("initramfs.cpio.gz", cold_layout.default_initramfs()),
        (
            "images/minimal/rootfs.ext4",
            cold_layout.image_rootfs("minimal"),
        ),
        (
            "images/python/rootfs.ext4",
            cold_layout.image_rootfs("python"),
        ),
    ] {
        println!("{what:<48} {}", mib(&path));
    }

    println!("\n== boot to userspace on the overlay root (QEMU microvm, TCG, median of {BOOTS})");
    for template in ["minimal", "python"] {
        let took = boot_to_userspace(&cold_layout, template);
        println!(
            "{:<48} {:>8.2} s",
            format!("{template}: QEMU start to init's first line"),
            took.as_secs_f64()
        );
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
