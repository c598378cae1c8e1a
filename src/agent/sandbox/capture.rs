//! Capturing a running sandbox's disk as a template image: a build's last step. The guest packs
//! its root file system (without the kernel's and envd's mounts) into a tar on its own disk; the
//! agent streams it out, wraps it as a one-layer `docker save` archive and imports it like any
//! container image (`template::image::import`), so everything the guest wrote is checked by the
//! same code that checks untrusted images: nothing in it can reach outside the new tree. The
//! result replaces `images/<template>/` and goes to the template store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{SandboxError, SandboxManager};
use crate::agent::wire::CaptureTemplate;
use crate::envd::api::{ProcessSpec, RunRequest};
use crate::envd::client::EnvdClient;
use crate::progress::Throttled;
use crate::store::BlobRef;
use crate::template::image::{self, ImportOptions};
use crate::template::oci::UnpackLimits;

/// Where the guest writes the tar: on its own disk (its `/tmp` is memory), in a directory the
/// pack leaves out of itself.
const GUEST_DIR: &str = "/.wrenn-capture";
const GUEST_TAR: &str = "/.wrenn-capture/rootfs.tar";
/// Mount points whose contents are the running system's, not the template's.
const LEFT_OUT: &[&str] = &["proc", "sys", "dev", "run", "tmp", ".wrenn-capture"];
const PACK_TIMEOUT: Duration = Duration::from_secs(1800);

impl SandboxManager {
    /// Makes the sandbox's disk as it is now the image of `request.template`, installs it on this
    /// host and publishes it to the template store. The sandbox runs on. Runs to its end (or
    /// rolls back) whatever the caller does: a half-written image is never installed.
    pub async fn capture_template(
        self: &Arc<Self>,
        id: &str,
        request: CaptureTemplate,
    ) -> Result<BlobRef, SandboxError> {
        let this = self.clone();
        let id = id.to_owned();
        self.run_to_end(async move { this.capture_now(&id, request).await })
            .await
    }

    async fn capture_now(
        self: &Arc<Self>,
        id: &str,
        request: CaptureTemplate,
    ) -> Result<BlobRef, SandboxError> {
        let failed = |reason: String| SandboxError::CaptureFailed {
            id: id.to_owned(),
            reason,
        };
        let (envd, _lease) = self.envd(id).await?;
        let template = request.template.clone();
        tracing::info!(sandbox = id, %template, "capturing the sandbox's disk as a template image");
        pack(&envd).await.map_err(&failed)?;
        let archive = self.layout.images_dir().join(format!(
            ".capture-{template}-{:016x}.tar",
            rand::random::<u64>()
        ));
        let fetched = fetch_as_image(&envd, &archive).await;
        // The guest's copy is not needed once fetched, whatever happened.
        let _ = run_as_root(
            &envd,
            &format!("rm -rf {GUEST_DIR}"),
            Duration::from_secs(120),
        )
        .await;
        if let Err(reason) = fetched {
            let _ = std::fs::remove_file(&archive);
            return Err(failed(reason));
        }
        let lease = self.templates.lock(&template).await;
        let out_dir = self.layout.image_dir(template.as_str());
        let options = ImportOptions {
            wrenn_binary: None,
            limits: UnpackLimits::default(),
            start_entrypoint: false,
            template: Some(request.config),
            source: "build",
        };
        let name = template.clone();
        let import_archive = archive.clone();
        let imported = tokio::task::spawn_blocking(move || {
            image::import(&import_archive, &name, &out_dir, &options, |progress| {
                tracing::debug!(
                    "unpacking: {} of {} bytes",
                    progress.bytes_done,
                    progress.bytes_total
                );
            })
        })
        .await;
        let removed = archive.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(removed)).await;
        let imported = match imported {
            Ok(Ok(imported)) => imported,
            Ok(Err(error)) => return Err(failed(error.to_string())),
            Err(error) => return Err(failed(format!("the import task failed: {error}"))),
        };
        tracing::info!(
            sandbox = id,
            %template,
            sha256 = imported.sha256,
            bytes = imported.size_bytes,
            "template image captured"
        );
        let published = self.templates.publish_locked(&template).await;
        drop(lease);
        Ok(published?)
    }
}

