//! The guest serial console on the host. The guest decides how much it writes, so the VMM does
//! not write a file itself: its console goes into a named pipe (`console.fifo` in the sandbox
//! directory) that the agent drains into `console.log`, which moves aside to `console.log.1`
//! when it reaches half of the configured cap. The files never hold more than the cap and always
//! hold the latest output, and neither a flood nor a slow disk can stall the guest: the pipe is
//! read as fast as it fills, and what the disk cannot take in time is dropped (and said so in the
//! log), never queued without bound. The pipe is a named one so that it outlives the agent
//! process: while nobody reads it the VMM's console writes fail (EPIPE, SIGPIPE ignored) and the
//! output is lost, and once the next agent process opens it ([`ConsoleDrain::attach`]) the same
//! log continues.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::stat::Mode;
use nix::unistd::mkfifo;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{VmFiles, VmmError};
use crate::config::ConsoleLogMaxBytes;

/// The most the drain reads from the pipe at once.
const READ_BYTES: usize = 16 * 1024;
/// Output read but not yet written; beyond it the drain drops what it reads. Together with a
/// spare buffer of the same size and the read buffer this bounds the drain's memory.
const PENDING_BYTES: usize = 64 * 1024;
/// How long the drain may take to write out the rest once the VMM has exited.
const FINISH_WAIT: Duration = Duration::from_secs(2);
/// How much of each file [`console_tail`] reads.
const TAIL_BYTES: u64 = 4096;

/// The console output of one VM on its way from the VMM's pipe to the capped log: a task reads
/// the pipe, a thread of its own writes the files, so a stalled disk never holds up the read.
#[derive(Debug)]
pub(crate) struct ConsoleDrain {
    reader: Option<JoinHandle<()>>,
    writer_done: Option<oneshot::Receiver<()>>,
}

/// What the reader hands the writer.
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Bytes read after `bytes` filled up and dropped; noted in the log before what follows.
    dropped: u64,
    /// The last byte handed over did not end a line.
    mid_line: bool,
    /// The reader is done: nothing more will come.
    closed: bool,
    /// The writer gave up; the reader discards.
    writer_failed: bool,
}

impl Pending {
    /// Hands `bytes` over, after a note on its own line about any dropped before them.
    fn append(&mut self, bytes: &[u8]) {
        if self.dropped > 0 {
            let newline = if self.mid_line { "\n" } else { "" };
            let note = format!(
                "{newline}[wrenn: {} bytes of console output dropped]\n",
                std::mem::take(&mut self.dropped)
            );
            self.bytes.extend_from_slice(note.as_bytes());
            self.mid_line = false;
        }
        if let Some(last) = bytes.last() {
            self.bytes.extend_from_slice(bytes);
            self.mid_line = *last != b'\n';
        }
    }
}

