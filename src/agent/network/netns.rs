//! Named network namespaces, laid out as `ip netns` lays them out (an nsfs bind mount at
//! `/run/netns/NAME`), so `ip netns list`, `ip -n`, the tests and leftover clean-up all see them.
//!
//! A namespace is entered only on a thread spawned for that one job: `setns` and `unshare` change
//! the calling thread, and a tokio worker (or a blocking-pool thread, which is reused) left in a
//! sandbox's namespace would run unrelated work there.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use super::SystemError;

pub(super) const NETNS_DIR: &str = "/run/netns";

pub(super) fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// An open named namespace. The open file keeps the namespace itself alive and addressable even
/// if its name is removed meanwhile.
#[derive(Debug)]
pub(super) struct Namespace {
    name: String,
    file: File,
}

impl Namespace {
    /// Creates the namespace `name`. An existing one of that name is refused with `EEXIST`, never
    /// adopted: it may belong to someone else.
    pub(super) async fn create(name: &str) -> Result<Self, SystemError> {
        let owned = name.to_owned();
        // The thread unshares into the new namespace and then ends with it, so nothing else
        // ever runs there by accident.
        let file = on_own_thread(move || create_on_this_thread(&owned)).await?;
        Ok(Self {
            name: name.to_owned(),
            file,
        })
    }

    /// Opens the existing namespace `name`, e.g. one a previous agent process made.
    pub(super) fn open(name: &str) -> Result<Self, SystemError> {
        let path = path_of(name);
        let file = File::open(&path).map_err(|e| {
            SystemError::io(format!("opening network namespace {}", path.display()), e)
        })?;
        Ok(Self {
            name: name.to_owned(),
            file,
        })
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `work` inside this namespace on a thread of its own: sockets, TAP devices and
    /// `/proc/sys/net` files it opens belong to the namespace.
    pub(super) async fn run<T, F>(&self, work: F) -> Result<T, SystemError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, SystemError> + Send + 'static,
    {
        let file = self.file.try_clone().map_err(|e| {
            SystemError::io(
                format!("duplicating the handle of namespace {}", self.name),
                e,
            )
        })?;
        let name = self.name.clone();
        on_own_thread(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| SystemError::Os {
                action: format!("entering network namespace {name}"),
                errno,
            })?;
            work()
        })
        .await
    }

    /// Sets a per-namespace sysctl, e.g. `net/ipv4/ip_forward`.
    pub(super) async fn write_sysctl(
        &self,
        key: &'static str,
        value: &'static str,
    ) -> Result<(), SystemError> {
        let name = self.name.clone();
        self.run(move || {
            std::fs::write(Path::new("/proc/sys").join(key), value).map_err(|e| {
                SystemError::io(format!("setting {key} = {value} in namespace {name}"), e)
            })
        })
        .await
    }
}

/// Removes the namespace `name` as `ip netns delete` does. Returns whether it existed. The kernel
/// frees the namespace, and the devices still in it, once its last user has gone.
pub(super) fn delete(name: &str) -> Result<bool, SystemError> {
    let path = path_of(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point, e.g. a create that failed between file and bind mount.
        Ok(()) | Err(Errno::EINVAL) => {}
        Err(Errno::ENOENT) => return Ok(false),
        Err(errno) => {
            return Err(SystemError::Os {
                action: format!("unmounting network namespace {name}"),
                errno,
            })
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SystemError::io(
            format!("removing network namespace file {}", path.display()),
            e,
        )),
    }
}

/// Runs `work` on a fresh thread that ends with it, and waits for it without blocking the
/// runtime.
async fn on_own_thread<T, F>(work: F) -> Result<T, SystemError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, SystemError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("wrenn-netns".to_owned())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| SystemError::io("starting a network namespace worker thread", e))?;
    match rx.await {
        Ok(result) => result,
        Err(_) => panic!("a network namespace worker thread panicked"),
    }
}

/// Serialises making `/run/netns` a shared mount, which two concurrent creates would otherwise
/// both bind-mount onto itself.
static RUN_DIR: Mutex<()> = Mutex::new(());

/// `/run/netns` must be a shared mount point so that namespaces mounted there later also appear
/// in mount namespaces that were copied earlier (e.g. a VMM's), as `ip netns add` ensures.
fn prepare_run_dir() -> Result<(), SystemError> {
    let _serial = RUN_DIR.lock().unwrap_or_else(|p| p.into_inner());
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(NETNS_DIR)
        .map_err(|e| SystemError::io(format!("creating {NETNS_DIR}"), e))?;
    let make_shared = || {
        mount(
            Some(""),
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    let shared = match make_shared() {
        // Not a mount point yet: make it one, then share it.
        Err(Errno::EINVAL) => mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| make_shared()),
        other => other,
    };
    shared.map_err(|errno| SystemError::Os {
        action: format!("making {NETNS_DIR} a shared mount"),
        errno,
    })
}

/// Must run on a thread of its own: it leaves the calling thread in the new namespace. Returns
/// the namespace opened, so no other name can be swapped in between.
fn create_on_this_thread(name: &str) -> Result<File, SystemError> {
    prepare_run_dir()?;
    let path = path_of(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o0)
        .open(&path)
        .map_err(|e| SystemError::io(format!("creating network namespace {name}"), e))?;
    let bound = unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|errno| SystemError::Os {
            action: format!("creating network namespace {name}"),
            errno,
        })
        .and_then(|()| {
            // thread-self, not self: only this thread is in the new namespace.
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|errno| SystemError::Os {
                action: format!("mounting network namespace {name} at {}", path.display()),
                errno,
            })
        });
    if bound.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    bound?;
    File::open(&path).map_err(|e| {
        let _ = delete(name);
        SystemError::io(format!("opening network namespace {name}"), e)
    })
}
