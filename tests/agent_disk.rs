//! Per-sandbox upper disks with the real mkfs.ext4, dumpe2fs, loop devices and overlayfs (run
//! as root).

use std::path::Path;
use std::process::Command;

use wrenn::agent::disk::{self, DiskError, UPPER_LABEL};
use wrenn::config::Layout;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const GIB: u64 = 1 << 30;

/// A fresh upper: the full size, a few MiB allocated, ext4 with our label, no reserved blocks,
/// and every group's inode table marked zeroed, so the guest kernel will not write zeros over
/// them (and inflate the sparse file) after its first mount.
fn assert_fresh_upper(path: &Path, size: u64) {
    assert_eq!(std::fs::metadata(path).unwrap().len(), size);
    let allocated = disk::allocated_bytes(path).unwrap();
    assert!(
        allocated < 32 << 20,
        "a fresh {size}-byte upper occupies {allocated} bytes"
    );
    let arg = path.to_str().unwrap();
    assert_eq!(
        run("blkid", &["-o", "value", "-s", "TYPE", arg]).trim(),
        "ext4"
    );
    let header = run("dumpe2fs", &["-h", arg]);
    assert!(
        header.contains(&format!("Filesystem volume name:   {UPPER_LABEL}")),
        "{header}"
    );
    assert!(header
        .lines()
        .any(|l| l.starts_with("Reserved block count:") && l.ends_with(" 0")));
    let groups = run("dumpe2fs", &[arg]);
    let group_lines: Vec<&str> = groups
        .lines()
        .filter(|l| l.starts_with("Group ") && l.contains("(Blocks"))
        .collect();
    assert!(group_lines.len() > 10);
    for line in group_lines {
        assert!(line.contains("ITABLE_ZEROED"), "{line}");
    }
    run("e2fsck", &["-fn", arg]);
}

#[tokio::test]
async fn mkfs_upper_is_a_sparse_ext4_that_needs_no_zeroing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = Layout::new(tmp.path()).sandbox_upper_disk("sb-sparse");
    disk::create_upper(&path, 5 * GIB).await.unwrap();
    assert_fresh_upper(&path, 5 * GIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uppers_copied_from_a_cached_blank_are_sparse_ext4_and_independent() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    // A staging file from a crash is swept when the factory opens.
    let stale = layout.blank_uppers_dir().join("upper-1.ext4.0123.staging");
    std::fs::create_dir_all(layout.blank_uppers_dir()).unwrap();
    std::fs::write(&stale, b"half").unwrap();
    let uppers = disk::UpperDisks::open(layout.clone());
    assert!(!stale.exists());

    // Four sandboxes of one size at once: all succeed from one blank, no staging file is left.
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let uppers = uppers.clone();
            let path = layout.sandbox_upper_disk(&format!("sb-{i}"));
            tokio::spawn(async move { uppers.create(&path, 5 * GIB).await.map(|()| path) })
        })
        .collect();
    let mut paths = Vec::new();
    for task in tasks {
        paths.push(task.await.unwrap().unwrap());
    }
    let cached: Vec<_> = std::fs::read_dir(layout.blank_uppers_dir())
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert_eq!(cached[0].path(), layout.blank_upper(5 * GIB));
    for path in &paths {
        assert_fresh_upper(path, 5 * GIB);
    }

    // Writing into one upper changes neither the blank nor its siblings.
    let blank = layout.blank_upper(5 * GIB);
    let blank_state = |p: &Path| {
        let meta = std::fs::metadata(p).unwrap();
        (meta.modified().unwrap(), disk::allocated_bytes(p).unwrap())
    };
    let blank_before = blank_state(&blank);
    run(
        "debugfs",
        &["-w", "-R", "mkdir marker", paths[0].to_str().unwrap()],
    );
    let listing = |p: &Path| run("debugfs", &["-R", "ls -l /", p.to_str().unwrap()]);
    assert!(listing(&paths[0]).contains("marker"));
    assert!(!listing(&paths[1]).contains("marker"));
    assert!(!listing(&blank).contains("marker"));
    assert_eq!(blank_state(&blank), blank_before);

    let err = uppers.create(&paths[1], 5 * GIB).await.unwrap_err();
    assert!(matches!(err, DiskError::AlreadyExists { .. }), "{err}");
    let err = uppers
        .create(&layout.sandbox_upper_disk("tiny"), 4096)
        .await
        .unwrap_err();
    assert!(matches!(err, DiskError::TooSmall { .. }), "{err}");
    assert!(!layout.sandbox_upper_disk("tiny").exists());
}

