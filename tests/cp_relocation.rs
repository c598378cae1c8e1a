//! Resume on any host, with a real control plane, two agents sharing a template store (a
//! directory both reach, as a shared mount or an S3 bucket would be) and QEMU/TCG guests. A
//! capsule paused on host A is copied to the store; A is killed; resuming the capsule (by
//! `POST .../resume`, or by any call into it) moves it to host B, which imports the copy and
//! resumes it with every write it had made, on disk and in memory, and its processes running.
//! When A comes back, the reconciler removes its stale copy, and nothing of the capsule is left
//! in the store. A capsule resumed at home (its copy removed before the guest runs) can no
//! longer be moved with an outdated copy. A snapshot template published to the store starts on
//! a host that never held it.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::agent::{add_agent_in, wait_clean, Agent, VM_TURNS};
use support::{Auth, TestCp, User};
use wrenn::config::{Config, Layout};
use wrenn::cp::reconciler;
use wrenn::cp::state::{AuthSettings, CapsuleSettings};
use wrenn::db::sandboxes;
use wrenn::id::{HostId, SandboxId};
use wrenn::store::TemplateStore;

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const DELETE: Method = Method::DELETE;

async fn api_key(cp: &TestCp, user: &User) -> Auth {
    let (status, key) = cp
        .call(
            POST,
            "/v1/api-keys",
            &user.auth(),
            Some(json!({"name": "sdk"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    Auth::ApiKey(key["key"].as_str().unwrap().to_owned())
}

/// A control plane and its agents sharing a template store directory (which the control plane
/// reaches too, as a shared mount or a bucket would be), and an API key of the admin's team.
struct Stack {
    cp: TestCp,
    /// Each agent with its host ID.
    agents: Vec<(Agent, String)>,
    key: Auth,
    store: tempfile::TempDir,
}

async fn stack(agents: usize) -> Stack {
    let store = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.store.url = Some(store_url(store.path()).parse().unwrap());
    let capsules = CapsuleSettings {
        store: Some(TemplateStore::open(&config.store, &Layout::new(store.path())).unwrap()),
        ..support::quiet_capsules()
    };
    let cp = TestCp::start_full(support::QUIET_MONITOR, capsules, AuthSettings::default()).await;
    let admin = cp.signup("admin@example.com").await;
    let mut started = Vec::new();
    for _ in 0..agents {
        let url = store_url(store.path());
        let env = [("STORE_URL", url.as_str())];
        // Images of their own: a template one host makes is not the other's.
        let root = Agent::new_root_with_own_images();
        started.push(add_agent_in(&cp, &admin.auth(), root, &env).await);
    }
    let key = api_key(&cp, &admin).await;
    Stack {
        cp,
        agents: started,
        key,
        store,
    }
}

fn store_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

async fn exec(cp: &TestCp, key: &Auth, id: &str, script: &str) -> Value {
    let (status, out) = cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/exec"),
            key,
            Some(json!({"cmd": "sh", "args": ["-c", script], "timeout_sec": 60})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    out
}

async fn host_of(cp: &TestCp, id: &str) -> String {
    let id: SandboxId = id.parse().unwrap();
    let row = sandboxes::by_id(&cp.db, id.uuid()).await.unwrap().unwrap();
    HostId(row.host_id.unwrap()).to_string()
}

async fn status_of(cp: &TestCp, key: &Auth, id: &str) -> String {
    let (status, capsule) = cp.call(GET, &format!("/v1/capsules/{id}"), key, None).await;
    assert_eq!(status, StatusCode::OK, "{capsule}");
    capsule["status"].as_str().unwrap().to_owned()
}

fn stored_copy(store: &Path, id: &str) -> Option<Value> {
    let bytes = std::fs::read(store.join(format!("paused/{id}.json"))).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// Waits for the copy of the capsule's latest pause to be complete in the store.
async fn wait_stored(store: &Path, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(copy) = stored_copy(store, id) {
            return copy;
        }
        assert!(Instant::now() < deadline, "no store copy of {id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The blobs of the store, by name.
fn blobs(store: &Path) -> Vec<String> {
    match std::fs::read_dir(store.join("blobs/sha256")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn part_blobs(copy: &Value) -> Vec<String> {
    copy["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["blob"]["sha256"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_capsule_resumes_on_another_host_when_its_own_is_gone_and_loses_no_write() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let Stack {
        cp,
        mut agents,
        key,
        store: store_dir,
    } = stack(2).await;
    let (second, second_host) = agents.pop().unwrap();
    let (first, first_host) = agents.pop().unwrap();

    let (status, capsule) = cp
        .call(
            POST,
            "/v1/capsules",
            &key,
            Some(json!({"template": "busybox"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();
    let home = host_of(&cp, &id).await;
    let (mut home_agent, away_agent, away_host) = if home == first_host {
        (first, second, second_host)
    } else {
        (second, first, first_host)
    };

    // Writes on disk (synced, and one left in the page cache), in memory, and a process.
    let out = exec(
        &cp,
        &key,
        &id,
        "for i in $(seq 1 300); do echo line-$i >> /root/log; done; sync
         echo unsynced > /root/unsynced
         mkdir -p /mnt/m && mount -t tmpfs m /mnt/m && echo in-memory > /mnt/m/f
         sh -c 'i=0; while :; do i=$((i+1)); echo $i > /mnt/m/count; sleep 0.2; done' \
           >/dev/null 2>&1 &
         echo $! > /root/counter.pid",
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");

    // Paused at home first and resumed there: the copy is removed before the guest runs again,
    // so it can never be taken for the capsule's latest state.
    let (status, body) = cp
        .call(POST, &format!("/v1/capsules/{id}/pause"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let early = wait_stored(store_dir.path(), &id).await;
    let (status, body) = cp
        .call(POST, &format!("/v1/capsules/{id}/resume"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        host_of(&cp, &id).await,
        home,
        "a host with room resumes its own capsule"
    );
    assert!(
        stored_copy(store_dir.path(), &id).is_none(),
        "the copy outlived a resume"
    );
    for blob in part_blobs(&early) {
        assert!(
            !blobs(store_dir.path()).contains(&blob),
            "a part outlived its copy"
        );
    }
    exec(&cp, &key, &id, "echo after-first-resume >> /root/log; sync").await;

    let (status, body) = cp
        .call(POST, &format!("/v1/capsules/{id}/pause"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let copy = wait_stored(store_dir.path(), &id).await;
    assert_eq!(copy["sandbox_id"], id.as_str());
    let parts: Vec<&str> = copy["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["part"].as_str().unwrap())
        .collect();
    assert!(
        parts.contains(&"record") && parts.contains(&"disk"),
        "{copy}"
    );
    // Packs carry only the pages that hold data: far less than the guest's memory and disk.
    let stored: u64 = copy["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["blob"]["size_bytes"].as_u64().unwrap())
        .sum();
    assert!(stored < 256 << 20, "{stored} bytes stored");

    // Host A is gone: its agent killed, the reconciler finds the capsule missing.
    home_agent.kill_hard();
    let report = reconciler::reconcile_once(&cp.state).await.unwrap();
    assert!(
        report.missing.iter().any(|m| m.to_string() == id),
        "{report:?}"
    );
    assert_eq!(status_of(&cp, &key, &id).await, "missing");

    let started = Instant::now();
    let (status, resumed) = cp
        .call(POST, &format!("/v1/capsules/{id}/resume"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    let moved_in = started.elapsed();
    assert_eq!(resumed["status"], "running", "{resumed}");
    assert_eq!(host_of(&cp, &id).await, away_host);
    assert!(away_agent.sandbox_ids().contains(&id));
    eprintln!("resumed on another host from the store in {moved_in:?}");

    let out = exec(
        &cp,
        &key,
        &id,
        "wc -l < /root/log; tail -n 1 /root/log; cat /root/unsynced /mnt/m/f
         a=$(cat /mnt/m/count); sleep 1; b=$(cat /mnt/m/count); [ $b -gt $a ] && echo counting",
    )
    .await;
    assert_eq!(
        out["stdout"], "301\nafter-first-resume\nunsynced\nin-memory\ncounting\n",
        "{out}"
    );
    assert!(
        stored_copy(store_dir.path(), &id).is_none(),
        "the copy outlived the resume"
    );
    for blob in part_blobs(&copy) {
        assert!(
            !blobs(store_dir.path()).contains(&blob),
            "a part outlived its copy"
        );
    }

    // A comes back with its own, stale, paused copy: the reconciler removes it there.
    home_agent.restart(None);
    let report = reconciler::reconcile_once(&cp.state).await.unwrap();
    assert!(
        report.orphans_destroyed.iter().any(|o| o.to_string() == id),
        "{report:?}"
    );
    assert!(!home_agent.sandbox_ids().contains(&id));
    assert_eq!(status_of(&cp, &key, &id).await, "running");

    // Paused on B and destroyed: its copy leaves the store with it.
    let (status, body) = cp
        .call(POST, &format!("/v1/capsules/{id}/pause"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let last = wait_stored(store_dir.path(), &id).await;
    let (status, body) = cp
        .call(DELETE, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(stored_copy(store_dir.path(), &id).is_none());
    for blob in part_blobs(&last) {
        assert!(
            !blobs(store_dir.path()).contains(&blob),
            "a part outlived its capsule"
        );
    }
    wait_clean(&away_agent);
    wait_clean(&home_agent);
}

/// A capsule whose host is gone and that has no copy in the store (it was running) stays
/// `missing`: a resume is refused as before, and nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_capsule_without_a_store_copy_is_not_moved() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let Stack {
        cp,
        mut agents,
        key,
        store: _store,
    } = stack(2).await;
    let (status, capsule) = cp
        .call(
            POST,
            "/v1/capsules",
            &key,
            Some(json!({"template": "busybox"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();
    // It runs: no copy. The other host has room, and it must not be moved there.
    let host = host_of(&cp, &id).await;
    let home = agents.iter().position(|(_, h)| *h == host).unwrap();
    let (mut agent, _) = agents.swap_remove(home);

    agent.kill_hard();
    reconciler::reconcile_once(&cp.state).await.unwrap();
    assert_eq!(status_of(&cp, &key, &id).await, "missing");
    let (status, body) = cp
        .call(POST, &format!("/v1/capsules/{id}/resume"), &key, None)
        .await;
    support::assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");
    let (status, body) = cp
        .call(
            POST,
            &format!("/v1/capsules/{id}/exec"),
            &key,
            Some(json!({"cmd": "true"})),
        )
        .await;
    support::assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");
    assert_eq!(host_of(&cp, &id).await, host);
    agent.restart(None);
    let (status, body) = cp
        .call(DELETE, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    wait_clean(&agent);
}

/// A paused capsule whose host has filled up meanwhile (a paused capsule reserves no CPU or
/// memory there) resumes on another host with room, while its host runs on; its old copy
/// there is removed once the move has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_capsule_whose_host_is_full_resumes_on_another() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let Stack {
        cp,
        mut agents,
        key,
        store: store_dir,
    } = stack(2).await;
    let (second, second_host) = agents.pop().unwrap();
    let (first, first_host) = agents.pop().unwrap();
    let (status, capsule) = cp
        .call(
            POST,
            "/v1/capsules",
            &key,
            Some(json!({"template": "busybox"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();
    exec(&cp, &key, &id, "echo before-the-move > /root/f; sync").await;
    let home = host_of(&cp, &id).await;
    let (home_agent, away_agent, away_host) = if home == first_host {
        (first, second, second_host)
    } else {
        (second, first, first_host)
    };
    let (status, body) = cp
        .call(POST, &format!("/v1/capsules/{id}/pause"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_stored(store_dir.path(), &id).await;

    // Its host now has room for nothing.
    let home_uuid: HostId = home.parse().unwrap();
    sqlx::query("UPDATE hosts SET memory_mb = 64 WHERE id = $1")
        .bind(home_uuid.0)
        .execute(&cp.db)
        .await
        .unwrap();
    // A call into it resumes it, elsewhere.
    let out = exec(&cp, &key, &id, "cat /root/f").await;
    assert_eq!(out["stdout"], "before-the-move\n", "{out}");
    assert_eq!(host_of(&cp, &id).await, away_host);
    assert!(away_agent.sandbox_ids().contains(&id));
    assert!(stored_copy(store_dir.path(), &id).is_none());

    let report = reconciler::reconcile_once(&cp.state).await.unwrap();
    assert!(
        report.orphans_destroyed.iter().any(|o| o.to_string() == id),
        "{report:?}"
    );
    assert!(!home_agent.sandbox_ids().contains(&id));

    // With no room anywhere, it resumes where it is, as it always could, rather than not at all.
    let (status, body) = cp
        .call(POST, &format!("/v1/capsules/{id}/pause"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_stored(store_dir.path(), &id).await;
    sqlx::query("UPDATE hosts SET memory_mb = 64")
        .execute(&cp.db)
        .await
        .unwrap();
    let (status, body) = cp
        .call(POST, &format!("/v1/capsules/{id}/resume"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(host_of(&cp, &id).await, away_host);
    let out = exec(&cp, &key, &id, "cat /root/f").await;
    assert_eq!(out["stdout"], "before-the-move\n", "{out}");

    let (status, body) = cp
        .call(DELETE, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(stored_copy(store_dir.path(), &id).is_none());
    wait_clean(&away_agent);
    wait_clean(&home_agent);
}

/// The registry's version of a team's template `name`: its document in the store, once the
/// snapshot template is published.
async fn published_version(cp: &TestCp, name: &str) -> Option<(String, u64)> {
    let row: Option<(Option<String>, Value)> =
        sqlx::query_as("SELECT image_sha256, metadata FROM templates WHERE name = $1")
            .bind(name)
            .fetch_optional(&cp.db)
            .await
            .unwrap();
    let (sha256, metadata) = row?;
    Some((sha256?, metadata["store_document_bytes"].as_u64()?))
}

async fn wait_published(cp: &TestCp, name: &str, not: Option<&str>) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((sha256, _)) = published_version(cp, name).await {
            if Some(sha256.as_str()) != not {
                return sha256;
            }
        }
        assert!(Instant::now() < deadline, "{name} was not published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The blobs a published snapshot template's document names, and the document.
fn snapshot_copy_blobs(store: &Path, document: &str) -> Vec<String> {
    let bytes = std::fs::read(store.join("blobs/sha256").join(document)).unwrap();
    let copy: Value = serde_json::from_slice(&bytes).unwrap();
    let mut blobs: Vec<String> = copy["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["blob"]["sha256"].as_str().unwrap().to_owned())
        .collect();
    blobs.push(document.to_owned());
    blobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_template_goes_to_the_store_and_starts_on_a_host_that_never_held_it() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let Stack {
        cp,
        mut agents,
        key,
        store: store_dir,
    } = stack(2).await;
    let store = store_dir.path();
    let (status, capsule) = cp
        .call(
            POST,
            "/v1/capsules",
            &key,
            Some(json!({"template": "busybox"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let source = capsule["id"].as_str().unwrap().to_owned();
    let out = exec(
        &cp,
        &key,
        &source,
        "mkdir -p /mnt/m && mount -t tmpfs m /mnt/m && echo in-memory > /mnt/m/f
         echo on-disk > /root/d && sync
         sh -c 'i=0; while :; do i=$((i+1)); echo $i > /mnt/m/count; sleep 0.2; done' \
           >/dev/null 2>&1 &
         echo $! > /root/counter.pid",
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let home = host_of(&cp, &source).await;
    let (status, template) = cp
        .call(
            POST,
            "/v1/snapshots",
            &key,
            Some(json!({"sandbox_id": source, "name": "warm"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{template}");
    let first = wait_published(&cp, "warm", None).await;
    let first_blobs = snapshot_copy_blobs(store, &first);
    assert_eq!(first_blobs.len(), 6, "five files and the document");

    // The source's host has room for nothing more: the create goes to the other host, which
    // pulls the template from the store and continues the snapshot's instant.
    let home_uuid: HostId = home.parse().unwrap();
    sqlx::query("UPDATE hosts SET memory_mb = 64 WHERE id = $1")
        .bind(home_uuid.0)
        .execute(&cp.db)
        .await
        .unwrap();
    let (status, capsule) = cp
        .call(
            POST,
            "/v1/capsules",
            &key,
            Some(json!({"template": "warm"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let child = capsule["id"].as_str().unwrap().to_owned();
    let away = host_of(&cp, &child).await;
    assert_ne!(away, home);
    let out = exec(
        &cp,
        &key,
        &child,
        "kill -0 $(cat /root/counter.pid) && cat /mnt/m/f /root/d && cat /mnt/m/count
         sleep 1; cat /mnt/m/count",
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let lines: Vec<&str> = out["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(&lines[..2], ["in-memory", "on-disk"], "{out}");
    let (before, after): (u64, u64) = (lines[2].parse().unwrap(), lines[3].parse().unwrap());
    assert!(after > before, "the counter runs on in the child: {out}");
    let (status, body) = cp
        .call(DELETE, &format!("/v1/capsules/{child}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    // An overwrite publishes a new copy and removes the old one from the store.
    sqlx::query("UPDATE hosts SET memory_mb = 4096")
        .execute(&cp.db)
        .await
        .unwrap();
    let (status, template) = cp
        .call(
            POST,
            "/v1/snapshots?overwrite=true",
            &key,
            Some(json!({"sandbox_id": source, "name": "warm"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{template}");
    let second = wait_published(&cp, "warm", Some(&first)).await;
    let second_blobs = snapshot_copy_blobs(store, &second);
    let left = blobs(store);
    assert!(
        first_blobs.iter().all(|b| !left.contains(b)),
        "the old copy is gone"
    );

    // A delete removes it from the store and from both hosts.
    let (status, body) = cp.call(DELETE, "/v1/snapshots/warm", &key, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let left = blobs(store);
    assert!(second_blobs.iter().all(|b| !left.contains(b)), "{left:?}");
    for (agent, _) in &agents {
        let images = std::fs::read_dir(agent.root.path().join("images"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        assert!(
            images.iter().all(|name| !name.starts_with("warm.")),
            "{images:?}"
        );
    }
    let (status, body) = cp
        .call(DELETE, &format!("/v1/capsules/{source}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for (agent, _) in agents.drain(..) {
        wait_clean(&agent);
    }
}
