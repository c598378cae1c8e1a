//! A process descriptor (Linux pidfd, 5.3+) for a VMM this process did not start: it cannot be
//! waited for like a child, but its pidfd turns readable when it ends, and signals sent through
//! the descriptor can never reach a later process that reuses the pid.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

#[derive(Debug)]
pub(crate) struct PidFd {
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    /// Opens a descriptor for `pid`; `ESRCH` when no such process exists.
    pub(crate) fn open(pid: u32) -> io::Result<Self> {
        let pid =
            libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1; it
        // reads and writes no memory of ours.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = i32::try_from(raw).expect("descriptors fit in i32");
        // SAFETY: the descriptor was just returned by the kernel and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the `OwnedFd` is moved into the `AsyncFd` and never replaced or closed while
        // there, so its descriptor stays the same open pidfd for the `AsyncFd`'s lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Whether the process has ended (it may still await reaping by its parent).
    pub(crate) fn ended(&self) -> io::Result<bool> {
        let mut fds = [PollFd::new(self.fd.get_ref().as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::ZERO)?;
        Ok(ready > 0)
    }

    /// Waits until the process has ended.
    pub(crate) async fn wait(&self) -> io::Result<()> {
        // Readable means ended, for good: the readiness is never cleared.
        self.fd.readable().await.map(drop)
    }

    /// Sends `signal` to the process, if it has not ended (`ESRCH` if it has).
    pub(crate) fn signal(&self, signal: Signal) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a null siginfo and no flags reads no memory of
        // ours; the descriptor is open for the duration of the call.
        let result = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_pidfd_sees_a_process_end_and_signals_only_it() {
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();
        assert!(!pidfd.ended().unwrap());
        pidfd.signal(Signal::SIGKILL).unwrap();
        tokio::time::timeout(Duration::from_secs(10), pidfd.wait())
            .await
            .expect("the end is seen")
            .unwrap();
        // Ended before it is reaped: a zombie counts as ended.
        assert!(pidfd.ended().unwrap());
        child.wait().unwrap();
        let err = pidfd.signal(Signal::SIGKILL).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{err}");
    }

    #[test]
    fn no_process_is_esrch() {
        // Beyond the default pid_max (4194304), so never a running process.
        let err = PidFd::open(i32::MAX as u32).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{err}");
    }
}
