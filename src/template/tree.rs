//! A host directory holding an untrusted guest root file system, worked on through file
//! descriptors only. The importer runs as root and an image is arbitrary input, so nothing an
//! image put in the tree may send a read or a write outside it: [`Tree::walk`] refuses symlinks,
//! [`Tree::resolve`] resolves them as the guest would, with the tree as `/`, and every final
//! component is opened, created or removed without following a symlink.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Symlinks followed while resolving one path: the kernel's own limit.
const MAX_SYMLINK_HOPS: usize = 40;

/// What a directory entry is, as `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    Symlink,
    File { mode: u32 },
    Other,
}

impl Kind {
    fn of(mode: u32) -> Self {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Self::Dir,
            libc::S_IFLNK => Self::Symlink,
            libc::S_IFREG => Self::File {
                mode: mode & 0o7777,
            },
            _ => Self::Other,
        }
    }
}

#[derive(Debug)]
pub(crate) enum WalkError {
    /// The component ending at `at` is a symlink.
    Symlink {
        at: PathBuf,
    },
    /// The component ending at `at` is neither a directory nor a symlink.
    NotADirectory {
        at: PathBuf,
    },
    Io(io::Error),
}

impl From<WalkError> for io::Error {
    fn from(error: WalkError) -> Self {
        match error {
            WalkError::Symlink { .. } => Errno::ELOOP.into(),
            WalkError::NotADirectory { .. } => Errno::ENOTDIR.into(),
            WalkError::Io(e) => e,
        }
    }
}

/// An open tree root.
#[derive(Debug)]
pub(crate) struct Tree {
    root: OwnedFd,
}

impl Tree {
    /// The directory at `path`, which the caller created or trusts (it may itself be reached
    /// through symlinks on the host; nothing below it is).
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let root = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { root })
    }

    /// The directory at `dirs` (components relative to the root), reached without following a
    /// symlink. Missing directories are created (mode 0755, the caller's owner) with `create`,
    /// and are `None` without it.
    pub(crate) fn walk(
        &self,
        dirs: &[OsString],
        create: bool,
    ) -> Result<Option<OwnedFd>, WalkError> {
        let mut fd = self.root.try_clone().map_err(WalkError::Io)?;
        for (depth, name) in dirs.iter().enumerate() {
            fd = match open_dir(&fd, name) {
                Ok(next) => next,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(&fd, name.as_os_str(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(WalkError::Io(e.into())),
                    }
                    let next = open_dir(&fd, name).map_err(|e| WalkError::Io(e.into()))?;
                    // The umask must not decide the mode.
                    nix::sys::stat::fchmod(&next, Mode::from_bits_truncate(0o755))
                        .map_err(|e| WalkError::Io(e.into()))?;
                    next
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let at = dirs[..=depth].iter().collect();
                    return Err(match kind(&fd, name) {
                        Ok(Some(Kind::Symlink)) => WalkError::Symlink { at },
                        Ok(_) => WalkError::NotADirectory { at },
                        Err(e) => WalkError::Io(e),
                    });
                }
                Err(e) => return Err(WalkError::Io(e.into())),
            };
        }
        Ok(Some(fd))
    }

    /// The tree's components for the guest path `path` once every symlink on the way is
    /// resolved as the guest kernel would with the tree as `/`: an absolute target starts again
    /// at the tree's root and `..` stops there. The last component is followed only with
    /// `follow_last`; components that do not exist are taken as they are.
    pub(crate) fn resolve(&self, path: &Path, follow_last: bool) -> io::Result<Vec<OsString>> {
        let mut resolved: Vec<OsString> = Vec::new();
        let mut pending = steps(path);
        let mut hops = 0;
        // Below a missing component nothing exists, so nothing more can be a symlink: how many
        // resolved components exist, once one is missing.
        let mut existing: Option<usize> = None;
        while let Some(step) = pending.pop() {
            let name = match step {
                Step::Up => {
                    resolved.pop();
                    if existing.is_some_and(|n| resolved.len() <= n) {
                        existing = None;
                    }
                    continue;
                }
                Step::Name(name) => name,
            };
            if existing.is_some() || (pending.is_empty() && !follow_last) {
                resolved.push(name);
                continue;
            }
            let Some(dir) = self.walk(&resolved, false)? else {
                existing = Some(resolved.len());
                resolved.push(name);
                continue;
            };
            match kind(&dir, &name)? {
                Some(Kind::Symlink) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(Errno::ELOOP.into());
                    }
                    let target = readlinkat(&dir, name.as_os_str())?;
                    if target.as_bytes().starts_with(b"/") {
                        resolved.clear();
                    }
                    pending.extend(steps(Path::new(&target)));
                }
                None => {
                    existing = Some(resolved.len());
                    resolved.push(name);
                }
                Some(_) => resolved.push(name),
            }
        }
        Ok(resolved)
    }
}

enum Step {
    Up,
    Name(OsString),
}

/// `path`'s steps, last first (a stack).
fn steps(path: &Path) -> Vec<Step> {
    let mut steps: Vec<Step> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(Step::Name(name.to_owned())),
            Component::ParentDir => Some(Step::Up),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    steps.reverse();
    steps
}