#[derive(Debug, Default)]
struct Handoff {
    pending: Mutex<Pending>,
    changed: Condvar,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ConsoleDrain {
    /// Starts an empty console log for `files` and a new console pipe, and drains one into the
    /// other; returns the end of the pipe the VMM writes its console to. It is non-blocking, so
    /// a VMM that outruns even the drain loses output rather than stalling the vCPU that writes
    /// the serial port. The drain ends by itself once every copy of that end is closed, i.e.
    /// when the VMM exits.
    pub(crate) fn start(
        files: &VmFiles,
        cap: ConsoleLogMaxBytes,
    ) -> Result<(Self, OwnedFd), VmmError> {
        let log = CappedLog::create(&files.console_log, &files.previous_console_log, cap)
            .map_err(log_failed(files))?;
        let fifo = &files.console_fifo;
        let fifo_failed = |source: io::Error| VmmError::File {
            what: "failed to create the console pipe",
            path: fifo.clone(),
            source,
        };
        match fs::remove_file(fifo) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                return Err(fifo_failed(error))
            }
            _ => {}
        }
        mkfifo(fifo, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|errno| fifo_failed(errno.into()))?;
        let receiver = open_read_end(fifo).map_err(fifo_failed)?;
        // Opened while a reader exists (without one a non-blocking open fails). Close-on-exec,
        // as std opens every file: no other process the agent starts may hold it, or this VM's
        // console would never end.
        let write_end = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
            .map_err(fifo_failed)?;
        let drain = Self::drain(log, receiver, files)?;
        Ok((drain, write_end.into()))
    }

    /// Drains the console pipe of a VMM that is already running (started by an earlier agent
    /// process) into its log, continuing the log where it stopped, within the same cap.
    pub(crate) fn attach(files: &VmFiles, cap: ConsoleLogMaxBytes) -> Result<Self, VmmError> {
        let log = CappedLog::append(&files.console_log, &files.previous_console_log, cap)
            .map_err(log_failed(files))?;
        let receiver = open_read_end(&files.console_fifo).map_err(|source| VmmError::File {
            what: "failed to open the console pipe",
            path: files.console_fifo.clone(),
            source,
        })?;
        Self::drain(log, receiver, files)
    }

    /// Starts the reader task and the writer thread.
    fn drain(log: CappedLog, receiver: pipe::Receiver, files: &VmFiles) -> Result<Self, VmmError> {
        let handoff = Arc::new(Handoff::default());
        let (done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("wrenn-console".into())
            .spawn({
                let handoff = handoff.clone();
                move || {
                    write_pending(log, &handoff);
                    let _ = done_tx.send(());
                }
            })
            .map_err(log_failed(files))?;
        let reader = tokio::spawn(read_pipe(
            receiver,
            CloseOnDrop(handoff),
            files.console_log.clone(),
        ));
        Ok(Self {
            reader: Some(reader),
            writer_done: Some(done_rx),
        })
    }

    /// Waits until everything the VMM wrote is in the log; call it once the VMM has exited.
    /// Gives up after a bounded wait (a process that inherited the pipe could hold it open),
    /// closing the pipe. Safe to cancel and to call again.
    pub(crate) async fn finish(&mut self) {
        if let Some(reader) = self.reader.as_mut() {
            if tokio::time::timeout(FINISH_WAIT, &mut *reader)
                .await
                .is_err()
            {
                tracing::warn!(
                    waited = ?FINISH_WAIT,
                    "the console pipe stayed open after the VMM exited; closing it"
                );
                reader.abort();
                let _ = reader.await;
            }
            self.reader = None;
        }
        if let Some(done) = self.writer_done.as_mut() {
            if tokio::time::timeout(FINISH_WAIT, done).await.is_err() {
                tracing::warn!(waited = ?FINISH_WAIT, "the console log writer is still busy");
            }
            self.writer_done = None;
        }
    }
}

/// Stops reading the pipe: a dropped VM handle gives the console up (the writer thread writes
/// out what it holds and ends), leaving it to [`ConsoleDrain::attach`]. Two drains reading one
/// pipe would each get part of the output.
impl Drop for ConsoleDrain {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

fn log_failed(files: &VmFiles) -> impl Fn(io::Error) -> VmmError + '_ {
    |source| VmmError::File {
        what: "failed to set up the console log",
        path: files.console_log.clone(),
        source,
    }
}

/// The read end of the console pipe, non-blocking and close-on-exec (no other process the
/// agent starts may hold it, or the VMM's writes would not fail once the agent is gone).
fn open_read_end(fifo: &Path) -> io::Result<pipe::Receiver> {
    pipe::OpenOptions::new().open_receiver(fifo)
}

/// Tells the writer that no more output comes, however the reader ends (EOF, error, abort, or
/// the runtime shutting down).
struct CloseOnDrop(Arc<Handoff>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.changed.notify_one();
    }
}

