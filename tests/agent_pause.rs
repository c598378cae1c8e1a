//! Pause to disk and resume on the host agent, with real QEMU/TCG guests. The correctness gate:
//! whatever a guest wrote — fsync'd and unsynced files on its disk, tmpfs files, a process's
//! memory, an open terminal's scrollback — is all there after every pause and resume, and the
//! paused sandbox holds no VMM process and no network slot meanwhile.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::agent::{sid, stack_with_env, wait_clean, Agent, VM_TURNS};
use wrenn::config::Layout;
use wrenn::envd::api::{AttachRequest, ProcessSpec, PtySize, StartRequest};
use wrenn::envd::client::ProcessEvent;
use wrenn::vmm::find_leftovers;

/// Pause/resume cycles the gate runs in CI; `cargo bench --bench persistence` runs a thousand.
fn gate_cycles() -> u32 {
    std::env::var("WRENN_GATE_CYCLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3)
}

const COUNTER_TAG: &str = "gate-counter";
const PTY_TAG: &str = "gate-pty";
const PTY_MARKER: &str = "gate-marker-42";

/// What the gate wrote into one guest and expects to find again.
struct Gate {
    id: String,
    /// Guest path → sha256 of its content.
    files: BTreeMap<String, String>,
    counter_pid: u32,
    last_count: u64,
}

fn sha_lines(out: &Value) -> BTreeMap<String, String> {
    out["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(|line| {
            let (sum, path) = line.split_once("  ").expect("sha256sum output");
            (path.to_owned(), sum.to_owned())
        })
        .collect()
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Handle::current().block_on(future)
}

/// Reads the PTY's output (its replayed scrollback first) until `needle` appears.
fn pty_shows(agent: &Agent, id: &str, needle: &str) {
    let envd = agent.envd(id);
    block_on(async {
        let mut session = envd
            .attach(&AttachRequest::Connect {
                selector: PTY_TAG.into(),
            })
            .await
            .expect("the terminal is still there");
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, session.next_event()).await {
                Ok(Ok(Some(ProcessEvent::Pty(bytes)))) => seen.extend_from_slice(&bytes),
                Ok(Ok(Some(_))) => {}
                other => panic!(
                    "`{needle}` never showed on the terminal ({other:?}); it showed {:?}",
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
    });
}

impl Gate {
    fn write(agent: &Agent, id: &str) -> Self {
        let out = agent.run_as_root(
            id,
            "set -e
             mkdir -p /var/gate /mnt/gate
             mount -t tmpfs -o size=64m gate /mnt/gate
             head -c 8388608 /dev/urandom > /var/gate/synced.bin
             sync
             head -c 4194304 /dev/urandom > /var/gate/unsynced.bin
             head -c 4194304 /dev/urandom > /mnt/gate/tmpfs.bin
             sha256sum /var/gate/synced.bin /var/gate/unsynced.bin /mnt/gate/tmpfs.bin",
        );
        let files = sha_lines(&out);
        assert_eq!(files.len(), 3, "{out}");
        let envd = agent.envd(id);
        let counter = block_on(envd.start(&StartRequest {
            process: ProcessSpec {
                cmd: "sh".into(),
                args: vec![
                    "-c".into(),
                    "i=0; while :; do i=$((i+1)); echo $i > /mnt/gate/count; sleep 0.05; done"
                        .into(),
                ],
                user: Some("root".into()),
                ..ProcessSpec::default()
            },
            tag: Some(COUNTER_TAG.into()),
            pty: None,
        }))
        .unwrap();
        block_on(envd.start(&StartRequest {
            process: ProcessSpec {
                cmd: "sh".into(),
                ..ProcessSpec::default()
            },
            tag: Some(PTY_TAG.into()),
            pty: Some(PtySize { cols: 80, rows: 24 }),
        }))
        .unwrap();
        block_on(envd.write_stdin(PTY_TAG, "echo gate-marker-$((40+2))\n")).unwrap();
        pty_shows(agent, id, PTY_MARKER);
        let mut gate = Self {
            id: id.to_owned(),
            files,
            counter_pid: counter.pid,
            last_count: 0,
        };
        gate.last_count = gate.count(agent);
        gate
    }

    fn count(&self, agent: &Agent) -> u64 {
        let out = agent.run(&self.id, "cat", &["/mnt/gate/count"]);
        out["stdout"].as_str().unwrap().trim().parse().unwrap()
    }

    /// One more unsynced file for this cycle, so each cycle has writes of its own.
    fn write_cycle(&mut self, agent: &Agent, cycle: u32) {
        let path = format!("/var/gate/cycle-{cycle}.bin");
        let out = agent.run_as_root(
            &self.id,
            &format!("head -c 65536 /dev/urandom > {path} && sha256sum {path}"),
        );
        self.files.extend(sha_lines(&out));
    }

    /// Everything written so far is intact and the counter process ran on from where it was.
    fn check(&mut self, agent: &Agent, cycle: u32) {
        let paths: Vec<&str> = self.files.keys().map(String::as_str).collect();
        let out = agent.run_as_root(&self.id, &format!("sha256sum {}", paths.join(" ")));
        assert_eq!(sha_lines(&out), self.files, "cycle {cycle}: files changed");
        let processes = block_on(agent.envd(&self.id).list()).unwrap();
        let counter = processes
            .iter()
            .find(|p| p.tag == COUNTER_TAG)
            .unwrap_or_else(|| panic!("cycle {cycle}: the counter is gone: {processes:?}"));
        assert_eq!(counter.pid, self.counter_pid, "cycle {cycle}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let count = loop {
            let count = self.count(agent);
            if count > self.last_count {
                break count;
            }
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: the counter stopped at {count} (was {})",
                self.last_count
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        self.last_count = count;
        pty_shows(agent, &self.id, PTY_MARKER);
        let echo = format!("cycle-{cycle}-done");
        block_on(
            agent
                .envd(&self.id)
                .write_stdin(PTY_TAG, format!("echo {echo}\n")),
        )
        .unwrap();
        pty_shows(agent, &self.id, &echo);
    }
}

fn pause(agent: &Agent, id: &str) -> Value {
    let (status, info) = agent.call(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None);
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["status"], "paused", "{info}");
    info
}

fn resume(agent: &Agent, id: &str) -> Value {
    let (status, info) = agent.call(Method::POST, &format!("/v1/sandboxes/{id}/resume"), None);
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["status"], "running", "{info}");
    info
}

