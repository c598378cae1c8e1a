//! Container image archives, `docker save` output or an OCI image layout, as one tar file on
//! disk. [`unpack`] indexes the archive's members in one pass, then seeks to each blob it needs,
//! applies the layers in order to a directory tree (whiteouts included) and returns the image's
//! runtime settings. Nothing is held in memory but the small JSON documents.
//!
//! The tree is on the host and the importer runs as root, so each layer entry is checked before
//! it is written and the first one refused fails the whole unpack ([`Refusal`] lists why).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Take, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use flate2::bufread::MultiGzDecoder;
use nix::fcntl::AtFlags;
use nix::sys::stat::UtimensatFlags;
use nix::sys::stat::{fchmod, fchmodat, futimens, mkdirat, utimensat, FchmodatFlags, Mode};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, mkfifoat, symlinkat, Gid, Uid};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::tree::{self, Kind, Tree, WalkError};

/// Default for [`UnpackLimits::max_archive_bytes`].
pub const DEFAULT_MAX_ARCHIVE_BYTES: u64 = 16 << 30;
/// Default for [`UnpackLimits::max_unpacked_bytes`].
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 32 << 30;

/// Longest entry path accepted: the guest's `PATH_MAX`.
const MAX_PATH_BYTES: usize = 4096;
/// Deepest entry path accepted; far beyond any real image, and it bounds the directory depth
/// the host has to walk and remove.
const MAX_PATH_DEPTH: usize = 256;
/// Bytes a layer may spend on the headers of one entry (GNU long names, pax records), which
/// the tar reader holds in memory.
const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Largest index, manifest or config document read.
const MAX_JSON_BYTES: u64 = 8 << 20;
/// Archive bytes between two progress reports within a layer.
const PROGRESS_STEP: u64 = 4 << 20;
/// Symlinks followed to find one member of the archive.
const MAX_MEMBER_LINKS: usize = 8;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// `.wh..wh..opq` without the whiteout prefix.
const OPAQUE_MARKER: &[u8] = b".wh..opq";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// The archive file's size.
    pub max_archive_bytes: u64,
    /// The layers' uncompressed tar streams together: every file's contents and every header.
    pub max_unpacked_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_archive_bytes: DEFAULT_MAX_ARCHIVE_BYTES,
            max_unpacked_bytes: DEFAULT_MAX_UNPACKED_BYTES,
        }
    }
}

/// The image config's runtime settings, as the image's author set them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Env`; an entry without `=` is a variable with an empty value.
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub cmd: Vec<String>,
    pub entrypoint: Vec<String>,
}

impl fmt::Debug for ImageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageConfig")
            .field("env", &crate::secret::EnvNames(&self.env))
            .field("working_dir", &self.working_dir)
            .field("user", &self.user)
            .field("cmd", &self.cmd)
            .field("entrypoint", &self.entrypoint)
            .finish()
    }
}

/// How far an unpack is: reported when each layer starts and ends and every few MiB between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportProgress {
    /// 1-based.
    pub layer: usize,
    pub layers: usize,
    /// Archive bytes of the layers read so far, of `bytes_total`.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("could not read the image archive {path}: {source}")]
    Archive { path: PathBuf, source: io::Error },
    #[error("the image archive {path} is {size} bytes, over the limit of {limit} bytes")]
    ArchiveTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error(
        "the image archive {path} is {kind}-compressed; decompress it first (its blobs are read \
         in place)"
    )]
    CompressedArchive { path: PathBuf, kind: &'static str },
    #[error(
        "{path} is not an image archive: it has neither a `manifest.json` (docker save) nor an \
         `oci-layout` and `index.json` (OCI image layout)"
    )]
    NotAnImage { path: PathBuf },
    #[error("the image archive has no `{member}`")]
    MissingMember { member: String },
    #[error("`{member}` is {size} bytes, over the limit of {MAX_JSON_BYTES} for a document")]
    DocumentTooLarge { member: String, size: u64 },
    #[error("`{member}` is not a valid document: {source}")]
    Document {
        member: String,
        source: serde_json::Error,
    },
    #[error("`manifest.json` lists {count} images; save exactly one")]
    ImageCount { count: usize },
    #[error("`{index}` offers no single {wanted} image (it offers: {offered})")]
    NoImage {
        index: String,
        wanted: String,
        offered: String,
    },
    #[error("`{index}` leads to a further image index; only one level of nesting is followed")]
    NestedIndex { index: String },
    #[error("`{member}` has neither manifests nor a config")]
    NotAManifest { member: String },
    #[error("the image is for {found}; this host runs {wanted} guests")]
    WrongPlatform { found: String, wanted: String },
    #[error("unsupported digest `{digest}`: only sha256 digests are supported")]
    UnsupportedDigest { digest: String },
    #[error("`{member}` is {actual} bytes but its descriptor says {expected}")]
    SizeMismatch {
        member: String,
        expected: u64,
        actual: u64,
    },
    #[error("`{member}` has digest sha256:{actual}, not sha256:{expected}")]
    DigestMismatch {
        member: String,
        expected: String,
        actual: String,
    },
    #[error("layer {layer} (`{blob}`) is {kind}-compressed, which is not supported")]
    UnsupportedCompression {
        layer: usize,
        blob: String,
        kind: &'static str,
    },
    #[error("could not read layer {layer} (`{blob}`): {source}")]
    Layer {
        layer: usize,
        blob: String,
        source: io::Error,
    },
    #[error("could not read layer {layer} (`{blob}`) at `{path}`: {source}")]
    LayerEntry {
        layer: usize,
        blob: String,
        path: String,
        source: io::Error,
    },
    #[error("layer {layer} (`{blob}`): refused `{path}`: {reason}")]
    Refused {
        layer: usize,
        blob: String,
        path: String,
        reason: Refusal,
    },
    #[error("could not write `{path}` from layer {layer} (`{blob}`) into the tree: {source}")]
    Write {
        layer: usize,
        blob: String,
        path: String,
        source: io::Error,
    },
    #[error("could not open the tree {path}: {source}")]
    Tree { path: PathBuf, source: io::Error },
}

/// Why a layer entry is not written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the path is absolute")]
    AbsolutePath,
    #[error("the path has a `..` component")]
    ParentComponent,
    #[error("the path is longer than {MAX_PATH_BYTES} bytes")]
    PathTooLong,
    #[error("the path is deeper than {MAX_PATH_DEPTH} components")]
    PathTooDeep,
    #[error("only a directory may name the root")]
    Root,
    #[error("device nodes are not allowed")]
    DeviceNode,
    #[error("unsupported entry type {0}")]
    UnsupportedType(String),
    #[error("uid or gid {0} is out of range")]
    IdOutOfRange(u64),
    #[error("the symlink has an empty target")]
    EmptySymlinkTarget,
    #[error("the symlink's target `{target}` climbs above the root")]
    SymlinkEscapes { target: String },
    #[error("its parent `{parent}` is a symlink in the tree")]
    SymlinkParent { parent: String },
    #[error("its parent `{parent}` is not a directory")]
    ParentNotDirectory { parent: String },
    #[error("the hard link's target `{target}` {problem}")]
    HardLinkTarget {
        target: String,
        problem: HardLinkProblem,
    },
    #[error("`.wh.` names no file")]
    EmptyWhiteout,
    #[error("the layers unpack to more than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the entry's headers are longer than {MAX_HEADER_BYTES} bytes")]
    HeadersTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HardLinkProblem {
    #[error("is absolute")]
    Absolute,
    #[error("has a `..` component")]
    ParentComponent,
    #[error("is not a valid path")]
    Invalid,
    #[error("has not been extracted")]
    Missing,
    #[error("is not a regular file")]
    NotAFile,
    #[error("is reached through a symlink")]
    SymlinkParent,
    #[error("is the link itself")]
    Itself,
}