#[tokio::test]
async fn upper_overlays_a_read_only_template() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // A small template image, as the images module builds them.
    let tree = root.join("tree/etc");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("os-release"), b"ID=template\n").unwrap();
    let template = root.join("rootfs.ext4");
    let template_arg = template.to_str().unwrap();
    let tree_arg = root.join("tree");
    run(
        "mkfs.ext4",
        &["-q", "-d", tree_arg.to_str().unwrap(), template_arg, "16M"],
    );
    let template_before = std::fs::read(&template).unwrap();

    let upper = root.join("sandbox/upper.ext4");
    let uppers = disk::UpperDisks::open(Layout::new(root.join("files")));
    uppers.create(&upper, GIB).await.unwrap();

    let lower_mnt = root.join("lower");
    let upper_mnt = root.join("upperfs");
    let merged = root.join("merged");
    for dir in [&lower_mnt, &upper_mnt, &merged] {
        std::fs::create_dir(dir).unwrap();
    }
    let mounts = Mounts(vec![merged.clone(), upper_mnt.clone(), lower_mnt.clone()]);
    run(
        "mount",
        &["-o", "loop,ro", template_arg, lower_mnt.to_str().unwrap()],
    );
    run(
        "mount",
        &[
            "-o",
            "loop",
            upper.to_str().unwrap(),
            upper_mnt.to_str().unwrap(),
        ],
    );
    std::fs::create_dir(upper_mnt.join("upper")).unwrap();
    std::fs::create_dir(upper_mnt.join("work")).unwrap();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower_mnt.display(),
        upper_mnt.join("upper").display(),
        upper_mnt.join("work").display()
    );
    run(
        "mount",
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &options,
            merged.to_str().unwrap(),
        ],
    );

    assert_eq!(
        std::fs::read(merged.join("etc/os-release")).unwrap(),
        b"ID=template\n"
    );
    std::fs::write(merged.join("etc/os-release"), b"ID=sandbox\n").unwrap();
    std::fs::write(merged.join("new-file"), vec![7u8; 1 << 20]).unwrap();
    drop(mounts);

    assert_eq!(
        std::fs::read(&template).unwrap(),
        template_before,
        "template was modified"
    );
    let _remount = Mounts(vec![upper_mnt.clone()]);
    run(
        "mount",
        &[
            "-o",
            "loop,ro",
            upper.to_str().unwrap(),
            upper_mnt.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(upper_mnt.join("upper/etc/os-release")).unwrap(),
        b"ID=sandbox\n"
    );
    assert_eq!(
        std::fs::metadata(upper_mnt.join("upper/new-file"))
            .unwrap()
            .len(),
        1 << 20
    );
    let allocated = disk::allocated_bytes(&upper).unwrap();
    assert!(
        allocated < 48 << 20,
        "upper grew to {allocated} bytes after a 1 MiB write"
    );
}

/// Unmounts in order on drop, so a failed assertion leaves no mounts or loop devices behind.
struct Mounts(Vec<std::path::PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = Command::new("umount").arg(dir).output();
        }
    }
}

#[tokio::test]
async fn remove_and_failures_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sb/upper.ext4");
    disk::create_upper(&path, disk::MIN_UPPER_SIZE_BYTES)
        .await
        .unwrap();
    let err = disk::create_upper(&path, GIB).await.unwrap_err();
    assert!(matches!(err, DiskError::AlreadyExists { .. }), "{err}");
    disk::remove(&path).unwrap();
    assert!(!path.exists());
    disk::remove(&path).unwrap();
    disk::create_upper(&path, GIB).await.unwrap();

    // A parent that is a file: the error names the path.
    let blocked = path.join("nested.ext4");
    let err = disk::create_upper(&blocked, GIB).await.unwrap_err();
    assert!(matches!(err, DiskError::Create { .. }), "{err}");
    assert!(err.to_string().contains("nested.ext4"), "{err}");

    // Larger than the host filesystem allows: refused, and the half-made file is removed.
    let huge = tmp.path().join("huge.ext4");
    let err = disk::create_upper(&huge, 1 << 60).await.unwrap_err();
    assert!(matches!(err, DiskError::Create { .. }), "{err}");
    assert!(!huge.exists());

    let err = disk::allocated_bytes(Path::new("/nonexistent/upper.ext4")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/upper.ext4"), "{err}");
}
