//! Each VM's cgroup, which bounds what its VMM process may take from the host: CPU time from
//! its vCPUs, memory from its guest memory plus the VMM's own overhead, processes, and disk
//! I/O on the files root's device. The VMM joins its cgroup before it executes, so everything
//! it ever allocates is charged there. Cgroup v2 (one directory per VM, the production path)
//! or, on hosts whose v2 hierarchy lacks the controllers (v1/v2 hybrids), one directory per v1
//! controller. Hierarchies are only used where they are mounted; nothing is (re)mounted here.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// The standard place the cgroup hierarchies are mounted.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";
/// The period CPU quotas are measured in (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// Memory the VMM needs beyond the guest's RAM: its own code and heap, device emulation and,
/// under TCG, its translation cache (see `docs/confinement.md` for what a TCG guest takes).
pub const VMM_MEMORY_OVERHEAD_MIB: u64 = 256;
/// Threads a VMM runs besides one per vCPU: QEMU's block I/O pool alone grows to 64.
const PIDS_BASE: u64 = 128;
/// The v1 controllers a VM gets a directory in; `cpuset` and the others are left alone.
const V1_CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "blkio"];
/// The v2 controllers enabled for the VMs.
const V2_CONTROLLERS: [&str; 4] = ["cpu", "io", "memory", "pids"];
/// How long a cgroup may stay busy after its last process exited (the kernel releases it
/// once the process is reaped).
const REMOVE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy under {root}: neither cgroup v2 with the cpu, memory and pids controllers nor v1 cpu, memory and pids hierarchies are mounted there")]
    Unavailable { root: PathBuf },
    #[error("the cgroup parent `{0}` must be a relative path without `..`")]
    BadParent(PathBuf),
    #[error("failed to {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cgroup {path} still holds processes after {waited:?}")]
    Busy { path: PathBuf, waited: Duration },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

/// A disk I/O limit on one block device: a VM may not take more of it than this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoLimit {
    /// The whole disk's `major:minor` (throttling applies to disks, not partitions).
    pub major: u64,
    pub minor: u64,
    /// Per direction: reads and writes are limited separately.
    pub bytes_per_sec: u64,
    pub ops_per_sec: u64,
}

impl IoLimit {
    /// The limit on the disk that holds `path`; `None` (logged) when that is no block device,
    /// such as a tmpfs or an overlay, which no cgroup can throttle.
    pub fn for_path(path: &Path, bytes_per_sec: u64, ops_per_sec: u64) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let dev = match fs::metadata(path) {
            Ok(meta) => meta.dev(),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "no disk I/O limit: the files root cannot be read");
                return None;
            }
        };
        let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        if !sys.exists() {
            tracing::warn!(path = %path.display(), device = %format!("{major}:{minor}"), "no disk I/O limit: the files root is not on a block device");
            return None;
        }
        // A partition's limit is set on its disk, whose `dev` is in the parent directory.
        let disk = if sys.join("partition").exists() {
            fs::read_to_string(sys.join("../dev")).ok()?
        } else {
            format!("{major}:{minor}")
        };
        let (major, minor) = disk.trim().split_once(':')?;
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            bytes_per_sec,
            ops_per_sec,
        })
    }
}

/// What one VM's cgroup allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// CPU time per [`CPU_PERIOD_US`]: one full host CPU per vCPU.
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub memory_bytes: u64,
    pub pids: u64,
    pub io: Option<IoLimit>,
}

impl VmLimits {
    pub fn new(vcpus: u32, memory_mib: u32, io: Option<IoLimit>) -> Self {
        Self {
            cpu_quota_us: u64::from(vcpus) * CPU_PERIOD_US,
            cpu_period_us: CPU_PERIOD_US,
            memory_bytes: (u64::from(memory_mib) + VMM_MEMORY_OVERHEAD_MIB) << 20,
            pids: PIDS_BASE + u64::from(vcpus),
            io,
        }
    }
}

/// The cgroup hierarchy this agent puts its VMs in: `<root>/<parent>/<sandbox id>` under v2,
/// `<root>/<controller>/<parent>/<sandbox id>` for each controller under v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    version: CgroupVersion,
    root: PathBuf,
    parent: PathBuf,
    io: Option<IoLimit>,
}