/// Unpacks the image in the tar file `archive` into the existing directory `tree` and returns
/// its config. Reports progress to `progress`. On failure the tree is left half-written; the
/// caller removes it.
pub fn unpack(
    archive: &Path,
    tree: &Path,
    limits: &UnpackLimits,
    mut progress: impl FnMut(ImportProgress),
) -> Result<ImageConfig, OciError> {
    let archive_error = |source| OciError::Archive {
        path: archive.to_owned(),
        source,
    };
    let file = File::open(archive).map_err(archive_error)?;
    let size = file.metadata().map_err(archive_error)?.len();
    if size > limits.max_archive_bytes {
        return Err(OciError::ArchiveTooLarge {
            path: archive.to_owned(),
            size,
            limit: limits.max_archive_bytes,
        });
    }
    let mut magic = [0u8; 6];
    let read = file.read_at(&mut magic, 0).map_err(archive_error)?;
    if let Some(kind) = compression(&magic[..read]) {
        return Err(OciError::CompressedArchive {
            path: archive.to_owned(),
            kind,
        });
    }
    let members = Members::index(file).map_err(archive_error)?;
    let plan = Plan::read(&members, archive)?;
    let tree = Tree::open(tree).map_err(|source| OciError::Tree {
        path: tree.to_owned(),
        source,
    })?;

    let mut run = Run {
        tree: &tree,
        members: &members,
        meter: Rc::new(RefCell::new(Meter::new(limits.max_unpacked_bytes))),
        dir_times: BTreeMap::new(),
        layer: 0,
        buffer: vec![0; 64 << 10],
        progress: &mut progress,
        layers: plan.layers.len(),
        bytes_total: plan.layers.iter().map(|l| l.member.size).sum(),
        bytes_before: 0,
    };
    for (index, layer) in plan.layers.iter().enumerate() {
        run.apply_layer(index + 1, layer)?;
    }
    run.restore_dir_times(&plan.layers)?;
    Ok(plan.config)
}

/// The compression a stream's first bytes announce.
fn compression(magic: &[u8]) -> Option<&'static str> {
    if magic.starts_with(&[0x1f, 0x8b]) {
        Some("gzip")
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd")
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz")
    } else if magic.starts_with(b"BZh") {
        Some("bzip2")
    } else {
        None
    }
}

// ---- The archive's members ----------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
}

/// Where each member of the archive lies, from one pass over its headers.
struct Members {
    file: File,
    files: HashMap<String, Member>,
    /// Symlinks and hard links (older `docker save` links repeated layers), as member names.
    links: HashMap<String, String>,
}

impl Members {
    fn index(mut file: File) -> io::Result<Self> {
        file.seek(SeekFrom::Start(0))?;
        let mut archive = tar::Archive::new(file.try_clone()?);
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        for entry in archive.entries_with_seek()? {
            let entry = entry?;
            let Some(name) = member_name(&[], &entry.path_bytes()) else {
                continue;
            };
            let kind = entry.header().entry_type();
            if kind.is_file() || kind.is_contiguous() {
                let member = Member {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                };
                files.insert(name, member);
            } else if kind.is_symlink() || kind.is_hard_link() {
                let Some(target) = entry.link_name_bytes() else {
                    continue;
                };
                let base: Vec<&str> = if kind.is_symlink() {
                    let mut dir: Vec<&str> = name.split('/').collect();
                    dir.pop();
                    dir
                } else {
                    Vec::new()
                };
                if let Some(target) = member_name(&base, &target) {
                    links.insert(name, target);
                }
            }
        }
        Ok(Self { file, files, links })
    }

    fn find(&self, name: &str) -> Option<Member> {
        let mut name = member_name(&[], name.as_bytes())?;
        for _ in 0..=MAX_MEMBER_LINKS {
            if let Some(member) = self.files.get(&name) {
                return Some(*member);
            }
            name = self.links.get(&name)?.clone();
        }
        None
    }

    fn get(&self, name: &str) -> Result<Member, OciError> {
        self.find(name).ok_or_else(|| OciError::MissingMember {
            member: name.to_owned(),
        })
    }

    /// The member's bytes from `skip` on.
    fn open(&self, member: Member, skip: u64) -> io::Result<Take<File>> {
        let mut file = self.file.try_clone()?;
        file.seek(SeekFrom::Start(member.offset + skip))?;
        Ok(file.take(member.size.saturating_sub(skip)))
    }

    /// A JSON document, checked against its digest and size when they are known.
    fn read_json<T: DeserializeOwned>(
        &self,
        name: &str,
        expected: Option<(&BlobDigest, u64)>,
        archive: &Path,
    ) -> Result<T, OciError> {
        let member = self.get(name)?;
        if member.size > MAX_JSON_BYTES {
            return Err(OciError::DocumentTooLarge {
                member: name.to_owned(),
                size: member.size,
            });
        }
        let mut bytes = Vec::new();
        self.open(member, 0)
            .and_then(|mut reader| reader.read_to_end(&mut bytes))
            .map_err(|source| OciError::Archive {
                path: archive.to_owned(),
                source,
            })?;
        let named = BlobDigest::of_member(name);
        let digest = expected.map(|(d, _)| d).or(named.as_ref());
        if let Some((_, size)) = expected {
            check_size(name, size, bytes.len() as u64)?;
        }
        if let Some(digest) = digest {
            digest.check(name, Sha256::digest(&bytes).into())?;
        }
        serde_json::from_slice(&bytes).map_err(|source| OciError::Document {
            member: name.to_owned(),
            source,
        })
    }
}

