//! The template images this host holds (every `images/<name>/rootfs.ext4` under a valid template
//! name, with its size and the checksum its `meta.json` records), and their exchange with the
//! template store: a create whose template this host lacks, or holds in another version, pulls
//! it first; a publish puts a local image into the store for every other host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::agent::wire::{HeldTemplate, ImportedTemplate};
use crate::config::Layout;
use crate::store::{BlobRef, StoreError, TemplateStore};
use crate::template::image::{self, ImageError, ImportOptions};
use crate::template::oci::UnpackLimits;
use crate::template::TemplateName;

/// A template's lock, held: its image does not change until this is dropped.
pub type ImageLease = tokio::sync::OwnedMutexGuard<()>;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template `{template}` is not on this host (expected {path})")]
    NotHere { template: String, path: PathBuf },
    #[error("template `{template}`: {source}")]
    Store {
        template: String,
        source: StoreError,
    },
    /// The archive is at fault: not an image, or an entry refused.
    #[error("importing template `{template}`: {reason}")]
    ImportRefused { template: String, reason: String },
    /// This host is: its envd binary, its disk, its tools.
    #[error("importing template `{template}`: {reason}")]
    ImportFailed { template: String, reason: String },
    /// A snapshot template's saved memory belongs to this host's VMM and kernel: it is not
    /// an image other hosts could use.
    #[error("template `{0}` is a snapshot template: its agent publishes it with its snapshot")]
    SnapshotTemplate(String),
    /// The store's copy of a snapshot template cannot be restored here (another VMM or guest
    /// kernel, another format, or not the template asked for); nothing of it was kept.
    #[error("snapshot template `{template}` cannot be used on this host: {reason}")]
    SnapshotUnusable { template: String, reason: String },
    #[error("the archive is over the {limit}-byte limit")]
    ArchiveTooLarge { limit: u64 },
    #[error("template `{template}`: {what}: {source}")]
    Io {
        template: String,
        what: String,
        source: std::io::Error,
    },
}

