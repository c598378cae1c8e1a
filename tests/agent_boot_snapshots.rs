//! Every create is a restore, on the host agent with real QEMU/TCG guests: the first create of a
//! template boots, the agent then makes the template's boot snapshot in the background, and
//! later creates restore it. Each restored guest gets its own identity before any user code
//! runs (random state, host name, machine ID, clock, envd token), its own disk, and behaves as a
//! booted one (pause and resume). A changed image makes a new snapshot and retires the old; a
//! snapshot that cannot be restored falls back to a boot.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::agent::{sid, stack_with_env, wait_clean, Agent, VM_TURNS};

const ON: [(&str, &str); 1] = [("AGENT_BOOT_SNAPSHOTS", "true")];

fn create(agent: &Agent, id: &str, template: &str) -> Value {
    let (status, body) = agent.call(
        Method::POST,
        "/v1/sandboxes",
        Some(json!({"sandbox_id": id, "template": template, "vcpus": 1, "memory_mb": 256, "disk_mb": 256})),
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

fn create_path(sandbox: &Value) -> &str {
    sandbox["metadata"]["create_path"]
        .as_str()
        .unwrap_or_default()
}

/// The published boot snapshots: directories with a `boot.json`.
fn boot_snapshots(agent: &Agent) -> Vec<PathBuf> {
    let dir = agent.root.path().join("snapshots/boot");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("boot.json").is_file())
        .collect();
    found.sort();
    found
}

/// Waits until the published boot snapshots are exactly one that is not in `old`.
fn wait_for_new_boot_snapshot(agent: &Agent, old: &[PathBuf]) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let now = boot_snapshots(agent);
        if let [only] = now.as_slice() {
            if !old.contains(only) {
                return only.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new boot snapshot (now {now:?}); log: {}",
            agent.log_lines(&["boot snapshot"]).join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What a guest says about its identity and a few random draws.
fn identity(agent: &Agent, id: &str) -> Value {
    let out = agent.run_as_root(
        id,
        "cat /proc/sys/kernel/random/uuid
         head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo
         hostname
         cat /etc/machine-id
         date +%s",
    );
    let lines: Vec<String> = out["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 5, "{out}");
    json!({"uuid": lines[0], "random": lines[1], "hostname": lines[2],
           "machine_id": lines[3], "clock": lines[4].parse::<i64>().unwrap()})
}

fn recorded_token(agent: &Agent, id: &str) -> String {
    let record: Value = serde_json::from_slice(
        &std::fs::read(agent.sandboxes_dir().join(id).join("sandbox.json")).unwrap(),
    )
    .unwrap();
    record["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_restore_the_boot_snapshot_and_each_guest_gets_its_own_identity() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (_cp, agent, _host, _auth) = stack_with_env(&ON).await;

    let first = sid("boot-first");
    assert_eq!(create_path(&create(&agent, &first, "busybox")), "cold_boot");
    let snapshot = wait_for_new_boot_snapshot(&agent, &[]);
    // Sparse: the 256 MiB guest's memory file holds only what the booted guest touched.
    let memory = std::fs::metadata(snapshot.join("memory")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(memory.len(), 256 << 20);
    assert!(
        memory.blocks() * 512 < 200 << 20,
        "{} bytes",
        memory.blocks() * 512
    );

    let (a, b) = (sid("boot-clone-a"), sid("boot-clone-b"));
    for id in [&a, &b] {
        let started = Instant::now();
        let sandbox = create(&agent, id, "busybox");
        assert_eq!(create_path(&sandbox), "boot_snapshot", "{sandbox}");
        eprintln!(
            "restored create took {:?}: {}",
            started.elapsed(),
            sandbox["metadata"]
        );
    }
    let (ia, ib) = (identity(&agent, &a), identity(&agent, &b));
    for field in ["uuid", "random", "hostname", "machine_id"] {
        assert_ne!(ia[field], ib[field], "{field}: {ia} vs {ib}");
    }
    assert_eq!(ia["hostname"], a.to_ascii_lowercase());
    let now = chrono::Utc::now().timestamp();
    for clock in [&ia["clock"], &ib["clock"]] {
        assert!(
            (clock.as_i64().unwrap() - now).abs() <= 5,
            "{clock} vs {now}"
        );
    }
    assert_ne!(recorded_token(&agent, &a), recorded_token(&agent, &b));

    // Independent disks and memories.
    agent.run_as_root(&a, "echo only-in-a > /root/mark && sync");
    let out = agent.run(&b, "cat", &["/root/mark"]);
    assert_ne!(out["exit_code"], 0, "{out}");

    // A restored guest pauses and resumes like a booted one.
    agent.run_as_root(
        &a,
        "mkdir -p /mnt/t && mount -t tmpfs t /mnt/t && echo kept > /mnt/t/f",
    );
    let (status, body) = agent.call(Method::POST, &format!("/v1/sandboxes/{a}/pause"), None);
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = agent.call(Method::POST, &format!("/v1/sandboxes/{a}/resume"), None);
    assert_eq!(status, StatusCode::OK, "{body}");
    let out = agent.run_as_root(&a, "cat /root/mark /mnt/t/f");
    assert_eq!(out["stdout"], "only-in-a\nkept\n");

    for id in [&first, &a, &b] {
        let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    wait_clean(&agent);
    assert_eq!(
        boot_snapshots(&agent),
        vec![snapshot],
        "the snapshot outlives its clones"
    );
}

/// A files root whose busybox image is a copy of the test image, for a test that changes it.
fn root_with_own_busybox() -> tempfile::TempDir {
    let root = Agent::new_root_with_own_images();
    let images = root.path().join("images");
    let shared = std::fs::read_link(images.join("busybox")).unwrap();
    std::fs::remove_file(images.join("busybox")).unwrap();
    copy_dir(&shared, &images.join("busybox"));
    root
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_image_makes_a_new_boot_snapshot_and_a_broken_one_falls_back_to_a_boot() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let cp = support::TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (agent, _host) =
        support::agent::add_agent_in(&cp, &admin.auth(), root_with_own_busybox(), &ON).await;

    let first = sid("image-first");
    assert_eq!(create_path(&create(&agent, &first, "busybox")), "cold_boot");
    let old = wait_for_new_boot_snapshot(&agent, &[]);

    // The image is replaced (as a pull or rebuild does): the old snapshot is not used, a new
    // one is made and the old one removed.
    let image = agent.root.path().join("images/busybox/rootfs.ext4");
    let replacement = image.with_extension("new");
    std::fs::copy(&image, &replacement).unwrap();
    std::fs::rename(&replacement, &image).unwrap();
    let second = sid("image-second");
    assert_eq!(
        create_path(&create(&agent, &second, "busybox")),
        "cold_boot"
    );
    let new = wait_for_new_boot_snapshot(&agent, std::slice::from_ref(&old));
    assert!(!old.exists(), "the superseded snapshot is removed");

    // A damaged snapshot: the create falls back to a boot, and the snapshot is discarded.
    let state = new.join("vmstate");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::write(&state, vec![0u8; len as usize]).unwrap();
    let third = sid("image-third");
    let sandbox = create(&agent, &third, "busybox");
    assert_eq!(create_path(&sandbox), "cold_boot", "{sandbox}");
    agent.run(&third, "true", &[]);
    assert!(!new.exists(), "the damaged snapshot is discarded");
    assert!(
        !agent
            .log_lines(&["restoring the boot snapshot failed"])
            .is_empty(),
        "the fallback is logged"
    );

    for id in [&first, &second, &third] {
        let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    wait_clean(&agent);
}
