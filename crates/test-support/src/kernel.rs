//! A guest kernel and initramfs for the VMM tests and benchmarks: the Debian cloud kernel that
//! `rootfs/build-kernel.sh` installs in the shared test files root (the one fetcher: the same
//! `vmlinux` the image tests and the agent boot), the modules a test initramfs may load (taken
//! from the kernel package that script downloaded, and cached outside the clone), and throwaway
//! busybox initramfs images with a test's own `/init`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::guest;

/// Where the modules are cached between runs, one directory per kernel release.
pub const MODULE_CACHE: &str = "/var/tmp/wrenn-test-kernel";

/// The virtio modules a test initramfs may need, in load order.
pub const VIRTIO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
];
/// Modules that let an initramfs see the ACPI power button.
pub const POWER_BUTTON_MODULES: &[&str] = &["evdev", "button"];

#[derive(Debug, Clone)]
pub struct TestKernel {
    pub vmlinux: PathBuf,
    /// `NAME.ko` (uncompressed) for every module in [`VIRTIO_MODULES`] and
    /// [`POWER_BUTTON_MODULES`].
    pub modules_dir: PathBuf,
    pub release: String,
}

impl TestKernel {
    pub fn module(&self, name: &str) -> PathBuf {
        self.modules_dir.join(format!("{name}.ko"))
    }
}

/// What build-kernel.sh records about the kernel it installed (`kernels/kernel.json`).
#[derive(Debug, serde::Deserialize)]
struct KernelInfo {
    package: String,
    package_version: String,
    release: String,
}