/// Reads the pipe until the VMM closes it, handing what it reads to the writer and counting
/// what does not fit. Guest-triggered, so it warns once per VM.
async fn read_pipe(mut pipe: pipe::Receiver, handoff: CloseOnDrop, log: PathBuf) {
    let mut buf = vec![0; READ_BYTES];
    let mut warned = false;
    loop {
        let read = match pipe.read(&mut buf).await {
            Ok(0) => {
                // The VMM is gone; say what the end of its output lost.
                handoff.0.lock().append(&[]);
                return;
            }
            Ok(read) => read,
            Err(error) => {
                // Closing the pipe makes the VMM drop its console output from now on.
                tracing::warn!(console = %log.display(), %error, "reading the guest console failed");
                return;
            }
        };
        let mut pending = handoff.0.lock();
        if pending.writer_failed {
            continue;
        }
        if pending.bytes.len() + read > PENDING_BYTES {
            pending.dropped += read as u64;
            drop(pending);
            if !warned {
                warned = true;
                tracing::warn!(
                    console = %log.display(),
                    "the guest console outpaces its log on disk; dropping output"
                );
            }
            continue;
        }
        pending.append(&buf[..read]);
        drop(pending);
        handoff.0.changed.notify_one();
    }
}

/// Writes what the reader hands over until it is done. Stops at the first write error: the
/// reader then discards, and the VM runs on.
fn write_pending(mut log: CappedLog, handoff: &Handoff) {
    let mut batch = Vec::new();
    loop {
        let closed = {
            let mut pending = handoff.lock();
            while pending.bytes.is_empty() && !pending.closed {
                pending = handoff
                    .changed
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            batch.clear();
            std::mem::swap(&mut batch, &mut pending.bytes);
            pending.closed
        };
        if let Err(error) = log.write(&batch) {
            handoff.lock().writer_failed = true;
            tracing::warn!(
                console = %log.current.display(),
                %error,
                "writing the guest console log failed; discarding the rest of the output"
            );
            return;
        }
        if closed {
            return;
        }
    }
}

/// An append-only log in two files that together never exceed the cap: `current` takes writes
/// until it holds half the cap, then replaces `previous` and starts again empty.
#[derive(Debug)]
struct CappedLog {
    current: PathBuf,
    previous: PathBuf,
    file_limit: u64,
    file: File,
    len: u64,
    rotated: bool,
}

impl CappedLog {
    /// Starts an empty log, removing what an earlier VM in the same directory left.
    fn create(current: &Path, previous: &Path, cap: ConsoleLogMaxBytes) -> io::Result<Self> {
        match fs::remove_file(previous) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        Ok(Self {
            current: current.to_owned(),
            previous: previous.to_owned(),
            file_limit: cap.get() / 2,
            file: create_empty(current)?,
            len: 0,
            rotated: false,
        })
    }

    /// Continues the log an earlier drain of the same VM wrote.
    fn append(current: &Path, previous: &Path, cap: ConsoleLogMaxBytes) -> io::Result<Self> {
        let file = open_appending(current, false)?;
        Ok(Self {
            current: current.to_owned(),
            previous: previous.to_owned(),
            file_limit: cap.get() / 2,
            len: file.metadata()?.len(),
            file,
            rotated: false,
        })
    }

    fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.len >= self.file_limit {
                self.rotate()?;
            }
            let room = usize::try_from(self.file_limit - self.len).unwrap_or(usize::MAX);
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.file.write_all(now)?;
            self.len += now.len() as u64;
            bytes = rest;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        fs::rename(&self.current, &self.previous)?;
        self.file = create_empty(&self.current)?;
        self.len = 0;
        // Guest-triggered: said once per VM.
        if !self.rotated {
            self.rotated = true;
            tracing::info!(
                console = %self.current.display(),
                "the guest console reached half its cap; older output now rotates out"
            );
        }
        Ok(())
    }
}

fn create_empty(path: &Path) -> io::Result<File> {
    open_appending(path, true)
}