/// A paused sandbox holds no VMM process and no network slot, and its snapshot is on disk.
fn holds_nothing_but_files(agent: &Agent, id: &str) {
    let layout = Layout::new(agent.root.path());
    assert!(
        find_leftovers(&layout).iter().all(|l| l.sandbox_id != id),
        "a paused sandbox still has a VMM process"
    );
    assert!(layout.snapshot_meta(id).is_file(), "no snapshot on disk");
    assert!(layout.sandbox_upper_disk(id).is_file(), "the disk is gone");
    let netns = support::agent::sh(&format!(
        "ip netns list | grep -c '^{}-' || true",
        agent.prefix
    ));
    assert_eq!(
        netns.trim(),
        "0",
        "a paused sandbox still holds a network slot"
    );
}

/// Agents whose graceful stop leaves their sandboxes running, as in production.
const KEEP_SANDBOXES: &[(&str, &str)] = &[("AGENT_DESTROY_SANDBOXES_ON_STOP", "false")];

/// The pid of the VMM process running sandbox `id`, if any.
fn vmm_pid(agent: &Agent, id: &str) -> Option<u32> {
    find_leftovers(&Layout::new(agent.root.path()))
        .into_iter()
        .find(|l| l.sandbox_id == id)
        .map(|l| l.pid)
}