/// This host's template images and the store they come from.
pub struct TemplateImages {
    layout: Layout,
    store: TemplateStore,
    /// The static wrenn binary imported images get as their envd.
    envd_binary: PathBuf,
    /// One change per template at a time: a pull, a capture, an import, a publish, a removal,
    /// and a create linking the image, each hold the template's lock, so none sees another's
    /// half-done work (creates needing the same missing image wait for the first one's pull).
    locks: Mutex<HashMap<TemplateName, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for TemplateImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateImages")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl TemplateImages {
    pub fn new(layout: Layout, store: TemplateStore, envd_binary: PathBuf) -> Self {
        Self {
            layout,
            store,
            envd_binary,
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn held(&self) -> Vec<HeldTemplate> {
        held(&self.layout)
    }

    /// The store the images come from and go to.
    pub fn store(&self) -> &TemplateStore {
        &self.store
    }

    /// Puts the image file at `path` (a sandbox's link to the image of `template` it was
    /// created from) into the store, unless the store holds it already, and returns its blob.
    /// When `path` is still the template's current image, the checksum recorded for it saves
    /// hashing it again.
    pub async fn publish_image_file(
        &self,
        template: &TemplateName,
        path: &Path,
    ) -> Result<BlobRef, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let identity = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino(), m.len()));
        let current = self.layout.image_rootfs(template.as_str());
        if let (Ok(own), Ok(image), Some(sha256)) = (
            identity(path),
            identity(&current),
            recorded_sha256(&self.layout, template),
        ) {
            if own == image {
                let blob = BlobRef::new(&sha256, own.2)?;
                if self.store.check(&blob).await.is_ok() {
                    return Ok(blob);
                }
            }
        }
        self.store.publish(path, |_| {}).await
    }

    /// Makes `dest` the image `blob` of `template`: a link to this host's image when it is that
    /// version, else a copy fetched from the store.
    pub async fn image_file_at(
        &self,
        template: &TemplateName,
        blob: &BlobRef,
        dest: &Path,
    ) -> Result<(), TemplateError> {
        let _lease = self.lock(template).await;
        if self.link_if_held(template, blob, dest) {
            return Ok(());
        }
        self.fetch_image(template, blob, dest).await
    }

    /// [`Self::image_file_at`] for a caller holding another template's lease: this host's image
    /// is linked only when `template`'s lock is free at once (two pulls, each holding one
    /// template's lock and wanting the other's image, would wait on each other for ever), and
    /// fetched from the store otherwise.
    pub async fn image_file_at_without_waiting(
        &self,
        template: &TemplateName,
        blob: &BlobRef,
        dest: &Path,
    ) -> Result<(), TemplateError> {
        if let Ok(_lease) = self.lock_of(template).try_lock_owned() {
            if self.link_if_held(template, blob, dest) {
                return Ok(());
            }
        }
        self.fetch_image(template, blob, dest).await
    }

    fn link_if_held(&self, template: &TemplateName, blob: &BlobRef, dest: &Path) -> bool {
        self.holds(template, blob)
            && std::fs::hard_link(self.layout.image_rootfs(template.as_str()), dest).is_ok()
    }

    async fn fetch_image(
        &self,
        template: &TemplateName,
        blob: &BlobRef,
        dest: &Path,
    ) -> Result<(), TemplateError> {
        self.store
            .fetch(blob, dest, |progress| {
                tracing::info!(template = %template, "fetching a paused sandbox's image: {progress}");
            })
            .await
            .map_err(|source| TemplateError::Store {
                template: template.to_string(),
                source,
            })
    }

    /// Holds `template`'s images still until the lease is dropped.
    pub async fn lock(&self, template: &TemplateName) -> ImageLease {
        self.lock_of(template).lock_owned().await
    }

    fn lock_of(&self, template: &TemplateName) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("template locks")
            .entry(template.clone())
            .or_default()
            .clone()
    }

    /// The path of the template's image, pulled from the store first when `wanted` names a
    /// version this host does not hold; without `wanted`, whatever the host holds. The image
    /// stays as it is while the lease lives: the create links it before letting go.
    pub async fn ensure(
        &self,
        template: &TemplateName,
        wanted: Option<&BlobRef>,
    ) -> Result<(PathBuf, ImageLease), TemplateError> {
        let lease = self.lock(template).await;
        let image = self.layout.image_rootfs(template.as_str());
        let Some(wanted) = wanted else {
            return if image.is_file() {
                Ok((image, lease))
            } else {
                Err(TemplateError::NotHere {
                    template: template.to_string(),
                    path: image,
                })
            };
        };
        if !self.holds(template, wanted) {
            self.pull(template, wanted).await?;
        }
        Ok((image, lease))
    }

    /// Whether the local image is `wanted`, by the checksum recorded when it was built or
    /// pulled: hashing a multi-GiB image on every create would cost more than the boot.
    fn holds(&self, template: &TemplateName, wanted: &BlobRef) -> bool {
        let size = std::fs::metadata(self.layout.image_rootfs(template.as_str())).map(|m| m.len());
        size.ok() == Some(wanted.size_bytes)
            && recorded_sha256(&self.layout, template).as_deref() == Some(wanted.sha256.as_str())
    }

    async fn pull(&self, template: &TemplateName, wanted: &BlobRef) -> Result<(), TemplateError> {
        let name = template.to_string();
        let io = |what: &str| {
            let template = name.clone();
            let what = what.to_owned();
            move |source| TemplateError::Io {
                template,
                what,
                source,
            }
        };
        let dir = self.layout.image_dir(template.as_str());
        std::fs::create_dir_all(&dir).map_err(io("creating its image directory"))?;
        // Named by the blob, so an interrupted pull of this version resumes and a pull of
        // another version never mistakes it for its own.
        let fetched = dir.join(format!(".pull-{}", wanted.sha256));
        tracing::info!(
            template = name,
            sha256 = wanted.sha256,
            bytes = wanted.size_bytes,
            store = self.store.location(),
            "pulling the template image"
        );
        let started = std::time::Instant::now();
        self.store
            .fetch(wanted, &fetched, |progress| {
                tracing::info!(template = name, "pulling: {progress}");
            })
            .await
            .map_err(|source| TemplateError::Store {
                template: name.clone(),
                source,
            })?;
        // Sandboxes booted from the image this replaces keep their own link to it
        // (`sandboxes/<id>/base.ext4`), so the rename cannot change a running or paused disk.
        std::fs::rename(&fetched, self.layout.image_rootfs(template.as_str()))
            .map_err(io("installing the pulled image"))?;
        let meta = serde_json::json!({
            "template": name,
            "sha256": wanted.sha256,
            "size_bytes": wanted.size_bytes,
            "source": "store",
            "store": self.store.location(),
            "pulled_at": chrono::Utc::now(),
            "pull_seconds": started.elapsed().as_secs_f64(),
        });
        write_meta(&self.layout, template, &meta).map_err(io("writing meta.json"))?;
        tracing::info!(
            template = name,
            seconds = started.elapsed().as_secs_f64(),
            "template image pulled"
        );
        Ok(())
    }

    /// Removes the local image of `template`, at once from the name's point of view (a rename
    /// out of the way first), so a create never sees half a directory. Removing an image the
    /// host does not hold is not an error.
    pub async fn remove(&self, template: &TemplateName) -> Result<(), TemplateError> {
        let _lease = self.lock(template).await;
        let dir = self.layout.image_dir(template.as_str());
        let doomed = self.layout.images_dir().join(format!(
            ".removing-{template}-{:016x}",
            rand::random::<u64>()
        ));
        let failed = |source| TemplateError::Io {
            template: template.to_string(),
            what: "removing its image".into(),
            source,
        };
        match std::fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(failed(source)),
        }
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&doomed))
            .await
            .map_err(|e| failed(std::io::Error::other(e)))?
            .map_err(failed)?;
        tracing::info!(%template, "template image removed from this host");
        Ok(())
    }

    /// Puts the local image of `template` into the store and records its checksum beside it.
    pub async fn publish(&self, template: &TemplateName) -> Result<BlobRef, TemplateError> {
        let _lease = self.lock(template).await;
        self.publish_locked(template).await
    }

    /// [`Self::publish`], for a caller holding the template's lease.
    pub async fn publish_locked(&self, template: &TemplateName) -> Result<BlobRef, TemplateError> {
        let name = template.to_string();
        let image = self.layout.image_rootfs(template.as_str());
        if !image.is_file() {
            return Err(TemplateError::NotHere {
                template: name,
                path: image,
            });
        }
        if self.layout.image_snapshot_dir(template.as_str()).exists() {
            return Err(TemplateError::SnapshotTemplate(name));
        }
        let blob = self
            .store
            .publish(&image, |progress| {
                tracing::info!(template = name, "publishing: {progress}");
            })
            .await
            .map_err(|source| TemplateError::Store {
                template: name.clone(),
                source,
            })?;
        self.record_version(template, &blob)
            .map_err(|source| TemplateError::Io {
                template: name.clone(),
                what: "writing meta.json".into(),
                source,
            })?;
        tracing::info!(
            template = name,
            sha256 = blob.sha256,
            "template image published"
        );
        Ok(blob)
    }
}