/// `path` (a member path or a link target, relative to the directory `base`) as the index
/// keys it: `/`-separated normal components; `None` for a path that leaves the archive's root
/// or is not UTF-8.
fn member_name(base: &[&str], path: &[u8]) -> Option<String> {
    let mut parts: Vec<&str> = base.to_vec();
    for component in Path::new(OsStr::from_bytes(path)).components() {
        match component {
            Component::Normal(name) => parts.push(name.to_str()?),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn check_size(member: &str, expected: u64, actual: u64) -> Result<(), OciError> {
    if expected == actual {
        Ok(())
    } else {
        Err(OciError::SizeMismatch {
            member: member.to_owned(),
            expected,
            actual,
        })
    }
}

/// A sha256 digest, as lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlobDigest(String);

impl BlobDigest {
    fn parse(digest: &str) -> Result<Self, OciError> {
        digest
            .strip_prefix("sha256:")
            .and_then(Self::from_hex)
            .ok_or_else(|| OciError::UnsupportedDigest {
                digest: digest.to_owned(),
            })
    }

    fn from_hex(hex: &str) -> Option<Self> {
        let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| Self(hex.to_owned()))
    }

    /// The digest a member under `blobs/sha256/` is named by, which both formats use for
    /// content-addressed blobs (`docker save` since Docker 25).
    fn of_member(name: &str) -> Option<Self> {
        Self::from_hex(name.strip_prefix("blobs/sha256/")?)
    }

    fn member(&self) -> String {
        format!("blobs/sha256/{}", self.0)
    }

    fn check(&self, member: &str, actual: [u8; 32]) -> Result<(), OciError> {
        let actual = hex::encode(actual);
        if actual == self.0 {
            Ok(())
        } else {
            Err(OciError::DigestMismatch {
                member: member.to_owned(),
                expected: self.0.clone(),
                actual,
            })
        }
    }
}

// ---- Finding the config and the layers ----------------------------------------------------

/// `docker save`'s `manifest.json`: one entry per image.
#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// An OCI image index or image manifest; `index.json` is an index.
#[derive(Deserialize)]
struct OciDocument {
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    size: u64,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct ConfigDocument {
    architecture: Option<String>,
    os: Option<String>,
    config: Option<RuntimeConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RuntimeConfig {
    env: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

/// The architecture guests run, in OCI's spelling: the host's own, as guests run under KVM.
fn guest_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

struct LayerBlob {
    name: String,
    member: Member,
    digest: Option<BlobDigest>,
}

struct Plan {
    config: ImageConfig,
    layers: Vec<LayerBlob>,
}

impl Plan {
    /// An OCI layout when the archive has one (every blob is checked against its digest),
    /// else `docker save`'s `manifest.json`.
    fn read(members: &Members, archive: &Path) -> Result<Self, OciError> {
        if members.find("oci-layout").is_some() && members.find("index.json").is_some() {
            Self::read_oci(members, archive)
        } else if members.find("manifest.json").is_some() {
            Self::read_docker(members, archive)
        } else {
            Err(OciError::NotAnImage {
                path: archive.to_owned(),
            })
        }
    }

    fn read_docker(members: &Members, archive: &Path) -> Result<Self, OciError> {
        let mut manifests: Vec<DockerManifest> =
            members.read_json("manifest.json", None, archive)?;
        if manifests.len() != 1 {
            return Err(OciError::ImageCount {
                count: manifests.len(),
            });
        }
        let manifest = manifests.remove(0);
        let config = members.read_json(&manifest.config, None, archive)?;
        let layers = manifest
            .layers
            .iter()
            .map(|name| {
                Ok(LayerBlob {
                    member: members.get(name)?,
                    digest: member_name(&[], name.as_bytes())
                        .and_then(|name| BlobDigest::of_member(&name)),
                    name: name.clone(),
                })
            })
            .collect::<Result<_, OciError>>()?;
        Self::new(config, layers)
    }

    fn read_oci(members: &Members, archive: &Path) -> Result<Self, OciError> {
        let index: OciDocument = members.read_json("index.json", None, archive)?;
        let mut document = index;
        let mut from = "index.json".to_owned();
        for depth in 0..3 {
            let Some(manifests) = &document.manifests else {
                break;
            };
            if depth == 2 {
                return Err(OciError::NestedIndex { index: from });
            }
            let chosen = choose(manifests, members, &from)?;
            let digest = BlobDigest::parse(&chosen.digest)?;
            let name = digest.member();
            document = members.read_json(&name, Some((&digest, chosen.size)), archive)?;
            from = name;
        }
        let Some(config) = &document.config else {
            return Err(OciError::NotAManifest { member: from });
        };
        let config_digest = BlobDigest::parse(&config.digest)?;
        let config = members.read_json(
            &config_digest.member(),
            Some((&config_digest, config.size)),
            archive,
        )?;
        let layers = document
            .layers
            .iter()
            .map(|descriptor| {
                let digest = BlobDigest::parse(&descriptor.digest)?;
                let name = digest.member();
                let member = members.get(&name)?;
                check_size(&name, descriptor.size, member.size)?;
                Ok(LayerBlob {
                    name,
                    member,
                    digest: Some(digest),
                })
            })
            .collect::<Result<_, OciError>>()?;
        Self::new(config, layers)
    }

    fn new(config: ConfigDocument, layers: Vec<LayerBlob>) -> Result<Self, OciError> {
        let architecture = config.architecture.unwrap_or_default();
        let os = config.os.unwrap_or_default();
        let wanted = guest_architecture();
        if (!architecture.is_empty() && architecture != wanted) || (!os.is_empty() && os != "linux")
        {
            return Err(OciError::WrongPlatform {
                found: format!("{os}/{architecture}"),
                wanted: format!("linux/{wanted}"),
            });
        }
        let runtime = config.config.unwrap_or(RuntimeConfig {
            env: None,
            cmd: None,
            entrypoint: None,
            working_dir: None,
            user: None,
        });
        let env = runtime
            .env
            .unwrap_or_default()
            .into_iter()
            .filter_map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((&pair, ""));
                (!name.is_empty()).then(|| (name.to_owned(), value.to_owned()))
            })
            .collect();
        let config = ImageConfig {
            env,
            working_dir: runtime.working_dir.filter(|d| !d.is_empty()),
            user: runtime.user.filter(|u| !u.is_empty()),
            cmd: runtime.cmd.unwrap_or_default(),
            entrypoint: runtime.entrypoint.unwrap_or_default(),
        };
        Ok(Self { config, layers })
    }
}

/// The manifest to follow from an index: among those whose blob the archive holds, the one
/// for the guests' platform, else the only one without a platform.
fn choose<'d>(
    manifests: &'d [Descriptor],
    members: &Members,
    index: &str,
) -> Result<&'d Descriptor, OciError> {
    let wanted = guest_architecture();
    let present: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| {
            BlobDigest::parse(&d.digest)
                .is_ok_and(|digest| members.find(&digest.member()).is_some())
        })
        .collect();
    if let Some(chosen) = present.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == wanted)
    }) {
        return Ok(chosen);
    }
    let unplatformed: Vec<&Descriptor> = present
        .iter()
        .copied()
        .filter(|d| d.platform.is_none())
        .collect();
    if let Some(first) = unplatformed.first() {
        if unplatformed.iter().all(|d| d.digest == first.digest) {
            return Ok(first);
        }
    }
    let offered: Vec<String> = present
        .iter()
        .map(|d| match &d.platform {
            Some(p) => format!("{}/{}", p.os, p.architecture),
            None => format!("{} without a platform", d.digest),
        })
        .collect();
    Err(OciError::NoImage {
        index: index.to_owned(),
        wanted: format!("linux/{wanted}"),
        offered: if offered.is_empty() {
            "nothing the archive holds".to_owned()
        } else {
            offered.join(", ")
        },
    })
}

// ---- Streams ------------------------------------------------------------------------------

/// Hashes and counts the bytes read through it.
struct Hashing<R> {
    inner: R,
    state: Rc<RefCell<HashState>>,
}

struct HashState {
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut state = self.state.borrow_mut();
        state.hasher.update(&buf[..n]);
        state.bytes += n as u64;
        Ok(n)
    }
}

enum Decoded<R: BufRead> {
    Plain(R),
    Gzip(MultiGzDecoder<R>),
}

impl<R: BufRead> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(r) => r.read(buf),
            Self::Gzip(r) => r.read(buf),
        }
    }
}

/// The unpacked-size budget, shared by every layer, and the window of bytes the headers of the
/// next entry may take.
struct Meter {
    consumed: u64,
    limit: u64,
    window_end: u64,
    exceeded: Option<Refusal>,
}

impl Meter {
    fn new(limit: u64) -> Self {
        Self {
            consumed: 0,
            limit,
            window_end: MAX_HEADER_BYTES,
            exceeded: None,
        }
    }

    fn begin_layer(&mut self) {
        self.window_end = self.consumed.saturating_add(MAX_HEADER_BYTES);
    }

