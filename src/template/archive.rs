//! A build's uploaded archive (tar, tar.gz or zip, told apart by their first bytes), checked
//! entry by entry and rewritten as one plain tar for the build capsule to unpack. Checking on the
//! control plane means the guest only ever sees entries that stay inside the build context:
//! relative paths without `..`, regular files, directories and symlinks that resolve inside it,
//! and no device nodes. The archive is read from and written to files, never held in memory.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive is not a tar, tar.gz or zip file")]
    UnknownFormat,
    #[error("archive entry `{path}`: {reason}")]
    Refused { path: String, reason: String },
    #[error("the archive unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("the archive is damaged: {0}")]
    Damaged(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Tar,
    TarGz,
    Zip,
}

/// What the rewritten tar holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub entries: u64,
    pub bytes: u64,
}

pub fn sniff(path: &Path) -> Result<ArchiveKind, ArchiveError> {
    let mut head = [0u8; 512];
    let mut file = File::open(path)?;
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    let head = &head[..read];
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(ArchiveKind::TarGz)
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Ok(ArchiveKind::Zip)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Ok(ArchiveKind::Tar)
    } else {
        Err(ArchiveError::UnknownFormat)
    }
}

/// Checks every entry of the archive at `source` and writes them as a plain tar to `out`. Stops
/// at the first refused entry, or once the unpacked size passes `limit`.
pub fn rewrite_as_tar(source: &Path, out: &Path, limit: u64) -> Result<Summary, ArchiveError> {
    let kind = sniff(source)?;
    let mut rewriter = Rewriter {
        builder: tar::Builder::new(std::io::BufWriter::new(File::create(out)?)),
        seen_links: HashSet::new(),
        summary: Summary {
            entries: 0,
            bytes: 0,
        },
        limit,
    };
    match kind {
        ArchiveKind::Tar => rewriter.tar(BufReader::new(File::open(source)?))?,
        ArchiveKind::TarGz => rewriter.tar(flate2::read::GzDecoder::new(BufReader::new(
            File::open(source)?,
        )))?,
        ArchiveKind::Zip => rewriter.zip(File::open(source)?)?,
    }
    let summary = rewriter.summary;
    rewriter.builder.into_inner()?.flush()?;
    Ok(summary)
}

struct Rewriter<W: Write> {
    builder: tar::Builder<W>,
    /// Symlinks written so far: no later entry may pass through one.
    seen_links: HashSet<PathBuf>,
    summary: Summary,
    limit: u64,
}

enum Kind {
    File,
    Dir,
    Symlink(PathBuf),
}

