//! Creates that restore instead of boot, snapshot templates and forks, through the public API
//! on a local stack of real parts (as root: a private PostgreSQL, the control plane, a
//! registered `wrenn agent` and QEMU/TCG microVMs), side by side in one run:
//!
//! - create → API answer and create → first exec, by cold boot (boot snapshots off) and by
//!   restoring the template's boot snapshot (p50/p99/max);
//! - a snapshot template: its `POST /v1/snapshots`, and creates from it;
//! - forks of 1 and of 8 children;
//! - pause → resume on the same host, and resume on another host from the template store
//!   (two agents sharing a store directory; the capsule's host killed), with the size and time
//!   of the copy a pause puts in the store;
//! - what the files cost on disk against the guest's memory: the boot snapshot's memory file
//!   (apparent and allocated), a snapshot template, a paused capsule's snapshot.
//!
//! `cargo bench --bench snapshots` (`just bench-snapshots`); `WRENN_BENCH_TEMPLATE` (default
//! `minimal`, the SDKs' default template) and `WRENN_BENCH_CREATES` (default 20) change it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::{Auth, TestCp};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_latencies(label: &str, mut values: Vec<Duration>) {
    if values.is_empty() {
        return;
    }
    values.sort();
    let at = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
    println!(
        "  {label:<34} p50 {:8.1} ms   p99 {:8.1} ms   max {:8.1} ms   (n={})",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(at(1.0)),
        values.len()
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Apparent and allocated bytes of every file under `dir`.
fn sizes(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return total;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (a, b) = sizes(&entry.path());
            total = (total.0 + a, total.1 + b);
        } else {
            total = (total.0 + meta.len(), total.1 + meta.blocks() * 512);
        }
    }
    total
}

struct Bench {
    cp: TestCp,
    key: Auth,
    agent: support::agent::Agent,
}

