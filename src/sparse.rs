//! Sparse files: copying only a file's data extents, and giving back the blocks of pages that
//! hold nothing but zeros. Disks and guest memory files are mostly holes; both the agent (upper
//! disks) and the VMM layer (snapshot memory) rely on copies and snapshots costing only what
//! the guest wrote.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::{copy_file_range, fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

/// The unit zero runs are found and punched in: a guest page.
const PAGE: usize = 4096;
/// How much is read at once while looking for zero pages.
const SCAN_CHUNK: usize = 1 << 20;

/// `ioctl(FICLONE)`: the whole file as a reflink, on filesystems that share extents.
const FICLONE: libc::Ioctl = 0x4004_9409;

/// Copies `input` into the empty file `output`, reproducing its holes: a reflink where the
/// filesystem shares extents (XFS, btrfs), else only the data extents, with
/// `copy_file_range`, which stays in the kernel.
pub fn copy_sparse(input: &File, output: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument and touches no memory.
    if unsafe { libc::ioctl(output.as_raw_fd(), FICLONE, input.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let len = input.metadata()?.len();
    output.set_len(len)?;
    let len = i64::try_from(len).map_err(io::Error::other)?;
    let mut position = 0;
    while position < len {
        let data = match lseek(input, position, Whence::SeekData) {
            Ok(offset) => offset,
            // No data after `position`: the rest is a hole, already there from set_len.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(input, data, Whence::SeekHole)?;
        let (mut offset_in, mut offset_out) = (data, data);
        while offset_in < hole {
            let chunk = usize::try_from(hole - offset_in).unwrap_or(usize::MAX);
            let copied = copy_file_range(
                input,
                Some(&mut offset_in),
                output,
                Some(&mut offset_out),
                chunk,
            )?;
            if copied == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "source shrank while copying",
                ));
            }
        }
        position = hole;
    }
    Ok(())
}

/// Punches a hole over every run of whole zero pages in `file` (its size stays), and returns
/// the bytes given back. A guest's memory file is mostly pages the guest never wrote or has
/// zeroed: once punched they cost no disk and read back as zeros.
pub fn punch_zero_pages(file: &File) -> io::Result<u64> {
    let len = i64::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
    let mut buffer = vec![0u8; SCAN_CHUNK];
    let mut punched = 0u64;
    let mut position = 0i64;
    while position < len {
        let data = match lseek(file, position, Whence::SeekData) {
            Ok(offset) => offset,
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let extent_end = lseek(file, data, Whence::SeekHole)?;
        let mut offset = data;
        // A zero run is punched as one range once it ends (or the extent does).
        let mut run: Option<(i64, i64)> = None;
        while offset < extent_end {
            let want = usize::try_from((extent_end - offset).min(SCAN_CHUNK as i64))
                .map_err(io::Error::other)?;
            let read = file.read_at(&mut buffer[..want], u64::try_from(offset).unwrap_or(0))?;
            if read == 0 {
                break;
            }
            for (index, page) in buffer[..read].chunks(PAGE).enumerate() {
                let start = offset + (index * PAGE) as i64;
                let end = start + page.len() as i64;
                let zero = page.len() == PAGE && page.iter().all(|&b| b == 0);
                run = match (zero, run) {
                    (true, Some((run_start, _))) => Some((run_start, end)),
                    (true, None) => Some((start, end)),
                    (false, Some(range)) => {
                        punched += punch(file, range)?;
                        None
                    }
                    (false, None) => None,
                };
            }
            offset += read as i64;
        }
        if let Some(range) = run {
            punched += punch(file, range)?;
        }
        position = extent_end;
    }
    Ok(punched)
}

fn punch(file: &File, (start, end): (i64, i64)) -> io::Result<u64> {
    fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        start,
        end - start,
    )?;
    Ok(u64::try_from(end - start).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn allocated(file: &File) -> u64 {
        file.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn zero_pages_are_punched_and_data_pages_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("memory"))
            .unwrap();
        // Written zeros (allocated), then data, then more zeros, then a trailing half page.
        let mut content = vec![0u8; 64 * PAGE];
        content[10 * PAGE + 7] = 1;
        content[40 * PAGE..41 * PAGE].fill(0xAB);
        content.extend_from_slice(&[0u8; PAGE / 2]);
        file.write_all(&content).unwrap();
        file.sync_all().unwrap();
        assert!(allocated(&file) >= content.len() as u64 - PAGE as u64);

        let punched = punch_zero_pages(&file).unwrap();
        assert_eq!(punched, 62 * PAGE as u64);
        assert_eq!(file.metadata().unwrap().len(), content.len() as u64);
        assert!(allocated(&file) <= 4 * PAGE as u64, "{}", allocated(&file));
        let mut back = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut back).unwrap();
        assert!(back == content, "the content changed");
        assert_eq!(punch_zero_pages(&file).unwrap(), 0);
    }

    #[test]
    fn a_sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        let target = dir.path().join("target");
        let file = File::create(&source).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_at(b"start", 0).unwrap();
        file.write_at(b"middle", 32 << 20).unwrap();
        drop(file);
        let input = File::open(&source).unwrap();
        let output = File::create(&target).unwrap();
        copy_sparse(&input, &output).unwrap();
        let copied = std::fs::read(&target).unwrap();
        assert_eq!(copied.len(), 64 << 20);
        assert_eq!(&copied[..5], b"start");
        assert_eq!(&copied[32 << 20..(32 << 20) + 6], b"middle");
        assert!(allocated(&output) < 1 << 20);
    }
}
