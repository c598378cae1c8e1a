//! Pseudo-terminals: opening one sized for a process, writing its input, and pumping its output
//! into the process's log.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::unix::AsyncFd;

use super::ProcessError;
use crate::envd::api::{PtySize, CHUNK_BYTES};
use crate::envd::output::{OutputLog, StreamKind};

pub(super) struct Pty {
    pub(super) master: OwnedFd,
    pub(super) slave: OwnedFd,
}

pub(super) fn validate_size(size: PtySize) -> Result<(), ProcessError> {
    if size.cols == 0 || size.rows == 0 {
        return Err(ProcessError::Invalid(
            "terminal cols and rows must be positive".into(),
        ));
    }
    Ok(())
}

fn winsize(size: PtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

pub(super) fn open_pty(size: PtySize) -> Result<Pty, ProcessError> {
    validate_size(size)?;
    let winsize = winsize(size);
    let pair = nix::pty::openpty(Some(&winsize), None).map_err(ProcessError::Pty)?;
    for fd in [&pair.master, &pair.slave] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(ProcessError::Pty)?;
    }
    let flags = nix::fcntl::fcntl(&pair.master, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(ProcessError::Pty)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&pair.master, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(ProcessError::Pty)?;
    Ok(Pty {
        master: pair.master,
        slave: pair.slave,
    })
}

/// Tells the terminal (and so the process on it) its new size.
pub(super) fn resize_pty(master: &AsyncFd<OwnedFd>, size: PtySize) -> io::Result<()> {
    let winsize = winsize(size);
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer on an open pty master.
    let rc = unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) async fn write_pty(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

pub(super) async fn pump_pty(master: Arc<AsyncFd<OwnedFd>>, output: Arc<OutputLog>) {
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        let Ok(mut guard) = master.readable().await else {
            return;
        };
        match guard
            .try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buffer).map_err(io::Error::from))
        {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => {
                output
                    .push(StreamKind::Pty, Bytes::copy_from_slice(&buffer[..n]))
                    .await
            }
            // EIO: every slave descriptor closed, the terminal's end of output.
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        }
    }
}
