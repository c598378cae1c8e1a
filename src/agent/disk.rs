//! Per-sandbox writable disks. A sandbox boots with the shared template image read-only as
//! `/dev/vda` and its own sparse ext4 "upper" file as `/dev/vdb`; the guest's initramfs stacks
//! them with overlayfs. Creating an upper never reads or copies the template, so its cost does
//! not grow with the template, and a fresh ext4 on a sparse file writes only a few MiB of
//! metadata whatever its size.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

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

/// Creates a sparse ext4 file of `size_bytes` at `path` (its directory is created when missing).
/// Refuses to overwrite an existing file; on failure nothing is left behind.
pub async fn create_upper(path: &Path, size_bytes: u64) -> Result<(), DiskError> {
    if size_bytes < MIN_UPPER_SIZE_BYTES {
        return Err(DiskError::TooSmall {
            size: size_bytes,
            min: MIN_UPPER_SIZE_BYTES,
        });
    }
    let create_error = |source| DiskError::Create {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(create_error)?;
    }
    let file = std::fs::OpenOptions::new()
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
        })?;
    // Round down to whole 4 KiB blocks so the filesystem covers the file exactly.
    let result = match file.set_len(size_bytes & !4095) {
        Ok(()) => format_ext4(path).await,
        Err(e) => Err(create_error(e)),
    };
    drop(file);
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
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