fn status_of(agent: &Agent, id: &str) -> Value {
    let (status, info) = agent.call(Method::GET, &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, StatusCode::OK, "{info}");
    info["status"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_write_is_lost_across_pause_resume_cycles_and_agent_restarts() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _, _) = stack_with_env(KEEP_SANDBOXES).await;
    let agent = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        let id = sid("gate");
        let (status, body) = agent.create(&id);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let mut gate = Gate::write(&agent, &id);
        for cycle in 0..gate_cycles() {
            gate.write_cycle(&agent, cycle);
            let paused = pause(&agent, &id);
            assert!(paused["metadata"]["pause_ms"].is_string(), "{paused}");
            holds_nothing_but_files(&agent, &id);
            let (status, info) = agent.call(Method::GET, &format!("/v1/sandboxes/{id}"), None);
            assert_eq!(
                (status, info["status"].clone()),
                (StatusCode::OK, json!("paused"))
            );
            if cycle % 2 == 0 {
                resume(&agent, &id);
            }
            // Odd cycles resume on the first call: the check's first command.
            gate.check(&agent, cycle);
        }
        let cycles = gate_cycles() as usize;
        assert_eq!(agent.log_lines(&["sandbox paused", &id]).len(), cycles);
        assert_eq!(agent.log_lines(&["sandbox resumed", &id]).len(), cycles);

        // The agent is killed while the sandbox runs: the next one adopts the same VMM.
        let running_vmm = vmm_pid(&agent, &id).expect("a running sandbox has a VMM");
        agent.kill_hard();
        agent.restart(None);
        assert_eq!(status_of(&agent, &id), "running");
        assert_eq!(
            vmm_pid(&agent, &id),
            Some(running_vmm),
            "the VMM was adopted"
        );
        gate.check(&agent, 100);
        // A graceful stop leaves it running too; a paused one survives a SIGKILL as well.
        agent.restart(None);
        assert_eq!(
            vmm_pid(&agent, &id),
            Some(running_vmm),
            "the VMM was adopted"
        );
        gate.check(&agent, 101);
        pause(&agent, &id);
        agent.kill_hard();
        agent.restart(None);
        assert_eq!(status_of(&agent, &id), "paused");
        holds_nothing_but_files(&agent, &id);
        gate.check(&agent, 102);
        // The adopted VM pauses and resumes like any other.
        pause(&agent, &id);
        resume(&agent, &id);
        gate.check(&agent, 103);
        let (status, _) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, StatusCode::NO_CONTENT);
        let layout = Layout::new(agent.root.path());
        assert!(!layout.snapshot_dir(&id).exists());
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_and_resume_are_idempotent_and_only_a_sandbox_that_lost_its_vm_is_lost() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _, _) = stack_with_env(KEEP_SANDBOXES).await;
    let agent = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        let id = sid("idempotent");
        let (status, body) = agent.create(&id);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        // Two pauses at once: one pauses, the other waits for it; both answer paused.
        let path = format!("/v1/sandboxes/{id}/pause");
        let answers: Vec<(StatusCode, Value)> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..2)
                .map(|_| s.spawn(|| agent.call(Method::POST, &path, None)))
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        for (status, info) in &answers {
            assert_eq!(*status, StatusCode::OK, "{info}");
            assert_eq!(info["status"], "paused", "{info}");
        }
        assert_eq!(agent.log_lines(&["sandbox paused", &id]).len(), 1);
        holds_nothing_but_files(&agent, &id);
        // The guest's clock stood still while it was paused; the resume sets it again.
        std::thread::sleep(Duration::from_secs(4));
        resume(&agent, &id);
        let out = agent.run(&id, "date", &["+%s"]);
        let guest: i64 = out["stdout"].as_str().unwrap().trim().parse().unwrap();
        let host = chrono::Utc::now().timestamp();
        assert!(
            (host - guest).abs() <= 2,
            "guest clock {guest}, host {host}"
        );
        resume(&agent, &id);
        assert_eq!(agent.log_lines(&["sandbox resumed", &id]).len(), 1);
        let out = agent.run(&id, "echo", &["back"]);
        assert_eq!(out["stdout"], "back\n", "{out}");

        // Unknown and malformed ids.
        let (status, body) = agent.call(
            Method::POST,
            &format!("/v1/sandboxes/{}/pause", sid("nobody")),
            None,
        );
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        let (status, body) = agent.call(Method::POST, "/v1/sandboxes/x/resume", None);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["code"], "invalid_request");

        pause(&agent, &id);
        let (status, _) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, StatusCode::NO_CONTENT);
        let layout = Layout::new(agent.root.path());
        assert!(
            !layout.snapshot_dir(&id).exists(),
            "the snapshot is removed"
        );
        assert!(!layout.sandbox_dir(&id).exists(), "the disk is removed");

        // A sandbox whose VM dies while no agent runs (as in a host reboot) is lost, and the
        // next agent says why; a paused one is not.
        let doomed = sid("doomed");
        let (status, body) = agent.create(&doomed);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = agent.create(&id);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        pause(&agent, &id);
        let pid = vmm_pid(&agent, &doomed).unwrap();
        agent.kill_hard();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        agent.restart(None);
        let (status, _) = agent.call(Method::GET, &format!("/v1/sandboxes/{doomed}"), None);
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (_, list) = agent.call(Method::GET, "/v1/sandboxes", None);
        let lost = list["lost"].as_array().unwrap();
        assert_eq!(lost.len(), 1, "{list}");
        assert_eq!(lost[0]["sandbox_id"], doomed.as_str());
        assert!(
            lost[0]["reason"]
                .as_str()
                .unwrap()
                .contains("stopped while no agent ran"),
            "{list}"
        );
        assert!(!layout.sandbox_dir(&doomed).exists());
        assert_eq!(status_of(&agent, &id), "paused");
        resume(&agent, &id);
        let (status, _) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, StatusCode::NO_CONTENT);
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}
