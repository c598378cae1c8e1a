//! Firecracker's jailer: the command line that starts Firecracker chrooted into a directory of
//! its own (`<base>/<exec file name>/<sandbox id>/root`, the jailer's layout), as the VM's
//! unprivileged user, in the sandbox's network namespace, under Firecracker's default seccomp
//! filters; and that directory's contents, which are all Firecracker may ever open: hard links
//! (copies, across filesystems) of the kernel, initrd and drives at fixed paths, its log, and
//! the sockets it creates. The VM's cgroup is the agent's own ([`super::super::cgroup`]), joined
//! before the jailer runs, so no `--cgroup` flags are passed.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::super::{Confinement, Drive, SnapshotFiles, VmSpec, VmmError};
use crate::config::Layout;

/// Paths inside the jail, as Firecracker sees them.
pub const API_SOCKET: &str = "/api.sock";
pub const LOG: &str = "/firecracker.log";
pub const VSOCK_SOCKET: &str = "/vsock.sock";
pub const KERNEL: &str = "/vmlinux";
pub const INITRD: &str = "/initrd";
pub const DRIVES: &str = "/drives";
/// The page server's socket, inside the jail (the page server itself runs outside).
pub const UFFD_SOCKET: &str = "/uffd.sock";

/// Where Firecracker writes a snapshot and reads one back, inside the jail.
pub const SNAPSHOT: &str = "/snapshot";

/// One VM's jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    base: PathBuf,
    exec_file: PathBuf,
    id: String,
    uid: u32,
    gid: u32,
    root: PathBuf,
}

fn jail_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VmmError + 'a {
    move |source| VmmError::File {
        what,
        path: path.to_owned(),
        source,
    }
}

impl Jail {
    /// The jail under `base` of `spec`'s VM, run from `exec_file` (the Firecracker binary the
    /// jailer copies in) as `confinement`'s user.
    pub fn new(base: &Path, exec_file: &Path, spec: &VmSpec, confinement: &Confinement) -> Self {
        let exec_name = exec_file.file_name().unwrap_or(exec_file.as_os_str());
        Self {
            base: base.to_owned(),
            exec_file: exec_file.to_owned(),
            id: spec.id.clone(),
            uid: confinement.uid,
            gid: confinement.gid,
            root: base.join(exec_name).join(&spec.id).join("root"),
        }
    }