    /// Called with each entry's size once its headers are read: its data, padding and the
    /// next entry's headers may follow.
    fn begin_entry(&mut self, size: u64) -> Result<(), Refusal> {
        let end = self.consumed.saturating_add(size);
        if end > self.limit {
            return Err(Refusal::TooLarge { limit: self.limit });
        }
        self.window_end = end
            .saturating_add(size.wrapping_neg() % 512)
            .saturating_add(MAX_HEADER_BYTES);
        Ok(())
    }
}

/// Counts a layer's uncompressed bytes against the [`Meter`] and fails the read past it, so
/// neither a huge layer nor a huge header is read further than the limits.
struct Metered<R> {
    inner: R,
    meter: Rc<RefCell<Meter>>,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let allowance = {
            let meter = self.meter.borrow();
            meter
                .limit
                .min(meter.window_end)
                .saturating_sub(meter.consumed)
        };
        if allowance == 0 && !buf.is_empty() {
            // Over the limit only if the stream really goes on.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            let mut meter = self.meter.borrow_mut();
            meter.exceeded = Some(if meter.consumed >= meter.limit {
                Refusal::TooLarge { limit: meter.limit }
            } else {
                Refusal::HeadersTooLong
            });
            return Err(io::Error::other("the layer goes past its limit"));
        }
        let len = buf
            .len()
            .min(usize::try_from(allowance).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.meter.borrow_mut().consumed += n as u64;
        Ok(n)
    }
}

// ---- Applying layers ----------------------------------------------------------------------

struct Run<'r> {
    tree: &'r Tree,
    members: &'r Members,
    meter: Rc<RefCell<Meter>>,
    /// Set once every layer is applied, since writing into a directory changes its mtime;
    /// with the layer that set each, for errors.
    dir_times: BTreeMap<Vec<OsString>, (i64, usize)>,
    /// The layer being applied (1-based).
    layer: usize,
    buffer: Vec<u8>,
    progress: &'r mut dyn FnMut(ImportProgress),
    layers: usize,
    bytes_total: u64,
    /// Archive bytes of the layers already applied.
    bytes_before: u64,
}

/// What went wrong with one entry; the caller adds the layer and the path.
enum EntryError {
    Refused(Refusal),
    Read(io::Error),
    Write(io::Error),
}

impl From<Refusal> for EntryError {
    fn from(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
}

impl Meta {
    fn time(&self) -> TimeSpec {
        TimeSpec::new(self.mtime, 0)
    }
}

impl Run<'_> {
    fn report(&mut self, layer: usize, in_layer: u64) {
        (self.progress)(ImportProgress {
            layer,
            layers: self.layers,
            bytes_done: self.bytes_before + in_layer,
            bytes_total: self.bytes_total,
        });
    }

    fn apply_layer(&mut self, index: usize, blob: &LayerBlob) -> Result<(), OciError> {
        let layer_error = |source| OciError::Layer {
            layer: index,
            blob: blob.name.clone(),
            source,
        };
        self.layer = index;
        self.report(index, 0);
        let hashed = Rc::new(RefCell::new(HashState {
            hasher: Sha256::new(),
            bytes: 0,
        }));
        let raw = self.members.open(blob.member, 0).map_err(layer_error)?;
        let mut buffered = BufReader::with_capacity(
            128 << 10,
            Hashing {
                inner: raw,
                state: Rc::clone(&hashed),
            },
        );
        let magic = buffered.fill_buf().map_err(layer_error)?;
        let decoded = match compression(magic) {
            None => Decoded::Plain(buffered),
            Some("gzip") => Decoded::Gzip(MultiGzDecoder::new(buffered)),
            Some(kind) => {
                return Err(OciError::UnsupportedCompression {
                    layer: index,
                    blob: blob.name.clone(),
                    kind,
                })
            }
        };
        self.meter.borrow_mut().begin_layer();
        let mut archive = tar::Archive::new(Metered {
            inner: decoded,
            meter: Rc::clone(&self.meter),
        });
        let mut layer = LayerState {
            touched: HashSet::new(),
        };
        let mut path = String::new();
        let mut reported = 0;
        let entries = archive.entries().map_err(layer_error)?;
        for entry in entries {
            let failure = match entry {
                Ok(mut entry) => {
                    let raw_path = entry.path_bytes().into_owned();
                    path = String::from_utf8_lossy(&raw_path).into_owned();
                    let begun = self.meter.borrow_mut().begin_entry(entry.size());
                    match begun {
                        Ok(()) => self.apply_entry(&mut layer, &mut entry, &raw_path).err(),
                        Err(refusal) => Some(EntryError::Refused(refusal)),
                    }
                }
                Err(e) => {
                    // The next entry's headers are unreadable: name the entry they follow.
                    path = if path.is_empty() {
                        "(the first entry)".to_owned()
                    } else {
                        format!("(the entry after {path})")
                    };
                    Some(EntryError::Read(e))
                }
            };
            if let Some(failure) = failure {
                return Err(self.entry_error(index, blob, &path, failure));
            }
            let done = hashed.borrow().bytes;
            if done >= reported + PROGRESS_STEP {
                reported = done;
                self.report(index, done);
            }
        }
        drop(archive);

        // The tar stream can end before the blob does (padding, the gzip trailer): the digest
        // covers every byte.
        let (bytes, digest) = {
            let mut state = hashed.borrow_mut();
            let mut rest = self
                .members
                .open(blob.member, state.bytes)
                .map_err(layer_error)?;
            let mut chunk = [0u8; 64 << 10];
            loop {
                let n = rest.read(&mut chunk).map_err(layer_error)?;
                if n == 0 {
                    break;
                }
                state.hasher.update(&chunk[..n]);
                state.bytes += n as u64;
            }
            let hasher = std::mem::take(&mut state.hasher);
            (state.bytes, <[u8; 32]>::from(hasher.finalize()))
        };
        check_size(&blob.name, blob.member.size, bytes)?;
        if let Some(expected) = &blob.digest {
            expected.check(&blob.name, digest)?;
        }
        self.bytes_before += blob.member.size;
        self.report(index, 0);
        Ok(())
    }

