//! Per-sandbox writable disks. A sandbox boots with the shared template image read-only as
//! `/dev/vda` and its own sparse ext4 "upper" file as `/dev/vdb`; the guest's initramfs stacks
//! them with overlayfs. Creating an upper never reads or copies the template, so its cost does
//! not grow with the template, and a fresh ext4 on a sparse file holds only a few MiB of
//! metadata whatever its size.
//!
//! [`UpperDisks`] is the fast path the agent uses: it formats one blank upper per size once and
//! gives each sandbox a sparse copy (a reflink where the filesystem supports it), which is
//! one to two orders of magnitude faster than running mkfs per sandbox (see `benches/agent_host.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::config::Layout;

/// Upper size when a request does not name one (the original's `disk_size_mb` default).
pub const DEFAULT_UPPER_SIZE_BYTES: u64 = 5 << 30;
/// Smallest upper accepted: below this the journal and metadata crowd out the guest's data.
pub const MIN_UPPER_SIZE_BYTES: u64 = 64 << 20;
/// Filesystem label of every upper, so the guest can tell it from the template.
pub const UPPER_LABEL: &str = "wrenn-upper";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk size {size} bytes is below the minimum of {min} bytes")]
    TooSmall { size: u64, min: u64 },
    #[error("disk {path} already exists")]
    AlreadyExists { path: PathBuf },
    #[error("could not create disk {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("could not format disk {path} as ext4: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("could not remove disk {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("could not inspect disk {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
}

/// Checks a requested size and rounds it down to whole 4 KiB blocks, so the filesystem covers
/// the file exactly.
fn upper_size(size_bytes: u64) -> Result<u64, DiskError> {
    if size_bytes < MIN_UPPER_SIZE_BYTES {
        return Err(DiskError::TooSmall {
            size: size_bytes,
            min: MIN_UPPER_SIZE_BYTES,
        });
    }
    Ok(size_bytes & !4095)
}

/// Creates `path` (and its directory when missing), refusing to overwrite an existing file.
fn create_new_file(path: &Path) -> Result<File, DiskError> {
    let create_error = |source| DiskError::Create {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(create_error)?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                DiskError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                create_error(e)
            }
        })
}

/// Creates a sparse ext4 file of `size_bytes` at `path` by running mkfs on it. Refuses to
/// overwrite an existing file; on failure nothing is left behind.
pub async fn create_upper(path: &Path, size_bytes: u64) -> Result<(), DiskError> {
    let size = upper_size(size_bytes)?;
    let file = create_new_file(path)?;
    let result = match file.set_len(size) {
        Ok(()) => format_ext4(path).await,
        Err(source) => Err(DiskError::Create {
            path: path.to_owned(),
            source,
        }),
    };
    drop(file);
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Makes upper disks from cached blanks: one formatted blank per size under
/// [`Layout::blank_uppers_dir`], copied sparsely for each sandbox. Every upper of a size
/// therefore shares one filesystem UUID, which nothing relies on: a guest sees only its own.
#[derive(Debug, Clone)]
pub struct UpperDisks {
    layout: Layout,
}

impl UpperDisks {
    /// Also removes half-written blanks a crash may have left.
    pub fn open(layout: Layout) -> Self {
        if let Ok(entries) = std::fs::read_dir(layout.blank_uppers_dir()) {
            for entry in entries.flatten() {
                if entry
                    .path()
                    .extension()
                    .is_some_and(|ext| ext == STAGING_EXTENSION)
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Self { layout }
    }

    /// Creates the upper disk at `path` (and its directory when missing). Refuses to overwrite
    /// an existing file; on failure nothing is left at `path`.
    pub async fn create(&self, path: &Path, size_bytes: u64) -> Result<(), DiskError> {
        let size = upper_size(size_bytes)?;
        let blank = self.blank(size).await?;
        let target = path.to_owned();
        tokio::task::spawn_blocking(move || copy_sparse(&blank, &target))
            .await
            .map_err(|e| DiskError::Create {
                path: path.to_owned(),
                source: io::Error::other(e),
            })?
    }

    /// The blank of `size` bytes, formatted now if this is the first request for that size.
    /// Concurrent first requests each format a private staging file and rename it into place;
    /// the blanks are interchangeable, so whichever rename lands last is as good as the first.
    async fn blank(&self, size: u64) -> Result<PathBuf, DiskError> {
        let blank = self.layout.blank_upper(size);
        if blank.exists() {
            return Ok(blank);
        }
        let staging = blank.with_extension(format!(
            "{}.{STAGING_EXTENSION}",
            uuid::Uuid::new_v4().simple()
        ));
        create_upper(&staging, size).await?;
        std::fs::rename(&staging, &blank).map_err(|source| {
            let _ = std::fs::remove_file(&staging);
            DiskError::Create {
                path: blank.clone(),
                source,
            }
        })?;
        Ok(blank)
    }
}

const STAGING_EXTENSION: &str = "staging";

/// Copies `source` to a new file `target`, reproducing its holes ([`crate::sparse`]); on
/// failure nothing is left at `target`.
pub fn copy_sparse(source: &Path, target: &Path) -> Result<(), DiskError> {
    let input = File::open(source).map_err(|error| DiskError::Inspect {
        path: source.to_owned(),
        source: error,
    })?;
    let output = create_new_file(target)?;
    let result = crate::sparse::copy_sparse(&input, &output);
    drop(output);
    result.map_err(|error| {
        let _ = std::fs::remove_file(target);
        DiskError::Create {
            path: target.to_owned(),
            source: error,
        }
    })
}

/// Formats the sparse file in place. `mke2fs` punches the whole file before writing and, on a
/// regular file, then knows the inode tables read as zeros: it marks them initialised
/// (ITABLE_ZEROED), so the guest kernel does not start zero-filling them at first mount, which
/// would allocate hundreds of MiB of the upper for nothing. The lazy options keep mkfs from
/// writing zeros itself, which would defeat the sparseness.
async fn format_ext4(path: &Path) -> Result<(), DiskError> {
    let format_error = |detail: String| DiskError::Format {
        path: path.to_owned(),
        detail,
    };
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-L", UPPER_LABEL])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,discard"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format_error(format!("could not run mkfs.ext4: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format_error(format!(
            "mkfs.ext4 {}: {}",
            output.status,
            stderr.trim()
        )))
    }
}

/// Deletes a disk file; a missing file is already removed.
pub fn remove(path: &Path) -> Result<(), DiskError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DiskError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Bytes the disk actually occupies on the host (allocated blocks), as opposed to its size.
pub fn allocated_bytes(path: &Path) -> Result<u64, DiskError> {
    let meta = std::fs::metadata(path).map_err(|source| DiskError::Inspect {
        path: path.to_owned(),
        source,
    })?;
    Ok(meta.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn too_small_and_existing_are_refused_without_side_effects() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("upper.ext4");
        let err = create_upper(&path, 1 << 20).await.unwrap_err();
        assert!(matches!(err, DiskError::TooSmall { .. }), "{err}");
        assert!(!path.exists());
        std::fs::write(&path, b"keep me").unwrap();
        let err = create_upper(&path, DEFAULT_UPPER_SIZE_BYTES)
            .await
            .unwrap_err();
        assert!(matches!(err, DiskError::AlreadyExists { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn remove_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("gone.ext4");
        remove(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        remove(&path).unwrap();
        assert!(!path.exists());
    }
}
