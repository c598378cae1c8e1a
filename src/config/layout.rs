//! The files-root layout: every path the agent touches on disk is built here and nowhere else.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("files root directory {path} could not be created: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{path} exists but is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("files root directory {path} is not writable: {source}")]
    NotWritable { path: PathBuf, source: io::Error },
}

impl Layout {
    pub fn new(root: impl AsRef<Path>) -> Self {
        Self {
            root: root.as_ref().to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn kernels_dir(&self) -> PathBuf {
        self.root.join("kernels")
    }

    /// The guest kernel used when a template does not name one.
    pub fn default_kernel(&self) -> PathBuf {
        self.kernels_dir().join("vmlinux")
    }

    /// The initramfs booted with the default kernel: loads its modules, assembles the overlay
    /// root from the base image (/dev/vda) and the sandbox disk (/dev/vdb), starts envd.
    pub fn default_initramfs(&self) -> PathBuf {
        self.kernels_dir().join("initramfs.cpio.gz")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// A template's base image directory: `rootfs.ext4` and `meta.json`.
    pub fn image_dir(&self, template: &str) -> PathBuf {
        self.images_dir().join(template)
    }

    /// A snapshot template's saved VM (a shared snapshot, the writable disk of that instant and
    /// `snapshot.json`), beside the base image it booted from.
    pub fn image_snapshot_dir(&self, template: &str) -> PathBuf {
        self.image_dir(template).join("snapshot")
    }

    /// The template store's directory when `store.url` names none (`crate::store`).
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    /// A template's base image, attached read-only as /dev/vda to every sandbox made from it.
    pub fn image_rootfs(&self, template: &str) -> PathBuf {
        self.image_dir(template).join("rootfs.ext4")
    }

    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// One sandbox's state directory. `sandbox_id` must be a validated id (a single path
    /// component), as the control plane issues them.
    pub fn sandbox_dir(&self, sandbox_id: &str) -> PathBuf {
        self.sandboxes_dir().join(sandbox_id)
    }

    /// The sandbox's sparse writable ext4 disk, overlaid in the guest on the read-only template.
    pub fn sandbox_upper_disk(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("upper.ext4")
    }

    /// The sandbox's hard link to the template image it was created from.
    pub fn sandbox_base_image(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("base.ext4")
    }

    /// What a restarted agent needs to adopt the sandbox or resume it (`agent::sandbox::record`).
    pub fn sandbox_record(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("sandbox.json")
    }

    /// The guest's serial console output, its most recent part.
    pub fn console_log(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("console.log")
    }

    /// The console output that came before `console.log`, moved aside when that file reached
    /// half of `agent.console_log_max_bytes`.
    pub fn previous_console_log(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("console.log.1")
    }

    /// The named pipe the VMM writes the guest console to and the agent drains into
    /// `console.log`; a named one, so that the next agent process can drain it again.
    pub fn console_fifo(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("console.fifo")
    }

    /// The VMM process's stdout and stderr (QEMU's diagnostics).
    pub fn vmm_log(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("vmm.log")
    }

    /// Firecracker's own logger (`--log-path`); its stdout is the guest console.
    pub fn firecracker_log(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("firecracker.log")
    }

    /// Firecracker's API socket.
    pub fn firecracker_socket(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("firecracker.sock")
    }

    /// The host end of Firecracker's vsock device (guest connections arrive at `<path>_<port>`).
    pub fn vsock_socket(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("vsock.sock")
    }

    /// QEMU's QMP control socket.
    pub fn qmp_socket(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("qmp.sock")
    }

    /// The empty directory a confined QEMU is chrooted into: it needs no file once running.
    pub fn vmm_root(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("vmm-root")
    }

    /// The chroot base of Firecracker's jailer: each VM's jail is
    /// `jails/<firecracker binary name>/<sandbox id>/root`, short enough for its API socket.
    pub fn jails_dir(&self) -> PathBuf {
        self.root.join("jails")
    }

    /// Formatted blank upper disks, one per size, from which sandbox uppers are copied; safe to
    /// delete at any time (they are re-created on demand).
    pub fn blank_uppers_dir(&self) -> PathBuf {
        self.root.join("cache").join("blank-uppers")
    }

    pub fn blank_upper(&self, size_bytes: u64) -> PathBuf {
        self.blank_uppers_dir()
            .join(format!("upper-{size_bytes}.ext4"))
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// One paused sandbox's snapshot: its files below, nothing else.
    pub fn snapshot_dir(&self, sandbox_id: &str) -> PathBuf {
        self.snapshots_dir().join(sandbox_id)
    }

    /// The snapshot's metadata, written last: a snapshot without it is never loaded.
    pub fn snapshot_meta(&self, sandbox_id: &str) -> PathBuf {
        self.snapshot_dir(sandbox_id).join("meta.json")
    }

    /// The metadata of a snapshot that has been restored, moved aside: the restored guest ran
    /// on and wrote its disk, so the memory here no longer matches the disk.
    pub fn snapshot_restored_meta(&self, sandbox_id: &str) -> PathBuf {
        self.snapshot_dir(sandbox_id).join("meta.restored.json")
    }

    /// The VM's device and CPU state (QEMU's migration stream, which carries the guest memory
    /// too; Firecracker's vmstate file).
    pub fn snapshot_state(&self, sandbox_id: &str) -> PathBuf {
        self.snapshot_dir(sandbox_id).join("vmstate")
    }

    /// The guest memory, for VMMs that write it apart from the state (Firecracker).
    pub fn snapshot_memory(&self, sandbox_id: &str) -> PathBuf {
        self.snapshot_dir(sandbox_id).join("memory")
    }

    /// Shared snapshots of booted templates, one directory per boot key (the template image,
    /// kernel, VMM and VM shape it was made with): the files of a shared snapshot, the
    /// writable disk at that instant and what it was made from. Kept apart from the paused
    /// sandboxes' snapshots, which are named by sandbox id.
    pub fn boot_snapshots_dir(&self) -> PathBuf {
        self.snapshots_dir().join("boot")
    }

    pub fn boot_snapshot_dir(&self, key: &str) -> PathBuf {
        self.boot_snapshots_dir().join(key)
    }

    /// A boot snapshot being made: published by renaming it to [`Layout::boot_snapshot_dir`].
    pub fn boot_snapshot_staging_dir(&self, key: &str) -> PathBuf {
        self.boot_snapshots_dir().join(format!(".staging-{key}"))
    }

    /// The snapshot of the booted VM a boot snapshot is made from, while it is being made.
    pub fn boot_snapshot_work_dir(&self, key: &str) -> PathBuf {
        self.boot_snapshots_dir().join(format!(".paused-{key}"))
    }

    /// Forks in progress: the source's memory and disk of one instant, each fork's until its
    /// children are started (nothing here outlives the agent process that made it).
    pub fn forks_dir(&self) -> PathBuf {
        self.snapshots_dir().join("forks")
    }

    /// The name a snapshot file is written under until it is complete: `<file>.partial`.
    pub fn partial(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".partial");
        PathBuf::from(name)
    }

    /// The agent's saved host credentials (JWT and refresh token), mode 0600.
    pub fn host_token_file(&self) -> PathBuf {
        self.root.join("host-token")
    }

    /// The sandboxes' metric rings, saved by a stopping agent for the next one
    /// (`agent::sandbox::metrics`).
    pub fn sandbox_metrics_file(&self) -> PathBuf {
        self.root.join("sandbox-metrics.json")
    }

    /// The host sysctls the agent changed and the values they had, put back when it leaves.
    pub fn host_sysctls_record(&self) -> PathBuf {
        self.root.join("host-sysctls.json")
    }

    /// The derived paths by name, in display order, for `config show` and retired-variable
    /// messages.
    pub fn derived(&self) -> [(&'static str, PathBuf); 5] {
        [
            ("kernel", self.default_kernel()),
            ("images", self.images_dir()),
            ("sandboxes", self.sandboxes_dir()),
            ("snapshots", self.snapshots_dir()),
            ("host_token", self.host_token_file()),
        ]
    }

    pub(super) fn path_named(&self, name: &str) -> PathBuf {
        self.derived()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p)
            .expect("retired variables map to derived paths")
    }

    /// Creates the root and its directories when missing (0755 for shared inputs, 0700 for
    /// per-sandbox state) and proves the root is writable, naming the directory on failure.
    pub fn prepare(&self) -> Result<(), LayoutError> {
        let dirs = [
            (self.root.clone(), 0o755),
            (self.kernels_dir(), 0o755),
            (self.images_dir(), 0o755),
            (self.sandboxes_dir(), 0o700),
            (self.snapshots_dir(), 0o700),
        ];
        for (dir, mode) in dirs {
            match fs::metadata(&dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(LayoutError::NotADirectory { path: dir }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(mode)
                        .create(&dir)
                        .map_err(|source| LayoutError::CreateDir {
                            path: dir.clone(),
                            source,
                        })?;
                    // The umask may have narrowed the mode; state directories must stay private.
                    fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).map_err(
                        |source| LayoutError::CreateDir {
                            path: dir.clone(),
                            source,
                        },
                    )?;
                }
                Err(source) => return Err(LayoutError::CreateDir { path: dir, source }),
            }
        }
        let probe = self
            .root
            .join(format!(".wrenn-write-probe-{}", std::process::id()));
        fs::write(&probe, b"")
            .and_then(|()| fs::remove_file(&probe))
            .map_err(|source| LayoutError::NotWritable {
                path: self.root.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_derives_from_the_root() {
        for root in ["/var/lib/wrenn", "/srv/w", "relative/root", "/"] {
            let layout = Layout::new(root);
            let root = Path::new(root);
            assert_eq!(layout.default_kernel(), root.join("kernels/vmlinux"));
            assert_eq!(layout.kernels_dir(), root.join("kernels"));
            assert_eq!(layout.images_dir(), root.join("images"));
            assert_eq!(
                layout.default_initramfs(),
                root.join("kernels/initramfs.cpio.gz")
            );
            assert_eq!(
                layout.image_rootfs("minimal"),
                root.join("images/minimal/rootfs.ext4")
            );
            assert_eq!(layout.sandboxes_dir(), root.join("sandboxes"));
            assert_eq!(layout.snapshots_dir(), root.join("snapshots"));
            assert_eq!(layout.host_token_file(), root.join("host-token"));
            assert_eq!(layout.sandbox_dir("sb-1"), root.join("sandboxes/sb-1"));
            for path in [
                layout.console_log("sb-1"),
                layout.console_fifo("sb-1"),
                layout.vmm_log("sb-1"),
                layout.firecracker_log("sb-1"),
                layout.firecracker_socket("sb-1"),
                layout.vsock_socket("sb-1"),
                layout.qmp_socket("sb-1"),
            ] {
                assert_eq!(path.parent(), Some(root.join("sandboxes/sb-1").as_path()));
            }
            for path in [
                layout.snapshot_meta("sb-1"),
                layout.snapshot_restored_meta("sb-1"),
                layout.snapshot_state("sb-1"),
                layout.snapshot_memory("sb-1"),
            ] {
                assert_eq!(path.parent(), Some(root.join("snapshots/sb-1").as_path()));
            }
            assert_eq!(
                Layout::partial(&layout.snapshot_state("sb-1")),
                root.join("snapshots/sb-1/vmstate.partial")
            );
            assert_eq!(
                layout.sandbox_upper_disk("sb-1"),
                root.join("sandboxes/sb-1/upper.ext4")
            );
            for (_, path) in layout.derived() {
                assert!(path.starts_with(root));
            }
        }
    }

    #[test]
    fn prepare_creates_directories_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path().join("a/b"));
        layout.prepare().unwrap();
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(layout.images_dir()), 0o755);
        assert_eq!(mode(layout.sandboxes_dir()), 0o700);
        assert_eq!(mode(layout.snapshots_dir()), 0o700);
        // Idempotent.
        layout.prepare().unwrap();
    }

    #[test]
    fn prepare_names_a_file_in_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("images"), b"").unwrap();
        let err = Layout::new(tmp.path()).prepare().unwrap_err();
        assert!(err.to_string().contains("images"), "{err}");
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn prepare_names_the_directory_it_cannot_create() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("file"), b"").unwrap();
        let err = Layout::new(tmp.path().join("file/sub"))
            .prepare()
            .unwrap_err();
        assert!(err.to_string().contains("file/sub"), "{err}");
    }
}
