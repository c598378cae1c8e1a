//! A container image archive, made here as `docker save` writes it from the host's static busybox,
//! imported as a template image: with `wrenn::template::image::import`, the ext4 image read back
//! with e2fsprogs; and through the control plane's API, uploaded and from a path on the host, with
//! a capsule booted from it. Needs root (the tree keeps the image's owners) and busybox-static.

mod support;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};
use wrenn::envd::template::TemplateConfig;
use wrenn::template::image::{self, ImportOptions, ENTRYPOINT_TAG};
use wrenn::template::TemplateName;

const BUSYBOX: &str = "/bin/busybox";
const MTIME: u64 = 1_700_000_000;

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    header
}

fn add_file(layer: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut header = header(tar::EntryType::Regular, data.len() as u64, mode);
    layer.append_data(&mut header, path, data).unwrap();
}

fn add_dir(layer: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut header = header(tar::EntryType::Directory, 0, 0o755);
    layer.append_data(&mut header, path, &b""[..]).unwrap();
}

/// The busybox userland as the busybox template lays it out (rootfs/templates/busybox.sh):
/// the binary and a symlink per applet.
fn busybox_layer() -> Vec<u8> {
    let busybox =
        fs::read(BUSYBOX).unwrap_or_else(|e| panic!("{BUSYBOX}: {e} (install busybox-static)"));
    let applets = Command::new(BUSYBOX).arg("--list-full").output().unwrap();
    let applets = String::from_utf8(applets.stdout).unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    for dir in ["bin/", "sbin/", "usr/", "usr/bin/", "usr/sbin/", "etc/"] {
        add_dir(&mut layer, dir);
    }
    add_file(&mut layer, "bin/busybox", &busybox, 0o755);
    for applet in applets.lines().map(str::trim) {
        if applet.is_empty() || ["bin/busybox", "sbin/init", "linuxrc"].contains(&applet) {
            continue;
        }
        let mut header = header(tar::EntryType::Symlink, 0, 0o777);
        layer
            .append_link(&mut header, applet, "/bin/busybox")
            .unwrap();
    }
    add_file(
        &mut layer,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    );
    add_file(
        &mut layer,
        "etc/group",
        b"root:x:0:\nnogroup:x:65534:\n",
        0o644,
    );
    add_file(
        &mut layer,
        "etc/motd",
        b"removed by the next layer\n",
        0o644,
    );
    layer.into_inner().unwrap()
}

/// A gzip'd layer on top: an application directory and a whiteout of the first layer's motd.
fn app_layer() -> Vec<u8> {
    let mut layer = tar::Builder::new(Vec::new());
    add_dir(&mut layer, "srv/");
    add_file(
        &mut layer,
        "srv/hello.sh",
        b"#!/bin/sh\necho hello\n",
        0o755,
    );
    add_file(&mut layer, "etc/.wh.motd", b"", 0o644);
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

/// A `docker save` archive: `manifest.json`, the config under its digest, `<id>/layer.tar`.
fn docker_save(dir: &Path) -> PathBuf {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello world"],
            "Cmd": ["/srv/hello.sh"],
            "WorkingDir": "/srv",
            "User": "65534",
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .unwrap();
    let config_name = format!("{}.json", hex::encode(Sha256::digest(&config)));
    let layers = [busybox_layer(), app_layer()];
    let layer_names = ["base/layer.tar", "app/layer.tar"];
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": ["busybox-app:latest"],
        "Layers": layer_names,
    }]);
    let path = dir.join("busybox-app.tar");
    let mut archive = tar::Builder::new(File::create(&path).unwrap());
    let mut members = vec![
        (
            "manifest.json".to_owned(),
            manifest.to_string().into_bytes(),
        ),
        (config_name, config),
    ];
    members.extend(
        layer_names
            .iter()
            .map(|n| (*n).to_owned())
            .zip(layers.iter().cloned()),
    );
    for (name, data) in members {
        let mut header = header(tar::EntryType::Regular, data.len() as u64, 0o644);
        archive
            .append_data(&mut header, name, data.as_slice())
            .unwrap();
    }
    archive.into_inner().unwrap().sync_all().unwrap();
    path
}

