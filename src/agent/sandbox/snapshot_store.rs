//! Snapshot templates in the template store: the host that made one publishes it (its
//! `snapshot/` files as packs, its base image, and a [`StoredSnapshotTemplate`] document naming
//! them, itself a blob whose reference the registry keeps as the template's version), and any
//! host with the same VMM and guest kernel pulls it before its first create of that version.
//!
//! The document is content-addressed like an image, so a host's copy is the registry's version
//! exactly when the checksum recorded in its `meta.json` is the document's.

use std::path::{Path, PathBuf};

use super::relocation::{pack_file, unpack_file, CopyError};
use super::snapshot_template::install;
use super::{SandboxError, SandboxManager};
use crate::agent::templates::{ImageLease, TemplateError};
use crate::agent::wire::{
    SnapshotTemplateFile, StoredSnapshotFile, StoredSnapshotTemplate,
    STORED_SNAPSHOT_TEMPLATE_FORMAT,
};
use crate::store::{BlobRef, StoreError, TemplateStore};
use crate::template::TemplateName;
use crate::vmm::{rebase_snapshot_meta, SnapshotFiles};

/// Where each file of a snapshot template lives in its `snapshot/` directory.
fn file_path(snapshot_dir: &Path, file: SnapshotTemplateFile) -> PathBuf {
    let files = SnapshotFiles::in_dir(snapshot_dir.to_owned());
    match file {
        SnapshotTemplateFile::Record => snapshot_dir.join("snapshot.json"),
        SnapshotTemplateFile::SnapshotMeta => files.meta,
        SnapshotTemplateFile::SnapshotState => files.state,
        SnapshotTemplateFile::SnapshotMemory => files.memory,
        SnapshotTemplateFile::Disk => snapshot_dir.join("upper.ext4"),
    }
}

const FILES: [SnapshotTemplateFile; 5] = [
    SnapshotTemplateFile::Record,
    SnapshotTemplateFile::SnapshotMeta,
    SnapshotTemplateFile::SnapshotState,
    SnapshotTemplateFile::SnapshotMemory,
    SnapshotTemplateFile::Disk,
];

