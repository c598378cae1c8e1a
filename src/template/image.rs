//! Template images from a directory tree: what every image needs besides its userland (the
//! accounts, the guest files envd expects, the wrenn binary and the template's settings:
//! [`finish_tree`]), the ext4 image itself ([`make_ext4`]), and a container image archive's whole
//! import into `images/<name>/` ([`import`]). Ports of rootfs/lib.sh's `install_accounts`,
//! `install_guest_files`, `make_ext4` and `write_meta`, for trees whose contents came from an
//! untrusted image: every path is resolved inside the tree, never through a host symlink.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Instant;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fchmod, Mode};
use nix::unistd::{fchown, Gid, Uid};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::oci::{self, ImageConfig, ImportProgress, OciError, UnpackLimits};
use super::tree::{self, Kind, Tree};
use super::TemplateName;
use crate::envd::api::{ProcessSpec, StartRequest};
use crate::envd::template::{TemplateConfig, TEMPLATE_CONFIG};
use crate::envd::users::Accounts;

/// rootfs/lib.sh's default `SOURCE_DATE_EPOCH`: the shadow entries' last password change.
const SOURCE_DATE_EPOCH: u64 = 1_704_067_200;
/// Where every image carries the wrenn binary; the initramfs starts it as `wrenn envd`.
pub const WRENN_BINARY: &str = "/usr/local/bin/wrenn";
/// The tag of the process [`template_config`] makes of an image's entrypoint.
pub const ENTRYPOINT_TAG: &str = "entrypoint";
/// The default user [`finish_tree`] adds: `user`, 1000:1000.
const USER_ID: u32 = 1000;
/// Largest account file (`/etc/passwd`, ...) read from an image.
const MAX_ACCOUNT_FILE_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Unpack(#[from] OciError),
    #[error("could not {action} `{path}` in the tree: {source}")]
    Tree {
        action: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("`{path}` in the tree is not {wanted}")]
    NotA { path: String, wanted: &'static str },
    #[error("the image's user `{user}` has no account in its /etc/passwd")]
    UnknownUser { user: String },
    #[error("could not run {tool}: {source}")]
    Spawn {
        tool: &'static str,
        source: io::Error,
    },
    #[error("{tool} failed on {path} ({status}): {output}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        status: ExitStatus,
        output: String,
    },
    #[error("the images directory {path} does not exist")]
    NoImagesDir { path: PathBuf },
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn tree_error<'a>(
    action: &'static str,
    path: &'a str,
) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Tree {
        action,
        path: path.to_owned(),
        source,
    }
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

// ---- The tree -----------------------------------------------------------------------------

/// Makes the unpacked userland at `tree` a Wrenn guest: the accounts root and `user`
/// (1000:1000) where missing, the mount points and files envd expects, the wrenn binary
/// (`wrenn_binary`, trusted, read on the host) as [`WRENN_BINARY`], and `config` as
/// [`TEMPLATE_CONFIG`] unless it is empty. Without `wrenn_binary` the tree must hold its own
/// (a captured Wrenn guest does).
pub fn finish_tree(
    tree: &Path,
    wrenn_binary: Option<&Path>,
    config: &TemplateConfig,
) -> Result<(), ImageError> {
    let tree = Tree::open(tree).map_err(io_error("open the tree", tree))?;
    install_accounts(&tree)?;
    install_guest_files(&tree)?;
    match wrenn_binary {
        Some(wrenn_binary) => {
            let mut binary = File::open(wrenn_binary).map_err(io_error("open", wrenn_binary))?;
            write_file(&tree, WRENN_BINARY, &mut binary, 0o755)?;
        }
        None if is_executable(&tree, WRENN_BINARY) => {}
        None => {
            return Err(ImageError::NotA {
                path: WRENN_BINARY.to_owned(),
                wanted: "an executable file (the wrenn binary envd runs from)",
            })
        }
    }
    if *config != TemplateConfig::default() {
        ensure_dir(&tree, "/etc/wrenn", Some(0o755), None)?;
        let mut json = serde_json::to_vec_pretty(config).expect("template settings serialize");
        json.push(b'\n');
        write_file(&tree, TEMPLATE_CONFIG, &mut json.as_slice(), 0o644)?;
    }
    Ok(())
}