fn debugfs(image: &Path, request: &str) -> String {
    let output = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "debugfs -R '{request}': {output:?}"
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_docker_save_archive_of_busybox_becomes_a_checked_template_image() {
    let inputs = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let archive = docker_save(inputs.path());
    // Any executable stands in for the static wrenn binary: nothing runs it here.
    let binary = inputs.path().join("wrenn");
    fs::copy("/bin/true", &binary).unwrap();
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o700)).unwrap();

    let name: TemplateName = "busybox-app".parse().unwrap();
    let out_dir = images.path().join("busybox-app");
    let options = ImportOptions {
        start_entrypoint: true,
        ..ImportOptions::new(&binary)
    };
    let mut reports = Vec::new();
    let imported = image::import(&archive, &name, &out_dir, &options, |p| reports.push(p)).unwrap();

    let rootfs = out_dir.join("rootfs.ext4");
    assert_eq!(imported.rootfs, rootfs);
    let names: Vec<String> = fs::read_dir(images.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["busybox-app"], "the work directory is gone");
    let last = reports.last().unwrap();
    assert_eq!((last.layer, last.layers), (2, 2));
    assert_eq!(last.bytes_done, last.bytes_total);

    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(out_dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["template"], "busybox-app");
    assert_eq!(meta["source"], "oci");
    assert_eq!(
        meta["sha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(fs::read(&rootfs).unwrap()))
    );
    assert_eq!(meta["size_bytes"], fs::metadata(&rootfs).unwrap().len());
    assert!(
        meta["envd_version"].as_str().unwrap().starts_with("wrenn "),
        "{meta}"
    );
    assert!(meta["build_seconds"].is_f64(), "{meta}");

    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "e2fsck: {fsck:?}");
    let label = Command::new("e2label").arg(&rootfs).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&label.stdout).trim(),
        "wrenn-busybox-ap"
    );

    let wrenn = debugfs(&rootfs, "stat /usr/local/bin/wrenn");
    assert!(wrenn.contains("Type: regular    Mode:  0755"), "{wrenn}");
    assert!(wrenn.contains("User:     0   Group:     0"), "{wrenn}");
    let sh = debugfs(&rootfs, "stat /bin/sh");
    assert!(sh.contains("Type: symlink"), "{sh}");
    assert!(sh.contains("\"/bin/busybox\""), "{sh}");
    let busybox = debugfs(&rootfs, "stat /bin/busybox");
    assert!(busybox.contains("Mode:  0755"), "{busybox}");
    let motd = debugfs(&rootfs, "stat /etc/motd");
    assert!(!motd.contains("Inode:"), "the whiteout removed it: {motd}");
    let hello = debugfs(&rootfs, "cat /srv/hello.sh");
    assert_eq!(hello, "#!/bin/sh\necho hello\n");

    let passwd = debugfs(&rootfs, "cat /etc/passwd");
    assert!(
        passwd.contains("root:x:0:0:root:/root:/bin/sh\n"),
        "{passwd}"
    );
    assert!(
        passwd.contains("user:x:1000:1000:Wrenn sandbox user:/home/user:/bin/sh\n"),
        "{passwd}"
    );
    let home = debugfs(&rootfs, "stat /home/user");
    assert!(home.contains("User:  1000   Group:  1000"), "{home}");
    let tmp = debugfs(&rootfs, "stat /tmp");
    assert!(tmp.contains("Mode:  01777"), "{tmp}");

    let settings: TemplateConfig =
        serde_json::from_str(&debugfs(&rootfs, "cat /etc/wrenn/template.json")).unwrap();
    assert_eq!(settings, imported.template);
    assert_eq!(settings.env["GREETING"], "hello world");
    assert_eq!(settings.workdir.as_deref(), Some("/srv"));
    // uid 65534 is `nobody` in the image's /etc/passwd, the name envd looks up.
    assert_eq!(settings.user.as_deref(), Some("nobody"));
    let start = &settings.start[0];
    assert_eq!(start.tag.as_deref(), Some(ENTRYPOINT_TAG));
    assert_eq!(start.process.cmd, "/srv/hello.sh");
    assert_eq!(start.process.cwd.as_deref(), Some("/srv"));
}

