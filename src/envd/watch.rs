//! Directory watches: inotify events (through `notify`) turned into create/modify/remove/rename
//! messages, queued within a bound; a client that falls behind is told how many it lost.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use notify::event::{ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::api::{ErrorBody, ErrorCode, WatchEventKind, WatchMessage};
use super::files::FileError;

/// Events queued per watch before further ones are counted as lost.
pub const WATCH_QUEUE: usize = 4096;

pub struct DirWatch {
    _watcher: RecommendedWatcher,
    events: mpsc::Receiver<WatchMessage>,
    lost: Arc<AtomicU64>,
}

impl DirWatch {
    pub fn start(path: &Path, recursive: bool) -> Result<Self, FileError> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => FileError::NotFound(path.display().to_string()),
            _ => FileError::Io {
                action: "watch",
                path: path.display().to_string(),
                source: e,
            },
        })?;
        if !meta.is_dir() {
            return Err(FileError::NotDirectory(path.display().to_string()));
        }
        let (sender, events) = mpsc::channel(WATCH_QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let sender_lost = lost.clone();
        // The cookie of the last "moved from", so its matching "moved to" is not reported twice.
        let pending_move: Mutex<Option<usize>> = Mutex::new(None);
        let handler = move |result: notify::Result<notify::Event>| {
            let messages = match result {
                Ok(event) => translate(&event, &pending_move),
                Err(error) => vec![WatchMessage::Error(ErrorBody {
                    code: ErrorCode::WatchFailed,
                    message: error.to_string(),
                })],
            };
            for message in messages {
                if sender.try_send(message).is_err() {
                    sender_lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let mut watcher = notify::recommended_watcher(handler).map_err(|e| watch_error(path, e))?;
        let mode = if recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        watcher
            .watch(path, mode)
            .map_err(|e| watch_error(path, e))?;
        Ok(Self {
            _watcher: watcher,
            events,
            lost,
        })
    }

    pub async fn next(&mut self) -> Option<WatchMessage> {
        let lost = self.lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            return Some(WatchMessage::Lost { events: lost });
        }
        self.events.recv().await
    }
}

fn watch_error(path: &Path, error: notify::Error) -> FileError {
    FileError::Io {
        action: "watch",
        path: path.display().to_string(),
        source: std::io::Error::other(error.to_string()),
    }
}

fn translate(event: &notify::Event, pending_move: &Mutex<Option<usize>>) -> Vec<WatchMessage> {
    let message = |kind, path: &Path, to: Option<&Path>| WatchMessage::Event {
        kind,
        path: path.display().to_string(),
        to: to.map(|p| p.display().to_string()),
    };
    let mut pending = pending_move.lock().unwrap_or_else(|p| p.into_inner());
    let each = |kind| event.paths.iter().map(|p| message(kind, p, None)).collect();
    match &event.kind {
        EventKind::Create(_) => each(WatchEventKind::Create),
        EventKind::Remove(_) => each(WatchEventKind::Remove),
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
            *pending = event.tracker();
            each(WatchEventKind::Rename)
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            if pending.is_some() && *pending == event.tracker() {
                Vec::new()
            } else {
                each(WatchEventKind::Create)
            }
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            *pending = None;
            match event.paths.as_slice() {
                [from, to] => vec![message(WatchEventKind::Rename, from, Some(to))],
                _ => each(WatchEventKind::Rename),
            }
        }
        EventKind::Modify(_) => each(WatchEventKind::Modify),
        EventKind::Access(_) | EventKind::Any | EventKind::Other => Vec::new(),
    }
}