/// Which version of a template `snapshot_dir` holds: its `snapshot.json`'s inode (an overwrite
/// installs a new directory).
fn template_identity(snapshot_dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(snapshot_dir.join("snapshot.json")).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Hard-links a template's files (its `snapshot/` and its base image) into `staging`, laid out
/// as the template is: the links keep this version's files whatever happens to the template.
fn link_aside(snapshot_dir: &Path, rootfs: &Path, staging: &Path) -> std::io::Result<()> {
    let linked = staging.join("snapshot");
    std::fs::create_dir_all(&linked)?;
    std::fs::hard_link(rootfs, staging.join("rootfs.ext4"))?;
    for file in FILES {
        let source = file_path(snapshot_dir, file);
        if source.exists() {
            std::fs::hard_link(&source, file_path(&linked, file))?;
        }
    }
    Ok(())
}

/// What every pack of one copy of `template` is labelled with.
fn label_prefix(template: &TemplateName) -> String {
    format!("wrenn snapshot template {template} ")
}

impl SandboxManager {
    /// Puts this host's snapshot template into the store (unless this version is there already)
    /// and answers its document's reference. The template's lock is held only to link its files
    /// aside, not while they are uploaded (creates of it go on meanwhile). What was uploaded of
    /// a publish that fails is removed again.
    pub(super) async fn publish_snapshot_template(
        &self,
        template: &TemplateName,
    ) -> Result<BlobRef, SandboxError> {
        let store = self.templates.store().clone();
        let failed = |source: StoreError| {
            SandboxError::Template(TemplateError::Store {
                template: template.to_string(),
                source,
            })
        };
        let staging = self.layout.images_dir().join(format!(
            ".snapshot-publish-{template}-{:016x}",
            rand::random::<u64>()
        ));
        let lease = self.templates.lock(template).await;
        let snapshot = self
            .template_snapshot(template)?
            .ok_or_else(|| TemplateError::NotHere {
                template: template.to_string(),
                path: self.layout.image_snapshot_dir(template.as_str()),
            })?;
        if let Some(published) = self.templates.recorded_version(template) {
            if store.check(&published).await.is_ok() {
                return Ok(published);
            }
        }
        let version = template_identity(&snapshot.files.dir);
        let linked = link_aside(
            &snapshot.files.dir,
            &self.layout.image_rootfs(template.as_str()),
            &staging,
        );
        drop(lease);
        let result = match linked {
            Ok(()) => {
                self.upload(template, &snapshot.record.from_template, &staging)
                    .await
            }
            Err(error) => Err(CopyError::Io {
                what: format!("linking {template}'s files aside"),
                source: error,
            }),
        };
        let _ = std::fs::remove_dir_all(&staging);
        let (copy, document) = result.map_err(|error| match error {
            CopyError::Store(source) => failed(source),
            other => SandboxError::Io {
                what: format!("publishing snapshot template {template}"),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
        // Recorded only if the template is still the version uploaded: an overwrite meanwhile
        // is another version, which this copy is not.
        let _lease = self.templates.lock(template).await;
        if template_identity(&self.layout.image_snapshot_dir(template.as_str())) != version {
            if let Err(error) = copy.remove_files(&store).await {
                tracing::warn!(%template, %error, "could not remove a superseded snapshot template copy from the store");
            }
            let _ = store.delete(&document.sha256).await;
            return Err(SandboxError::Io {
                what: format!("publishing snapshot template {template}"),
                source: std::io::Error::other("it was replaced while it was uploaded"),
            });
        }
        self.templates
            .record_version(template, &document)
            .map_err(|source| SandboxError::Io {
                what: format!("recording the published version of {template}"),
                source,
            })?;
        tracing::info!(%template, sha256 = document.sha256, "snapshot template published");
        Ok(document)
    }

    /// Uploads the files linked in `staging` and the document naming them; on failure removes
    /// what it uploaded.
    async fn upload(
        &self,
        template: &TemplateName,
        from_template: &TemplateName,
        staging: &Path,
    ) -> Result<(StoredSnapshotTemplate, BlobRef), CopyError> {
        let store = self.templates.store().clone();
        let started = std::time::Instant::now();
        let (kernel_sha256, initrd_sha256) = self.kernel_checksums.of(&self.layout).await?;
        let vmm_version = self.vmm.version().await.map_err(|e| CopyError::Io {
            what: "asking the VMM's version".into(),
            source: std::io::Error::other(e),
        })?;
        let base_image = self
            .templates
            .publish_image_file(from_template, &staging.join("rootfs.ext4"))
            .await?;
        let mut copy = StoredSnapshotTemplate {
            format: STORED_SNAPSHOT_TEMPLATE_FORMAT,
            template: template.clone(),
            vmm: self.vmm.kind().to_string(),
            vmm_version,
            kernel_sha256,
            initrd_sha256,
            from_template: from_template.clone(),
            base_image,
            files: Vec::new(),
            stored_at: chrono::Utc::now(),
        };
        let uploaded = async {
            let version = uuid::Uuid::new_v4();
            for file in FILES {
                let source = file_path(&staging.join("snapshot"), file);
                if !source.exists() {
                    continue;
                }
                let pack = staging.join(format!("{file:?}.pack"));
                let label = format!("{}copy {version} {file:?}", label_prefix(template));
                pack_file(source, pack.clone(), label, || false).await?;
                let blob = store.publish(&pack, |_| {}).await?;
                let _ = std::fs::remove_file(&pack);
                copy.files.push(StoredSnapshotFile { file, blob });
            }
            let bytes = serde_json::to_vec_pretty(&copy).expect("a stored template serialises");
            Ok::<_, CopyError>(store.publish_bytes(bytes).await?)
        }
        .await;
        match uploaded {
            Ok(document) => {
                tracing::info!(%template, elapsed = ?started.elapsed(), "snapshot template uploaded");
                Ok((copy, document))
            }
            Err(error) => {
                if let Err(cleanup) = copy.remove_files(&store).await {
                    tracing::warn!(%template, error = %cleanup, "could not remove an unfinished snapshot template copy from the store");
                }
                Err(error)
            }
        }
    }

    /// Makes this host's copy of `template` the store's version `document` unless it is that
    /// version already; the caller holds the template's lease.
    pub(super) async fn ensure_snapshot_template(
        &self,
        template: &TemplateName,
        document: &BlobRef,
        lease: ImageLease,
    ) -> Result<(PathBuf, ImageLease), SandboxError> {
        let image = self.layout.image_rootfs(template.as_str());
        let held = self.templates.recorded_version(template).as_ref() == Some(document)
            && self.template_snapshot(template)?.is_some();
        if !held {
            self.pull_snapshot_template(template, document).await?;
        }
        Ok((image, lease))
    }

    /// Installs the store's copy `document` of `template` here, replacing what the host held of
    /// it. On failure nothing of it is left and the host's earlier copy stays.
    async fn pull_snapshot_template(
        &self,
        template: &TemplateName,
        document: &BlobRef,
    ) -> Result<(), SandboxError> {
        let unusable = |reason: String| {
            SandboxError::Template(TemplateError::SnapshotUnusable {
                template: template.to_string(),
                reason,
            })
        };
        let store = self.templates.store().clone();
        let fetched = store.read_bytes(document).await.map_err(|source| {
            SandboxError::Template(TemplateError::Store {
                template: template.to_string(),
                source,
            })
        })?;
        let copy: StoredSnapshotTemplate = serde_json::from_slice(&fetched)
            .map_err(|e| unusable(format!("its copy in the store is unreadable: {e}")))?;
        if copy.format != STORED_SNAPSHOT_TEMPLATE_FORMAT || copy.template != *template {
            return Err(unusable(format!(
                "the store's document is of format {} for template `{}`; this agent reads \
                 format {STORED_SNAPSHOT_TEMPLATE_FORMAT}",
                copy.format, copy.template
            )));
        }
        self.check_restorable_here(
            (&copy.vmm, &copy.vmm_version),
            (&copy.kernel_sha256, copy.initrd_sha256.as_deref()),
        )
        .await
        .map_err(unusable)?;
        // Named like an unfinished snapshot template, which agent start removes.
        let staging = self.layout.images_dir().join(format!(
            ".snapshot-pull-{template}-{:016x}",
            rand::random::<u64>()
        ));
        let started = std::time::Instant::now();
        let result = self
            .take_in_template(&store, &copy, document, &staging)
            .await;
        let installed = result.and_then(|()| {
            install(&self.layout.image_dir(template.as_str()), &staging)
                .map_err(|reason| unusable(format!("installing it: {reason}")))
        });
        if let Err(error) = installed {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error);
        }
        tracing::info!(%template, sha256 = document.sha256, elapsed = ?started.elapsed(), "snapshot template pulled from the store");
        Ok(())
    }

    /// Fetches and unpacks the copy's files into `staging` (laid out as `images/<template>/`),
    /// pointed at this host's kernel and the paths they will have once installed.
    async fn take_in_template(
        &self,
        store: &TemplateStore,
        copy: &StoredSnapshotTemplate,
        document: &BlobRef,
        staging: &Path,
    ) -> Result<(), SandboxError> {
        let template = &copy.template;
        let unusable = |reason: String| {
            SandboxError::Template(TemplateError::SnapshotUnusable {
                template: template.to_string(),
                reason,
            })
        };
        let snapshot_dir = staging.join("snapshot");
        std::fs::create_dir_all(&snapshot_dir)
            .map_err(|e| unusable(format!("creating {}: {e}", snapshot_dir.display())))?;
        for stored in &copy.files {
            let pack = staging.join(format!("{:?}.pack", stored.file));
            store
                .fetch(&stored.blob, &pack, |_| {})
                .await
                .map_err(|source| TemplateError::Store {
                    template: template.to_string(),
                    source,
                })?;
            let label = unpack_file(pack.clone(), file_path(&snapshot_dir, stored.file))
                .await
                .map_err(|e| unusable(format!("unpacking its {:?}: {e}", stored.file)))?;
            if !label.starts_with(&label_prefix(template)) {
                return Err(unusable(format!(
                    "its {:?} is a pack of something else: {label}",
                    stored.file
                )));
            }
            let _ = std::fs::remove_file(&pack);
        }
        if super::snapshot_template::read_template_snapshot(snapshot_dir.clone())?.is_none() {
            return Err(unusable(
                "its copy in the store has no snapshot.json".into(),
            ));
        }
        let rootfs = staging.join("rootfs.ext4");
        // This template's lease is held: another's is not waited for.
        self.templates
            .image_file_at_without_waiting(&copy.from_template, &copy.base_image, &rootfs)
            .await?;
        let installed_dir = self.layout.image_dir(template.as_str());
        let initramfs = self.layout.default_initramfs();
        rebase_snapshot_meta(
            &file_path(&snapshot_dir, SnapshotTemplateFile::SnapshotMeta),
            &self.layout.default_kernel(),
            initramfs.is_file().then_some(initramfs.as_path()),
            &[
                ("root", &installed_dir.join("rootfs.ext4")),
                ("upper", &installed_dir.join("snapshot").join("upper.ext4")),
            ],
        )
        .map_err(|e| unusable(format!("pointing its snapshot at this host's files: {e}")))?;
        let meta = serde_json::json!({
            "template": template,
            "source": "store",
            "from_template": copy.from_template,
            "sha256": document.sha256,
            "size_bytes": document.size_bytes,
            "pulled_at": chrono::Utc::now(),
        });
        std::fs::write(
            staging.join("meta.json"),
            serde_json::to_vec_pretty(&meta).expect("meta serialises"),
        )
        .map_err(|e| unusable(format!("writing meta.json: {e}")))?;
        Ok(())
    }
}