/// Root and the default user in the account files where missing, both locked for password
/// logins (envd starts processes as them directly); their home directories; and, where sudo is
/// installed, sudo for `user` without a password (it has none): the sandbox is the user's own
/// machine.
fn install_accounts(tree: &Tree) -> Result<(), ImageError> {
    let shell = if is_executable(tree, "/bin/bash") {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let days = SOURCE_DATE_EPOCH / 86400;
    ensure_dir(tree, "/etc", None, None)?;
    add_accounts(
        tree,
        "/etc/passwd",
        &[
            ("root", format!("root:x:0:0:root:/root:{shell}")),
            (
                "user",
                format!("user:x:{USER_ID}:{USER_ID}:Wrenn sandbox user:/home/user:{shell}"),
            ),
        ],
        0o644,
    )?;
    add_accounts(
        tree,
        "/etc/group",
        &[
            ("root", "root:x:0:".to_owned()),
            ("user", format!("user:x:{USER_ID}:")),
        ],
        0o644,
    )?;
    add_accounts(
        tree,
        "/etc/shadow",
        &[
            ("root", format!("root:*:{days}:0:99999:7:::")),
            ("user", format!("user:*:{days}:0:99999:7:::")),
        ],
        0o640,
    )?;
    ensure_dir(tree, "/root", Some(0o700), Some((0, 0)))?;
    ensure_dir(tree, "/home/user", Some(0o755), Some((USER_ID, USER_ID)))?;
    if is_executable(tree, "/usr/bin/sudo") {
        ensure_dir(tree, "/etc/sudoers.d", Some(0o750), None)?;
        write_file(
            tree,
            "/etc/sudoers.d/wrenn-user",
            &mut &b"user ALL=(ALL:ALL) NOPASSWD: ALL\n"[..],
            0o440,
        )?;
    }
    Ok(())
}

/// Mount points, sticky temporary directories, and the files envd rewrites at boot (hostname,
/// hosts, resolv.conf) as placeholders. Each file replaces whatever was there, a symlink
/// included (images often link resolv.conf to a resolver's runtime file).
fn install_guest_files(tree: &Tree) -> Result<(), ImageError> {
    for dir in ["/dev", "/proc", "/sys", "/run", "/usr/local/bin"] {
        ensure_dir(tree, dir, Some(0o755), None)?;
    }
    for dir in ["/tmp", "/var/tmp"] {
        ensure_dir(tree, dir, Some(0o1777), None)?;
    }
    write_file(tree, "/etc/hostname", &mut &b"capsule\n"[..], 0o644)?;
    write_file(
        tree,
        "/etc/hosts",
        &mut &b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tcapsule\n"[..],
        0o644,
    )?;
    write_file(
        tree,
        "/etc/resolv.conf",
        &mut &b"# Written by envd at boot from the sandbox network settings.\n"[..],
        0o644,
    )
}

/// Whether the guest path is an executable regular file, symlinks followed inside the tree.
fn is_executable(tree: &Tree, path: &str) -> bool {
    let Ok(resolved) = tree.resolve(Path::new(path), true) else {
        return false;
    };
    let Some((name, parent)) = resolved.split_last() else {
        return false;
    };
    let Ok(Some(dir)) = tree.walk(parent, false) else {
        return false;
    };
    matches!(tree::kind(&dir, name), Ok(Some(Kind::File { mode })) if mode & 0o111 != 0)
}

/// The guest path's parent directory (created where missing) and its last component, with
/// symlinks resolved inside the tree (the last one too with `follow_last`).
fn parent_of(
    tree: &Tree,
    path: &str,
    follow_last: bool,
) -> Result<(OwnedFd, OsString), ImageError> {
    let resolved = tree
        .resolve(Path::new(path), follow_last)
        .map_err(tree_error("resolve", path))?;
    let Some((name, parent)) = resolved.split_last() else {
        return Err(ImageError::NotA {
            path: path.to_owned(),
            wanted: "a file",
        });
    };
    let dir = tree
        .walk(parent, true)
        .map_err(|e| tree_error("create the directory of", path)(e.into()))?
        .ok_or_else(|| {
            tree_error("create the directory of", path)(io::ErrorKind::NotFound.into())
        })?;
    Ok((dir, name.to_owned()))
}

/// `install -d`: the directory and its parents, symlinks followed inside the tree; the mode
/// and owner, when given, are set on it even if it existed.
fn ensure_dir(
    tree: &Tree,
    path: &str,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
) -> Result<(), ImageError> {
    let (parent, name) = parent_of(tree, path, true)?;
    let (dir, created) = match tree::open_dir(&parent, &name) {
        Ok(dir) => (dir, false),
        Err(nix::errno::Errno::ENOENT) => {
            nix::sys::stat::mkdirat(&parent, name.as_os_str(), Mode::from_bits_truncate(0o755))
                .map_err(|e| tree_error("create the directory", path)(e.into()))?;
            let dir = tree::open_dir(&parent, &name)
                .map_err(|e| tree_error("open the directory", path)(e.into()))?;
            (dir, true)
        }
        Err(nix::errno::Errno::ENOTDIR | nix::errno::Errno::ELOOP) => {
            return Err(ImageError::NotA {
                path: path.to_owned(),
                wanted: "a directory",
            })
        }
        Err(e) => return Err(tree_error("open the directory", path)(e.into())),
    };
    if let Some((uid, gid)) = owner {
        fchown(&dir, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| tree_error("set the owner of", path)(e.into()))?;
    }
    // A new directory's mode is 0755 whatever the umask.
    if let Some(mode) = mode.or(created.then_some(0o755)) {
        fchmod(&dir, Mode::from_bits_truncate(mode))
            .map_err(|e| tree_error("set the mode of", path)(e.into()))?;
    }
    Ok(())
}

/// A new regular file at the guest path with `contents`, owned by root, replacing whatever
/// was there (a symlink is replaced, not followed).
fn write_file(
    tree: &Tree,
    path: &str,
    contents: &mut dyn Read,
    mode: u32,
) -> Result<(), ImageError> {
    let (dir, name) = parent_of(tree, path, false)?;
    let mut file = tree::create_file(&dir, &name).map_err(tree_error("create", path))?;
    io::copy(contents, &mut file).map_err(tree_error("write", path))?;
    fchown(&file, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
        .map_err(|e| tree_error("set the owner of", path)(e.into()))?;
    fchmod(&file, Mode::from_bits_truncate(mode))
        .map_err(|e| tree_error("set the mode of", path)(e.into()))
}

/// The contents of a guest file, symlinks followed inside the tree; `None` when missing.
fn read_file(tree: &Tree, path: &str) -> Result<Option<String>, ImageError> {
    let resolved = tree
        .resolve(Path::new(path), true)
        .map_err(tree_error("resolve", path))?;
    let Some((name, parent)) = resolved.split_last() else {
        return Err(ImageError::NotA {
            path: path.to_owned(),
            wanted: "a regular file",
        });
    };
    let Some(dir) = tree
        .walk(parent, false)
        .map_err(|e| tree_error("open the directory of", path)(e.into()))?
    else {
        return Ok(None);
    };
    match tree::kind(&dir, name).map_err(tree_error("inspect", path))? {
        None => return Ok(None),
        Some(Kind::File { .. }) => {}
        Some(_) => {
            return Err(ImageError::NotA {
                path: path.to_owned(),
                wanted: "a regular file",
            })
        }
    }
    let fd = openat(
        &dir,
        name.as_os_str(),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| tree_error("open", path)(e.into()))?;
    let mut bytes = Vec::new();
    File::from(fd)
        .take(MAX_ACCOUNT_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(tree_error("read", path))?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Appends each `(name, line)` whose name has no line in the account file yet, creating the
/// file if needed, and sets its mode.
fn add_accounts(
    tree: &Tree,
    path: &str,
    accounts: &[(&str, String)],
    mode: u32,
) -> Result<(), ImageError> {
    let existing = read_file(tree, path)?.unwrap_or_default();
    let mut added = String::new();
    for (name, line) in accounts {
        let prefix = format!("{name}:");
        if !existing.lines().any(|l| l.starts_with(&prefix)) {
            added.push_str(line);
            added.push('\n');
        }
    }
    // A last line without its newline would run into the first added one.
    if !added.is_empty() && !existing.is_empty() && !existing.ends_with('\n') {
        added.insert(0, '\n');
    }
    let (dir, name) = parent_of(tree, path, true)?;
    let fd = openat(
        &dir,
        name.as_os_str(),
        OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| tree_error("open", path)(e.into()))?;
    let mut file = File::from(fd);
    file.write_all(added.as_bytes())
        .map_err(tree_error("write", path))?;
    fchmod(&file, Mode::from_bits_truncate(mode))
        .map_err(|e| tree_error("set the mode of", path)(e.into()))
}

// ---- The ext4 image -------------------------------------------------------------------------

/// Builds an ext4 image of `tree` at `out` (replacing it), sized to the tree's contents, then
/// checks it with `e2fsck`. The label is `wrenn-<name>` (cut to ext4's 16 bytes) and the UUID
/// and directory hash seed derive from `name`, as rootfs/lib.sh's builds do. File times are
/// the tree's own (lib.sh's reproducibility pass is left out). On failure nothing is left at
/// `out`.
pub fn make_ext4(tree: &Path, out: &Path, name: &str) -> Result<(), ImageError> {
    let (used_kib, entries) = disk_usage(tree)?;
    // Blocks in use, a tenth for directories and extent trees, and room for the journal; the
    // image is a read-only lower layer, so free space only matters to update-envd, which
    // grows the image when it must.
    let size_kib = used_kib * 11 / 10 + entries / 4 + 24576;
    let inodes = entries + entries / 5 + 256;
    let uuid = name_uuid(&format!("image:{name}"));
    let label: String = format!("wrenn-{name}")
        .char_indices()
        .take_while(|(at, c)| at + c.len_utf8() <= 16)
        .map(|(_, c)| c)
        .collect();
    match fs::remove_file(out) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("replace", out)(e)),
    }
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args([
        "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0", "-N",
    ])
    .arg(inodes.to_string())
    .arg("-L")
    .arg(&label)
    .arg("-U")
    .arg(&uuid)
    .arg("-E")
    .arg(format!(
        "hash_seed={uuid},root_owner=0:0,lazy_itable_init=0"
    ))
    .arg("-d")
    .arg(tree)
    .arg(out)
    .arg(format!("{size_kib}K"))
    // libext2fs takes the superblock's times from here.
    .env("E2FSPROGS_FAKE_TIME", SOURCE_DATE_EPOCH.to_string())
    .env("LC_ALL", "C");
    let checked = run_tool("mkfs.ext4", &mut mkfs, out).and_then(|()| {
        let mut fsck = Command::new("e2fsck");
        fsck.arg("-fn").arg(out).env("LC_ALL", "C");
        run_tool("e2fsck", &mut fsck, out)
    });
    if checked.is_err() {
        let _ = fs::remove_file(out);
    }
    checked
}

fn run_tool(tool: &'static str, command: &mut Command, out: &Path) -> Result<(), ImageError> {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .map_err(|source| ImageError::Spawn { tool, source })?;
    if status.success() {
        return Ok(());
    }
    // e2fsck reports what it found on stdout.
    let output = [stderr, stdout]
        .iter()
        .map(|bytes| String::from_utf8_lossy(bytes).trim().to_owned())
        .filter(|text| !text.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    Err(ImageError::Tool {
        tool,
        path: out.to_owned(),
        status,
        output,
    })
}

/// `du -sk` and `find | wc -l` of the tree: KiB allocated (each inode once) and entries.
fn disk_usage(tree: &Path) -> Result<(u64, u64), ImageError> {
    let mut seen = std::collections::HashSet::new();
    let mut blocks = 0u64;
    let mut entries = 0u64;
    let mut count = |meta: &fs::Metadata| {
        entries += 1;
        if seen.insert((meta.dev(), meta.ino())) {
            blocks += meta.blocks();
        }
    };
    count(&fs::symlink_metadata(tree).map_err(io_error("inspect", tree))?);
    // Only real directories are entered (`file_type` does not follow symlinks).
    let mut pending = vec![tree.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(io_error("list", &dir))? {
            let entry = entry.map_err(io_error("list", &dir))?;
            let path = entry.path();
            count(&fs::symlink_metadata(&path).map_err(io_error("inspect", &path))?);
            if entry
                .file_type()
                .map_err(io_error("inspect", &path))?
                .is_dir()
            {
                pending.push(path);
            }
        }
    }
    Ok((blocks.div_ceil(2), entries))
}

/// A stable UUID derived from a name, so an image's identity does not change between builds
/// (lib.sh's `name_uuid`).
fn name_uuid(name: &str) -> String {
    let h = hex::encode(Sha256::digest(format!("wrenn:{name}")));
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

// ---- Settings ---------------------------------------------------------------------------------

/// The template settings an image's config implies: its environment, user and working
/// directory, and with `start_entrypoint` its entrypoint and command as one process started at
/// boot, tagged [`ENTRYPOINT_TAG`].
pub fn template_config(image: &ImageConfig, start_entrypoint: bool) -> TemplateConfig {
    let mut words = image.entrypoint.iter().chain(&image.cmd).cloned();
    let start = match words.next() {
        Some(cmd) if start_entrypoint => vec![StartRequest {
            process: ProcessSpec {
                cmd,
                args: words.collect(),
                cwd: image.working_dir.clone(),
                ..ProcessSpec::default()
            },
            tag: Some(ENTRYPOINT_TAG.to_owned()),
            pty: None,
        }],
        _ => Vec::new(),
    };
    TemplateConfig {
        env: image.env.clone(),
        user: image.user.clone(),
        workdir: image.working_dir.clone(),
        start,
    }
}

/// The account name envd will run as for the image's `User` (`name`, `uid`, `name:group` or
/// `uid:gid`): envd knows users by name only and runs them with their own groups, so a group is
/// dropped and a uid becomes its name. Root and `user` count as present, as [`finish_tree`]
/// adds them.
fn account_name(tree: &Tree, user: &str) -> Result<String, ImageError> {
    let unknown = || ImageError::UnknownUser {
        user: user.to_owned(),
    };
    let name = user.split(':').next().unwrap_or_default();
    let passwd = read_file(tree, "/etc/passwd")?.unwrap_or_default();
    let accounts = Accounts::parse(&passwd, "");
    if let Ok(uid) = name.parse::<u32>() {
        let found = accounts.user_name(uid);
        return match uid {
            _ if found != uid.to_string() => Ok(found),
            0 => Ok("root".to_owned()),
            USER_ID => Ok("user".to_owned()),
            _ => Err(unknown()),
        };
    }
    if name == "root" || name == "user" || accounts.account(name).is_ok() {
        Ok(name.to_owned())
    } else {
        Err(unknown())
    }
}

// ---- Import -----------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The static wrenn binary installed as [`WRENN_BINARY`]; none keeps the image's own.
    pub wrenn_binary: Option<PathBuf>,
    pub limits: UnpackLimits,
    /// Start the image's entrypoint and command at boot (see [`template_config`]).
    pub start_entrypoint: bool,
    /// The settings to bake in instead of those the image's config gives (a build's).
    pub template: Option<TemplateConfig>,
    /// Where the image came from, for `meta.json`: `oci` or `build`.
    pub source: &'static str,
}

impl ImportOptions {
    pub fn new(wrenn_binary: impl Into<PathBuf>) -> Self {
        Self {
            wrenn_binary: Some(wrenn_binary.into()),
            limits: UnpackLimits::default(),
            start_entrypoint: false,
            template: None,
            source: "oci",
        }
    }
}

/// An imported template image.
#[derive(Debug, Clone)]
pub struct ImportedImage {
    pub rootfs: PathBuf,
    pub meta: PathBuf,
    pub size_bytes: u64,
    /// Of `rootfs`, hex.
    pub sha256: String,
    pub build_seconds: f64,
    /// As the archive gave it.
    pub image: ImageConfig,
    /// As baked into the image.
    pub template: TemplateConfig,
}

/// `meta.json` beside an image, with the fields rootfs/lib.sh's `write_meta` writes that an
/// import knows.
#[derive(Serialize)]
struct ImageMeta<'a> {
    template: &'a str,
    envd_version: String,
    built_at: String,
    build_seconds: f64,
    size_bytes: u64,
    sha256: &'a str,
    source: &'static str,
}

/// Imports the image in the tar file `archive` as the template `name` into `out_dir`
/// (`images/<name>/`, created if missing; its parent must exist): `rootfs.ext4` and
/// `meta.json`, each replacing any earlier one by a rename. The work happens in a private
/// directory beside `out_dir`, removed whether the import succeeds or fails, so a failed import
/// leaves nothing behind.
pub fn import(
    archive: &Path,
    name: &TemplateName,
    out_dir: &Path,
    options: &ImportOptions,
    progress: impl FnMut(ImportProgress),
) -> Result<ImportedImage, ImageError> {
    let started = Instant::now();
    let parent = match out_dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(ImageError::NoImagesDir {
            path: parent.to_owned(),
        });
    }
    let work = WorkDir::create(parent, name)?;
    let tree_path = work.path.join("tree");
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&tree_path)
        .map_err(io_error("create", &tree_path))?;

    let image = oci::unpack(archive, &tree_path, &options.limits, progress)?;
    let mut template = options
        .template
        .clone()
        .unwrap_or_else(|| template_config(&image, options.start_entrypoint));
    if let Some(user) = &template.user {
        let tree = Tree::open(&tree_path).map_err(io_error("open the tree", &tree_path))?;
        template.user = Some(account_name(&tree, user)?);
    }
    finish_tree(&tree_path, options.wrenn_binary.as_deref(), &template)?;
    let staged_rootfs = work.path.join("rootfs.ext4");
    make_ext4(&tree_path, &staged_rootfs, name.as_str())?;
    let (size_bytes, sha256) = hash_file(&staged_rootfs)?;
    let build_seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    let staged_meta = work.path.join("meta.json");
    let mut json = serde_json::to_vec_pretty(&ImageMeta {
        template: name.as_str(),
        envd_version: crate::version::long(),
        built_at: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        build_seconds,
        size_bytes,
        sha256: &sha256,
        source: options.source,
    })
    .expect("image metadata serializes");
    json.push(b'\n');
    fs::write(&staged_meta, json).map_err(io_error("write", &staged_meta))?;

    let created_out_dir = match fs::create_dir(out_dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && out_dir.is_dir() => false,
        Err(e) => return Err(io_error("create", out_dir)(e)),
    };
    let rootfs = out_dir.join("rootfs.ext4");
    let meta = out_dir.join("meta.json");
    let placed = fs::rename(&staged_rootfs, &rootfs)
        .map_err(io_error("move the image to", &rootfs))
        .and_then(|()| fs::rename(&staged_meta, &meta).map_err(io_error("move", &meta)));
    if let Err(error) = placed {
        if created_out_dir {
            let _ = fs::remove_dir_all(out_dir);
        }
        return Err(error);
    }
    Ok(ImportedImage {
        rootfs,
        meta,
        size_bytes,
        sha256,
        build_seconds,
        image,
        template,
    })
}

