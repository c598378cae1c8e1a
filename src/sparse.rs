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

/// What a pack starts with: names the format and its version.
const PACK_MAGIC: &[u8; 8] = b"WRNPACK1";
/// Marks the end of a pack's extents (no extent starts there).
const PACK_END: u64 = u64::MAX;
/// The longest label a pack may carry.
const PACK_LABEL_MAX: u64 = 4096;

/// Writes `input` as a *pack*: one stream holding its apparent size and only the runs of pages
/// that hold data, so a mostly empty disk or memory file travels (to the template store and
/// back) at the cost of what the guest wrote. `label` goes into the header: it names what the
/// pack is of and makes two packs of identical files different objects. `stop` is asked
/// between chunks; when it says so the pack ends with an `Interrupted` error. Returns the bytes
/// written.
///
/// Layout (integers little-endian u64): magic, label length, label, apparent size, then per
/// extent its offset, length and bytes, and last an extent at offset `u64::MAX` of length 0.
pub fn pack(
    input: &File,
    output: &mut impl io::Write,
    label: &str,
    stop: &dyn Fn() -> bool,
) -> io::Result<u64> {
    let len = input.metadata()?.len();
    let mut written = 0u64;
    let mut put = |output: &mut dyn io::Write, bytes: &[u8]| -> io::Result<()> {
        output.write_all(bytes)?;
        written += bytes.len() as u64;
        Ok(())
    };
    put(output, PACK_MAGIC)?;
    put(output, &(label.len() as u64).to_le_bytes())?;
    put(output, label.as_bytes())?;
    put(output, &len.to_le_bytes())?;
    let mut buffer = vec![0u8; SCAN_CHUNK];
    let mut position = 0i64;
    let end = i64::try_from(len).map_err(io::Error::other)?;
    while position < end {
        let data = match lseek(input, position, Whence::SeekData) {
            Ok(offset) => offset,
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let extent_end = lseek(input, data, Whence::SeekHole)?.min(end);
        let mut offset = data;
        while offset < extent_end {
            if stop() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "pack stopped"));
            }
            let want = usize::try_from((extent_end - offset).min(SCAN_CHUNK as i64))
                .map_err(io::Error::other)?;
            let read = input.read_at(&mut buffer[..want], u64::try_from(offset).unwrap_or(0))?;
            if read == 0 {
                break;
            }
            // Runs of pages with data, each written as one extent; zero pages are left out.
            let mut run: Option<usize> = None;
            let pages = buffer[..read].chunks(PAGE).enumerate();
            for (index, page) in pages {
                let zero = page.iter().all(|&b| b == 0);
                match (zero, run) {
                    (false, None) => run = Some(index * PAGE),
                    (true, Some(start)) => {
                        let bytes = &buffer[start..index * PAGE];
                        put(output, &(offset as u64 + start as u64).to_le_bytes())?;
                        put(output, &(bytes.len() as u64).to_le_bytes())?;
                        put(output, bytes)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(start) = run {
                let bytes = &buffer[start..read];
                put(output, &(offset as u64 + start as u64).to_le_bytes())?;
                put(output, &(bytes.len() as u64).to_le_bytes())?;
                put(output, bytes)?;
            }
            offset += read as i64;
        }
        position = extent_end;
    }
    put(output, &PACK_END.to_le_bytes())?;
    put(output, &0u64.to_le_bytes())?;
    Ok(written)
}

/// Writes the file a [`pack`] holds into the empty file `output` (holes where it had none of
/// its pages) and returns the pack's label. A pack that is truncated, damaged or names extents
/// outside its size is an `InvalidData` error.
pub fn unpack(input: &mut impl io::Read, output: &File) -> io::Result<String> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("pack: {what}"));
    let mut word = [0u8; 8];
    let mut next = |input: &mut dyn io::Read| -> io::Result<u64> {
        input.read_exact(&mut word)?;
        Ok(u64::from_le_bytes(word))
    };
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic)?;
    if &magic != PACK_MAGIC {
        return Err(invalid("not a pack (wrong magic)"));
    }
    let label_len = next(input)?;
    if label_len > PACK_LABEL_MAX {
        return Err(invalid("label too long"));
    }
    let mut label = vec![0u8; label_len as usize];
    input.read_exact(&mut label)?;
    let label = String::from_utf8(label).map_err(|_| invalid("label is not UTF-8"))?;
    let len = next(input)?;
    output.set_len(len)?;
    let mut buffer = vec![0u8; SCAN_CHUNK];
    let mut previous_end = 0u64;
    loop {
        let offset = next(input)?;
        let mut left = next(input)?;
        if offset == PACK_END {
            return if left == 0 {
                Ok(label)
            } else {
                Err(invalid("malformed end"))
            };
        }
        let fits = offset
            .checked_add(left)
            .is_some_and(|extent_end| offset >= previous_end && extent_end <= len);
        if !fits {
            return Err(invalid("extent out of order or beyond the file's size"));
        }
        let mut at = offset;
        while left > 0 {
            let want = buffer
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            input.read_exact(&mut buffer[..want])?;
            output.write_all_at(&buffer[..want], at)?;
            at += want as u64;
            left -= want as u64;
        }
        previous_end = at;
    }
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

    #[test]
    fn a_pack_carries_data_pages_only_and_unpacks_to_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        let file = File::create(&source).unwrap();
        file.set_len(16 << 20).unwrap();
        file.write_at(b"start", 0).unwrap();
        file.write_at(&[0u8; 3 * PAGE], 4 * PAGE as u64).unwrap();
        file.write_at(&[7u8; 2 * PAGE], (3 << 20) - PAGE as u64)
            .unwrap();
        file.set_len((16 << 20) + 100).unwrap();
        file.write_at(b"tail", 16 << 20).unwrap();
        drop(file);

        let mut packed = Vec::new();
        let written = pack(
            &File::open(&source).unwrap(),
            &mut packed,
            "sandbox x memory",
            &|| false,
        )
        .unwrap();
        assert_eq!(written, packed.len() as u64);
        assert!(packed.len() < 4 * PAGE + 200, "{} bytes", packed.len());

        let target = dir.path().join("target");
        let output = File::create(&target).unwrap();
        let label = unpack(&mut packed.as_slice(), &output).unwrap();
        assert_eq!(label, "sandbox x memory");
        assert!(std::fs::read(&target).unwrap() == std::fs::read(&source).unwrap());
        assert!(allocated(&output) < 1 << 20);
    }

    #[test]
    fn a_damaged_pack_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        std::fs::write(&source, [1u8; 3 * PAGE]).unwrap();
        let mut packed = Vec::new();
        pack(&File::open(&source).unwrap(), &mut packed, "l", &|| false).unwrap();
        let error = pack(&File::open(&source).unwrap(), &mut Vec::new(), "l", &|| {
            true
        })
        .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::Interrupted);
        let output = File::create(dir.path().join("target")).unwrap();

        let truncated = &packed[..packed.len() - 20];
        assert!(unpack(&mut &truncated[..], &output).is_err());
        let mut wrong_magic = packed.clone();
        wrong_magic[0] = b'X';
        let error = unpack(&mut wrong_magic.as_slice(), &output).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        // The file's size shrunk under its one extent.
        let mut too_small = packed.clone();
        let size_at = 8 + 8 + 1;
        too_small[size_at..size_at + 8].copy_from_slice(&(PAGE as u64).to_le_bytes());
        let error = unpack(&mut too_small.as_slice(), &output).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