    fn entry_error(
        &self,
        layer: usize,
        blob: &LayerBlob,
        path: &str,
        error: EntryError,
    ) -> OciError {
        let blob = blob.name.clone();
        let path = path.to_owned();
        match error {
            EntryError::Refused(reason) => OciError::Refused {
                layer,
                blob,
                path,
                reason,
            },
            // A read the meter stopped is a refusal, not a broken stream.
            EntryError::Read(source) => match self.meter.borrow_mut().exceeded.take() {
                Some(reason) => OciError::Refused {
                    layer,
                    blob,
                    path,
                    reason,
                },
                None => OciError::LayerEntry {
                    layer,
                    blob,
                    path,
                    source,
                },
            },
            EntryError::Write(source) => OciError::Write {
                layer,
                blob,
                path,
                source,
            },
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        layer: &mut LayerState,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
    ) -> Result<(), EntryError> {
        let header = entry.header();
        let kind = header.entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let path = entry_path(raw_path)?;
        let Some((name, parent)) = path.split_last() else {
            // `./`: the tree's root, whose owner and mode the import decides.
            return if kind.is_dir() {
                Ok(())
            } else {
                Err(Refusal::Root.into())
            };
        };
        layer.touch(parent);
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(layer, parent, hidden);
        }
        let id = |id: io::Result<u64>| -> Result<u32, EntryError> {
            let id = id.map_err(EntryError::Read)?;
            u32::try_from(id).map_err(|_| Refusal::IdOutOfRange(id).into())
        };
        let meta = Meta {
            uid: id(header.uid())?,
            gid: id(header.gid())?,
            mode: header.mode().map_err(EntryError::Read)? & 0o7777,
            mtime: header
                .mtime()
                .map_err(EntryError::Read)?
                .try_into()
                .unwrap_or(i64::MAX),
        };
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.file(parent, name, entry, meta)?
            }
            tar::EntryType::Directory => self.directory(&path, meta)?,
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.symlink(parent, name, &target, meta)?
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                self.hard_link(&path, &target)?
            }
            tar::EntryType::Fifo => self.fifo(parent, name, meta)?,
            tar::EntryType::Char | tar::EntryType::Block => return Err(Refusal::DeviceNode.into()),
            other => return Err(Refusal::UnsupportedType(format!("{other:?}")).into()),
        }
        layer.touched.insert(path);
        Ok(())
    }

    /// The directory `parent`, created where missing; a symlink on the way is refused.
    fn parent(&self, parent: &[OsString]) -> Result<OwnedFd, EntryError> {
        match self.tree.walk(parent, true) {
            Ok(Some(fd)) => Ok(fd),
            Ok(None) => Err(EntryError::Write(io::ErrorKind::NotFound.into())),
            Err(WalkError::Symlink { at }) => Err(Refusal::SymlinkParent {
                parent: at.display().to_string(),
            }
            .into()),
            Err(WalkError::NotADirectory { at }) => Err(Refusal::ParentNotDirectory {
                parent: at.display().to_string(),
            }
            .into()),
            Err(WalkError::Io(e)) => Err(EntryError::Write(e)),
        }
    }

    fn file<R: Read>(
        &mut self,
        parent: &[OsString],
        name: &OsStr,
        data: &mut R,
        meta: Meta,
    ) -> Result<(), EntryError> {
        let dir = self.parent(parent)?;
        let mut file = tree::create_file(&dir, name).map_err(EntryError::Write)?;
        loop {
            let n = match data.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EntryError::Read(e)),
            };
            file.write_all(&self.buffer[..n])
                .map_err(EntryError::Write)?;
        }
        set_owner_mode_time(&file, meta).map_err(EntryError::Write)
    }

    fn directory(&mut self, path: &[OsString], meta: Meta) -> Result<(), EntryError> {
        let (name, parent) = path.split_last().ok_or(Refusal::Root)?;
        let dir = self.parent(parent)?;
        let write = |e: nix::Error| EntryError::Write(e.into());
        match tree::kind(&dir, name).map_err(EntryError::Write)? {
            Some(Kind::Dir) => {}
            existing => {
                if existing.is_some() {
                    tree::remove_all(&dir, name).map_err(EntryError::Write)?;
                }
                mkdirat(&dir, name.as_os_str(), Mode::from_bits_truncate(0o700)).map_err(write)?;
            }
        }
        let fd = tree::open_dir(&dir, name).map_err(write)?;
        fchown(
            &fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(write)?;
        fchmod(&fd, Mode::from_bits_truncate(meta.mode)).map_err(write)?;
        self.dir_times
            .insert(path.to_vec(), (meta.mtime, self.layer));
        Ok(())
    }

    fn symlink(
        &mut self,
        parent: &[OsString],
        name: &OsStr,
        target: &[u8],
        meta: Meta,
    ) -> Result<(), EntryError> {
        check_symlink_target(parent.len(), target)?;
        let dir = self.parent(parent)?;
        let write = |e: nix::Error| EntryError::Write(e.into());
        tree::remove_all(&dir, name).map_err(EntryError::Write)?;
        symlinkat(OsStr::from_bytes(target), &dir, name).map_err(write)?;
        fchownat(
            &dir,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(write)?;
        utimensat(
            &dir,
            name,
            &meta.time(),
            &meta.time(),
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(write)
    }

    fn hard_link(&mut self, path: &[OsString], target: &[u8]) -> Result<(), EntryError> {
        let shown = String::from_utf8_lossy(target).into_owned();
        let refuse = |problem| {
            EntryError::Refused(Refusal::HardLinkTarget {
                target: shown.clone(),
                problem,
            })
        };
        let target_path = entry_path(target).map_err(|refusal| {
            refuse(match refusal {
                Refusal::AbsolutePath => HardLinkProblem::Absolute,
                Refusal::ParentComponent => HardLinkProblem::ParentComponent,
                _ => HardLinkProblem::Invalid,
            })
        })?;
        if target_path == path {
            return Err(refuse(HardLinkProblem::Itself));
        }
        let Some((target_name, target_parent)) = target_path.split_last() else {
            return Err(refuse(HardLinkProblem::NotAFile));
        };
        let target_dir = match self.tree.walk(target_parent, false) {
            Ok(Some(fd)) => fd,
            Ok(None) | Err(WalkError::NotADirectory { .. }) => {
                return Err(refuse(HardLinkProblem::Missing))
            }
            Err(WalkError::Symlink { .. }) => return Err(refuse(HardLinkProblem::SymlinkParent)),
            Err(WalkError::Io(e)) => return Err(EntryError::Write(e)),
        };
        match tree::kind(&target_dir, target_name).map_err(EntryError::Write)? {
            Some(Kind::File { .. }) => {}
            None => return Err(refuse(HardLinkProblem::Missing)),
            Some(_) => return Err(refuse(HardLinkProblem::NotAFile)),
        }
        let (name, parent) = path.split_last().ok_or(Refusal::Root)?;
        let dir = self.parent(parent)?;
        tree::remove_all(&dir, name).map_err(EntryError::Write)?;
        linkat(
            &target_dir,
            target_name.as_os_str(),
            &dir,
            name.as_os_str(),
            AtFlags::empty(),
        )
        .map_err(|e| EntryError::Write(e.into()))
    }

    fn fifo(&mut self, parent: &[OsString], name: &OsStr, meta: Meta) -> Result<(), EntryError> {
        let dir = self.parent(parent)?;
        let write = |e: nix::Error| EntryError::Write(e.into());
        tree::remove_all(&dir, name).map_err(EntryError::Write)?;
        mkfifoat(&dir, name, Mode::from_bits_truncate(0o600)).map_err(write)?;
        fchownat(
            &dir,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(write)?;
        // The name was just made a FIFO, so following it cannot lead elsewhere.
        fchmodat(
            &dir,
            name,
            Mode::from_bits_truncate(meta.mode),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(write)?;
        utimensat(
            &dir,
            name,
            &meta.time(),
            &meta.time(),
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(write)
    }

    /// `.wh.<name>` hides `<name>` of the lower layers; `.wh..wh..opq` hides everything the
    /// lower layers put in its directory. Neither touches what this layer wrote, before or
    /// after the marker.
    fn whiteout(
        &mut self,
        layer: &LayerState,
        parent: &[OsString],
        hidden: &[u8],
    ) -> Result<(), EntryError> {
        if hidden == OPAQUE_MARKER {
            return self.clear_lower(layer, parent.to_vec());
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            // Other `.wh..wh.` names are aufs bookkeeping, meaningless in an image.
            return Ok(());
        }
        if hidden.is_empty() {
            return Err(Refusal::EmptyWhiteout.into());
        }
        let name = OsStr::from_bytes(hidden);
        let mut path = parent.to_vec();
        path.push(name.to_owned());
        let Some(dir) = self.existing_dir(parent)? else {
            return Ok(());
        };
        if !layer.touched.contains(&path) {
            return tree::remove_all(&dir, name).map_err(EntryError::Write);
        }
        if tree::kind(&dir, name).map_err(EntryError::Write)? == Some(Kind::Dir) {
            self.clear_lower(layer, path)?;
        }
        Ok(())
    }

    /// Removes everything below the directory `path` that this layer did not write.
    fn clear_lower(&mut self, layer: &LayerState, path: Vec<OsString>) -> Result<(), EntryError> {
        let mut pending = vec![path];
        while let Some(path) = pending.pop() {
            let Some(dir) = self.existing_dir(&path)? else {
                continue;
            };
            for (name, kind) in tree::list(&dir).map_err(EntryError::Write)? {
                let mut child = path.clone();
                child.push(name);
                if !layer.touched.contains(&child) {
                    let name = child.last().map(OsString::as_os_str).unwrap_or_default();
                    tree::remove_all(&dir, name).map_err(EntryError::Write)?;
                } else if kind == Kind::Dir {
                    pending.push(child);
                }
            }
        }
        Ok(())
    }

    /// The directory at `path` if there is one; a symlink on the way is refused, as a
    /// whiteout must not remove anything outside the tree either.
    fn existing_dir(&self, path: &[OsString]) -> Result<Option<OwnedFd>, EntryError> {
        match self.tree.walk(path, false) {
            Ok(fd) => Ok(fd),
            Err(WalkError::NotADirectory { .. }) => Ok(None),
            Err(WalkError::Symlink { at }) => Err(Refusal::SymlinkParent {
                parent: at.display().to_string(),
            }
            .into()),
            Err(WalkError::Io(e)) => Err(EntryError::Write(e)),
        }
    }

    fn restore_dir_times(&mut self, layers: &[LayerBlob]) -> Result<(), OciError> {
        for (path, (mtime, layer)) in &self.dir_times {
            let Ok(Some(dir)) = self.tree.walk(path, false) else {
                // Removed or replaced by a later layer.
                continue;
            };
            let time = TimeSpec::new(*mtime, 0);
            futimens(&dir, &time, &time).map_err(|e| OciError::Write {
                layer: *layer,
                blob: layers
                    .get(layer.saturating_sub(1))
                    .map(|l| l.name.clone())
                    .unwrap_or_default(),
                path: path_string(path),
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

/// The paths one layer wrote, with their ancestors.
struct LayerState {
    touched: HashSet<Vec<OsString>>,
}

impl LayerState {
    fn touch(&mut self, dirs: &[OsString]) {
        for depth in 1..=dirs.len() {
            if !self.touched.contains(&dirs[..depth]) {
                self.touched.insert(dirs[..depth].to_vec());
            }
        }
    }
}

fn path_string(path: &[OsString]) -> String {
    path.iter()
        .map(|c| c.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn set_owner_mode_time(fd: &impl AsFd, meta: Meta) -> io::Result<()> {
    fchown(
        fd,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )?;
    // After the owner: chown clears the set-id bits.
    fchmod(fd, Mode::from_bits_truncate(meta.mode))?;
    futimens(fd, &meta.time(), &meta.time())?;
    Ok(())
}

/// An entry's path as components below the root.
fn entry_path(raw: &[u8]) -> Result<Vec<OsString>, Refusal> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(Refusal::PathTooLong);
    }
    let mut path = Vec::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(name) => path.push(name.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err(Refusal::ParentComponent),
            Component::RootDir | Component::Prefix(_) => return Err(Refusal::AbsolutePath),
        }
    }
    if path.len() > MAX_PATH_DEPTH {
        return Err(Refusal::PathTooDeep);
    }
    Ok(path)
}

/// A relative target must stay below the root, counted from the link's directory (`depth`
/// components below it). Absolute targets are resolved in the guest, inside its root.
fn check_symlink_target(depth: usize, target: &[u8]) -> Result<(), Refusal> {
    if target.is_empty() {
        return Err(Refusal::EmptySymlinkTarget);
    }
    if target.starts_with(b"/") {
        return Ok(());
    }
    let mut depth = depth;
    for component in Path::new(OsStr::from_bytes(target)).components() {
        match component {
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| Refusal::SymlinkEscapes {
                        target: String::from_utf8_lossy(target).into_owned(),
                    })?;
            }
            Component::Normal(_) => depth += 1,
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::os::unix::fs::MetadataExt;

    use flate2::write::GzEncoder;
    use serde_json::json;

    use super::*;

    const MTIME: u64 = 1_600_000_000;

    /// A layer built entry by entry; names and link targets are written into the header as
    /// given, so hostile entries can be made too.
    pub(in crate::template) struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        pub(in crate::template) fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }

        fn entry(mut self, kind: tar::EntryType, path: &str, link: &str, data: &[u8]) -> Self {
            self.entry_owned(kind, path, link, data, 0o644, (0, 0));
            self
        }

        fn entry_owned(
            &mut self,
            kind: tar::EntryType,
            path: &str,
            link: &str,
            data: &[u8],
            mode: u32,
            (uid, gid): (u64, u64),
        ) {
            let mut header = tar::Header::new_gnu();
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_mode(mode);
            header.set_uid(uid);
            header.set_gid(gid);
            header.set_mtime(MTIME);
            header.set_cksum();
            self.0.append(&header, data).unwrap();
        }

        pub(in crate::template) fn dir(mut self, path: &str, mode: u32) -> Self {
            self.entry_owned(tar::EntryType::Directory, path, "", b"", mode, (0, 0));
            self
        }

        pub(in crate::template) fn file(self, path: &str, data: &[u8]) -> Self {
            self.entry(tar::EntryType::Regular, path, "", data)
        }

        pub(in crate::template) fn file_as(
            mut self,
            path: &str,
            data: &[u8],
            mode: u32,
            owner: (u64, u64),
        ) -> Self {
            self.entry_owned(tar::EntryType::Regular, path, "", data, mode, owner);
            self
        }

        pub(in crate::template) fn symlink(self, path: &str, target: &str) -> Self {
            self.entry(tar::EntryType::Symlink, path, target, b"")
        }

        fn hard_link(self, path: &str, target: &str) -> Self {
            self.entry(tar::EntryType::Link, path, target, b"")
        }

        pub(in crate::template) fn tar(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }

        pub(in crate::template) fn gzip(self) -> Vec<u8> {
            let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&self.tar()).unwrap();
            gz.finish().unwrap()
        }
    }

    pub(in crate::template) fn config(runtime: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
        .unwrap()
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn outer(path: &Path, members: &[(String, Vec<u8>)]) -> PathBuf {
        let mut builder = tar::Builder::new(File::create(path).unwrap());
        for (name, data) in members {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, name, data.as_slice())
                .unwrap();
        }
        builder.into_inner().unwrap().sync_all().unwrap();
        path.to_owned()
    }

    /// A `docker save` archive as Docker before 25 wrote it: `<id>/layer.tar` layers and the
    /// config under its digest.
    pub(in crate::template) fn docker_archive(
        dir: &Path,
        config: &[u8],
        layers: &[Vec<u8>],
    ) -> PathBuf {
        let config_name = format!("{}.json", sha(config));
        let layer_names: Vec<String> = (0..layers.len())
            .map(|i| format!("layer{i}/layer.tar"))
            .collect();
        let manifest = json!([{
            "Config": config_name,
            "RepoTags": ["test:latest"],
            "Layers": layer_names,
        }]);
        let mut members = vec![
            (
                "manifest.json".to_owned(),
                manifest.to_string().into_bytes(),
            ),
            (config_name, config.to_vec()),
        ];
        members.extend(layer_names.into_iter().zip(layers.iter().cloned()));
        outer(&dir.join("docker.tar"), &members)
    }

    fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
        json!({"mediaType": media_type, "digest": format!("sha256:{}", sha(bytes)), "size": bytes.len()})
    }

    /// An OCI layout whose `index.json` leads to an image index listing an arm64 and an amd64
    /// manifest (both present); `tamper` changes one byte of the amd64 image's first layer
    /// after its digest is taken.
    fn oci_archive(
        dir: &Path,
        config: &[u8],
        layers: &[Vec<u8>],
        arm_layer: &[u8],
        tamper: bool,
    ) -> PathBuf {
        let manifest = |config: &[u8], layers: &[Vec<u8>]| {
            serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": descriptor("application/vnd.oci.image.config.v1+json", config),
                "layers": layers
                    .iter()
                    .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l))
                    .collect::<Vec<_>>(),
            }))
            .unwrap()
        };
        let amd = manifest(config, layers);
        let arm_config = String::from_utf8(config.to_vec())
            .unwrap()
            .replace("amd64", "arm64")
            .into_bytes();
        let arm = manifest(&arm_config, &[arm_layer.to_vec()]);
        let platform = |arch: &str| json!({"architecture": arch, "os": "linux"});
        let mut arm_descriptor = descriptor("application/vnd.oci.image.manifest.v1+json", &arm);
        arm_descriptor["platform"] = platform("arm64");
        let mut amd_descriptor = descriptor("application/vnd.oci.image.manifest.v1+json", &amd);
        amd_descriptor["platform"] = platform("amd64");
        let image_index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [arm_descriptor, amd_descriptor],
        }))
        .unwrap();
        let index = json!({
            "schemaVersion": 2,
            "manifests": [descriptor("application/vnd.oci.image.index.v1+json", &image_index)],
        });
        let blob = |bytes: &[u8]| (format!("blobs/sha256/{}", sha(bytes)), bytes.to_vec());
        let mut members = vec![
            (
                "oci-layout".to_owned(),
                br#"{"imageLayoutVersion": "1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_owned(), index.to_string().into_bytes()),
            blob(&image_index),
            blob(&amd),
            blob(&arm),
            blob(config),
            blob(&arm_config),
            blob(arm_layer),
        ];
        for (i, layer) in layers.iter().enumerate() {
            let (name, mut bytes) = blob(layer);
            if tamper && i == 0 {
                let last = bytes.len() - 1;
                bytes[last] ^= 0xff;
            }
            members.push((name, bytes));
        }
        outer(&dir.join("oci.tar"), &members)
    }

    fn unpack_into(
        archive: &Path,
        limits: &UnpackLimits,
    ) -> (tempfile::TempDir, Result<ImageConfig, OciError>) {
        let tree = tempfile::tempdir().unwrap();
        let result = unpack(archive, tree.path(), limits, |_| {});
        (tree, result)
    }

    fn names_below(root: &Path) -> Vec<String> {
        let mut names = Vec::new();
        let mut pending = vec![root.to_owned()];
        while let Some(dir) = pending.pop() {
            for entry in fs_entries(&dir) {
                let path = entry.path();
                names.push(path.strip_prefix(root).unwrap().display().to_string());
                if entry.file_type().unwrap().is_dir() {
                    pending.push(path);
                }
            }
        }
        names.sort();
        names
    }

    fn fs_entries(dir: &Path) -> Vec<std::fs::DirEntry> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn docker_save_layers_apply_in_order_with_whiteouts_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let lower = Layer::new()
            .dir("etc/", 0o755)
            .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
            .file_as("usr/bin/tool", b"#!/bin/sh\n", 0o4755, (1000, 1001))
            .hard_link("usr/bin/tool2", "usr/bin/tool")
            .symlink("bin", "usr/bin")
            .symlink("usr/lib/up", "../../etc")
            .symlink("usr/lib/abs", "/etc/passwd")
            .file("var/cache/old", b"old")
            .file("var/cache/sub/deep", b"deep")
            .file("data/gone", b"gone")
            .file("data/kept", b"kept")
            .dir("data/gonedir/", 0o755)
            .file("data/gonedir/inner", b"inner")
            .tar();
        // The opaque marker comes after this layer's own file in the directory, which it must
        // not remove.
        let upper = Layer::new()
            .file("var/cache/new", b"new")
            .file("var/cache/.wh..wh..opq", b"")
            .file("data/.wh.gone", b"")
            .file("data/.wh.gonedir", b"")
            .file("data/added", b"added")
            .file("etc/passwd", b"replaced\n")
            .gzip();
        let config = config(json!({
            "Env": ["PATH=/usr/bin:/bin", "EMPTY", "EQ=a=b"],
            "Cmd": ["serve", "--port", "80"],
            "Entrypoint": ["/bin/tool"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
        }));
        let archive = docker_archive(dir.path(), &config, &[lower, upper]);
        let tree = tempfile::tempdir().unwrap();
        let mut reports = Vec::new();
        let image = unpack(&archive, tree.path(), &UnpackLimits::default(), |p| {
            reports.push(p)
        })
        .unwrap();
        let root = tree.path();

        assert_eq!(image.env["PATH"], "/usr/bin:/bin");
        assert_eq!(image.env["EMPTY"], "");
        assert_eq!(image.env["EQ"], "a=b");
        assert_eq!(image.cmd, ["serve", "--port", "80"]);
        assert_eq!(image.entrypoint, ["/bin/tool"]);
        assert_eq!(image.working_dir.as_deref(), Some("/srv"));
        assert_eq!(image.user.as_deref(), Some("1000:1000"));

        assert_eq!(
            std::fs::read(root.join("etc/passwd")).unwrap(),
            b"replaced\n"
        );
        let tool = std::fs::symlink_metadata(root.join("usr/bin/tool")).unwrap();
        assert_eq!(tool.mode() & 0o7777, 0o4755, "set-uid kept after chown");
        assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
        assert_eq!(tool.mtime(), MTIME as i64);
        let tool2 = std::fs::symlink_metadata(root.join("usr/bin/tool2")).unwrap();
        assert_eq!(tool2.ino(), tool.ino());
        assert_eq!(
            std::fs::read_link(root.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(
            std::fs::read_link(root.join("usr/lib/abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            std::fs::metadata(root.join("etc")).unwrap().mtime(),
            MTIME as i64
        );

        let names = names_below(root);
        for gone in [
            "var/cache/old",
            "var/cache/sub",
            "data/gone",
            "data/gonedir",
        ] {
            assert!(!names.contains(&gone.to_owned()), "{gone} in {names:?}");
        }
        for kept in ["var/cache/new", "data/kept", "data/added"] {
            assert!(
                names.contains(&kept.to_owned()),
                "{kept} missing from {names:?}"
            );
        }
        assert!(!names.iter().any(|n| n.contains(".wh.")), "{names:?}");

        assert_eq!(
            reports.first().map(|p| (p.layer, p.bytes_done)),
            Some((1, 0))
        );
        let last = reports.last().unwrap();
        assert_eq!((last.layer, last.layers), (2, 2));
        assert_eq!(last.bytes_done, last.bytes_total);
    }

    #[test]
    fn oci_layout_follows_a_nested_index_to_the_guest_platform() {
        let dir = tempfile::tempdir().unwrap();
        let layer = Layer::new().file("amd64", b"yes").gzip();
        let arm_layer = Layer::new().file("arm64", b"no").gzip();
        let config = config(json!({"Env": ["A=1"], "Cmd": ["sh"]}));
        let archive = oci_archive(dir.path(), &config, &[layer], &arm_layer, false);
        let (tree, image) = unpack_into(&archive, &UnpackLimits::default());
        let image = image.unwrap();
        assert_eq!(image.env["A"], "1");
        assert_eq!(image.cmd, ["sh"]);
        assert_eq!(names_below(tree.path()), ["amd64"]);
    }

    #[test]
    fn oci_blobs_are_checked_against_their_digests() {
        let dir = tempfile::tempdir().unwrap();
        let layer = Layer::new().file("a", b"a").tar();
        let config = config(json!({}));
        let archive = oci_archive(dir.path(), &config, &[layer], b"", true);
        let (_tree, result) = unpack_into(&archive, &UnpackLimits::default());
        match result {
            Err(OciError::DigestMismatch { member, .. }) => {
                assert!(member.starts_with("blobs/sha256/"), "{member}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Unpacks a docker-save archive of one layer and returns the refusal.
    fn refusal(layer: Vec<u8>, limits: &UnpackLimits) -> (String, Refusal) {
        let dir = tempfile::tempdir().unwrap();
        let archive = docker_archive(dir.path(), &config(json!({})), &[layer]);
        match unpack_into(&archive, limits).1 {
            Err(OciError::Refused {
                layer: 1,
                blob,
                path,
                reason,
            }) => {
                assert_eq!(blob, "layer0/layer.tar");
                (path, reason)
            }
            other => panic!("{other:?}"),
        }
    }

    fn refused(layer: Layer) -> (String, Refusal) {
        refusal(layer.tar(), &UnpackLimits::default())
    }

    #[test]
    fn refuses_absolute_paths() {
        let (path, reason) = refused(Layer::new().file("/etc/evil", b"x"));
        assert_eq!(
            (path.as_str(), reason),
            ("/etc/evil", Refusal::AbsolutePath)
        );
    }

    #[test]
    fn refuses_parent_components() {
        let (path, reason) = refused(Layer::new().file("a/../../evil", b"x"));
        assert_eq!(
            (path.as_str(), reason),
            ("a/../../evil", Refusal::ParentComponent)
        );
    }

    #[test]
    fn refuses_device_nodes() {
        let layer = Layer::new().entry(tar::EntryType::Char, "dev/null", "", b"");
        assert_eq!(refused(layer).1, Refusal::DeviceNode);
        let layer = Layer::new().entry(tar::EntryType::Block, "dev/sda", "", b"");
        assert_eq!(refused(layer).1, Refusal::DeviceNode);
    }

    #[test]
    fn refuses_symlinks_that_climb_above_the_root() {
        let (path, reason) = refused(Layer::new().symlink("usr/lib/x", "../../../etc/shadow"));
        assert_eq!(path, "usr/lib/x");
        assert_eq!(
            reason,
            Refusal::SymlinkEscapes {
                target: "../../../etc/shadow".into()
            }
        );
    }

    #[test]
    fn refuses_writing_through_a_symlinked_parent() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap();
        let (path, reason) = refused(
            Layer::new()
                .symlink("escape", target)
                .file("escape/planted", b"x"),
        );
        assert_eq!(path, "escape/planted");
        assert_eq!(
            reason,
            Refusal::SymlinkParent {
                parent: "escape".into()
            }
        );
        assert!(fs_entries(outside.path()).is_empty());
        // A whiteout must not remove through one either.
        std::fs::write(outside.path().join("victim"), b"x").unwrap();
        let (_, reason) = refused(
            Layer::new()
                .symlink("escape", target)
                .file("escape/.wh.victim", b""),
        );
        assert!(
            matches!(reason, Refusal::SymlinkParent { .. }),
            "{reason:?}"
        );
        assert!(outside.path().join("victim").exists());
    }

    #[test]
    fn refuses_hard_links_to_anything_but_an_extracted_file_in_the_tree() {
        let problem = |layer: Layer| match refused(layer).1 {
            Refusal::HardLinkTarget { problem, .. } => problem,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            problem(Layer::new().hard_link("a", "missing")),
            HardLinkProblem::Missing
        );
        assert_eq!(
            problem(Layer::new().hard_link("a", "/etc/shadow")),
            HardLinkProblem::Absolute
        );
        assert_eq!(
            problem(Layer::new().hard_link("a", "../etc/shadow")),
            HardLinkProblem::ParentComponent
        );
        assert_eq!(
            problem(Layer::new().dir("d/", 0o755).hard_link("a", "d")),
            HardLinkProblem::NotAFile
        );
        assert_eq!(
            problem(
                Layer::new()
                    .symlink("link", "/")
                    .hard_link("a", "link/etc/shadow")
            ),
            HardLinkProblem::SymlinkParent
        );
    }

    #[test]
    fn refuses_layers_past_the_unpacked_size_limit() {
        let limits = UnpackLimits {
            max_unpacked_bytes: 64 << 10,
            ..UnpackLimits::default()
        };
        let layer = Layer::new()
            .file("small", b"fits")
            .file("big", &vec![0; 128 << 10])
            .gzip();
        let (path, reason) = refusal(layer, &limits);
        assert_eq!(
            (path.as_str(), reason),
            ("big", Refusal::TooLarge { limit: 64 << 10 })
        );
    }

    #[test]
    fn refuses_headers_longer_than_their_limit() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_entry_type(tar::EntryType::Regular);
        let long = "a/".repeat(MAX_HEADER_BYTES as usize);
        builder
            .append_data(&mut header, format!("{long}x"), &b""[..])
            .unwrap();
        let (_, reason) = refusal(builder.into_inner().unwrap(), &UnpackLimits::default());
        assert_eq!(reason, Refusal::HeadersTooLong);
    }

    #[test]
    fn refuses_archives_past_their_size_limit_and_compressed_archives() {
        let dir = tempfile::tempdir().unwrap();
        let archive = docker_archive(dir.path(), &config(json!({})), &[Layer::new().tar()]);
        let limits = UnpackLimits {
            max_archive_bytes: 1024,
            ..UnpackLimits::default()
        };
        let (_tree, result) = unpack_into(&archive, &limits);
        assert!(
            matches!(result, Err(OciError::ArchiveTooLarge { limit: 1024, .. })),
            "{result:?}"
        );
        let gzipped = dir.path().join("docker.tar.gz");
        let mut gz = GzEncoder::new(File::create(&gzipped).unwrap(), flate2::Compression::fast());
        gz.write_all(&std::fs::read(&archive).unwrap()).unwrap();
        gz.finish().unwrap();
        let (_tree, result) = unpack_into(&gzipped, &UnpackLimits::default());
        assert!(
            matches!(
                result,
                Err(OciError::CompressedArchive { kind: "gzip", .. })
            ),
            "{result:?}"
        );
    }

    #[test]
    fn refuses_zstd_layers_and_foreign_platforms() {
        let dir = tempfile::tempdir().unwrap();
        let zstd = [&[0x28, 0xb5, 0x2f, 0xfd][..], &[0; 64]].concat();
        let archive = docker_archive(dir.path(), &config(json!({})), &[zstd]);
        let (_tree, result) = unpack_into(&archive, &UnpackLimits::default());
        assert!(
            matches!(
                result,
                Err(OciError::UnsupportedCompression {
                    layer: 1,
                    kind: "zstd",
                    ..
                })
            ),
            "{result:?}"
        );
        let arm = String::from_utf8(config(json!({})))
            .unwrap()
            .replace("amd64", "arm64");
        let archive = docker_archive(dir.path(), arm.as_bytes(), &[Layer::new().tar()]);
        let (_tree, result) = unpack_into(&archive, &UnpackLimits::default());
        assert!(
            matches!(result, Err(OciError::WrongPlatform { .. })),
            "{result:?}"
        );
    }
}
