//! Guest VMs for tests and benchmarks: builds a files root's kernel, initramfs and template
//! images with the rootfs/ scripts, and boots them under QEMU `microvm` with TCG, capturing the
//! serial console. A VM is killed on drop, and with its owner if that process dies first.

use std::io::{self, BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use wrenn::config::Layout;

/// The kernel command line the host agent boots sandboxes with, minus the network settings.
pub const AGENT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// `ip=` for QEMU user-mode networking: guest 10.0.2.15, gateway 10.0.2.2.
pub const USER_NET_IP: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.0:capsule:eth0:off";
/// envd's port inside the guest.
pub const ENVD_PORT: u16 = 49983;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("{what} failed: {source}")]
    Io { what: String, source: io::Error },
    #[error("{command} failed:\n{output}")]
    Build { command: String, output: String },
    #[error("guest console never showed {needle:?} within {timeout:?}; console:\n{console}")]
    ConsoleTimeout {
        needle: String,
        timeout: Duration,
        console: String,
    },
    #[error("guest did not power off within {timeout:?}; console:\n{console}")]
    StillRunning { timeout: Duration, console: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> GuestError {
    let what = what.into();
    move |source| GuestError::Io { what, source }
}

fn rootfs_script(name: &str) -> PathBuf {
    crate::repo_root().join("rootfs").join(name)
}

fn run_build(mut cmd: Command) -> Result<String, GuestError> {
    let command = format!("{cmd:?}");
    let output = cmd.output().map_err(io_err(command.clone()))?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(GuestError::Build {
            command,
            output: text,
        });
    }
    Ok(text)
}

/// Builds (or finds up to date) the QEMU kernel and initramfs in `layout`'s root; returns the
/// script's progress lines.
pub fn build_kernel(layout: &Layout) -> Result<String, GuestError> {
    let mut cmd = Command::new(rootfs_script("build-kernel.sh"));
    cmd.arg(layout.root());
    run_build(cmd)
}

/// Builds (or finds up to date) the template image `template` carrying `static_bin` as envd.
pub fn build_image(
    layout: &Layout,
    template: &str,
    static_bin: &Path,
) -> Result<String, GuestError> {
    let mut cmd = Command::new(rootfs_script("build-image.sh"));
    cmd.arg(template)
        .arg(layout.root())
        .env("WRENN_STATIC_BIN", static_bin);
    run_build(cmd)
}

/// Replaces envd in an image file with `static_bin`.
pub fn update_envd(image: &Path, static_bin: &Path) -> Result<String, GuestError> {
    let mut cmd = Command::new(rootfs_script("update-envd.sh"));
    cmd.arg(image).env("WRENN_STATIC_BIN", static_bin);
    run_build(cmd)
}

/// Where a sandbox disk made by [`sandbox_disk`] puts its init script (`wrenn.init=` value).
pub const TEST_INIT: &str = "/usr/local/bin/wrenn-test-init";

/// A 64 MiB ext4 sandbox disk like the host agent's, optionally carrying `init_script` as an
/// executable [`TEST_INIT`] in the overlay's upper layer, so it shadows nothing in the image.
pub fn sandbox_disk(dir: &Path, init_script: Option<&str>) -> Result<PathBuf, GuestError> {
    let tree = dir.join("sandbox-tree");
    let bin_dir = tree.join("upper/usr/local/bin");
    std::fs::create_dir_all(&bin_dir).map_err(io_err(format!("creating {}", bin_dir.display())))?;
    if let Some(script) = init_script {
        let path = tree.join("upper").join(TEST_INIT.trim_start_matches('/'));
        std::fs::write(&path, script).map_err(io_err(format!("writing {}", path.display())))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(format!("chmod {}", path.display())))?;
    }
    let disk = dir.join("sandbox.ext4");
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&tree)
        .arg(&disk)
        .arg("64M");
    run_build(cmd)?;
    Ok(disk)
}

