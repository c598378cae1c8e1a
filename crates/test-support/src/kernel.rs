//! A guest kernel and initramfs for the VMM tests and benchmarks: the Debian cloud kernel
//! (fetched with apt once and cached outside the clone, as an uncompressed `vmlinux` plus its
//! virtio modules) and throwaway busybox initramfs images with a test's own `/init`.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// Where the kernel is cached between runs.
pub const KERNEL_CACHE: &str = "/var/tmp/wrenn-test-kernel";

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
    /// `NAME.ko` for every module in [`VIRTIO_MODULES`] and [`POWER_BUTTON_MODULES`].
    pub modules_dir: PathBuf,
    pub release: String,
}

impl TestKernel {
    pub fn module(&self, name: &str) -> PathBuf {
        self.modules_dir.join(format!("{name}.ko"))
    }
}

/// The cached kernel, fetched on first use. Concurrent callers wait on a lock file.
pub fn test_kernel() -> Result<TestKernel> {
    let cache = Path::new(KERNEL_CACHE);
    fs::create_dir_all(cache).with_context(|| format!("creating {KERNEL_CACHE}"))?;
    let lock = File::create(cache.join(".lock")).context("creating the kernel cache lock")?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("locking the kernel cache")?;
    // `release` is written last, so its presence means the cache is complete.
    let complete = cache.join("release").is_file()
        && VIRTIO_MODULES
            .iter()
            .chain(POWER_BUTTON_MODULES)
            .all(|m| cache.join(format!("modules/{m}.ko")).is_file());
    if !complete {
        fetch_kernel(cache)?;
    }
    Ok(TestKernel {
        vmlinux: cache.join("vmlinux"),
        modules_dir: cache.join("modules"),
        release: fs::read_to_string(cache.join("release"))?.trim().to_owned(),
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

fn fetch_kernel(cache: &Path) -> Result<()> {
    let depends = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
    let package = depends
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Depends: ")
                .filter(|p| p.starts_with("linux-image-"))
        })
        .context("apt-cache names no kernel package for linux-image-cloud-amd64")?
        .to_owned();
    let work = cache.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    run(Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(&work))?;
    let deb = fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let root = work.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let release = package.trim_start_matches("linux-image-").to_owned();
    let bzimage = root.join(format!("boot/vmlinuz-{release}"));
    let vmlinux = extract_vmlinux(
        &fs::read(&bzimage).with_context(|| format!("reading {}", bzimage.display()))?,
    )?;

    let modules = cache.join("modules");
    fs::create_dir_all(&modules)?;
    let module_root = root.join(format!("lib/modules/{release}/kernel"));
    for name in VIRTIO_MODULES.iter().chain(POWER_BUTTON_MODULES) {
        let file = format!("{name}.ko");
        let found = find_file(&module_root, &file)?
            .with_context(|| format!("{file} is not in {package}"))?;
        fs::copy(&found, modules.join(&file))?;
    }
    let tmp = cache.join("vmlinux.tmp");
    fs::write(&tmp, vmlinux)?;
    fs::rename(&tmp, cache.join("vmlinux"))?;
    fs::write(cache.join("release"), &release)?;
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

fn find_file(dir: &Path, name: &str) -> io::Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name)? {
                return Ok(Some(found));
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Decompresses the kernel inside a bzImage, using the boot protocol header to find the
/// payload rather than searching for magic numbers.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |off: usize| -> Result<usize> {
        let bytes = bzimage.get(off..off + 4).context("bzImage too short")?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")) as usize)
    };
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage (no HdrS boot header)");
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let payload = bzimage
        .get(start..start + u32_at(0x24c)?)
        .context("payload outside the bzImage")?;
    // Every format but gzip is followed by the 4-byte uncompressed size the kernel build appends.
    let (tool, data): (&[&str], &[u8]) = if payload.starts_with(&[0x1f, 0x8b]) {
        (&["gzip", "-dc"], payload)
    } else {
        let data = &payload[..payload.len().saturating_sub(4)];
        match payload {
            [0x02, 0x21, 0x4c, 0x18, ..] => (&["lz4", "-dc"], data),
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => (&["xz", "-dc"], data),
            [0x28, 0xb5, 0x2f, 0xfd, ..] => (&["zstd", "-dc"], data),
            _ => bail!(
                "unknown kernel compression (payload starts {:02x?})",
                &payload[..payload.len().min(6)]
            ),
        }
    };
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", tool[0]))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = data.to_vec();
    let writer = std::thread::spawn(move || io::Write::write_all(&mut stdin, &input));
    let output = child.wait_with_output()?;
    writer.join().expect("writer thread")?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            tool[0],
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    if !output.stdout.starts_with(b"\x7fELF") {
        bail!("the decompressed kernel is not an ELF image");
    }
    Ok(output.stdout)
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