/// Has the guest pack its root file system into [`GUEST_TAR`].
async fn pack(envd: &EnvdClient) -> Result<(), String> {
    let filters: Vec<String> = LEFT_OUT.iter().map(|name| format!("-e '{name}'")).collect();
    // `ls -A /` rather than `--exclude`: busybox's tar has no such option.
    let script = format!(
        "set -e; rm -rf {GUEST_DIR}; mkdir -m 0700 {GUEST_DIR}; sync; cd /; \
         tar -cf {GUEST_TAR} $(ls -A / | grep -v -x {}); sync",
        filters.join(" ")
    );
    run_as_root(envd, &script, PACK_TIMEOUT).await
}

async fn run_as_root(envd: &EnvdClient, script: &str, timeout: Duration) -> Result<(), String> {
    let request = RunRequest {
        process: ProcessSpec {
            user: Some("root".into()),
            cwd: Some("/".into()),
            ..ProcessSpec::new("/bin/sh", &["-c", script])
        },
        timeout_sec: Some(timeout.as_secs()),
    };
    let answer = envd.run(&request).await.map_err(|e| format!("envd: {e}"))?;
    if answer.exit_code == 0 {
        Ok(())
    } else {
        let detail = answer.stderr.lines().last().unwrap_or_default().to_owned();
        Err(format!(
            "packing the guest's files exited with status {}: {detail}",
            answer.exit_code
        ))
    }
}

/// Streams [`GUEST_TAR`] into `archive` as the one layer of a `docker save` archive.
async fn fetch_as_image(envd: &EnvdClient, archive: &Path) -> Result<(), String> {
    let io = |what: &str| {
        let what = what.to_owned();
        let path: PathBuf = archive.to_owned();
        move |e: std::io::Error| format!("{what} {}: {e}", path.display())
    };
    let download = envd
        .read_file(GUEST_TAR, Some("root"))
        .await
        .map_err(|e| format!("envd: {e}"))?;
    let size = download
        .size
        .ok_or("envd did not say how large the packed files are")?;
    // The guest says how large; what it says is checked before a byte lands on the host's disk.
    let limit = UnpackLimits::default().max_archive_bytes;
    if size > limit {
        return Err(format!(
            "the packed files are {size} bytes, over the {limit}-byte limit of an image"
        ));
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(archive)
        .await
        .map_err(io("creating"))?;
    file.write_all(header("layer.tar", size).as_bytes())
        .await
        .map_err(io("writing"))?;
    let mut body = download.body;
    let mut done = 0u64;
    let mut progress = Throttled::new(Duration::from_secs(2), |p: &crate::progress::Progress| {
        tracing::info!("fetching the captured files: {p}");
    });
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("envd: {e}"))?;
        done += chunk.len() as u64;
        if done > size {
            return Err(format!("envd sent more than the {size} bytes it announced"));
        }
        file.write_all(&chunk).await.map_err(io("writing"))?;
        progress.update(done, size);
    }
    if done != size {
        return Err(format!("envd sent {done} of the {size} bytes it announced"));
    }
    let padding = (512 - size % 512) % 512;
    file.write_all(&vec![0u8; padding as usize])
        .await
        .map_err(io("writing"))?;
    // The small members and the end of the archive, built in memory.
    let mut tail = tar::Builder::new(Vec::new());
    for (name, content) in [
        (
            "manifest.json",
            br#"[{"Config":"config.json","RepoTags":[],"Layers":["layer.tar"]}]"#.as_slice(),
        ),
        ("config.json", br#"{"config":{}}"#.as_slice()),
    ] {
        tail.append(&header(name, content.len() as u64), content)
            .map_err(|e| format!("building the archive: {e}"))?;
    }
    let tail = tail
        .into_inner()
        .map_err(|e| format!("building the archive: {e}"))?;
    file.write_all(&tail).await.map_err(io("writing"))?;
    file.sync_all().await.map_err(io("syncing"))?;
    Ok(())
}

fn header(name: &str, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header
        .set_path(name)
        .expect("member names are short and relative");
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    header
}