    /// The user and group the jailed Firecracker runs as.
    pub fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// The jail's root directory on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a path inside the jail is on the host.
    pub fn host_path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// The jailer's arguments (Firecracker's own follow `--`; the jailer adds its `--id`).
    pub fn command_line(&self, netns: Option<&Path>) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--id".into(),
            self.id.clone().into(),
            "--exec-file".into(),
            self.exec_file.clone().into(),
            "--uid".into(),
            self.uid.to_string().into(),
            "--gid".into(),
            self.gid.to_string().into(),
            "--chroot-base-dir".into(),
            self.base.clone().into(),
        ];
        if let Some(netns) = netns {
            args.push("--netns".into());
            args.push(netns.into());
        }
        args.extend(
            [
                "--",
                "--api-sock",
                API_SOCKET,
                "--log-path",
                LOG,
                "--level",
                "Info",
            ]
            .iter()
            .map(OsString::from),
        );
        args
    }

    fn drive_path(drive: &Drive) -> String {
        format!("{DRIVES}/{}", drive.id)
    }

    /// `spec` as Firecracker sees it from inside the jail: the kernel, initrd and drives at
    /// their jail paths and the vsock socket inside. Its API calls are built from this.
    pub fn inside(&self, spec: &VmSpec) -> VmSpec {
        let mut inside = spec.clone();
        inside.kernel = KERNEL.into();
        inside.initrd = spec.initrd.as_ref().map(|_| INITRD.into());
        for drive in &mut inside.drives {
            drive.path = Self::drive_path(drive).into();
        }
        inside.files.vsock_socket = VSOCK_SOCKET.into();
        inside
    }

    /// Puts `spec`'s files into the jail: the kernel, initrd and read-only drives stay the
    /// host's (linked where others may read them, copied otherwise), writable drives and the log
    /// belong to the VM's user. A jail left by an earlier VMM of the sandbox is replaced.
    pub fn populate(&self, spec: &VmSpec) -> Result<(), VmmError> {
        self.remove()?;
        let drives = self.host_path(DRIVES);
        for dir in [&self.root, &drives] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(jail_error("failed to create jail directory", dir))?;
        }
        self.place(&spec.kernel, KERNEL, false)?;
        if let Some(initrd) = &spec.initrd {
            self.place(initrd, INITRD, false)?;
        }
        for drive in &spec.drives {
            self.place(&drive.path, &Self::drive_path(drive), !drive.read_only)?;
        }
        let log = self.host_path(LOG);
        fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&log)
            .map_err(jail_error("failed to create jail log", &log))?;
        self.give(&log)
    }

    /// Links `host` to `inside`. A `writable` file must be linked (the guest's writes belong
    /// in the sandbox's own disk) and becomes the VM user's; a read-only one is copied, for the
    /// VM's user alone, when it is on another filesystem or others may not read it (changing a
    /// shared image's owner would change it for every sandbox).
    fn place(&self, host: &Path, inside: &str, writable: bool) -> Result<(), VmmError> {
        let target = self.host_path(inside);
        let meta = fs::metadata(host).map_err(jail_error("failed to read", host))?;
        if writable {
            fs::hard_link(host, &target)
                .map_err(jail_error("failed to link into the jail", host))?;
            return self.give(&target);
        }
        if meta.mode() & 0o004 != 0 && fs::hard_link(host, &target).is_ok() {
            return Ok(());
        }
        fs::copy(host, &target).map_err(jail_error("failed to copy into the jail", host))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o400))
            .map_err(jail_error("failed to set the mode of", &target))?;
        self.give(&target)
    }

    /// Makes `path` the VM user's.
    fn give(&self, path: &Path) -> Result<(), VmmError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .map_err(jail_error("failed to hand over", path))
    }

    /// `snapshot` as Firecracker sees it from inside the jail: the same file names, in
    /// [`SNAPSHOT`].
    pub fn snapshot_inside(&self, snapshot: &SnapshotFiles) -> SnapshotFiles {
        let inside = |path: &Path| Path::new(SNAPSHOT).join(path.file_name().unwrap_or_default());
        SnapshotFiles {
            dir: SNAPSHOT.into(),
            meta: inside(&snapshot.meta),
            restored_meta: inside(&snapshot.restored_meta),
            state: inside(&snapshot.state),
            memory: inside(&snapshot.memory),
        }
    }

    /// Creates the jail's snapshot directory, empty and the VM user's, for Firecracker to
    /// write a snapshot into.
    pub fn prepare_snapshot(&self) -> Result<(), VmmError> {
        let dir = self.host_path(SNAPSHOT);
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(jail_error("failed to empty", &dir)(e));
            }
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(jail_error("failed to create jail directory", &dir))?;
        self.give(&dir)
    }

    /// Moves the state and memory Firecracker wrote into the jail (at `snapshot`'s partial
    /// names) to `snapshot`'s own partial files, which the snapshot writer then commits.
    pub fn take_snapshot(&self, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
        let inside = self.snapshot_inside(snapshot);
        for (from, to) in [
            (&inside.state, &snapshot.state),
            (&inside.memory, &snapshot.memory),
        ] {
            let from = self.host_path(&Layout::partial(from).to_string_lossy());
            let to = Layout::partial(to);
            if fs::rename(&from, &to).is_err() {
                // Another filesystem.
                fs::copy(&from, &to)
                    .map_err(jail_error("failed to move out of the jail", &from))?;
                fs::remove_file(&from).map_err(jail_error("failed to remove", &from))?;
            }
        }
        Ok(())
    }

    /// Puts `snapshot`'s state and memory into the jail for Firecracker to load, readable by
    /// the VM's user: a paused VM's files are linked where they share a filesystem (the VM is
    /// their only user), a `shared` snapshot's are always copied, sparsely, since giving the
    /// shared files to one VM's user would open them to that VM alone and to no other. Without
    /// `memory`, the memory stays outside: a page server serves it.
    pub fn bring_snapshot(
        &self,
        snapshot: &SnapshotFiles,
        shared: bool,
        memory: bool,
    ) -> Result<(), VmmError> {
        let inside = self.snapshot_inside(snapshot);
        self.prepare_snapshot()?;
        let mut files = vec![(&snapshot.state, &inside.state)];
        if memory {
            files.push((&snapshot.memory, &inside.memory));
        }
        for (from, to) in files {
            let to = self.host_path(&to.to_string_lossy());
            if shared || fs::hard_link(from, &to).is_err() {
                copy_sparse(from, &to).map_err(jail_error("failed to copy into the jail", from))?;
            }
            self.give(&to)?;
        }
        Ok(())
    }

    /// Removes the jail (its links; the files they point to stay).
    pub fn remove(&self) -> Result<(), VmmError> {
        let dir = self.root.parent().unwrap_or(&self.root);
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(jail_error("failed to remove jail", dir)(e))
            }
            _ => Ok(()),
        }
    }
}

/// Copies `from` to a new `to`, keeping its holes.
fn copy_sparse(from: &Path, to: &Path) -> io::Result<()> {
    let input = fs::File::open(from)?;
    let output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    crate::sparse::copy_sparse(&input, &output)
}