impl TemplateImages {
    /// Records in the template's `meta.json` that this host's copy is `blob` in the store.
    pub fn record_version(&self, template: &TemplateName, blob: &BlobRef) -> std::io::Result<()> {
        let meta_path = self.layout.image_dir(template.as_str()).join("meta.json");
        let mut meta = std::fs::read(&meta_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({ "template": template }));
        meta["sha256"] = blob.sha256.clone().into();
        meta["size_bytes"] = blob.size_bytes.into();
        write_meta(&self.layout, template, &meta)
    }

    /// The version of the template in the store that this host's copy is, as recorded.
    pub fn recorded_version(&self, template: &TemplateName) -> Option<BlobRef> {
        let meta =
            std::fs::read(self.layout.image_dir(template.as_str()).join("meta.json")).ok()?;
        let meta: serde_json::Value = serde_json::from_slice(&meta).ok()?;
        BlobRef::new(meta["sha256"].as_str()?, meta["size_bytes"].as_u64()?).ok()
    }
}

/// Where an import's archive comes from.
pub enum ImportSource {
    /// A file on this host, which the import leaves in place.
    Path(PathBuf),
    /// The request's body, written to a private file first.
    Upload(axum::body::Body),
}

impl TemplateImages {
    /// Imports a container image archive (`docker save` or OCI layout) as the image of
    /// `template`, installs it here and publishes it to the store. A failed import leaves no
    /// file and keeps the image the host had.
    pub async fn import(
        &self,
        template: &TemplateName,
        source: ImportSource,
        start_entrypoint: bool,
    ) -> Result<ImportedTemplate, TemplateError> {
        let name = template.to_string();
        let failed = |reason: String| TemplateError::ImportFailed {
            template: name.clone(),
            reason,
        };
        let binary = self.envd_binary.clone();
        tokio::task::spawn_blocking(move || check_static(&binary))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(&failed)?;
        let limits = UnpackLimits::default();
        let _lease = self.lock(template).await;
        let (archive, uploaded) = match source {
            ImportSource::Path(path) => {
                if !path.is_absolute() || !path.is_file() {
                    return Err(TemplateError::ImportRefused {
                        template: name.clone(),
                        reason: format!(
                            "{} is not an absolute path to a file on this host",
                            path.display()
                        ),
                    });
                }
                (path, None)
            }
            ImportSource::Upload(body) => {
                let file = tempfile::Builder::new()
                    .prefix(&format!(".upload-{name}-"))
                    .tempfile_in(self.layout.images_dir())
                    .map_err(|e| failed(format!("creating the upload file: {e}")))?;
                let (file, path) = file.into_parts();
                receive(body, file, limits.max_archive_bytes).await?;
                (path.to_path_buf(), Some(path))
            }
        };
        let options = ImportOptions {
            wrenn_binary: Some(self.envd_binary.clone()),
            limits,
            start_entrypoint,
            template: None,
            source: "oci",
        };
        let out_dir = self.layout.image_dir(template.as_str());
        let owned = template.clone();
        let progress_name = name.clone();
        let imported = tokio::task::spawn_blocking(move || {
            let mut last = std::time::Instant::now();
            image::import(&archive, &owned, &out_dir, &options, |p| {
                if last.elapsed() >= std::time::Duration::from_secs(2) {
                    last = std::time::Instant::now();
                    tracing::info!(
                        template = progress_name,
                        "importing: layer {} of {}, {} of {}",
                        p.layer,
                        p.layers,
                        crate::progress::Bytes(p.bytes_done),
                        crate::progress::Bytes(p.bytes_total)
                    );
                }
            })
        })
        .await;
        drop(uploaded);
        let imported = match imported {
            Ok(Ok(imported)) => imported,
            Ok(Err(
                error @ (ImageError::Unpack(_)
                | ImageError::UnknownUser { .. }
                | ImageError::NotA { .. }),
            )) => {
                return Err(TemplateError::ImportRefused {
                    template: name.clone(),
                    reason: error.to_string(),
                })
            }
            Ok(Err(error)) => return Err(failed(error.to_string())),
            Err(error) => return Err(failed(format!("the import task failed: {error}"))),
        };
        let image = self.publish_locked(template).await?;
        Ok(ImportedTemplate {
            image,
            entrypoint: imported.image.entrypoint,
            cmd: imported.image.cmd,
            user: imported.template.user,
            workdir: imported.template.workdir,
            env: imported.template.env.into_keys().collect(),
        })
    }
}