/// Replays the journal of a sandbox disk a guest has powered off with (`e2fsck -fy`), so tools
/// that read it offline see the last writes: `sync` in the guest commits them to the journal,
/// not to their final place. Exit status 1 (journal replayed, summary counts fixed) is the
/// normal outcome.
pub fn recover_journal(disk: &Path) -> Result<(), GuestError> {
    let mut cmd = Command::new("e2fsck");
    cmd.arg("-fy").arg(disk);
    let command = format!("{cmd:?}");
    let output = cmd.output().map_err(io_err(command.clone()))?;
    match output.status.code() {
        Some(0 | 1) => Ok(()),
        _ => Err(GuestError::Build {
            command,
            output: String::from_utf8_lossy(&output.stdout).into_owned(),
        }),
    }
}

/// A file's contents read from an unmounted ext4 image (`debugfs cat`); empty when absent.
pub fn read_from_ext4(image: &Path, path: &str) -> Result<String, GuestError> {
    let mut cmd = Command::new("debugfs");
    cmd.args(["-R", &format!("cat {path}")]).arg(image);
    let output = cmd.output().map_err(io_err(format!("{cmd:?}")))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Under TCG the guest reads the host's TSC, and without this hint the kernel calibrates it
/// against the emulated PIT, which fails on a busy host and leaves the boot hanging with no clock
/// source (`tsc_early_khz=` on the guest command line); the agent's QEMU backend does the same.
pub use wrenn::vmm::qemu::host_tsc_khz;

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<u16, GuestError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding a probe port"))?;
    Ok(listener
        .local_addr()
        .map_err(io_err("reading the probe port"))?
        .port())
}

/// What to boot: the files root's kernel and initramfs, up to two virtio disks in contract
/// order, and optionally user-mode networking forwarding a host port to envd's.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// /dev/vda, attached read-only.
    pub base_image: Option<PathBuf>,
    /// /dev/vdb, writable.
    pub sandbox_disk: Option<PathBuf>,
    /// Host loopback port forwarded to the guest's envd port, with `ip=` set to match.
    pub forward_port: Option<u16>,
    /// Appended to the agent's command line (`wrenn.init=...`).
    pub extra_cmdline: Vec<String>,
    pub memory_mib: u32,
}

impl GuestSpec {
    pub fn new(layout: &Layout) -> Self {
        Self {
            kernel: layout.default_kernel(),
            initramfs: layout.default_initramfs(),
            base_image: None,
            sandbox_disk: None,
            forward_port: None,
            extra_cmdline: Vec::new(),
            memory_mib: 512,
        }
    }

    pub fn cmdline(&self) -> String {
        let mut words = vec![AGENT_CMDLINE.to_string()];
        if self.forward_port.is_some() {
            words.push(USER_NET_IP.to_string());
        }
        if let Some(khz) = host_tsc_khz() {
            words.push(format!("tsc_early_khz={khz}"));
        }
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    fn qemu_command(&self) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-M",
            "microvm",
            "-m",
            &self.memory_mib.to_string(),
        ])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&self.kernel)
        .arg("-initrd")
        .arg(&self.initramfs)
        .args(["-append", &self.cmdline()]);
        let disks = [
            ("vda", &self.base_image, ",readonly=on"),
            ("vdb", &self.sandbox_disk, ""),
        ];
        for (id, disk, mode) in disks {
            if let Some(path) = disk {
                cmd.arg("-drive")
                    .arg(format!(
                        "id={id},file={},format=raw,if=none{mode}",
                        path.display()
                    ))
                    .args(["-device", &format!("virtio-blk-device,drive={id}")]);
            }
        }
        if let Some(port) = self.forward_port {
            cmd.args([
                "-netdev",
                &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{ENVD_PORT}"),
            ])
            .args(["-device", "virtio-net-device,netdev=n0"]);
        }
        cmd
    }
}

#[derive(Default)]
struct Console {
    text: Mutex<String>,
    changed: Condvar,
}

/// A running guest. Its serial console accumulates in memory.
pub struct GuestVm {
    child: Child,
    console: Arc<Console>,
    started: Instant,
}