impl Cgroups {
    /// Cgroup v2 when `root` is a v2 hierarchy offering cpu, memory and pids (pure v2 hosts);
    /// otherwise the v1 hierarchies mounted under `root` (hybrid hosts).
    pub fn detect(root: &Path, parent: &Path, io: Option<IoLimit>) -> Result<Self, CgroupError> {
        check_parent(parent)?;
        let version = if fs::read_to_string(root.join("cgroup.controllers")).is_ok_and(|c| {
            let offered: Vec<&str> = c.split_whitespace().collect();
            ["cpu", "memory", "pids"]
                .iter()
                .all(|n| offered.contains(n))
        }) {
            CgroupVersion::V2
        } else if ["cpu", "memory", "pids"]
            .iter()
            .all(|c| root.join(c).join("cgroup.procs").is_file())
        {
            CgroupVersion::V1
        } else {
            return Err(CgroupError::Unavailable {
                root: root.to_owned(),
            });
        };
        Ok(Self {
            version,
            root: root.to_owned(),
            parent: parent.to_owned(),
            io,
        })
    }

    /// A hierarchy of a known version, for tests that build one in a temporary directory.
    pub fn with_version(
        version: CgroupVersion,
        root: &Path,
        parent: &Path,
        io: Option<IoLimit>,
    ) -> Result<Self, CgroupError> {
        check_parent(parent)?;
        Ok(Self {
            version,
            root: root.to_owned(),
            parent: parent.to_owned(),
            io,
        })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    pub fn io(&self) -> Option<IoLimit> {
        self.io
    }

    /// The limits of a VM with `vcpus` and `memory_mib`.
    pub fn limits(&self, vcpus: u32, memory_mib: u32) -> VmLimits {
        VmLimits::new(vcpus, memory_mib, self.io)
    }

    /// This agent's directories, one per hierarchy.
    fn parents(&self) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V2 => vec![self.root.join(&self.parent)],
            CgroupVersion::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| self.root.join(c))
                .filter(|mount| mount.is_dir())
                .map(|mount| mount.join(&self.parent))
                .collect(),
        }
    }

    /// The cgroup of sandbox `id`, whether or not it exists.
    pub fn vm(&self, id: &str) -> VmCgroup {
        VmCgroup {
            dirs: self.parents().into_iter().map(|p| p.join(id)).collect(),
        }
    }

    /// The path of sandbox `id`'s cgroup relative to the v2 root (what Firecracker's jailer
    /// takes as `--parent-cgroup` plus its `--id`).
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// Creates sandbox `id`'s cgroup with `limits` (an existing one, left by a VMM that
    /// exited, is reused and its limits set again).
    pub fn create(&self, id: &str, limits: &VmLimits) -> Result<VmCgroup, CgroupError> {
        if self.version == CgroupVersion::V2 {
            self.enable_v2_controllers()?;
        }
        let cgroup = self.vm(id);
        for dir in &cgroup.dirs {
            fs::create_dir_all(dir).map_err(io_error("create cgroup", dir))?;
        }
        let written = match self.version {
            CgroupVersion::V2 => cgroup.write_v2(limits),
            CgroupVersion::V1 => cgroup.write_v1(limits),
        };
        if let Err(error) = written {
            if let Err(remove) = cgroup.remove_empty() {
                tracing::warn!(%remove, "removing a cgroup whose limits could not be set");
            }
            return Err(error);
        }
        Ok(cgroup)
    }

    /// Lets the VMs' cgroups use the v2 controllers: each level from the root down to the
    /// parent delegates them to its children.
    fn enable_v2_controllers(&self) -> Result<(), CgroupError> {
        let offered = fs::read_to_string(self.root.join("cgroup.controllers"))
            .map_err(io_error("read", &self.root.join("cgroup.controllers")))?;
        let wanted: Vec<String> = V2_CONTROLLERS
            .iter()
            .filter(|c| offered.split_whitespace().any(|o| o == **c))
            .map(|c| format!("+{c}"))
            .collect();
        let mut level = self.root.clone();
        for part in self.parent.components() {
            let control = level.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&control).unwrap_or_default();
            let missing: Vec<&str> = wanted
                .iter()
                .map(String::as_str)
                .filter(|w| !enabled.split_whitespace().any(|e| e == &w[1..]))
                .collect();
            if !missing.is_empty() {
                fs::write(&control, missing.join(" "))
                    .map_err(io_error("enable controllers in", &control))?;
            }
            level.push(part);
            fs::create_dir_all(&level).map_err(io_error("create cgroup", &level))?;
        }
        let control = level.join("cgroup.subtree_control");
        let enabled = fs::read_to_string(&control).unwrap_or_default();
        if !wanted
            .iter()
            .all(|w| enabled.split_whitespace().any(|e| e == &w[1..]))
        {
            fs::write(&control, wanted.join(" "))
                .map_err(io_error("enable controllers in", &control))?;
        }
        Ok(())
    }

    /// The sandbox IDs that have a cgroup here, for the agent's clean-up after a crash.
    pub fn existing(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .parents()
            .iter()
            .filter_map(|parent| fs::read_dir(parent).ok())
            .flat_map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

fn check_parent(parent: &Path) -> Result<(), CgroupError> {
    let normal = parent
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if parent.as_os_str().is_empty() || !normal {
        return Err(CgroupError::BadParent(parent.to_owned()));
    }
    Ok(())
}

/// One VM's cgroup: one directory under v2, one per controller under v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
}