/// Writes an uploaded archive to `file`, refusing it once it passes `limit`.
async fn receive(
    body: axum::body::Body,
    file: std::fs::File,
    limit: u64,
) -> Result<(), TemplateError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let io = |source| TemplateError::Io {
        template: String::new(),
        what: "writing the uploaded archive".into(),
        source,
    };
    let mut file = tokio::fs::File::from_std(file);
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| io(std::io::Error::other(e)))?;
        received += chunk.len() as u64;
        if received > limit {
            return Err(TemplateError::ArchiveTooLarge { limit });
        }
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)
}

/// Refuses a binary with an ELF interpreter: a dynamically linked envd would not start in
/// images without the host's libraries.
fn check_static(binary: &std::path::Path) -> Result<(), String> {
    let bytes =
        std::fs::read(binary).map_err(|e| format!("the envd binary {}: {e}", binary.display()))?;
    let field = |at: usize, len: usize| -> Option<u64> {
        let raw = bytes.get(at..at + len)?;
        Some(
            raw.iter()
                .rev()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
        )
    };
    let elf64 = bytes.starts_with(b"\x7fELF\x02\x01");
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (field(0x20, 8), field(0x36, 2), field(0x38, 2))
    else {
        return Err(format!(
            "the envd binary {} is not an ELF executable",
            binary.display()
        ));
    };
    if !elf64 {
        return Err(format!(
            "the envd binary {} is not a 64-bit ELF executable",
            binary.display()
        ));
    }
    const PT_INTERP: u64 = 3;
    let dynamic = (0..phnum).any(|i| {
        usize::try_from(phoff + i * phentsize)
            .ok()
            .and_then(|at| field(at, 4))
            == Some(PT_INTERP)
    });
    if dynamic {
        return Err(format!(
            "the envd binary {} is dynamically linked; set agent.envd_binary to a static build (`just build-static`)",
            binary.display()
        ));
    }
    Ok(())
}

