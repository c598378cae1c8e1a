//! envd files end to end: streamed transfers, listings, ownership, bad paths and watches.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use wrenn::envd::api::{EntryType, ListRequest, WatchEventKind, WatchMessage};
use wrenn::envd::client::EnvdClient;
use wrenn_test_support::envd::EnvdProcess;

fn envd() -> EnvdProcess {
    EnvdProcess::start(Path::new(env!("CARGO_BIN_EXE_wrenn"))).expect("envd starts")
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("envd-files-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn text(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

const TEST_USER: &str = "wrenn-test";

/// The unprivileged account the ownership tests write as, created on first use.
fn test_user() -> (u32, u32) {
    let lookup = || {
        let out = Command::new("id").args(["-u", TEST_USER]).output().ok()?;
        let uid = String::from_utf8(out.stdout).ok()?.trim().parse().ok()?;
        let out = Command::new("id").args(["-g", TEST_USER]).output().ok()?;
        let gid = String::from_utf8(out.stdout).ok()?.trim().parse().ok()?;
        Some((uid, gid))
    };
    if let Some(ids) = lookup() {
        return ids;
    }
    // Another test binary may be creating it at the same moment; either way it then exists.
    let _ = Command::new("useradd")
        .args(["--create-home", "--shell", "/bin/sh", TEST_USER])
        .status();
    lookup().expect("the test user exists (useradd needs root)")
}

/// Deterministic content: byte `i` of the stream is `BASE[i % BASE.len()]`, with a prime period
/// so chunk boundaries never line up with it.
struct Pattern {
    base: Vec<u8>,
}

impl Pattern {
    fn new() -> Self {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let base = (0..1_048_573)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        Self { base }
    }

    fn chunk(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut at = (offset % self.base.len() as u64) as usize;
        while out.len() < len {
            let n = (self.base.len() - at).min(len - out.len());
            out.extend_from_slice(&self.base[at..at + n]);
            at = 0;
        }
        out
    }

    fn verify(&self, offset: u64, data: &[u8]) {
        let mut at = (offset % self.base.len() as u64) as usize;
        let mut rest = data;
        while !rest.is_empty() {
            let n = (self.base.len() - at).min(rest.len());
            assert!(
                rest[..n] == self.base[at..at + n],
                "content differs near byte {offset}"
            );
            rest = &rest[n..];
            at = 0;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gibibyte_upload_and_download_stay_within_bounded_memory() {
    let envd = envd();
    let client = envd.client();
    let dir = scratch();
    let target = dir.path().join("big/blob.bin");
    const TOTAL: u64 = 2 << 30;
    const CHUNK: usize = 1 << 20;
    let pattern = std::sync::Arc::new(Pattern::new());
    let source = pattern.clone();
    let body = futures::stream::unfold(0u64, move |offset| {
        let source = source.clone();
        async move {
            (offset < TOTAL).then(|| {
                let len = CHUNK.min((TOTAL - offset) as usize);
                (
                    Ok(Bytes::from(source.chunk(offset, len))),
                    offset + len as u64,
                )
            })
        }
    });
    let entry = client.write_file(&text(&target), None, body).await.unwrap();
    assert_eq!(entry.size, TOTAL);
    assert_eq!(std::fs::metadata(&target).unwrap().len(), TOTAL);

    let download = client.read_file(&text(&target), None).await.unwrap();
    assert_eq!(download.size, Some(TOTAL));
    let mut body = download.body;
    let mut offset = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        pattern.verify(offset, &chunk);
        offset += chunk.len() as u64;
    }
    assert_eq!(offset, TOTAL);
    let hwm = EnvdProcess::status_kib(envd.pid(), "VmHWM").unwrap();
    assert!(
        hwm < 64 * 1024,
        "envd peak RSS {hwm} KiB after 2 GiB each way"
    );
}

#[tokio::test]
async fn files_are_written_listed_moved_and_removed() {
    let envd = envd();
    let client = envd.client();
    let dir = scratch();
    let root = text(dir.path());

    let entry = client
        .write_file_bytes(&format!("{root}/a/b/c.txt"), None, "hello")
        .await
        .unwrap();
    assert_eq!(
        (entry.name.as_str(), entry.kind, entry.size),
        ("c.txt", EntryType::File, 5)
    );
    assert_eq!(entry.permissions, "-rw-r--r--");
    let download = client
        .read_file(&format!("{root}/a/b/c.txt"), None)
        .await
        .unwrap();
    let content: Vec<Bytes> = download.body.map(|c| c.unwrap()).collect().await;
    assert_eq!(content.concat(), b"hello");
    // Overwriting replaces the content and keeps the mode.
    std::fs::set_permissions(
        dir.path().join("a/b/c.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    let entry = client
        .write_file_bytes(&format!("{root}/a/b/c.txt"), None, "hi")
        .await
        .unwrap();
    assert_eq!((entry.size, entry.permissions.as_str()), (2, "-rwxr-x---"));

    std::os::unix::fs::symlink(dir.path().join("a/b"), dir.path().join("link")).unwrap();
    let list = client
        .list_dir(&ListRequest {
            path: root.clone(),
            depth: None,
            user: None,
        })
        .await
        .unwrap();
    let names: Vec<_> = list.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        names,
        [("a", EntryType::Directory), ("link", EntryType::Symlink)]
    );
    assert_eq!(
        list[1].symlink_target.as_deref(),
        Some(text(&dir.path().join("a/b")).as_str())
    );
    assert!(chrono::DateTime::parse_from_rfc3339(&list[0].modified_at).is_ok());
    assert_eq!(list[0].owner, "root");
    let deep = client
        .list_dir(&ListRequest {
            path: root.clone(),
            depth: Some(3),
            user: None,
        })
        .await
        .unwrap();
    assert_eq!(deep.len(), 4, "{deep:?}");

    // Through a symlinked directory.
    let via_link = client
        .stat(&format!("{root}/link/c.txt"), None)
        .await
        .unwrap();
    assert_eq!(via_link.size, 2);
    client
        .write_file_bytes(&format!("{root}/link/d.txt"), None, "x")
        .await
        .unwrap();
    assert!(dir.path().join("a/b/d.txt").exists());

    let made = client
        .mkdir(&format!("{root}/new/dir"), None)
        .await
        .unwrap();
    assert_eq!(made.kind, EntryType::Directory);
    assert_eq!(
        client
            .mkdir(&format!("{root}/new/dir"), None)
            .await
            .unwrap_err()
            .code()
            .map(|c| c.as_str()),
        Some("conflict")
    );

    let moved = client
        .rename(
            &format!("{root}/a/b/c.txt"),
            &format!("{root}/moved/c2.txt"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(moved.name, "c2.txt");
    assert!(!dir.path().join("a/b/c.txt").exists());
    client.remove(&format!("{root}/a"), None).await.unwrap();
    assert!(!dir.path().join("a").exists());
    // The symlink itself is removed, not what it pointed to.
    client.remove(&format!("{root}/link"), None).await.unwrap();

    let code = |e: wrenn::envd::client::EnvdClientError| e.code().map(|c| c.as_str().to_owned());
    assert_eq!(
        code(client.remove(&format!("{root}/a"), None).await.unwrap_err()).as_deref(),
        Some("not_found")
    );
    assert_eq!(
        code(
            client
                .stat(&format!("{root}/nope"), None)
                .await
                .unwrap_err()
        )
        .as_deref(),
        Some("not_found")
    );
    assert_eq!(
        code(
            client
                .read_file(&format!("{root}/nope"), None)
                .await
                .err()
                .unwrap()
        )
        .as_deref(),
        Some("not_found")
    );
    assert_eq!(
        code(client.read_file(&root, None).await.err().unwrap()).as_deref(),
        Some("invalid_request")
    );
    assert_eq!(
        code(client.stat("", None).await.unwrap_err()).as_deref(),
        Some("invalid_request")
    );
    assert_eq!(
        code(client.stat("/tmp", Some("no-such-user")).await.unwrap_err()).as_deref(),
        Some("not_found")
    );
    let not_a_dir = ListRequest {
        path: format!("{root}/moved/c2.txt"),
        depth: None,
        user: None,
    };
    assert_eq!(
        code(client.list_dir(&not_a_dir).await.unwrap_err()).as_deref(),
        Some("invalid_request")
    );
    assert!(client.health().await.is_ok());
}

#[tokio::test]
async fn relative_paths_and_ownership_follow_the_user() {
    let (uid, gid) = test_user();
    let envd = envd();
    let client = envd.client();
    let home = format!("/home/{TEST_USER}");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
    let sub = format!("envd-test-{}", std::process::id());

    let entry = client
        .write_file_bytes(&format!("{sub}/deep/file.txt"), Some(TEST_USER), "mine")
        .await
        .unwrap();
    assert_eq!(entry.path, format!("{home}/{sub}/deep/file.txt"));
    assert_eq!(
        (entry.owner.as_str(), entry.group.as_str()),
        (TEST_USER, TEST_USER)
    );
    for path in [
        format!("{home}/{sub}"),
        format!("{home}/{sub}/deep"),
        entry.path.clone(),
    ] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{path}");
    }
    let made = client
        .mkdir(&format!("~/{sub}/made"), Some(TEST_USER))
        .await
        .unwrap();
    assert_eq!(made.owner, TEST_USER);

    let mut spec = wrenn::envd::api::ProcessSpec::new(
        "sh",
        &[
            "-c",
            "id -u; id -G; echo $HOME $USER $LOGNAME; pwd; touch ~/proc-made",
        ],
    );
    spec.user = Some(TEST_USER.into());
    let out = client
        .run(&wrenn::envd::api::RunRequest {
            process: spec,
            timeout_sec: None,
        })
        .await
        .unwrap();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], uid.to_string(), "{out:?}");
    assert!(lines[1].split(' ').any(|g| g == gid.to_string()));
    assert_eq!(lines[2], format!("{home} {TEST_USER} {TEST_USER}"));
    assert_eq!(lines[3], home);
    assert_eq!(
        std::fs::metadata(format!("{home}/proc-made"))
            .unwrap()
            .uid(),
        uid
    );
    client
        .remove(&format!("~/{sub}"), Some(TEST_USER))
        .await
        .unwrap();
    client.remove("proc-made", Some(TEST_USER)).await.unwrap();
}

async fn next_watch(watch: &mut wrenn::envd::client::WatchSession) -> WatchMessage {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a watch event")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn watches_report_create_modify_rename_and_remove() {
    let envd = envd();
    let client: EnvdClient = envd.client();
    let dir = scratch();
    let root = text(dir.path());
    let mut watch = client.watch(&root, false, None).await.unwrap();
    // Give inotify a moment to be armed on the server before acting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let file = dir.path().join("w.txt");
    std::fs::write(&file, "1").unwrap();
    let renamed = dir.path().join("w2.txt");
    std::fs::rename(&file, &renamed).unwrap();
    std::fs::remove_file(&renamed).unwrap();

    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(kind, path, _)| *kind == WatchEventKind::Remove && *path == text(&renamed))
    {
        match next_watch(&mut watch).await {
            WatchMessage::Event { kind, path, to } => seen.push((kind, path, to)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        seen.contains(&(WatchEventKind::Create, text(&file), None)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(k, p, _)| *k == WatchEventKind::Modify && *p == text(&file)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(WatchEventKind::Rename, text(&file), Some(text(&renamed)))),
        "{seen:?}"
    );

    let err = client
        .watch(&format!("{root}/missing"), false, None)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code().map(|c| c.as_str()), Some("not_found"));
}
