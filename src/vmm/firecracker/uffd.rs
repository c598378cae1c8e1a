//! The userfaultfd page server (`wrenn uffd-serve`): a restored Firecracker guest's memory,
//! loaded lazily. Firecracker maps the guest memory anonymously, registers it with a
//! userfaultfd and hands that descriptor to this process over a Unix socket (its documented
//! handshake: one message, a JSON array of regions and the descriptor as `SCM_RIGHTS`); each
//! page the guest first touches is then copied in from the snapshot's memory file on demand.
//!
//! It is a process of its own, not a task of the agent: the guest hangs at its next fault the
//! moment its page server is gone, and an agent restart must not take the guests with it. It
//! ends when Firecracker closes the socket (the VM is gone).
//!
//! **Prefetch.** The pages a guest touched after its last restore are its working set: they are
//! recorded (`--record`, a list of page numbers written atomically every second and at the end)
//! and copied in first at the next restore (`--prefetch`), between faults, which are always
//! served first.
//!
//! **Balloon.** Pages Firecracker gives back (`UFFD_EVENT_REMOVE`) are zero from then on, not
//! the file's.
//!
//! The kernel interface (`linux/userfaultfd.h`) is a handful of ioctls on fixed structures;
//! they are declared here with `nix`'s ioctl macros rather than through a bindgen-built crate
//! (which would need libclang on every build machine).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("Firecracker did not connect to {0} in time")]
    NoConnection(PathBuf),
    #[error("the handshake was malformed: {0}")]
    Handshake(String),
    #[error("the guest touched {0:#x}, outside every region it announced")]
    OutsideRegions(u64),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UffdError {
    let what = what.into();
    move |source| UffdError::Io { what, source }
}

fn errno(what: &str) -> impl FnOnce(nix::errno::Errno) -> UffdError + '_ {
    move |e| UffdError::Io {
        what: what.to_owned(),
        source: std::io::Error::from(e),
    }
}

/// One region of guest memory, as Firecracker announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(from = "AnnouncedRegion")]
pub struct GuestRegionUffdMapping {
    pub base_host_virt_addr: u64,
    pub size: u64,
    /// Where the region starts in the memory file.
    pub offset: u64,
    /// In bytes.
    pub page_size: u64,
}

/// The handshake's spelling: `page_size` since v1.12, `page_size_kib` (deprecated, and in
/// bytes despite its name) before and beside it.
#[derive(Deserialize)]
struct AnnouncedRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: Option<u64>,
    page_size_kib: Option<u64>,
}

impl From<AnnouncedRegion> for GuestRegionUffdMapping {
    fn from(region: AnnouncedRegion) -> Self {
        Self {
            base_host_virt_addr: region.base_host_virt_addr,
            size: region.size,
            offset: region.offset,
            page_size: region.page_size.or(region.page_size_kib).unwrap_or(0),
        }
    }
}

pub mod sys {
    //! `linux/userfaultfd.h`, the parts a page server and its tests use.

    pub const UFFD_API: u64 = 0xAA;
    pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
    pub const UFFD_EVENT_REMOVE: u8 = 0x15;
    pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
    pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    /// `userfaultfd(2)` flag: faults from user mode only, allowed without privileges.
    pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioCopy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub copy: i64,
    }

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioZeropage {
        pub range: UffdioRange,
        pub mode: u64,
        pub zeropage: i64,
    }

    /// `struct uffd_msg`: the event, then its arguments (for a page fault: flags, address; for a
    /// removal: start, end).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdMsg {
        pub event: u8,
        pub reserved1: u8,
        pub reserved2: u16,
        pub reserved3: u32,
        pub arg: [u64; 3],
    }

    nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
    nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
    nix::ioctl_readwrite!(uffdio_copy, 0xAA, 0x03, UffdioCopy);
    nix::ioctl_readwrite!(uffdio_zeropage, 0xAA, 0x04, UffdioZeropage);
}

/// What `wrenn uffd-serve` is asked to do.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The socket to listen on; Firecracker's load names it.
    pub socket: PathBuf,
    /// The snapshot's memory file.
    pub memory: PathBuf,
    /// Pages to copy in first (a list [`write_pages`] wrote), when present.
    pub prefetch: Option<PathBuf>,
    /// Where to keep the list of pages this guest touched.
    pub record: Option<PathBuf>,
    /// Owner of the socket (a jailed Firecracker's user and group).
    pub owner: Option<(u32, u32)>,
}