impl VmCgroup {
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The `cgroup.procs` files a process writes `0` into to join this cgroup, opened for
    /// writing (close-on-exec, as Rust opens every file).
    pub(crate) fn join_handles(&self) -> Result<Vec<File>, CgroupError> {
        self.dirs
            .iter()
            .map(|dir| {
                let procs = dir.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .map_err(io_error("open", &procs))
            })
            .collect()
    }

    /// The processes in this cgroup (under v1, in its first controller's directory).
    pub fn pids(&self) -> Vec<u32> {
        self.dirs
            .first()
            .and_then(|dir| fs::read_to_string(dir.join("cgroup.procs")).ok())
            .map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = dir.join(file);
        fs::write(&path, value).map_err(io_error("write", &path))
    }

    fn write_v2(&self, limits: &VmLimits) -> Result<(), CgroupError> {
        let dir = &self.dirs[0];
        Self::write(
            dir,
            "cpu.max",
            &format!("{} {}", limits.cpu_quota_us, limits.cpu_period_us),
        )?;
        Self::write(dir, "memory.max", &limits.memory_bytes.to_string())?;
        // Swap would let a guest's memory outgrow the limit on the host's disk instead.
        if dir.join("memory.swap.max").exists() {
            Self::write(dir, "memory.swap.max", "0")?;
        }
        Self::write(dir, "pids.max", &limits.pids.to_string())?;
        if let Some(io) = limits.io {
            Self::write(
                dir,
                "io.max",
                &format!(
                    "{}:{} rbps={} wbps={} riops={} wiops={}",
                    io.major,
                    io.minor,
                    io.bytes_per_sec,
                    io.bytes_per_sec,
                    io.ops_per_sec,
                    io.ops_per_sec
                ),
            )?;
        }
        Ok(())
    }