/// The shared test root's kernel (built by [`guest::test_kernel_root`] on first use) and its
/// modules. Concurrent callers wait on the test root's lock file.
pub fn test_kernel() -> Result<TestKernel> {
    let layout = guest::test_kernel_root()?;
    let json = layout.kernels_dir().join("kernel.json");
    let info: KernelInfo = serde_json::from_str(
        &fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?,
    )
    .with_context(|| format!("parsing {}", json.display()))?;
    let modules_dir = Path::new(MODULE_CACHE).join(&info.release);
    let complete = || {
        VIRTIO_MODULES
            .iter()
            .chain(POWER_BUTTON_MODULES)
            .all(|m| modules_dir.join(format!("{m}.ko")).is_file())
    };
    if !complete() {
        let _lock = guest::lock_test_root(layout)?;
        if !complete() {
            extract_modules(layout, &info, &modules_dir)?;
        }
    }
    Ok(TestKernel {
        vmlinux: layout.default_kernel(),
        modules_dir,
        release: info.release,
    })
}

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The package build-kernel.sh keeps in its download cache (`$WRENN_BUILD_DIR/debs`, as in
/// rootfs/lib.sh).
fn cached_deb(info: &KernelInfo) -> Option<PathBuf> {
    let build_dir =
        std::env::var("WRENN_BUILD_DIR").unwrap_or_else(|_| "/var/tmp/wrenn-build".to_string());
    let prefix = format!(
        "{}_{}_",
        info.package,
        info.package_version.replace(':', "%3a")
    );
    fs::read_dir(Path::new(&build_dir).join("debs"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

/// Unpacks the kernel package and copies the test modules, decompressed, into `dest`. The
/// caller holds the test root's lock.
fn extract_modules(layout: &wrenn::config::Layout, info: &KernelInfo, dest: &Path) -> Result<()> {
    let deb = match cached_deb(info) {
        Some(deb) => deb,
        None => {
            // The kernel is up to date but its download cache was emptied since: rebuilding
            // downloads the package again.
            let _ = fs::remove_file(layout.kernels_dir().join(".stamp"));
            guest::build_kernel(layout)?;
            cached_deb(info).with_context(|| {
                format!(
                    "build-kernel.sh left no {}={} package in its download cache",
                    info.package, info.package_version
                )
            })?
        }
    };
    fs::create_dir_all(MODULE_CACHE).with_context(|| format!("creating {MODULE_CACHE}"))?;
    let work = tempfile::Builder::new()
        .prefix("unpack-")
        .tempdir_in(MODULE_CACHE)?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(work.path()))?;
    let module_root = work
        .path()
        .join(format!("lib/modules/{}/kernel", info.release));
    let staged = work.path().join("modules");
    fs::create_dir_all(&staged)?;
    for name in VIRTIO_MODULES.iter().chain(POWER_BUTTON_MODULES) {
        let found = find_module(&module_root, name)?
            .with_context(|| format!("{name}.ko is not in {}", deb.display()))?;
        let out = staged.join(format!("{name}.ko"));
        let decompress = match found.extension().and_then(|x| x.to_str()) {
            Some("ko") => None,
            Some("xz") => Some("xz"),
            Some("zst") => Some("zstd"),
            Some("gz") => Some("gzip"),
            _ => bail!("unexpected module file {}", found.display()),
        };
        match decompress {
            None => {
                fs::copy(&found, &out)?;
            }
            Some(tool) => {
                // Binary output: not through `run`, which returns text.
                let output = Command::new(tool)
                    .arg("-dc")
                    .arg(&found)
                    .output()
                    .with_context(|| format!("running {tool}"))?;
                if !output.status.success() {
                    bail!("{tool} -dc {} failed", found.display());
                }
                fs::write(&out, output.stdout)?;
            }
        }
    }
    // A rename, so a concurrent reader never sees half the set.
    let _ = fs::remove_dir_all(dest);
    fs::rename(&staged, dest).with_context(|| format!("installing {}", dest.display()))?;
    Ok(())
}

/// `NAME.ko`, or its compressed form, anywhere under `dir`.
fn find_module(dir: &Path, name: &str) -> io::Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name)? {
                return Ok(Some(found));
            }
        } else if let Some(file) = path.file_name().and_then(|n| n.to_str()) {
            let stem = file
                .strip_suffix(".xz")
                .or_else(|| file.strip_suffix(".zst"))
                .or_else(|| file.strip_suffix(".gz"))
                .unwrap_or(file);
            if stem.strip_suffix(".ko") == Some(name) {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}

/// Builds a gzip'd newc initramfs in `dir` holding a static busybox (with its applets linked
/// into /bin), the given modules under /modules and `init` as /init, and returns its path.
pub fn busybox_initramfs(dir: &Path, init: &str, modules: &[PathBuf]) -> Result<PathBuf> {
    let stage = dir.join("initramfs-root");
    let _ = fs::remove_dir_all(&stage);
    for sub in ["bin", "sbin", "dev", "proc", "sys", "modules", "tmp"] {
        fs::create_dir_all(stage.join(sub))?;
    }
    fs::copy("/bin/busybox", stage.join("bin/busybox"))
        .context("copying /bin/busybox (install busybox-static)")?;
    let applets = run(Command::new("/bin/busybox").arg("--list"))?;
    for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", stage.join("bin").join(applet))?;
    }
    for module in modules {
        fs::copy(
            module,
            stage
                .join("modules")
                .join(module.file_name().context("module path")?),
        )?;
    }
    let init_path = stage.join("init");
    fs::write(&init_path, init)?;
    fs::set_permissions(
        &init_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let out = dir.join("initramfs.cpio.gz");
    run(Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . | cpio -o -H newc --quiet | gzip -1 > \"$2\"")
        .arg("sh")
        .arg(&stage)
        .arg(&out))?;
    fs::remove_dir_all(&stage)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_module_takes_plain_and_compressed_modules_by_exact_name() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("drivers/block");
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("virtio_blk.ko.xz"), b"").unwrap();
        fs::write(deep.join("virtio_blk_extra.ko"), b"").unwrap();
        fs::write(tmp.path().join("evdev.ko"), b"").unwrap();
        assert_eq!(
            find_module(tmp.path(), "virtio_blk").unwrap(),
            Some(deep.join("virtio_blk.ko.xz"))
        );
        assert_eq!(
            find_module(tmp.path(), "evdev").unwrap(),
            Some(tmp.path().join("evdev.ko"))
        );
        assert_eq!(find_module(tmp.path(), "virtio").unwrap(), None);
    }
}