/// How long Firecracker has to connect after the socket is up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the record of touched pages is brought up to date.
const RECORD_EVERY: Duration = Duration::from_secs(1);
/// How often deferred faults are retried, in milliseconds.
const DEFERRED_RETRY_MS: u8 = 1;
/// Pages copied in per prefetch step, between looks at the fault queue.
const PREFETCH_BATCH: usize = 64;

/// What a page server did, for its log line and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub faults: u64,
    pub prefetched: u64,
    pub zero_pages: u64,
}

/// Binds the socket, takes Firecracker's handshake and serves the guest's faults until
/// Firecracker goes away. `ready` is called once the socket accepts connections.
pub fn serve(options: &ServeOptions, ready: impl FnOnce()) -> Result<Served, UffdError> {
    let _ = std::fs::remove_file(&options.socket);
    let listener = UnixListener::bind(&options.socket)
        .map_err(io(format!("binding {}", options.socket.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&options.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io("restricting the socket"))?;
    }
    if let Some((uid, gid)) = options.owner {
        std::os::unix::fs::chown(&options.socket, Some(uid), Some(gid))
            .map_err(io("handing the socket to the jail's user"))?;
    }
    // Everything that can fail before the guest depends on this process is done first: once
    // Firecracker has loaded, a page server that gives up hangs the guest.
    let memory =
        File::open(&options.memory).map_err(io(format!("opening {}", options.memory.display())))?;
    let prefetch = options
        .prefetch
        .as_deref()
        .map(read_pages)
        .unwrap_or_default();
    ready();
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let waited = poll(
        &mut fds,
        PollTimeout::try_from(CONNECT_TIMEOUT).unwrap_or(PollTimeout::MAX),
    )
    .map_err(errno("waiting for Firecracker"))?;
    if waited == 0 {
        let _ = std::fs::remove_file(&options.socket);
        return Err(UffdError::NoConnection(options.socket.clone()));
    }
    let (stream, _) = listener.accept().map_err(io("accepting Firecracker"))?;
    // One guest per server: nobody else may connect.
    drop(listener);
    let _ = std::fs::remove_file(&options.socket);
    let (regions, uffd) = handshake(&stream)?;
    let mut server = PageServer::new(regions, uffd, memory, prefetch)?;
    let result = server.run(&stream, options.record.as_deref());
    if let Some(record) = &options.record {
        server.save(record)?;
    }
    result.map(|()| server.served)
}

/// Reads Firecracker's one message: the regions and the userfaultfd.
fn handshake(stream: &UnixStream) -> Result<(Vec<GuestRegionUffdMapping>, OwnedFd), UffdError> {
    let mut buf = vec![0u8; 64 << 10];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(errno("receiving the handshake"))?;
        let fd = msg
            .cmsgs()
            .ok()
            .into_iter()
            .flatten()
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            });
        let len = msg.bytes;
        if len == 0 {
            return Err(UffdError::Handshake("Firecracker closed the socket".into()));
        }
        let text = &buf[..len];
        let regions: Vec<GuestRegionUffdMapping> = serde_json::from_slice(text)
            .map_err(|e| UffdError::Handshake(format!("the regions are not JSON: {e}")))?;
        if let Some(fd) = fd {
            // SAFETY: the descriptor just arrived with the message and is ours alone.
            let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
            check_regions(&regions)?;
            return Ok((regions, uffd));
        }
        if Instant::now() > deadline {
            return Err(UffdError::Handshake("no descriptor came with it".into()));
        }
    }
}

fn check_regions(regions: &[GuestRegionUffdMapping]) -> Result<(), UffdError> {
    if regions.is_empty() {
        return Err(UffdError::Handshake("no regions".into()));
    }
    for region in regions {
        let page = region.page_size;
        if page == 0
            || !page.is_power_of_two()
            || region.base_host_virt_addr % page != 0
            || region.size % page != 0
            || region.offset % page != 0
        {
            return Err(UffdError::Handshake(format!(
                "region {region:?} is not aligned to its page size"
            )));
        }
    }
    Ok(())
}