fn multipart(config: &serde_json::Value, archive: &[u8]) -> (String, Vec<u8>) {
    let boundary = "wrenn-import-boundary";
    let mut body = Vec::new();
    write!(
        body,
        "--{boundary}\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n{config}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"image.tar\"\r\nContent-Type: application/x-tar\r\n\r\n"
    )
    .unwrap();
    body.extend_from_slice(archive);
    write!(body, "\r\n--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_image_and_one_on_the_host_become_templates_that_capsules_boot() {
    use hyper::{Method, StatusCode};
    use support::agent::{add_agent_in, wait_clean, Agent, VM_TURNS};
    use support::{assert_error, Auth, TestCp};

    let _turn = VM_TURNS.acquire().await.unwrap();
    let inputs = tempfile::tempdir().unwrap();
    let archive = docker_save(inputs.path());
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await.auth();
    let Auth::Bearer(token) = &admin else {
        panic!("a user token")
    };
    let authorization = format!("Bearer {token}");
    let (agent, host_id) = add_agent_in(&cp, &admin, Agent::new_root_with_own_images(), &[]).await;

    let (content_type, body) = multipart(
        &json!({"description": "busybox with an app", "memory_mb": 256}),
        &fs::read(&archive).unwrap(),
    );
    let (status, imported) = cp
        .raw(
            Method::POST,
            "/v1/admin/templates/busybox-app/import",
            &[("authorization", authorization.as_str())],
            Some(&content_type),
            body,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{imported}");
    assert_eq!(imported["host_id"], host_id.as_str());
    assert_eq!(imported["cmd"], json!(["/srv/hello.sh"]));
    assert_eq!(imported["user"], "nobody");
    assert_eq!(imported["env"], json!(["GREETING", "PATH"]));

    let (status, capsule) = cp
        .call(
            Method::POST,
            "/v1/capsules",
            &admin,
            Some(json!({"template": "busybox-app"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();
    let (status, out) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/exec"),
            &admin,
            Some(json!({"cmd": "/bin/sh", "args": ["-c", "id -un; pwd; echo $GREETING; /srv/hello.sh; test -e /etc/motd || echo motd-gone"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(
        out["stdout"].as_str().unwrap().lines().collect::<Vec<_>>(),
        ["nobody", "/srv", "hello world", "hello", "motd-gone"],
        "{out}"
    );
    let (status, _) = cp
        .call(Method::DELETE, &format!("/v1/capsules/{id}"), &admin, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // An archive already on the host, named by path.
    let (status, imported) = cp
        .call(
            Method::POST,
            "/v1/admin/templates/busybox-app-2/import",
            &admin,
            Some(json!({"host_id": host_id, "path": archive})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{imported}");
    let (status, templates) = cp.call(Method::GET, "/v1/snapshots", &admin, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        templates.to_string().contains("busybox-app-2"),
        "{templates}"
    );

    // Refusals: a protected name, a path without its host, an archive that is no image.
    let (status, body) = cp
        .call(
            Method::POST,
            "/v1/admin/templates/minimal/import",
            &admin,
            Some(json!({"host_id": host_id, "path": archive})),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = cp
        .call(
            Method::POST,
            "/v1/admin/templates/x/import",
            &admin,
            Some(json!({"path": archive})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (content_type, body) = multipart(&json!({}), b"not an image");
    let (status, body) = cp
        .raw(
            Method::POST,
            "/v1/admin/templates/junk/import",
            &[("authorization", authorization.as_str())],
            Some(&content_type),
            body,
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let images = wrenn::config::Layout::new(agent.root.path()).images_dir();
    assert!(!images.join("junk").exists());
    wait_clean(&agent);
    drop(agent);
    cp.stop().await;
}

#[test]
fn the_cli_imports_an_archive_on_the_host_and_publishes_it_to_the_store() {
    let inputs = tempfile::tempdir().unwrap();
    let archive = docker_save(inputs.path());
    let root = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wrenn"))
        .args(["template", "import"])
        .arg(&archive)
        .args(["--name", "cli-app"])
        .env("AGENT_FILES_ROOTDIR", root.path())
        .env(
            "AGENT_ENVD_BINARY",
            wrenn_test_support::guest::static_binary(),
        )
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let sha256 = answer["image"]["sha256"].as_str().unwrap();
    assert!(
        root.path()
            .join("store/blobs/sha256")
            .join(sha256)
            .is_file(),
        "published to the default store"
    );
    assert!(root.path().join("images/cli-app/rootfs.ext4").is_file());
    assert!(stderr.contains("template image published"), "{stderr}");

    // A dynamically linked envd binary would not start in the image: refused.
    let output = Command::new(env!("CARGO_BIN_EXE_wrenn"))
        .args(["template", "import"])
        .arg(&archive)
        .args(["--name", "cli-app-2"])
        .env("AGENT_FILES_ROOTDIR", root.path())
        .env("AGENT_ENVD_BINARY", env!("CARGO_BIN_EXE_wrenn"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("dynamically linked"),
        "{output:?}"
    );
    assert!(!root.path().join("images/cli-app-2").exists());
}