/// Opened in append mode: a drain that is being replaced ([`ConsoleDrain::attach`]) may still
/// write its last batch, which then lands after, not over, the new drain's output.
fn open_appending(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(truncate)
        .custom_flags(libc::O_APPEND)
        .mode(0o600)
        .open(path)
}

/// The last `max_lines` lines of the guest console, read across the rotated file and the
/// current one, for error messages.
pub fn console_tail(files: &VmFiles, max_lines: usize) -> Vec<String> {
    let (current, current_cut) = file_tail(&files.console_log);
    // Only when the current file was read whole does the rotated one continue it.
    let (mut bytes, cut) = if current_cut {
        (Vec::new(), true)
    } else {
        file_tail(&files.previous_console_log)
    };
    bytes.extend(current);
    // Read from the middle of a file, the first line is only the end of one.
    if cut {
        let line_end = bytes.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.drain(..line_end);
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..]
        .iter()
        .map(|line| (*line).to_owned())
        .collect()
}

/// Up to [`TAIL_BYTES`] from the end of a file, and whether that is not all of it; nothing
/// when it is missing or unreadable.
fn file_tail(path: &Path) -> (Vec<u8>, bool) {
    let read = || -> io::Result<(Vec<u8>, bool)> {
        let mut file = File::open(path)?;
        let start = file.metadata()?.len().saturating_sub(TAIL_BYTES);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok((bytes, start > 0))
    };
    read().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layout;

    fn cap(bytes: u64) -> ConsoleLogMaxBytes {
        ConsoleLogMaxBytes::try_from(bytes).unwrap()
    }

    fn sizes(files: &VmFiles) -> (u64, u64) {
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        (size(&files.console_log), size(&files.previous_console_log))
    }

    fn files(root: &Path) -> VmFiles {
        let files = VmFiles::for_sandbox(&Layout::new(root), "cl-console");
        fs::create_dir_all(&files.dir).unwrap();
        files
    }

    fn numbered_lines(from: u32, to: u32) -> Vec<u8> {
        (from..to)
            .flat_map(|i| format!("line {i:06}\n").into_bytes())
            .collect()
    }

    #[test]
    fn the_capped_log_rotates_at_half_the_cap_and_keeps_the_latest_output() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let mut log =
            CappedLog::create(&files.console_log, &files.previous_console_log, cap(8192)).unwrap();
        log.write(b"first\n").unwrap();
        assert_eq!(sizes(&files), (6, 0));
        assert!(!files.previous_console_log.exists());

        // 12 bytes a line: 100 000 lines are far beyond the cap, in uneven writes.
        let all = numbered_lines(0, 100_000);
        for piece in all.chunks(1000 + 7) {
            log.write(piece).unwrap();
            let (current, previous) = sizes(&files);
            assert!(
                current <= 4096 && previous <= 4096,
                "{current} + {previous}"
            );
        }
        let (current, previous) = sizes(&files);
        assert_eq!(previous, 4096);
        let mut kept = fs::read(&files.previous_console_log).unwrap();
        kept.extend(fs::read(&files.console_log).unwrap());
        assert_eq!(kept.len() as u64, current + previous);
        assert!(all.ends_with(&kept), "the newest bytes are kept, in order");
        assert!(String::from_utf8_lossy(&kept).ends_with("line 099999\n"));
    }

    #[test]
    fn a_write_larger_than_the_cap_keeps_only_its_end() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let mut log =
            CappedLog::create(&files.console_log, &files.previous_console_log, cap(8193)).unwrap();
        let all = numbered_lines(0, 10_000);
        log.write(&all).unwrap();
        let (current, previous) = sizes(&files);
        assert!(current + previous <= 8193, "{current} + {previous}");
        let mut kept = fs::read(&files.previous_console_log).unwrap();
        kept.extend(fs::read(&files.console_log).unwrap());
        assert!(all.ends_with(&kept));
    }

    #[test]
    fn a_new_log_replaces_what_an_earlier_vm_left() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        fs::write(&files.console_log, b"old current").unwrap();
        fs::write(&files.previous_console_log, b"old previous").unwrap();
        let mut log =
            CappedLog::create(&files.console_log, &files.previous_console_log, cap(8192)).unwrap();
        log.write(b"new\n").unwrap();
        assert_eq!(fs::read(&files.console_log).unwrap(), b"new\n");
        assert!(!files.previous_console_log.exists());
    }

    #[test]
    fn the_tail_reads_across_the_rotation() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        assert!(console_tail(&files, 8).is_empty());
        let mut log =
            CappedLog::create(&files.console_log, &files.previous_console_log, cap(8192)).unwrap();
        // 342 lines of 12 bytes pass the 4096-byte rotation point inside the last line.
        log.write(&numbered_lines(0, 342)).unwrap();
        log.write(b"panic: boot failed\n").unwrap();
        assert_eq!(
            fs::read(&files.console_log).unwrap(),
            b" 000341\npanic: boot failed\n"
        );
        assert_eq!(
            console_tail(&files, 3),
            ["line 000340", "line 000341", "panic: boot failed"]
        );
    }

    #[test]
    fn the_tail_skips_the_partial_line_its_read_starts_in() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let mut log =
            CappedLog::create(&files.console_log, &files.previous_console_log, cap(16384)).unwrap();
        // 8192 bytes in the rotated file, of which the tail reads the last 4096: from the
        // middle of line 341.
        log.write(&numbered_lines(0, 1000)).unwrap();
        let all = console_tail(&files, usize::MAX);
        assert_eq!(all.first().map(String::as_str), Some("line 000342"));
        assert_eq!(all.last().map(String::as_str), Some("line 000999"));
        assert_eq!(all.len(), 658);
    }

    #[test]
    fn a_long_current_file_is_the_whole_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let mut log =
            CappedLog::create(&files.console_log, &files.previous_console_log, cap(65536)).unwrap();
        // 32768 bytes rotated, then 12000 in the current file: more than the tail reads.
        log.write(&numbered_lines(0, 3731)).unwrap();
        let all = console_tail(&files, usize::MAX);
        let expected: Vec<String> = (3731 - 341..3731).map(|i| format!("line {i:06}")).collect();
        assert_eq!(all, expected);
    }

    #[test]
    fn a_note_marks_dropped_output_on_a_line_of_its_own() {
        let mut pending = Pending::default();
        pending.append(b"half a li");
        pending.dropped = 10;
        pending.append(b"next\n");
        pending.dropped = 5;
        pending.append(b"");
        assert_eq!(
            String::from_utf8(pending.bytes).unwrap(),
            "half a li\n[wrenn: 10 bytes of console output dropped]\nnext\n\
             [wrenn: 5 bytes of console output dropped]\n"
        );
    }

    /// Writes all of `bytes` to the non-blocking pipe end, waiting while it is full.
    fn write_waiting(end: &mut File, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match end.write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn kept(files: &VmFiles) -> Vec<u8> {
        let mut kept = fs::read(&files.previous_console_log).unwrap_or_default();
        kept.extend(fs::read(&files.console_log).unwrap());
        kept
    }

    #[tokio::test]
    async fn the_drain_writes_what_the_vmm_sends_and_ends_when_it_closes_the_pipe() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let (mut drain, vmm_end) = ConsoleDrain::start(&files, cap(1 << 20)).unwrap();
        let mut vmm_end = File::from(vmm_end);
        let sent = numbered_lines(0, 2000);
        let writer = {
            let sent = sent.clone();
            tokio::task::spawn_blocking(move || {
                for piece in sent.chunks(1000) {
                    write_waiting(&mut vmm_end, piece);
                }
            })
        };
        writer.await.unwrap();
        drain.finish().await;
        assert_eq!(kept(&files), sent);
        drain.finish().await;
    }

    #[tokio::test]
    async fn a_flood_stays_within_the_cap_keeps_the_latest_output_and_never_blocks_the_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let (mut drain, vmm_end) = ConsoleDrain::start(&files, cap(16384)).unwrap();
        let mut vmm_end = File::from(vmm_end);
        let flood = tokio::task::spawn_blocking(move || {
            let line = b"flood flood flood flood flood flood flood flood\n";
            let mut written = 0u64;
            // A VMM that never waits: what the full pipe refuses is lost, nothing blocks.
            for _ in 0..100_000 {
                match vmm_end.write(line) {
                    Ok(n) => written += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            // Let the drain catch up, so the last line is not what it has to drop.
            std::thread::sleep(Duration::from_secs(1));
            write_waiting(&mut vmm_end, b"FLOOD-END\n");
            written
        });
        let written = flood.await.unwrap();
        drain.finish().await;
        assert!(written > 16384, "only {written} bytes went through");
        let (current, previous) = sizes(&files);
        assert!(current + previous <= 16384, "{current} + {previous}");
        assert_eq!(console_tail(&files, 1), ["FLOOD-END"]);
    }

    #[tokio::test]
    async fn a_dropped_drain_lets_the_writer_thread_end_and_the_vmm_see_a_closed_pipe() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let (mut drain, vmm_end) = ConsoleDrain::start(&files, cap(8192)).unwrap();
        let mut vmm_end = File::from(vmm_end);
        drain.reader.take().unwrap().abort();
        tokio::time::timeout(FINISH_WAIT, drain.writer_done.take().unwrap())
            .await
            .expect("the writer thread ends with the reader")
            .unwrap();
        // As after the agent is killed: the VMM's writes fail instead of blocking, and the VMM
        // (which ignores SIGPIPE) runs on.
        let err = loop {
            match vmm_end.write_all(b"x") {
                Ok(()) => tokio::task::yield_now().await,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    }

    #[tokio::test]
    async fn a_new_drain_attaches_to_the_pipe_of_a_running_vmm_and_continues_the_capped_log() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let drain = ConsoleDrain::start(&files, cap(8192));
        let (drain, vmm_end) = drain.unwrap();
        let mut vmm_end = File::from(vmm_end);
        write_waiting(&mut vmm_end, b"before\n");
        while kept(&files) != b"before\n" {
            tokio::task::yield_now().await;
        }
        // The agent goes away: the VMM's writes fail, and what it writes meanwhile is lost.
        drop(drain);
        let err = loop {
            match vmm_end.write_all(b"lost\n") {
                Ok(()) => tokio::task::yield_now().await,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");

        let mut drain = ConsoleDrain::attach(&files, cap(8192)).unwrap();
        // The pipe is read again as soon as `attach` returns.
        write_waiting(&mut vmm_end, b"after\n");
        // Past the cap: the continued log rotates as before.
        let more = numbered_lines(0, 2000);
        for piece in more.chunks(1000) {
            write_waiting(&mut vmm_end, piece);
        }
        drop(vmm_end);
        drain.finish().await;
        let (current, previous) = sizes(&files);
        assert!(current + previous <= 8192, "{current} + {previous}");
        assert!(more.ends_with(&kept(&files)));
        assert_eq!(console_tail(&files, 1), ["line 001999"]);
    }

    #[tokio::test]
    async fn an_attached_drain_keeps_what_the_log_held() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let (drain, vmm_end) = ConsoleDrain::start(&files, cap(8192)).unwrap();
        let mut vmm_end = File::from(vmm_end);
        write_waiting(&mut vmm_end, b"before\n");
        while kept(&files) != b"before\n" {
            tokio::task::yield_now().await;
        }
        drop(drain);
        let mut drain = ConsoleDrain::attach(&files, cap(8192)).unwrap();
        // The pipe is read again as soon as `attach` returns.
        write_waiting(&mut vmm_end, b"after\n");
        drop(vmm_end);
        drain.finish().await;
        assert_eq!(String::from_utf8(kept(&files)).unwrap(), "before\nafter\n");
    }
}