/// Opens the directory `name` in `dir`, failing (`ELOOP` or `ENOTDIR`) on a symlink.
pub(crate) fn open_dir(dir: &impl AsFd, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// What `name` in `dir` is, without following a symlink; `None` when there is nothing.
pub(crate) fn kind(dir: &impl AsFd, name: &OsStr) -> io::Result<Option<Kind>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(Kind::of(stat.st_mode))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The entries of `dir` but `.` and `..`.
pub(crate) fn list(dir: &OwnedFd) -> io::Result<Vec<(OsString, Kind)>> {
    let mut listing = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut entries = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        let kind = match entry.file_type() {
            Some(Type::Directory) => Kind::Dir,
            Some(Type::Symlink) => Kind::Symlink,
            // Regular files need their mode, and some file systems do not report types.
            _ => match kind(dir, name)? {
                Some(kind) => kind,
                None => continue,
            },
        };
        entries.push((name.to_owned(), kind));
    }
    Ok(entries)
}

/// Removes `name` from `dir` and, for a directory, everything below it; nothing there is fine.
/// Symlinks are removed, never followed.
pub(crate) fn remove_all(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    match kind(dir, name)? {
        None => return Ok(()),
        Some(Kind::Dir) => {}
        Some(_) => return Ok(unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?),
    }
    // Depth first without recursion: the depth is the image's to choose.
    struct Frame {
        fd: OwnedFd,
        name: OsString,
        subdirs: Vec<OsString>,
    }
    let open = |parent: &OwnedFd, name: &OsStr| -> io::Result<Frame> {
        let fd = open_dir(parent, name)?;
        let mut subdirs = Vec::new();
        for (child, kind) in list(&fd)? {
            if kind == Kind::Dir {
                subdirs.push(child);
            } else {
                unlinkat(&fd, child.as_os_str(), UnlinkatFlags::NoRemoveDir)?;
            }
        }
        Ok(Frame {
            fd,
            name: name.to_owned(),
            subdirs,
        })
    };
    let mut stack = vec![open(dir, name)?];
    while let Some(top) = stack.last_mut() {
        if let Some(child) = top.subdirs.pop() {
            let frame = open(&top.fd, &child)?;
            stack.push(frame);
            continue;
        }
        let Some(done) = stack.pop() else { break };
        let parent = stack.last().map_or(dir, |frame| &frame.fd);
        unlinkat(parent, done.name.as_os_str(), UnlinkatFlags::RemoveDir)?;
    }
    Ok(())
}

/// Creates `name` in `dir` as a new, empty regular file (mode 0600 until the caller sets it),
/// replacing whatever was there; a symlink there is replaced, not followed.
pub(crate) fn create_file(dir: &OwnedFd, name: &OsStr) -> io::Result<File> {
    remove_all(dir, name)?;
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn names(components: &[OsString]) -> String {
        components
            .iter()
            .map(|c| c.to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn resolve_keeps_symlinks_inside_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        symlink("/usr", root.join("abs")).unwrap();
        symlink("../../../../..", root.join("usr/up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        let tree = Tree::open(root).unwrap();
        let resolve = |path: &str, follow| names(&tree.resolve(Path::new(path), follow).unwrap());
        assert_eq!(resolve("/bin/bash", true), "usr/bin/bash");
        assert_eq!(resolve("/abs/bin", true), "usr/bin");
        assert_eq!(resolve("/usr/up/etc/passwd", true), "etc/passwd");
        assert_eq!(resolve("/bin", false), "bin");
        assert_eq!(resolve("/missing/../bin/x", true), "usr/bin/x");
        let error = tree.resolve(Path::new("/loop/x"), true).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn walk_refuses_symlinks_and_creates_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("real")).unwrap();
        symlink("real", root.join("link")).unwrap();
        std::fs::write(root.join("file"), b"").unwrap();
        let tree = Tree::open(root).unwrap();
        let path = |p: &str| -> Vec<OsString> { p.split('/').map(OsString::from).collect() };
        assert!(tree.walk(&path("real"), false).unwrap().is_some());
        assert!(tree.walk(&path("real/a/b"), false).unwrap().is_none());
        assert!(tree.walk(&path("real/a/b"), true).unwrap().is_some());
        assert!(root.join("real/a/b").is_dir());
        match tree.walk(&path("link/a"), true) {
            Err(WalkError::Symlink { at }) => assert_eq!(at, Path::new("link")),
            other => panic!("{other:?}"),
        }
        match tree.walk(&path("file/a"), true) {
            Err(WalkError::NotADirectory { at }) => assert_eq!(at, Path::new("file")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn remove_all_removes_links_not_their_targets() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("d/e/f")).unwrap();
        std::fs::write(root.join("d/e/f/g"), b"").unwrap();
        symlink(outside.path(), root.join("d/e/out")).unwrap();
        let tree = Tree::open(root).unwrap();
        let top = tree.walk(&[], false).unwrap().unwrap();
        remove_all(&top, OsStr::new("d")).unwrap();
        remove_all(&top, OsStr::new("absent")).unwrap();
        assert!(!root.join("d").exists());
        assert!(outside.path().join("keep").exists());
    }
}