fn hash_file(path: &Path) -> Result<(u64, String), ImageError> {
    let mut file = File::open(path).map_err(io_error("open", path))?;
    let mut hasher = Sha256::new();
    let size = io::copy(&mut file, &mut hasher).map_err(io_error("read", path))?;
    Ok((size, hex::encode(hasher.finalize())))
}

/// A private directory beside the image directory, removed when dropped. Its mode is 0700
/// because the tree inside holds the image's set-uid files owned by root, which no host user
/// may reach; its name starts with a dot, which no template name does, so it is never taken
/// for a template.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create(parent: &Path, name: &TemplateName) -> Result<Self, ImageError> {
        let path = parent.join(format!(".{name}.import-{:016x}", rand::random::<u64>()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_error("create", &path))?;
        Ok(Self { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), "could not remove the import's work directory: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use serde_json::json;

    use super::*;
    use crate::template::oci::tests::{config, docker_archive, Layer};

    fn executable(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn meta(path: &Path) -> fs::Metadata {
        fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn finish_tree_adds_accounts_guest_files_the_binary_and_settings() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        executable(&tree.join("usr/bin/bash"));
        executable(&tree.join("usr/bin/sudo"));
        symlink("usr/bin", tree.join("bin")).unwrap();
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/ash").unwrap();
        symlink("../run/resolver/resolv.conf", tree.join("etc/resolv.conf")).unwrap();
        let binary = dir.path().join("wrenn");
        executable(&binary);
        let config = TemplateConfig {
            env: [("A".to_owned(), "1".to_owned())].into(),
            workdir: Some("/srv".into()),
            ..TemplateConfig::default()
        };
        finish_tree(&tree, Some(&binary), &config).unwrap();

        let passwd = fs::read_to_string(tree.join("etc/passwd")).unwrap();
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/ash\n\
             user:x:1000:1000:Wrenn sandbox user:/home/user:/bin/bash\n"
        );
        let group = fs::read_to_string(tree.join("etc/group")).unwrap();
        assert_eq!(group, "root:x:0:\nuser:x:1000:\n");
        let shadow = fs::read_to_string(tree.join("etc/shadow")).unwrap();
        assert!(
            shadow.starts_with("root:*:19723:0:99999:7:::\n"),
            "{shadow}"
        );
        assert_eq!(meta(&tree.join("etc/shadow")).mode() & 0o7777, 0o640);
        let home = meta(&tree.join("home/user"));
        assert_eq!(
            (home.uid(), home.gid(), home.mode() & 0o7777),
            (1000, 1000, 0o755)
        );
        assert_eq!(meta(&tree.join("root")).mode() & 0o7777, 0o700);
        assert_eq!(
            fs::read_to_string(tree.join("etc/sudoers.d/wrenn-user")).unwrap(),
            "user ALL=(ALL:ALL) NOPASSWD: ALL\n"
        );
        assert_eq!(
            meta(&tree.join("etc/sudoers.d/wrenn-user")).mode() & 0o7777,
            0o440
        );
        for (dir, mode) in [
            ("dev", 0o755),
            ("run", 0o755),
            ("tmp", 0o1777),
            ("var/tmp", 0o1777),
        ] {
            let dir_meta = meta(&tree.join(dir));
            assert!(dir_meta.is_dir(), "{dir}");
            assert_eq!(dir_meta.mode() & 0o7777, mode, "{dir}");
        }
        assert_eq!(
            fs::read_to_string(tree.join("etc/hostname")).unwrap(),
            "capsule\n"
        );
        let resolv = meta(&tree.join("etc/resolv.conf"));
        assert!(resolv.is_file(), "the symlink is replaced");
        assert!(!tree.join("run/resolver").exists());
        let wrenn = meta(&tree.join("usr/local/bin/wrenn"));
        assert_eq!(
            (wrenn.uid(), wrenn.gid(), wrenn.mode() & 0o7777),
            (0, 0, 0o755)
        );
        let written = TemplateConfig::load(&tree.join("etc/wrenn/template.json"))
            .unwrap()
            .unwrap();
        assert_eq!(written, config);

        let bare = dir.path().join("bare");
        fs::create_dir(&bare).unwrap();
        finish_tree(&bare, Some(&binary), &TemplateConfig::default()).unwrap();
        assert!(!bare.join("etc/wrenn").exists(), "no settings, no file");
        let passwd = fs::read_to_string(bare.join("etc/passwd")).unwrap();
        assert!(
            passwd.starts_with("root:x:0:0:root:/root:/bin/sh\n"),
            "{passwd}"
        );
        assert!(!bare.join("etc/sudoers.d").exists());
    }

    #[test]
    fn finish_tree_resolves_the_images_symlinks_inside_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        // On the host these lead out of the tree; in the guest, to its own directories.
        symlink(outside.path(), tree.join("etc")).unwrap();
        symlink("../../../../../..", tree.join("home")).unwrap();
        symlink(outside.path().join("bin"), tree.join("usr")).unwrap();
        let binary = dir.path().join("wrenn");
        executable(&binary);
        finish_tree(&tree, Some(&binary), &TemplateConfig::default()).unwrap();

        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        let etc = tree.join(outside.path().strip_prefix("/").unwrap());
        assert!(fs::read_to_string(etc.join("passwd"))
            .unwrap()
            .contains("user:x:1000"));
        // `/home/user` is `/user` in the guest.
        assert_eq!(meta(&tree.join("user")).uid(), 1000);
        let bin = tree.join(outside.path().join("bin").strip_prefix("/").unwrap());
        assert!(bin.join("local/bin/wrenn").is_file());
    }

    #[test]
    fn the_image_config_becomes_template_settings() {
        let image = ImageConfig {
            env: [("PATH".to_owned(), "/bin".to_owned())].into(),
            working_dir: Some("/app".into()),
            user: Some("app".into()),
            cmd: vec!["--port".into(), "80".into()],
            entrypoint: vec!["/bin/server".into(), "-v".into()],
        };
        let plain = template_config(&image, false);
        assert_eq!(plain.env, image.env);
        assert_eq!(plain.workdir.as_deref(), Some("/app"));
        assert_eq!(plain.user.as_deref(), Some("app"));
        assert!(plain.start.is_empty());

        let started = template_config(&image, true);
        assert_eq!(
            started.start,
            [StartRequest {
                process: ProcessSpec {
                    cmd: "/bin/server".into(),
                    args: vec!["-v".into(), "--port".into(), "80".into()],
                    cwd: Some("/app".into()),
                    ..ProcessSpec::default()
                },
                tag: Some(ENTRYPOINT_TAG.into()),
                pty: None,
            }]
        );
        let cmd_only = ImageConfig {
            cmd: vec!["sh".into()],
            ..ImageConfig::default()
        };
        let start = &template_config(&cmd_only, true).start[0].process;
        assert_eq!((start.cmd.as_str(), start.args.len()), ("sh", 0));
        assert!(template_config(&ImageConfig::default(), true)
            .start
            .is_empty());
    }

    #[test]
    fn image_users_become_account_names() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\n\
             nobody:x:65534:65534::/:/bin/false\n",
        )
        .unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        let name = |user: &str| account_name(&tree, user).map_err(|e| e.to_string());
        assert_eq!(name("1000:1000").unwrap(), "node");
        assert_eq!(name("65534").unwrap(), "nobody");
        assert_eq!(name("nobody:nogroup").unwrap(), "nobody");
        assert_eq!(name("0").unwrap(), "root");
        assert_eq!(name("user").unwrap(), "user");
        assert!(name("ghost").unwrap_err().contains("`ghost`"));
        assert!(name("4242").is_err());
    }

    #[test]
    fn name_uuid_matches_the_shell_builds() {
        // rootfs/lib.sh: name_uuid image:busybox
        assert_eq!(
            name_uuid("image:busybox"),
            "f9454f68-ad00-4882-8524-709b6d5d9344"
        );
    }

    #[test]
    fn make_ext4_reports_the_tools_output_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        let out = dir.path().join("missing/rootfs.ext4");
        match make_ext4(&tree, &out, "t") {
            Err(ImageError::Tool { tool, output, .. }) => {
                assert_eq!(tool, "mkfs.ext4");
                assert!(output.contains("No such file"), "{output}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!out.exists());
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_failed_import_leaves_nothing_behind() {
        let inputs = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let name: TemplateName = "imported".parse().unwrap();
        let out_dir = images.path().join("imported");
        let binary = inputs.path().join("wrenn");
        executable(&binary);

        let hostile = docker_archive(
            inputs.path(),
            &config(json!({})),
            &[Layer::new().file("ok", b"x").file("/etc/evil", b"x").gzip()],
        );
        let error = import(
            &hostile,
            &name,
            &out_dir,
            &ImportOptions::new(&binary),
            |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(error, ImageError::Unpack(OciError::Refused { .. })),
            "{error}"
        );
        assert!(leftovers(images.path()).is_empty());

        let fine = docker_archive(
            inputs.path(),
            &config(json!({"User": "ghost"})),
            &[Layer::new().file("ok", b"x").tar()],
        );
        let error =
            import(&fine, &name, &out_dir, &ImportOptions::new(&binary), |_| {}).unwrap_err();
        assert!(matches!(error, ImageError::UnknownUser { .. }), "{error}");
        assert!(leftovers(images.path()).is_empty());

        let no_binary = ImportOptions::new(inputs.path().join("absent"));
        let fine = docker_archive(
            inputs.path(),
            &config(json!({})),
            &[Layer::new().file("ok", b"x").tar()],
        );
        let error = import(&fine, &name, &out_dir, &no_binary, |_| {}).unwrap_err();
        assert!(matches!(error, ImageError::Io { .. }), "{error}");
        assert!(leftovers(images.path()).is_empty());
    }
}