impl Bench {
    async fn start(boot_snapshots: bool) -> Self {
        let flag = if boot_snapshots { "true" } else { "false" };
        let cp = TestCp::start().await;
        let admin = cp.signup("admin@example.com").await.auth();
        // Its own images directory: the snapshot template lands there, not among the shared
        // test images.
        let (agent, _) = support::agent::add_agent_in(
            &cp,
            &admin,
            support::agent::Agent::new_root_with_own_images(),
            &[("AGENT_BOOT_SNAPSHOTS", flag)],
        )
        .await;
        sqlx::query("UPDATE hosts SET cpu_cores = 64, memory_mb = 65536, disk_gb = 4096")
            .execute(&cp.db)
            .await
            .unwrap();
        let (status, key) = cp
            .call(
                Method::POST,
                "/v1/api-keys",
                &admin,
                Some(json!({"name": "bench"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        Self {
            key: Auth::ApiKey(key["key"].as_str().unwrap().to_owned()),
            cp,
            agent,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.cp.call(method, path, &self.key, body).await
    }

    async fn create_from(&self, template: &str) -> (Value, Duration) {
        let started = Instant::now();
        let (status, capsule) = self
            .call(
                Method::POST,
                "/v1/capsules",
                Some(json!({"template": template})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{capsule}");
        (capsule, started.elapsed())
    }

    async fn sh(&self, id: &str, script: &str) -> Value {
        let (status, out) = self
            .call(
                Method::POST,
                &format!("/v1/capsules/{id}/exec"),
                Some(json!({"cmd": "/bin/sh", "args": ["-c", script], "timeout_sec": 120})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        out
    }

    async fn destroy(&self, id: &str) {
        let (status, body) = self
            .call(Method::DELETE, &format!("/v1/capsules/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }

    /// `n` creates of `template`, each destroyed after its first exec: (create, create → first
    /// exec) latencies and how each was made.
    async fn creates(
        &self,
        template: &str,
        n: usize,
    ) -> (Vec<Duration>, Vec<Duration>, Vec<String>) {
        let (mut answers, mut first_execs, mut paths) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let started = Instant::now();
            let (capsule, answered) = self.create_from(template).await;
            let id = capsule["id"].as_str().unwrap().to_owned();
            self.sh(&id, "true").await;
            first_execs.push(started.elapsed());
            answers.push(answered);
            paths.push(
                capsule["metadata"]["create_path"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
            );
            self.destroy(&id).await;
        }
        (answers, first_execs, paths)
    }

    async fn stop(self) {
        support::agent::wait_clean(&self.agent);
        drop(self.agent);
        self.cp.stop().await;
    }
}

/// Pause on one host, kill it, resume on the other from the store, `rounds` times (the killed
/// host is started again each time, and the capsule moves back and forth).
async fn relocation_figures(template: &str, rounds: usize) {
    use wrenn::config::{Config, Layout};
    use wrenn::cp::state::{AuthSettings, CapsuleSettings};

    let store_dir = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store_dir.path().display());
    let mut config = Config::default();
    config.store.url = Some(store_url.parse().unwrap());
    let store =
        wrenn::store::TemplateStore::open(&config.store, &Layout::new(store_dir.path())).unwrap();
    let capsules = CapsuleSettings {
        store: Some(store),
        ..support::quiet_capsules()
    };
    let cp = TestCp::start_full(support::QUIET_MONITOR, capsules, AuthSettings::default()).await;
    let admin = cp.signup("admin@example.com").await.auth();
    let env = [
        ("STORE_URL", store_url.as_str()),
        ("AGENT_BOOT_SNAPSHOTS", "false"),
    ];
    let mut agents = Vec::new();
    for _ in 0..2 {
        let root = support::agent::Agent::new_root();
        let (agent, host) = support::agent::add_agent_in(&cp, &admin, root, &env).await;
        agents.push((agent, host));
    }
    sqlx::query("UPDATE hosts SET cpu_cores = 64, memory_mb = 65536, disk_gb = 4096")
        .execute(&cp.db)
        .await
        .unwrap();
    let (status, key) = cp
        .call(
            Method::POST,
            "/v1/api-keys",
            &admin,
            Some(json!({"name": "bench"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let key = Auth::ApiKey(key["key"].as_str().unwrap().to_owned());
    let (status, capsule) = cp
        .call(
            Method::POST,
            "/v1/capsules",
            &key,
            Some(json!({"template": template})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();
    let (status, out) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/exec"),
            &key,
            Some(json!({"cmd": "/bin/sh", "args": ["-c",
                "head -c 67108864 /dev/urandom > /dev/shm/state; head -c 16777216 /dev/urandom > /root/disk; sync"],
                "timeout_sec": 120})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let copy_path = store_dir.path().join(format!("paused/{id}.json"));
    let (mut copies, mut moves, mut stored) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (status, body) = cp
            .call(
                Method::POST,
                &format!("/v1/capsules/{id}/pause"),
                &key,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let paused = Instant::now();
        while !copy_path.is_file() {
            assert!(paused.elapsed() < Duration::from_secs(600), "no store copy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        copies.push(paused.elapsed());
        let copy: Value = serde_json::from_slice(&std::fs::read(&copy_path).unwrap()).unwrap();
        stored.push(
            copy["parts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["blob"]["size_bytes"].as_u64().unwrap())
                .sum::<u64>(),
        );
        let row =
            wrenn::db::sandboxes::by_id(&cp.db, id.parse::<wrenn::id::SandboxId>().unwrap().uuid())
                .await
                .unwrap()
                .unwrap();
        let home = wrenn::id::HostId(row.host_id.unwrap()).to_string();
        let index = agents.iter().position(|(_, host)| *host == home).unwrap();
        agents[index].0.kill_hard();
        wrenn::cp::reconciler::reconcile_once(&cp.state)
            .await
            .unwrap();
        let started = Instant::now();
        let (status, body) = cp
            .call(
                Method::POST,
                &format!("/v1/capsules/{id}/resume"),
                &key,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        moves.push(started.elapsed());
        let agent = &mut agents[index].0;
        tokio::task::block_in_place(|| agent.restart(None));
        wrenn::cp::reconciler::reconcile_once(&cp.state)
            .await
            .unwrap();
    }
    println!("resume on another host, from the template store (64 MiB dirtied in memory, 16 MiB on disk)");
    print_latencies("pause -> copy complete in the store", copies);
    print_latencies("resume elsewhere (import + restore)", moves);
    println!(
        "  copy in the store: {:.1} MiB (packs of record, snapshot and disk)",
        mib(stored.iter().sum::<u64>() / stored.len().max(1) as u64)
    );
    let (status, body) = cp
        .call(Method::DELETE, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for (agent, _) in agents {
        support::agent::wait_clean(&agent);
        drop(agent);
    }
    cp.stop().await;
}

fn wait_for_boot_snapshot(root: &Path) -> std::path::PathBuf {
    let dir = root.join("snapshots/boot");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(found) = std::fs::read_dir(&dir).ok().and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .find(|p| p.join("boot.json").is_file())
        }) {
            return found;
        }
        assert!(Instant::now() < deadline, "no boot snapshot was made");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("snapshots benchmark: run it with `cargo bench --bench snapshots`");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("snapshots benchmark: the local stack boots VMs and needs root; skipped");
        return;
    }
    let template = std::env::var("WRENN_BENCH_TEMPLATE").unwrap_or_else(|_| "minimal".into());
    let n = std::env::var("WRENN_BENCH_CREATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20usize);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "# local stack: QEMU/TCG microVMs, template `{template}`, {} host CPUs",
            std::thread::available_parallelism().map_or(0, |p| p.get())
        );

        let cold = Bench::start(false).await;
        let (answers, first_execs, _) = cold.creates(&template, n.min(5)).await;
        println!("creates");
        print_latencies("cold boot: create", answers);
        print_latencies("cold boot: create -> first exec", first_execs);
        cold.stop().await;

        let warm = Bench::start(true).await;
        let (_, first, _) = warm.creates(&template, 1).await;
        let made = Instant::now();
        let boot = wait_for_boot_snapshot(warm.agent.root.path());
        println!(
            "  boot snapshot made {:.1} s after the first create ({:.0} ms to the first exec)",
            made.elapsed().as_secs_f64(),
            ms(first[0])
        );
        let (answers, first_execs, paths) = warm.creates(&template, n).await;
        let restored = paths.iter().filter(|p| *p == "boot_snapshot").count();
        print_latencies("boot snapshot: create", answers);
        print_latencies("boot snapshot: create -> first exec", first_execs);
        println!("  ({restored} of {n} creates restored the boot snapshot)");

        let (source, _) = warm.create_from(&template).await;
        let source = source["id"].as_str().unwrap().to_owned();
        warm.sh(&source, "head -c 67108864 /dev/urandom > /dev/shm/state; sync")
            .await;
        let started = Instant::now();
        let (status, made_template) = warm
            .call(
                Method::POST,
                "/v1/snapshots",
                Some(json!({"sandbox_id": source, "name": "bench-snapshot"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{made_template}");
        println!("snapshot templates (the source holds 64 MiB of random data in /dev/shm)");
        print_latencies("POST /v1/snapshots", vec![started.elapsed()]);
        let (answers, first_execs, _) = warm.creates("bench-snapshot", n.min(10)).await;
        print_latencies("snapshot template: create", answers);
        print_latencies("snapshot template: -> first exec", first_execs);

        println!("forks");
        for count in [1usize, 8] {
            let started = Instant::now();
            let (status, children) = warm
                .call(
                    Method::POST,
                    &format!("/v1/capsules/{source}/fork"),
                    Some(json!({"count": count})),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{children}");
            print_latencies(&format!("fork of {count}"), vec![started.elapsed()]);
            for child in children.as_array().unwrap() {
                warm.destroy(child["id"].as_str().unwrap()).await;
            }
        }

        println!("pause and resume on the same host");
        let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            for (path, into) in [("pause", &mut pauses), ("resume", &mut resumes)] {
                let started = Instant::now();
                let (status, body) = warm
                    .call(Method::POST, &format!("/v1/capsules/{source}/{path}"), None)
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                into.push(started.elapsed());
            }
        }
        print_latencies("pause", pauses);
        print_latencies("resume", resumes);
        relocation_figures(&template, 3).await;
        let (status, body) = warm
            .call(Method::POST, &format!("/v1/capsules/{source}/pause"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");

        println!("on disk");
        let root = warm.agent.root.path();
        let memory_mb = made_template["memory_mb"].as_u64().unwrap_or(0);
        let (apparent, allocated) = sizes(&boot.join("memory"));
        let (_, memory_alone) = {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(boot.join("memory")).unwrap();
            (meta.len(), meta.blocks() * 512)
        };
        println!(
            "  guest memory {memory_mb} MiB; boot snapshot memory file {:.1} MiB apparent, {:.1} MiB allocated; whole boot snapshot {:.1} MiB",
            mib(std::fs::metadata(boot.join("memory")).map_or(apparent, |m| m.len())),
            mib(memory_alone),
            mib(sizes(&boot).1.max(allocated)),
        );
        let images = root.join("images");
        if let Some(dir) = std::fs::read_dir(&images).ok().and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().contains("bench-snapshot"))
        }) {
            println!(
                "  snapshot template (64 MiB dirtied): {:.1} MiB allocated",
                mib(sizes(&dir.join("snapshot")).1)
            );
        }
        println!(
            "  paused capsule's snapshot: {:.1} MiB allocated",
            mib(sizes(&root.join("snapshots").join(&source)).1)
        );
        warm.destroy(&source).await;
        let (status, body) = warm
            .call(Method::DELETE, "/v1/snapshots/bench-snapshot", None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        warm.stop().await;
    });
}