fn write_meta(
    layout: &Layout,
    template: &TemplateName,
    meta: &serde_json::Value,
) -> std::io::Result<()> {
    let path = layout.image_dir(template.as_str()).join("meta.json");
    let partial = Layout::partial(&path);
    std::fs::write(&partial, serde_json::to_vec_pretty(meta)?)?;
    std::fs::rename(&partial, &path)
}

/// Read on every listing: a directory scan and one small file per template, so an image built
/// or removed while the agent runs is reported at once.
pub fn held(layout: &Layout) -> Vec<HeldTemplate> {
    let Ok(entries) = std::fs::read_dir(layout.images_dir()) else {
        return Vec::new();
    };
    let mut held: Vec<HeldTemplate> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name: TemplateName = entry.file_name().to_str()?.parse().ok()?;
            let image = std::fs::metadata(layout.image_rootfs(name.as_str())).ok()?;
            if !image.is_file() {
                return None;
            }
            Some(HeldTemplate {
                sha256: recorded_sha256(layout, &name),
                size_bytes: image.len(),
                name,
            })
        })
        .collect();
    held.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    held
}

fn recorded_sha256(layout: &Layout, name: &TemplateName) -> Option<String> {
    let meta = std::fs::read(layout.image_dir(name.as_str()).join("meta.json")).ok()?;
    let meta: serde_json::Value = serde_json::from_slice(&meta).ok()?;
    meta["sha256"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_images_with_a_rootfs_under_valid_names() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        assert!(held(&layout).is_empty(), "no images directory at all");
        for (name, with_image) in [("python", true), ("minimal", true), ("half", false)] {
            std::fs::create_dir_all(layout.image_dir(name)).unwrap();
            if with_image {
                std::fs::write(layout.image_rootfs(name), vec![0; 4096]).unwrap();
            }
        }
        std::fs::write(
            layout.image_dir("python").join("meta.json"),
            r#"{"template": "python", "sha256": "abc"}"#,
        )
        .unwrap();
        std::fs::create_dir_all(layout.images_dir().join(".hidden")).unwrap();
        std::fs::write(layout.images_dir().join(".hidden/rootfs.ext4"), b"x").unwrap();
        let names: Vec<(String, u64, Option<String>)> = held(&layout)
            .into_iter()
            .map(|t| (t.name.to_string(), t.size_bytes, t.sha256))
            .collect();
        assert_eq!(
            names,
            [
                ("minimal".to_owned(), 4096, None),
                ("python".to_owned(), 4096, Some("abc".to_owned()))
            ]
        );
    }
}