    fn write_v1(&self, limits: &VmLimits) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            if dir.join("cpu.cfs_quota_us").exists() {
                Self::write(dir, "cpu.cfs_period_us", &limits.cpu_period_us.to_string())?;
                Self::write(dir, "cpu.cfs_quota_us", &limits.cpu_quota_us.to_string())?;
            }
            if dir.join("memory.limit_in_bytes").exists() {
                Self::write(
                    dir,
                    "memory.limit_in_bytes",
                    &limits.memory_bytes.to_string(),
                )?;
                // Memory plus swap: the same, so that none of it goes to swap.
                if dir.join("memory.memsw.limit_in_bytes").exists() {
                    Self::write(
                        dir,
                        "memory.memsw.limit_in_bytes",
                        &limits.memory_bytes.to_string(),
                    )?;
                }
            }
            if dir.join("pids.max").exists() {
                Self::write(dir, "pids.max", &limits.pids.to_string())?;
            }
            if let (Some(io), true) = (
                limits.io,
                dir.join("blkio.throttle.read_bps_device").exists(),
            ) {
                let device = format!("{}:{}", io.major, io.minor);
                for (file, value) in [
                    ("blkio.throttle.read_bps_device", io.bytes_per_sec),
                    ("blkio.throttle.write_bps_device", io.bytes_per_sec),
                    ("blkio.throttle.read_iops_device", io.ops_per_sec),
                    ("blkio.throttle.write_iops_device", io.ops_per_sec),
                ] {
                    Self::write(dir, file, &format!("{device} {value}"))?;
                }
            }
        }
        Ok(())
    }

    /// Removes the cgroup, waiting for the kernel to release it once its last process has
    /// ended; one that does not exist is fine.
    pub async fn remove(&self) -> Result<(), CgroupError> {
        let started = Instant::now();
        loop {
            match self.remove_empty() {
                Err(CgroupError::Busy { .. }) if started.elapsed() < REMOVE_WAIT => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(CgroupError::Busy { path, .. }) => {
                    return Err(CgroupError::Busy {
                        path,
                        waited: started.elapsed(),
                    })
                }
                other => return other,
            }
        }
    }

    /// Kills whatever still runs in the cgroup, then removes it: for the leftovers of an agent
    /// that crashed, whose VMMs are gone or were not taken over.
    pub async fn kill_and_remove(&self) -> Result<(), CgroupError> {
        for pid in self.pids() {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = signal::kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
        self.remove().await
    }

    /// Removes the cgroup now: one no process ever ran in, or whose processes are all reaped.
    pub(crate) fn remove_empty(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(CgroupError::Busy {
                        path: dir.clone(),
                        waited: Duration::ZERO,
                    })
                }
                Err(source) => {
                    return Err(CgroupError::Io {
                        what: "remove cgroup",
                        path: dir.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> IoLimit {
        IoLimit {
            major: 254,
            minor: 0,
            bytes_per_sec: 1 << 20,
            ops_per_sec: 100,
        }
    }

    #[test]
    fn limits_follow_the_vm() {
        let limits = VmLimits::new(2, 512, None);
        assert_eq!(limits.cpu_quota_us, 200_000);
        assert_eq!(limits.cpu_period_us, 100_000);
        assert_eq!(limits.memory_bytes, (512 + VMM_MEMORY_OVERHEAD_MIB) << 20);
        assert_eq!(limits.pids, PIDS_BASE + 2);
    }

    #[test]
    fn a_v2_cgroup_gets_its_limits_and_the_parents_delegate_the_controllers() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let cgroups = Cgroups::detect(root, Path::new("wrenn/agent1"), Some(io())).unwrap();
        assert_eq!(cgroups.version(), CgroupVersion::V2);
        let cgroup = cgroups.create("cl-a", &cgroups.limits(2, 256)).unwrap();
        let dir = root.join("wrenn/agent1/cl-a");
        assert_eq!(cgroup.dirs(), std::slice::from_ref(&dir));
        let read = |path: PathBuf| fs::read_to_string(path).unwrap();
        for level in [
            root.to_owned(),
            root.join("wrenn"),
            root.join("wrenn/agent1"),
        ] {
            assert_eq!(
                read(level.join("cgroup.subtree_control")),
                "+cpu +io +memory +pids"
            );
        }
        assert_eq!(read(dir.join("cpu.max")), "200000 100000");
        assert_eq!(
            read(dir.join("memory.max")),
            ((256 + VMM_MEMORY_OVERHEAD_MIB) << 20).to_string()
        );
        assert_eq!(read(dir.join("pids.max")), (PIDS_BASE + 2).to_string());
        assert_eq!(
            read(dir.join("io.max")),
            "254:0 rbps=1048576 wbps=1048576 riops=100 wiops=100"
        );
        assert!(
            !dir.join("memory.swap.max").exists(),
            "written only where the kernel offers it"
        );
        assert_eq!(cgroups.existing(), ["cl-a"]);
    }

    #[test]
    fn v1_cgroups_have_one_directory_per_controller() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        for controller in ["cpu", "memory", "pids", "blkio"] {
            fs::create_dir(root.join(controller)).unwrap();
            fs::write(root.join(controller).join("cgroup.procs"), "").unwrap();
        }
        let cgroups = Cgroups::detect(root, Path::new("wrenn"), None).unwrap();
        assert_eq!(cgroups.version(), CgroupVersion::V1);
        let cgroup = cgroups.vm("cl-b");
        let expected: Vec<PathBuf> = ["cpu", "memory", "pids", "blkio"]
            .iter()
            .map(|c| root.join(c).join("wrenn/cl-b"))
            .collect();
        assert_eq!(cgroup.dirs(), expected);
    }

    #[test]
    fn a_host_without_controllers_or_a_bad_parent_is_refused() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let err = Cgroups::detect(root.path(), Path::new("wrenn"), None).unwrap_err();
        assert!(matches!(err, CgroupError::Unavailable { .. }), "{err}");
        for parent in ["", "../x", "/abs", "a/../b"] {
            let err =
                Cgroups::with_version(CgroupVersion::V2, root.path(), Path::new(parent), None)
                    .unwrap_err();
            assert!(matches!(err, CgroupError::BadParent(_)), "{parent}: {err}");
        }
    }
}
