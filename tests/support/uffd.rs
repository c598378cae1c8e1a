//! Firecracker's side of a lazily loaded restore, for tests: guest memory mapped anonymously
//! and registered with a userfaultfd, handed to a page server over its socket with the
//! documented handshake (one message: the regions as JSON, the descriptor as `SCM_RIGHTS`).

// Each test binary that includes this uses part of it.
#![allow(dead_code)]

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::json;
use wrenn::vmm::firecracker::uffd::sys;

pub const PAGE: usize = 4096;

/// Guest memory whose pages come from a page server.
pub struct LazyMemory {
    base: *mut u8,
    len: usize,
    _uffd: OwnedFd,
    /// Open while the guest lives: the page server ends when it closes.
    _socket: UnixStream,
}

// SAFETY: the mapping belongs to this value alone and is reached only through `&mut self`; the
// raw pointer is its address, valid on any thread.
unsafe impl Send for LazyMemory {}

impl LazyMemory {
    /// Maps `len` bytes, registers them for missing-page faults and connects to the page server
    /// listening on `socket` (waiting for it to appear), sending it one region at file offset 0.
    pub fn connect(socket: &Path, len: usize) -> Self {
        // SAFETY: a fresh anonymous private mapping; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap");
        // SAFETY: the userfaultfd system call with valid flags.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | sys::UFFD_USER_MODE_ONLY,
            )
        };
        assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
        // SAFETY: the descriptor was just created and is ours.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features: sys::UFFD_FEATURE_EVENT_REMOVE,
            ioctls: 0,
        };
        // SAFETY: a valid userfaultfd and structure.
        unsafe { sys::uffdio_api(uffd.as_raw_fd(), &mut api) }.expect("UFFDIO_API");
        let mut register = sys::UffdioRegister {
            range: sys::UffdioRange {
                start: base as u64,
                len: len as u64,
            },
            mode: sys::UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: the range is our mapping.
        unsafe { sys::uffdio_register(uffd.as_raw_fd(), &mut register) }.expect("UFFDIO_REGISTER");
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connecting to the page server at {}: {e}", socket.display()),
            }
        };
        let regions = json!([{
            "base_host_virt_addr": base as u64,
            "size": len,
            "offset": 0,
            "page_size": PAGE,
            "page_size_kib": PAGE,
        }])
        .to_string();
        let fds = [uffd.as_raw_fd()];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(regions.as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sending the handshake");
        Self {
            base: base.cast(),
            len,
            _uffd: uffd,
            _socket: stream,
        }
    }

    /// The guest's memory (each first touch of a page waits for the page server).
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: our mapping of `len` bytes, alive as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }

    /// Gives pages back, as a balloon does: they read as zero from then on.
    pub fn give_back(&mut self, offset: usize, len: usize) {
        // SAFETY: a page-aligned range within our mapping.
        let done = unsafe { libc::madvise(self.base.add(offset).cast(), len, libc::MADV_DONTNEED) };
        assert_eq!(done, 0, "madvise: {}", std::io::Error::last_os_error());
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}
