//! The output log of one process: a bounded buffer of recent chunks that attached readers consume
//! at their own pace. An attached reader back-pressures the process (its chunks are never
//! evicted before it read them); with nobody attached the oldest chunks are evicted, and a reader
//! that attaches later is told exactly how many bytes it missed.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use super::api::ExitInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
    Pty,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogItem {
    Data(StreamKind, Bytes),
    /// Bytes evicted before this reader could read them.
    Lost(u64),
    Exit(ExitInfo),
}

struct Chunk {
    seq: u64,
    /// Total bytes written before this chunk.
    offset: u64,
    kind: StreamKind,
    data: Bytes,
}

struct Cursor {
    seq: u64,
    offset: u64,
}

#[derive(Default)]
struct State {
    chunks: VecDeque<Chunk>,
    buffered: usize,
    next_seq: u64,
    written: u64,
    /// Next chunk each attached reader wants.
    readers: HashMap<u64, u64>,
    next_reader: u64,
    exit: Option<ExitInfo>,
}

impl State {
    fn first_seq(&self) -> u64 {
        self.chunks.front().map_or(self.next_seq, |c| c.seq)
    }

    fn first_offset(&self) -> u64 {
        self.chunks.front().map_or(self.written, |c| c.offset)
    }

    /// Evicts old chunks until `incoming` more bytes fit; false when an attached reader still
    /// needs the oldest chunk.
    fn make_room(&mut self, incoming: usize, capacity: usize) -> bool {
        while self.buffered + incoming > capacity {
            let Some(front) = self.chunks.front() else {
                return true;
            };
            if self.readers.values().any(|&wanted| wanted <= front.seq) {
                return false;
            }
            self.buffered -= front.data.len();
            self.chunks.pop_front();
        }
        true
    }
}

pub struct OutputLog {
    state: Mutex<State>,
    changed: Notify,
    capacity: usize,
}

impl OutputLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a chunk, waiting while an attached reader has not consumed the oldest one.
    pub async fn push(&self, kind: StreamKind, data: Bytes) {
        if data.is_empty() {
            return;
        }
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if state.make_room(data.len(), self.capacity) {
                    let chunk = Chunk {
                        seq: state.next_seq,
                        offset: state.written,
                        kind,
                        data,
                    };
                    state.next_seq += 1;
                    state.written += chunk.data.len() as u64;
                    state.buffered += chunk.data.len();
                    state.chunks.push_back(chunk);
                    drop(state);
                    self.changed.notify_waiters();
                    return;
                }
            }
            notified.await;
        }
    }

    /// Records the exit; readers see it after the last chunk.
    pub fn finish(&self, exit: ExitInfo) {
        self.lock().exit = Some(exit);
        self.changed.notify_waiters();
    }

    /// Drops the oldest chunks beyond `capacity` that no attached reader still needs.
    pub fn shrink(&self, capacity: usize) {
        self.lock().make_room(0, capacity);
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        self.lock().exit.clone()
    }

    /// A reader that replays everything still buffered, then follows new output.
    pub fn reader(self: &std::sync::Arc<Self>) -> LogReader {
        let mut state = self.lock();
        let id = state.next_reader;
        state.next_reader += 1;
        state.readers.insert(id, 0);
        LogReader {
            log: self.clone(),
            id,
            cursor: Cursor { seq: 0, offset: 0 },
            exit_sent: false,
        }
    }
}

pub struct LogReader {
    log: std::sync::Arc<OutputLog>,
    id: u64,
    cursor: Cursor,
    exit_sent: bool,
}

impl LogReader {
    /// The next item, or `None` after the exit was delivered.
    pub async fn next(&mut self) -> Option<LogItem> {
        if self.exit_sent {
            return None;
        }
        let log = self.log.clone();
        loop {
            let notified = log.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(item) = self.poll_item() {
                return Some(item);
            }
            notified.await;
        }
    }

    fn poll_item(&mut self) -> Option<LogItem> {
        let mut state = self.log.lock();
        let first_seq = state.first_seq();
        if self.cursor.seq < first_seq {
            let first_offset = state.first_offset();
            let lost = first_offset - self.cursor.offset;
            self.cursor = Cursor {
                seq: first_seq,
                offset: first_offset,
            };
            state.readers.insert(self.id, first_seq);
            if lost > 0 {
                return Some(LogItem::Lost(lost));
            }
        }
        let index = (self.cursor.seq - first_seq) as usize;
        if let Some(chunk) = state.chunks.get(index) {
            let item = LogItem::Data(chunk.kind, chunk.data.clone());
            self.cursor = Cursor {
                seq: chunk.seq + 1,
                offset: chunk.offset + chunk.data.len() as u64,
            };
            state.readers.insert(self.id, self.cursor.seq);
            drop(state);
            self.log.changed.notify_waiters();
            return Some(item);
        }
        if let Some(exit) = state.exit.clone() {
            self.exit_sent = true;
            return Some(LogItem::Exit(exit));
        }
        None
    }
}

impl Drop for LogReader {
    fn drop(&mut self) {
        self.log.lock().readers.remove(&self.id);
        self.log.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn exit() -> ExitInfo {
        ExitInfo {
            exit_code: 0,
            signal: None,
        }
    }

    #[tokio::test]
    async fn detached_log_evicts_and_late_reader_learns_the_loss() {
        let log = Arc::new(OutputLog::new(10));
        for _ in 0..5 {
            log.push(StreamKind::Stdout, Bytes::from_static(b"abcd"))
                .await;
        }
        log.finish(exit());
        let mut reader = log.reader();
        assert_eq!(reader.next().await, Some(LogItem::Lost(12)));
        assert_eq!(
            reader.next().await,
            Some(LogItem::Data(StreamKind::Stdout, "abcd".into()))
        );
        assert_eq!(
            reader.next().await,
            Some(LogItem::Data(StreamKind::Stdout, "abcd".into()))
        );
        assert_eq!(reader.next().await, Some(LogItem::Exit(exit())));
        assert_eq!(reader.next().await, None);

        log.shrink(4);
        let mut late = log.reader();
        assert_eq!(late.next().await, Some(LogItem::Lost(16)));
        assert_eq!(
            late.next().await,
            Some(LogItem::Data(StreamKind::Stdout, "abcd".into()))
        );
    }

    #[tokio::test]
    async fn attached_reader_back_pressures_the_writer() {
        let log = Arc::new(OutputLog::new(8));
        let mut reader = log.reader();
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..100u8 {
                    log.push(StreamKind::Stderr, Bytes::from(vec![i; 4])).await;
                }
                log.finish(exit());
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!writer.is_finished(), "the writer must wait for the reader");
        for i in 0..100u8 {
            assert_eq!(
                reader.next().await,
                Some(LogItem::Data(StreamKind::Stderr, vec![i; 4].into()))
            );
        }
        assert_eq!(reader.next().await, Some(LogItem::Exit(exit())));
        writer.await.unwrap();
    }
}