impl GuestVm {
    pub fn boot(spec: &GuestSpec) -> Result<Self, GuestError> {
        let mut cmd = spec.qemu_command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(io::Error::from)
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(io_err("starting qemu-system-x86_64"))?;
        let console = Arc::new(Console::default());
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let console = Arc::clone(&console);
            thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                    let mut text = console.text.lock().unwrap();
                    text.push_str(String::from_utf8_lossy(&line).trim_end_matches('\r'));
                    text.push('\n');
                    console.changed.notify_all();
                }
            });
        }
        Ok(Self {
            child,
            console,
            started,
        })
    }

    /// Everything the guest printed so far (serial console and QEMU's own messages).
    pub fn console(&self) -> String {
        self.console.text.lock().unwrap().clone()
    }

    /// Waits until the console shows `needle`; returns the time since boot.
    pub fn wait_for_console(
        &self,
        needle: &str,
        timeout: Duration,
    ) -> Result<Duration, GuestError> {
        let deadline = Instant::now() + timeout;
        let mut text = self.console.text.lock().unwrap();
        loop {
            if text.contains(needle) {
                return Ok(self.started.elapsed());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(GuestError::ConsoleTimeout {
                    needle: needle.to_string(),
                    timeout,
                    console: text.clone(),
                });
            }
            text = self
                .console
                .changed
                .wait_timeout(text, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Waits for QEMU to exit on its own (the guest powered off or rebooted).
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<ExitStatus, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(io_err("waiting for qemu"))? {
                // Let the reader threads drain the last console lines.
                thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(GuestError::StillRunning {
                    timeout,
                    console: self.console(),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn since_boot(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The static `wrenn` the guest images carry: `$WRENN_STATIC_BIN` (which `just test` sets), or
/// built here with `just build-static`.
pub fn static_binary() -> PathBuf {
    if let Ok(path) = std::env::var("WRENN_STATIC_BIN") {
        return PathBuf::from(path);
    }
    let output = Command::new("just")
        .arg("build-static")
        .current_dir(crate::repo_root())
        .output()
        .expect("`just build-static` runs (install just with .ci/bootstrap)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("a UTF-8 path");
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build-static prints the binary path"),
    )
}

/// The files root shared by VM tests, outside the clone (`$WRENN_TEST_FILES_ROOT`, default
/// /var/tmp/wrenn-test-root) so later runs find its builds up to date. Builds nothing.
pub fn test_root() -> Layout {
    let root = std::env::var("WRENN_TEST_FILES_ROOT")
        .unwrap_or_else(|_| "/var/tmp/wrenn-test-root".to_string());
    Layout::new(root)
}

/// An exclusive lock on `layout`'s root between processes (a lock file beside it, so the files
/// root holds nothing the agent does not expect), released on drop.
pub fn lock_test_root(layout: &Layout) -> Result<Flock<std::fs::File>, GuestError> {
    let mut path = layout.root().as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(io_err(format!("creating {}", parent.display())))?;
    }
    let file =
        std::fs::File::create(&path).map_err(io_err(format!("creating {}", path.display())))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .map_err(|e| io_err(format!("locking {}", path.display()))(e.into()))
}

/// The shared test root with its kernel and initramfs built (or found up to date) once per
/// process, under [`lock_test_root`] so concurrent test processes never run build-kernel.sh
/// (and its download) on it at the same time. The VMM tests' kernel
/// ([`crate::kernel::test_kernel`]) and the image tests' both come from here.
pub fn test_kernel_root() -> Result<&'static Layout, GuestError> {
    static ROOT: std::sync::OnceLock<Result<Layout, String>> = std::sync::OnceLock::new();
    let built = ROOT.get_or_init(|| {
        let layout = test_root();
        let _lock = lock_test_root(&layout).map_err(|e| e.to_string())?;
        build_kernel(&layout).map_err(|e| e.to_string())?;
        Ok(layout)
    });
    built.as_ref().map_err(|e| GuestError::Build {
        command: "rootfs/build-kernel.sh on the shared test root".to_string(),
        output: e.clone(),
    })
}

/// The shared test root ([`test_root`]) with the kernel, the initramfs, the `busybox` image
/// (the fastest to build and boot, for tests of the VM and the agent) and the `minimal` image
/// (the control plane's default template) built once per process.
pub fn test_files() -> &'static Layout {
    static FILES: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();
    FILES.get_or_init(|| {
        let layout = test_kernel_root().unwrap_or_else(|e| panic!("{e}")).clone();
        for template in ["busybox", "minimal"] {
            build_image(&layout, template, &static_binary()).unwrap_or_else(|e| panic!("{e}"));
        }
        layout
    })
}