/// Page numbers in a file: the memory file's offset divided by its page size, little-endian
/// `u64`s.
pub fn read_pages(path: &Path) -> Vec<u64> {
    std::fs::read(path)
        .map(|bytes| {
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("eight bytes")))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes page numbers to `path` atomically (a reader sees the old list or the new). Not
/// synced: the list is a hint, and a page server waiting on the disk keeps a guest waiting.
pub fn write_pages(path: &Path, pages: impl IntoIterator<Item = u64>) -> std::io::Result<()> {
    let partial = crate::config::Layout::partial(path);
    let mut file = File::create(&partial)?;
    let bytes: Vec<u8> = pages.into_iter().flat_map(u64::to_le_bytes).collect();
    file.write_all(&bytes)?;
    std::fs::rename(&partial, path)
}

struct PageServer {
    regions: Vec<GuestRegionUffdMapping>,
    uffd: OwnedFd,
    memory: File,
    /// File offsets to copy in first, in order.
    prefetch: std::vec::IntoIter<u64>,
    /// Guest ranges given back: zero from then on.
    removed: Vec<(u64, u64)>,
    /// Faults the kernel asked to retry (`EAGAIN` while the memory map changes): retried on
    /// every turn of the loop until served, since the kernel does not raise them again.
    deferred: Vec<u64>,
    /// File offsets of the pages the guest touched (or was given ahead of its touch).
    touched: BTreeSet<u64>,
    recorded_len: usize,
    page: Vec<u8>,
    served: Served,
}

impl PageServer {
    fn new(
        regions: Vec<GuestRegionUffdMapping>,
        uffd: OwnedFd,
        memory: File,
        prefetch: Vec<u64>,
    ) -> Result<Self, UffdError> {
        let page_size = regions[0].page_size;
        let prefetch: Vec<u64> = prefetch.into_iter().map(|p| p * page_size).collect();
        nix::fcntl::fcntl(
            &uffd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(errno("making the userfaultfd non-blocking"))?;
        Ok(Self {
            page: vec![0; usize::try_from(page_size).unwrap_or(4096)],
            regions,
            uffd,
            memory,
            prefetch: prefetch.into_iter(),
            removed: Vec::new(),
            deferred: Vec::new(),
            touched: BTreeSet::new(),
            recorded_len: 0,
            served: Served::default(),
        })
    }

    fn run(&mut self, stream: &UnixStream, record: Option<&Path>) -> Result<(), UffdError> {
        // The first pages are recorded at once, later ones at most every `RECORD_EVERY`.
        let mut last_record: Option<Instant> = None;
        let mut prefetching = true;
        loop {
            let timeout = if prefetching {
                PollTimeout::ZERO
            } else if !self.deferred.is_empty() {
                PollTimeout::from(DEFERRED_RETRY_MS)
            } else {
                PollTimeout::try_from(RECORD_EVERY).unwrap_or(PollTimeout::MAX)
            };
            let (uffd_ready, gone) = {
                let mut fds = [
                    PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stream.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(errno("waiting for faults")(e)),
                }
                let revents = |fd: &PollFd| fd.revents().unwrap_or(PollFlags::empty());
                (
                    revents(&fds[0]).contains(PollFlags::POLLIN),
                    // Firecracker never writes after the handshake: readable means closed.
                    !revents(&fds[1]).is_empty(),
                )
            };
            if uffd_ready {
                self.drain_events()?;
            }
            self.retry_deferred()?;
            if uffd_ready {
                // Faults first; the prefetch and the exit wait for a quiet moment.
            } else if gone {
                return Ok(());
            } else if prefetching {
                prefetching = self.prefetch_some()?;
            }
            if let Some(record) = record {
                let due = last_record.is_none_or(|at| at.elapsed() >= RECORD_EVERY);
                if due && self.touched.len() != self.recorded_len {
                    self.save(record)?;
                    last_record = Some(Instant::now());
                }
            }
        }
    }

    /// Serves every event queued now; faults that cannot be served yet (`EAGAIN` while a
    /// removal is pending) are deferred.
    fn drain_events(&mut self) -> Result<(), UffdError> {
        loop {
            let mut msg = sys::UffdMsg::default();
            // SAFETY: `UffdMsg` is plain data of the kernel's `struct uffd_msg` layout.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(
                    (&mut msg as *mut sys::UffdMsg).cast::<u8>(),
                    std::mem::size_of::<sys::UffdMsg>(),
                )
            };
            match nix::unistd::read(&self.uffd, buf) {
                Ok(n) if n == buf.len() => {}
                Ok(_) => return Err(UffdError::Handshake("a short userfaultfd event".into())),
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(errno("reading userfaultfd events")(e)),
            }
            match msg.event {
                sys::UFFD_EVENT_PAGEFAULT => {
                    let address = msg.arg[1];
                    if !self.fault(address)? {
                        self.deferred.push(address);
                    }
                }
                sys::UFFD_EVENT_REMOVE => self.removed.push((msg.arg[0], msg.arg[1])),
                _ => {}
            }
        }
        Ok(())
    }

    fn retry_deferred(&mut self) -> Result<(), UffdError> {
        for address in std::mem::take(&mut self.deferred) {
            if !self.fault(address)? {
                self.deferred.push(address);
            }
        }
        Ok(())
    }

    /// Fills the page at guest address `address`; false when the kernel asks to retry.
    fn fault(&mut self, address: u64) -> Result<bool, UffdError> {
        let region = self
            .regions
            .iter()
            .find(|r| (r.base_host_virt_addr..r.base_host_virt_addr + r.size).contains(&address))
            .copied()
            .ok_or(UffdError::OutsideRegions(address))?;
        let page_address = address & !(region.page_size - 1);
        let offset = region.offset + (page_address - region.base_host_virt_addr);
        self.served.faults += 1;
        self.touched.insert(offset);
        self.fill(page_address, offset)
    }

    /// Copies file offset `offset` into guest address `dst`; zero when given back or a hole.
    fn fill(&mut self, dst: u64, offset: u64) -> Result<bool, UffdError> {
        let removed = self.removed.iter().any(|(s, e)| (*s..*e).contains(&dst));
        let zero = removed || {
            self.page.fill(0);
            read_up_to(&self.memory, &mut self.page, offset)?;
            self.page.iter().all(|b| *b == 0)
        };
        let len = self.page.len() as u64;
        let result = if zero {
            self.served.zero_pages += 1;
            let mut zeropage = sys::UffdioZeropage {
                range: sys::UffdioRange { start: dst, len },
                ..Default::default()
            };
            // SAFETY: a valid userfaultfd and a structure of the kernel's layout.
            unsafe { sys::uffdio_zeropage(self.uffd.as_raw_fd(), &mut zeropage) }
        } else {
            let mut copy = sys::UffdioCopy {
                dst,
                src: self.page.as_ptr() as u64,
                len,
                ..Default::default()
            };
            // SAFETY: `src` is our page buffer of `len` bytes; the kernel reads it only.
            unsafe { sys::uffdio_copy(self.uffd.as_raw_fd(), &mut copy) }
        };
        match result {
            // Already there: another fault on the page, or a prefetch, came first.
            Ok(_) | Err(nix::errno::Errno::EEXIST) => Ok(true),
            Err(nix::errno::Errno::EAGAIN) => Ok(false),
            Err(e) => Err(errno("filling a guest page")(e)),
        }
    }

    /// Copies in the next prefetch batch; false when the list is done.
    fn prefetch_some(&mut self) -> Result<bool, UffdError> {
        for _ in 0..PREFETCH_BATCH {
            let Some(offset) = self.prefetch.next() else {
                return Ok(false);
            };
            let Some(region) = self
                .regions
                .iter()
                .find(|r| (r.offset..r.offset + r.size).contains(&offset))
                .copied()
            else {
                continue;
            };
            let dst = region.base_host_virt_addr + (offset - region.offset);
            // A prefetch the kernel defers is dropped: the guest's own fault will bring it.
            self.fill(dst, offset)?;
            self.touched.insert(offset);
            self.served.prefetched += 1;
        }
        Ok(true)
    }

    fn save(&mut self, record: &Path) -> Result<(), UffdError> {
        let page_size = self.regions[0].page_size;
        write_pages(record, self.touched.iter().map(|o| o / page_size))
            .map_err(io(format!("writing {}", record.display())))?;
        self.recorded_len = self.touched.len();
        Ok(())
    }
}

/// Reads as much of `buf` as the file holds from `offset` (the rest stays as it is).
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> Result<(), UffdError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("reading the memory file")(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_parse_in_both_handshake_spellings_and_must_be_aligned() {
        let new: Vec<GuestRegionUffdMapping> = serde_json::from_str(
            r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#,
        )
        .unwrap();
        assert_eq!(new[0].page_size, 4096);
        let old: Vec<GuestRegionUffdMapping> = serde_json::from_str(
            r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]"#,
        )
        .unwrap();
        assert_eq!(old, new);
        check_regions(&new).unwrap();
        let mut bad = new.clone();
        bad[0].size = 100;
        assert!(check_regions(&bad).is_err());
        assert!(check_regions(&[]).is_err());
    }

    #[test]
    fn page_lists_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("touched");
        write_pages(&path, [3, 1, 4_000_000_000]).unwrap();
        assert_eq!(read_pages(&path), vec![3, 1, 4_000_000_000]);
        assert!(read_pages(&dir.path().join("absent")).is_empty());
    }
}
