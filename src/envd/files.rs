//! Filesystem operations on behalf of a guest user: streamed reads and writes (never whole files
//! in memory), listings, stat, mkdir, remove and move. envd runs as root; what it creates for a
//! user is owned by that user.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncWriteExt, BufWriter};

use super::api::{EntryInfo, EntryType};
use super::users::{resolve_path, Account, Accounts, UserError};

/// Write batch handed to the blocking pool at once; bounds upload memory together with tokio's
/// own file buffer.
const WRITE_BUFFER: usize = 1 << 20;
/// Largest listing returned at once, so a deep `depth` cannot exhaust guest memory.
pub const LIST_LIMIT: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    User(#[from] UserError),
    #[error("invalid path `{0}`: paths must be non-empty and contain no NUL byte")]
    InvalidPath(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} is a directory")]
    IsDirectory(String),
    #[error("{0} is not a directory")]
    NotDirectory(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("no space left on the device writing {0}")]
    NoSpace(String),
    #[error("the listing of {0} exceeds {LIST_LIMIT} entries; ask for a smaller depth")]
    TooMany(String),
    #[error("upload to {path} failed: {reason}")]
    Upload { path: String, reason: String },
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> FileError {
    let shown = path.display().to_string();
    match source.raw_os_error() {
        Some(libc::ENOENT) => FileError::NotFound(shown),
        Some(libc::EEXIST) => FileError::Exists(shown),
        Some(libc::EISDIR) => FileError::IsDirectory(shown),
        Some(libc::ENOTDIR) => FileError::NotDirectory(shown),
        Some(libc::EACCES) | Some(libc::EPERM) => FileError::PermissionDenied(shown),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => FileError::NoSpace(shown),
        _ => FileError::Io {
            action,
            path: shown,
            source,
        },
    }
}

/// Who a file operation is for, and how to name owners in answers.
pub struct FileUser {
    pub account: Account,
    pub accounts: Accounts,
}

impl FileUser {
    pub fn resolve(name: Option<&str>) -> Result<Self, FileError> {
        let accounts = Accounts::load()?;
        let account = accounts.effective(name)?;
        Ok(Self { account, accounts })
    }

    pub fn path(&self, raw: &str) -> Result<PathBuf, FileError> {
        resolve_path(raw, &self.account.home).ok_or_else(|| FileError::InvalidPath(raw.to_owned()))
    }

    fn chown(&self, path: &Path) -> Result<(), FileError> {
        std::os::unix::fs::lchown(path, Some(self.account.uid), Some(self.account.gid))
            .map_err(|e| io_error("change the owner of", path, e))
    }

    /// Creates `dir` and its missing ancestors owned by the user; returns what it created,
    /// outermost first, so a failed operation can remove them again.
    fn create_dirs(&self, dir: &Path) -> Result<Vec<PathBuf>, FileError> {
        let mut missing = Vec::new();
        let mut cursor = Some(dir);
        while let Some(path) = cursor {
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_dir() => break,
                Ok(_) => return Err(FileError::NotDirectory(path.display().to_string())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(path.to_owned()),
                Err(e) => return Err(io_error("inspect", path, e)),
            }
            cursor = path.parent();
        }
        missing.reverse();
        let mut created = Vec::new();
        for path in missing {
            if let Err(e) = std::fs::create_dir(&path) {
                remove_created(&created);
                return Err(io_error("create directory", &path, e));
            }
            created.push(path.clone());
            if let Err(e) = self.chown(&path) {
                remove_created(&created);
                return Err(e);
            }
        }
        Ok(created)
    }

    pub fn entry(&self, path: &Path) -> Result<EntryInfo, FileError> {
        let meta = std::fs::symlink_metadata(path).map_err(|e| io_error("stat", path, e))?;
        let file_type = meta.file_type();
        let (kind, symlink_target) = if file_type.is_symlink() {
            let target = std::fs::read_link(path)
                .ok()
                .map(|t| t.display().to_string());
            (EntryType::Symlink, target)
        } else if file_type.is_dir() {
            (EntryType::Directory, None)
        } else {
            (EntryType::File, None)
        };
        let modified = chrono::DateTime::from_timestamp(meta.mtime(), meta.mtime_nsec() as u32)
            .unwrap_or_default();
        Ok(EntryInfo {
            name: path
                .file_name()
                .map_or_else(|| "/".into(), |n| n.to_string_lossy().into_owned()),
            path: path.display().to_string(),
            kind,
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            permissions: permissions_string(meta.mode()),
            owner: self.accounts.user_name(meta.uid()),
            group: self.accounts.group_name(meta.gid()),
            modified_at: modified.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            symlink_target,
        })
    }

    pub fn list(&self, dir: &Path, depth: u32) -> Result<Vec<EntryInfo>, FileError> {
        let meta = std::fs::metadata(dir).map_err(|e| io_error("list", dir, e))?;
        if !meta.is_dir() {
            return Err(FileError::NotDirectory(dir.display().to_string()));
        }
        let mut entries = Vec::new();
        self.walk(dir, depth.max(1), &mut entries)?;
        Ok(entries)
    }

    fn walk(&self, dir: &Path, depth: u32, entries: &mut Vec<EntryInfo>) -> Result<(), FileError> {
        let mut children: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io_error("list", dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .collect();
        children.sort();
        for child in children {
            // An entry removed while we walk is simply no longer there.
            let Ok(entry) = self.entry(&child) else {
                continue;
            };
            let descend = depth > 1 && entry.kind == EntryType::Directory;
            entries.push(entry);
            if entries.len() > LIST_LIMIT {
                return Err(FileError::TooMany(dir.display().to_string()));
            }
            if descend {
                self.walk(&child, depth - 1, entries)?;
            }
        }
        Ok(())
    }

    pub fn mkdir(&self, path: &Path) -> Result<EntryInfo, FileError> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(FileError::Exists(path.display().to_string()));
        }
        self.create_dirs(path)?;
        self.entry(path)
    }

    pub fn remove(&self, path: &Path) -> Result<(), FileError> {
        let meta = std::fs::symlink_metadata(path).map_err(|e| io_error("remove", path, e))?;
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        removed.map_err(|e| io_error("remove", path, e))
    }

    pub fn rename(&self, from: &Path, to: &Path) -> Result<EntryInfo, FileError> {
        std::fs::symlink_metadata(from).map_err(|e| io_error("move", from, e))?;
        let created = match to.parent() {
            Some(parent) => self.create_dirs(parent)?,
            None => Vec::new(),
        };
        if let Err(e) = std::fs::rename(from, to) {
            remove_created(&created);
            return Err(io_error("move", from, e));
        }
        self.entry(to)
    }

    /// Opens a regular file for a streamed download; returns it with its size.
    pub async fn open_read(&self, path: &Path) -> Result<(tokio::fs::File, u64), FileError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| io_error("read", path, e))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| io_error("read", path, e))?;
        if meta.is_dir() {
            return Err(FileError::IsDirectory(path.display().to_string()));
        }
        Ok((file, meta.len()))
    }

    /// Streams `body` into `path`: into a temporary file beside it, renamed over the target only
    /// when the whole body arrived, so a failed upload leaves neither a torn file nor new
    /// directories behind.
    pub async fn write<S, E>(&self, path: &Path, body: S) -> Result<EntryInfo, FileError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        // Writing to a symlink writes to the file it points at.
        let target = match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
            }
            Ok(meta) if meta.is_dir() => {
                return Err(FileError::IsDirectory(path.display().to_string()))
            }
            _ => path.to_owned(),
        };
        let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(FileError::InvalidPath(path.display().to_string()));
        };
        let existing_mode = std::fs::metadata(&target)
            .ok()
            .map(|m| m.permissions().mode());
        let created = self.create_dirs(parent)?;
        let temp = parent.join(format!(
            ".{}.wrenn-upload-{:08x}",
            name.to_string_lossy(),
            rand::random::<u32>()
        ));
        let result = self
            .write_temp(&temp, &target, body, existing_mode.unwrap_or(0o644))
            .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&temp);
            remove_created(&created);
            return Err(e);
        }
        self.entry(&target)
    }

    async fn write_temp<S, E>(
        &self,
        temp: &Path,
        target: &Path,
        mut body: S,
        mode: u32,
    ) -> Result<(), FileError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(temp)
            .await
            .map_err(|e| io_error("create", target, e))?;
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER, file);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| FileError::Upload {
                path: target.display().to_string(),
                reason: e.to_string(),
            })?;
            writer
                .write_all(&chunk)
                .await
                .map_err(|e| io_error("write", target, e))?;
        }
        writer
            .flush()
            .await
            .map_err(|e| io_error("write", target, e))?;
        let mut file = writer.into_inner();
        file.flush()
            .await
            .map_err(|e| io_error("write", target, e))?;
        drop(file);
        std::fs::set_permissions(temp, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_error("set permissions of", target, e))?;
        self.chown(temp)?;
        std::fs::rename(temp, target).map_err(|e| io_error("replace", target, e))
    }
}

fn remove_created(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// `ls -l` style: type character then rwx triplets with setuid, setgid and sticky folded in.
pub fn permissions_string(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '-',
    };
    let mut out = String::with_capacity(10);
    out.push(kind);
    let special = [(0o4000, 's', 'S'), (0o2000, 's', 'S'), (0o1000, 't', 'T')];
    for (i, (bit, set_exec, set_plain)) in special.iter().enumerate() {
        let shift = 6 - 3 * i as u32;
        let triplet = (mode >> shift) & 0o7;
        out.push(if triplet & 4 != 0 { 'r' } else { '-' });
        out.push(if triplet & 2 != 0 { 'w' } else { '-' });
        let exec = triplet & 1 != 0;
        out.push(match (mode & bit != 0, exec) {
            (true, true) => *set_exec,
            (true, false) => *set_plain,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_permission_strings() {
        assert_eq!(permissions_string(libc::S_IFREG | 0o755), "-rwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFDIR | 0o1777), "drwxrwxrwt");
        assert_eq!(permissions_string(libc::S_IFREG | 0o4644), "-rwSr--r--");
        assert_eq!(permissions_string(libc::S_IFLNK | 0o777), "lrwxrwxrwx");
    }
}