impl<W: Write> Rewriter<W> {
    fn tar(&mut self, reader: impl Read) -> Result<(), ArchiveError> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive
            .entries()
            .map_err(|e| ArchiveError::Damaged(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| ArchiveError::Damaged(e.to_string()))?;
            let raw = entry
                .path()
                .map_err(|e| ArchiveError::Damaged(e.to_string()))?
                .into_owned();
            let header = entry.header();
            let kind = match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => Kind::Symlink(
                    entry
                        .link_name()
                        .map_err(|e| ArchiveError::Damaged(e.to_string()))?
                        .ok_or_else(|| refused(&raw, "a symlink without a target"))?
                        .into_owned(),
                ),
                // Metadata entries of pax and GNU archives, read by the tar crate itself.
                tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink => continue,
                tar::EntryType::Link => {
                    return Err(refused(
                        &raw,
                        "hard links are not supported; archive the file",
                    ))
                }
                tar::EntryType::Char | tar::EntryType::Block => {
                    return Err(refused(&raw, "device nodes are refused"))
                }
                other => {
                    return Err(refused(
                        &raw,
                        &format!("entries of type {other:?} are refused"),
                    ))
                }
            };
            let mode = header.mode().unwrap_or(0o644) & 0o7777;
            let size = header.size().unwrap_or(0);
            self.add(&raw, kind, mode, size, &mut entry)?;
        }
        Ok(())
    }

    fn zip(&mut self, file: File) -> Result<(), ArchiveError> {
        let mut archive =
            zip::ZipArchive::new(file).map_err(|e| ArchiveError::Damaged(e.to_string()))?;
        for index in 0..archive.len() {
            let mut entry = archive
                .by_index(index)
                .map_err(|e| ArchiveError::Damaged(e.to_string()))?;
            let raw = PathBuf::from(
                entry
                    .name()
                    .map_err(|e| ArchiveError::Damaged(e.to_string()))?
                    .into_owned(),
            );
            let mode = entry.unix_mode().unwrap_or(0o644);
            let kind = if entry.is_dir() {
                Kind::Dir
            } else if entry.is_symlink() {
                let mut target = String::new();
                entry
                    .read_to_string(&mut target)
                    .map_err(|e| ArchiveError::Damaged(e.to_string()))?;
                Kind::Symlink(PathBuf::from(target))
            } else if mode & 0o170000 == 0 || mode & 0o170000 == 0o100000 {
                Kind::File
            } else {
                return Err(refused(
                    &raw,
                    "only files, directories and symlinks are accepted",
                ));
            };
            let size = entry.size();
            self.add(&raw, kind, mode & 0o7777, size, &mut entry)?;
        }
        Ok(())
    }

    fn add(
        &mut self,
        raw: &Path,
        kind: Kind,
        mode: u32,
        size: u64,
        data: &mut impl Read,
    ) -> Result<(), ArchiveError> {
        let path = entry_name(raw)?;
        if path.as_os_str().is_empty() {
            return Ok(());
        }
        if let Some(link) = path
            .ancestors()
            .skip(1)
            .find(|parent| self.seen_links.contains(*parent))
        {
            return Err(refused(
                raw,
                &format!(
                    "it would be written through the symlink `{}`",
                    link.display()
                ),
            ));
        }
        self.summary.entries += 1;
        if self.summary.entries > MAX_ENTRIES {
            return Err(ArchiveError::TooManyEntries { limit: MAX_ENTRIES });
        }
        // Headers count too: a million empty files would otherwise rewrite to gigabytes.
        let header_bytes = 512 + path.as_os_str().len() as u64;
        self.summary.bytes = self
            .summary
            .bytes
            .saturating_add(size)
            .saturating_add(header_bytes);
        if self.summary.bytes > self.limit {
            return Err(ArchiveError::TooLarge { limit: self.limit });
        }
        let mut header = tar::Header::new_gnu();
        header.set_mode(mode);
        header.set_mtime(0);
        match kind {
            Kind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                self.builder
                    .append_data(&mut header, &path, std::io::empty())?;
            }
            Kind::Symlink(target) => {
                let resolved = path.parent().unwrap_or(Path::new("")).join(&target);
                if target.is_absolute() || !stays_inside(&resolved) {
                    return Err(refused(
                        raw,
                        &format!("its target `{}` is outside the archive", target.display()),
                    ));
                }
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                self.builder.append_link(&mut header, &path, &target)?;
                self.seen_links.insert(path);
            }
            Kind::File => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(size);
                // An entry shorter than it claims would leave the tar misaligned, its later bytes
                // read as unchecked headers; the count catches it.
                let mut exact = Counted {
                    inner: data.take(size),
                    read: 0,
                };
                self.builder.append_data(&mut header, &path, &mut exact)?;
                if exact.read != size {
                    return Err(refused(
                        raw,
                        &format!("it holds {} of the {size} bytes it claims", exact.read),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Entries per archive.
const MAX_ENTRIES: u64 = 1_000_000;

struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

fn refused(path: &Path, reason: &str) -> ArchiveError {
    ArchiveError::Refused {
        path: path.display().to_string(),
        reason: reason.to_owned(),
    }
}

/// An entry name as a normal relative path; absolute names and `..` are refused (tools
/// disagree on what a `..` in a name means, so it is refused even where it stays inside).
fn entry_name(path: &Path) -> Result<PathBuf, ArchiveError> {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(refused(path, "`..` in entry names is refused")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(path, "absolute paths are refused"))
            }
        }
    }
    Ok(clean)
}

/// Whether a symlink's relative target, resolved from the link's directory, stays inside.
fn stays_inside(resolved: &Path) -> bool {
    let mut depth = 0usize;
    for component in resolved.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(up) => depth = up,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes entries into a test archive.
    type Build<'a> = dyn Fn(&mut tar::Builder<File>) + 'a;

    fn tar_with(dir: &Path, build: impl FnOnce(&mut tar::Builder<File>)) -> PathBuf {
        let path = dir.join("in.tar");
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        build(&mut builder);
        builder.into_inner().unwrap().flush().unwrap();
        path
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(0o644);
        header
    }

    /// Names as the rewritten tar holds them.
    fn names(tar: &Path) -> Vec<String> {
        tar::Archive::new(File::open(tar).unwrap())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn tar_tar_gz_and_zip_become_one_checked_tar() {
        let dir = tempfile::tempdir().unwrap();
        let source = tar_with(dir.path(), |b| {
            b.append_data(
                &mut header(tar::EntryType::Directory, 0),
                "./app/",
                std::io::empty(),
            )
            .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 5),
                "app/main.py",
                &b"print"[..],
            )
            .unwrap();
            b.append_link(&mut header(tar::EntryType::Symlink, 0), "app/lib", "../app")
                .unwrap();
        });
        let out = dir.path().join("out.tar");
        let summary = rewrite_as_tar(&source, &out, 1 << 20).unwrap();
        assert_eq!(summary.entries, 3);
        let entry_names = ["app", "app/main.py", "app/lib"];
        let headers: u64 = entry_names.iter().map(|n| 512 + n.len() as u64).sum();
        assert_eq!(summary.bytes, 5 + headers, "data and headers both count");
        assert_eq!(names(&out), ["app", "app/main.py", "app/lib"]);

        let gz = dir.path().join("in.tar.gz");
        let mut encoder =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        std::io::copy(&mut File::open(&source).unwrap(), &mut encoder).unwrap();
        encoder.finish().unwrap();
        assert_eq!(sniff(&gz).unwrap(), ArchiveKind::TarGz);
        rewrite_as_tar(&gz, &out, 1 << 20).unwrap();
        assert_eq!(names(&out), ["app", "app/main.py", "app/lib"]);

        let zipped = dir.path().join("in.zip");
        let mut writer = zip::ZipWriter::new(File::create(&zipped).unwrap());
        let options = zip::write::SimpleFileOptions::default();
        writer.add_directory("app/", options).unwrap();
        writer.start_file("app/main.py", options).unwrap();
        writer.write_all(b"print").unwrap();
        writer.finish().unwrap();
        assert_eq!(sniff(&zipped).unwrap(), ArchiveKind::Zip);
        let summary = rewrite_as_tar(&zipped, &out, 1 << 20).unwrap();
        assert_eq!(summary.entries, 2);
        assert_eq!(names(&out), ["app", "app/main.py"]);
    }

    #[test]
    fn escaping_entries_devices_and_oversize_archives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.tar");
        let refusal = |build: &Build<'_>| {
            let source = tar_with(dir.path(), |b| build(b));
            rewrite_as_tar(&source, &out, 1 << 20)
                .unwrap_err()
                .to_string()
        };
        // The tar crate refuses to write `..` and absolute names, so those headers are raw.
        let raw_name = |b: &mut tar::Builder<File>, name: &str| {
            let mut h = header(tar::EntryType::Regular, 1);
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
        };
        let cases: [(&Build<'_>, &str); 6] = [
            (&|b| raw_name(b, "/etc/passwd"), "absolute paths"),
            (&|b| raw_name(b, "a/../../x"), "`..`"),
            (
                &|b| {
                    let mut h = header(tar::EntryType::Char, 0);
                    h.set_device_major(1).unwrap();
                    b.append_data(&mut h, "null", std::io::empty()).unwrap();
                },
                "device nodes",
            ),
            (
                &|b| {
                    b.append_link(&mut header(tar::EntryType::Symlink, 0), "up", "../../etc")
                        .unwrap();
                },
                "outside the archive",
            ),
            (
                &|b| {
                    b.append_link(&mut header(tar::EntryType::Symlink, 0), "abs", "/etc")
                        .unwrap();
                },
                "outside the archive",
            ),
            (
                &|b| {
                    b.append_link(&mut header(tar::EntryType::Symlink, 0), "d", "sub")
                        .unwrap();
                    b.append_data(&mut header(tar::EntryType::Regular, 1), "d/x", &b"x"[..])
                        .unwrap();
                },
                "through the symlink",
            ),
        ];
        for (build, needle) in cases {
            let message = refusal(build);
            assert!(message.contains(needle), "{needle}: {message}");
        }
        let big = tar_with(dir.path(), |b| {
            b.append_data(
                &mut header(tar::EntryType::Regular, 4096),
                "big",
                &[0u8; 4096][..],
            )
            .unwrap();
        });
        assert!(matches!(
            rewrite_as_tar(&big, &out, 1000),
            Err(ArchiveError::TooLarge { limit: 1000 })
        ));
        std::fs::write(dir.path().join("text"), b"hello").unwrap();
        assert!(matches!(
            rewrite_as_tar(&dir.path().join("text"), &out, 1000),
            Err(ArchiveError::UnknownFormat)
        ));
    }
}
