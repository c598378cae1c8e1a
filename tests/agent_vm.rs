//! The host agent for real: a control plane over a private PostgreSQL, a host registered with a
//! one-time token, and `wrenn agent` booting microVMs from the `minimal` image under QEMU/TCG.
//! Every test checks that what it created on the host (namespaces, links, nft elements, VMM
//! processes, files) is gone afterwards.
//!
//! Each agent has its own name prefix and address ranges; the tests run two at a time because
//! TCG guests share two cores.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::agent::{sid, stack, stack_with_env, wait_clean, CREATE_STEPS, VM_TURNS};
use wrenn::config::Layout;
use wrenn::vmm::qemu::qmp::QmpClient;
use wrenn::vmm::{console_tail, find_leftovers, VmFiles};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn boots_runs_commands_moves_files_and_destroys_without_traces() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, host_id, admin) = stack().await;
    let (status, host) = cp
        .call(Method::GET, &format!("/v1/hosts/{host_id}"), &admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(host["status"], "online", "{host}");

    let agent = tokio::task::spawn_blocking(move || {
        let (status, info) = agent.create(&sid("e2e-one"));
        assert_eq!(status, StatusCode::CREATED, "{info}");
        assert_eq!(info["status"], "running");
        assert!(info["metadata"]["envd_version"].is_string(), "{info}");

        let out = agent.run(&sid("e2e-one"), "cat", &["/etc/passwd"]);
        assert_eq!(out["exit_code"], 0, "{out}");
        assert!(
            out["stdout"].as_str().unwrap().contains("user:x:1000"),
            "{out}"
        );

        let put = agent
            .http
            .put(agent.url(&format!(
                "/v1/sandboxes/{}/envd/files?path=/home/user/notes/hello.txt",
                sid("e2e-one")
            )))
            .header("authorization", format!("Bearer {}", agent.secret))
            .send("written from the host\n")
            .unwrap();
        assert_eq!(put.status().as_u16(), 200);
        let mut get = agent
            .http
            .get(agent.url(&format!(
                "/v1/sandboxes/{}/envd/files?path=/home/user/notes/hello.txt",
                sid("e2e-one")
            )))
            .header("authorization", format!("Bearer {}", agent.secret))
            .call()
            .unwrap();
        assert_eq!(
            get.body_mut().read_to_string().unwrap(),
            "written from the host\n"
        );
        let out = agent.run(&sid("e2e-one"), "cat", &["/home/user/notes/hello.txt"]);
        assert_eq!(out["stdout"], "written from the host\n", "{out}");

        let (status, list) = agent.call(Method::GET, "/v1/sandboxes", None);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1, "{list}");

        // Sampled every second: CPU of the VMM per vCPU, the guest's memory, the disk's bytes.
        let out = agent.run(
            &sid("e2e-one"),
            "sh",
            &["-c", "timeout 3 sh -c 'while :; do :; done'; true"],
        );
        assert_eq!(out["exit_code"], 0, "{out}");
        let metrics_path = format!("/v1/sandboxes/{}/metrics", sid("e2e-one"));
        let (status, metrics) = agent.call(Method::GET, &format!("{metrics_path}?range=5m"), None);
        assert_eq!(status, StatusCode::OK, "{metrics}");
        assert_eq!(metrics["range"], "5m");
        let points = metrics["points"].as_array().unwrap();
        assert!(points.len() >= 3, "{metrics}");
        let busiest = points
            .iter()
            .map(|p| p["cpu_pct"].as_f64().unwrap())
            .fold(0.0, f64::max);
        assert!((30.0..=100.0).contains(&busiest), "{metrics}");
        let last = points.last().unwrap();
        let mem = last["mem_bytes"].as_u64().unwrap();
        assert!(mem > (8 << 20) && mem < (512 << 20), "{last}");
        assert!(last["disk_bytes"].as_u64().unwrap() > 0, "{last}");
        let (_, hour) = agent.call(Method::GET, &format!("{metrics_path}?range=1h"), None);
        assert!(!hour["points"].as_array().unwrap().is_empty(), "{hour}");
        let (status, _) = agent.call(Method::GET, &format!("{metrics_path}?range=3d"), None);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let unknown = format!("/v1/sandboxes/{}/metrics", sid("never-here"));
        let (status, _) = agent.call(Method::GET, &unknown, None);
        assert_eq!(status, StatusCode::NOT_FOUND);

        let (status, body) = agent.call(
            Method::DELETE,
            &format!("/v1/sandboxes/{}", sid("e2e-one")),
            None,
        );
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let (status, _) = agent.call(
            Method::GET,
            &format!("/v1/sandboxes/{}", sid("e2e-one")),
            None,
        );
        assert_eq!(status, StatusCode::NOT_FOUND);
        // Its metrics outlive it.
        let (status, metrics) = agent.call(Method::GET, &metrics_path, None);
        assert_eq!(status, StatusCode::OK, "{metrics}");
        assert_eq!(metrics["range"], "10m");
        wait_clean(&agent);
        // A stopped agent takes its host firewall table with it.
        let mut agent = agent;
        let table = format!("table inet {}", agent.prefix);
        let listed = || {
            support::agent::sh("nft list tables")
                .lines()
                .any(|l| l.trim() == table)
        };
        assert!(listed());
        agent.stop();
        assert!(!listed());
        // The next agent process answers for the metrics this one kept.
        agent.restart(None);
        let (status, metrics) = agent.call(Method::GET, &format!("{metrics_path}?range=5m"), None);
        assert_eq!(status, StatusCode::OK, "{metrics}");
        assert!(
            metrics["points"].as_array().unwrap().len() >= 3,
            "{metrics}"
        );
        agent.stop();
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_without_the_agent_secret_or_with_bad_input_are_refused() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, mut agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let secret = std::mem::replace(&mut agent.secret, "wrong".into());
        let (status, body) = agent.call(Method::GET, "/v1/ping", None);
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        agent.secret = secret;

        let cases = [
            (json!({"sandbox_id": "../x", "template": "busybox", "vcpus": 1, "memory_mb": 256}), 400),
            (json!({"sandbox_id": sid("a"), "template": "nope", "vcpus": 1, "memory_mb": 256}), 404),
            (json!({"sandbox_id": sid("a"), "template": "busybox", "vcpus": 0, "memory_mb": 256}), 400),
            (json!({"sandbox_id": sid("a"), "template": "busybox", "vcpus": 1, "memory_mb": 1}), 400),
            (json!({"sandbox_id": sid("a"), "template": "busybox", "vcpus": 1, "memory_mb": 256, "x": 1}), 400),
            (json!({"template": "busybox"}), 400),
        ];
        for (body, want) in cases {
            let (status, reply) = agent.call(Method::POST, "/v1/sandboxes", Some(body.clone()));
            assert_eq!(status.as_u16(), want, "{body} -> {reply}");
            assert!(reply["error"]["message"].is_string(), "{reply}");
        }
        let (status, _) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{}", sid("missing")), None);
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = agent.call(Method::GET, &format!("/v1/sandboxes/{}/envd/health", sid("missing")), None);
        assert_eq!(status, StatusCode::NOT_FOUND);
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sandboxes_cannot_reach_each_other() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let (status, a) = agent.create(&sid("e2e-a"));
        assert_eq!(status, StatusCode::CREATED, "{a}");
        let (status, b) = agent.create(&sid("e2e-b"));
        assert_eq!(status, StatusCode::CREATED, "{b}");
        let b_addr = b["guest_addr"].as_str().unwrap();
        // Each guest reaches its own envd over loopback, but not its neighbour's.
        let probe = |addr: &str| {
            // stdin stays open until envd answers: a client that half-closes first may get
            // nothing back, since hyper drops a connection whose read side ended mid-exchange.
            let script = format!(
                "(printf 'GET /health HTTP/1.0\\r\\n\\r\\n'; sleep 2) | nc -w 3 {addr} 49983"
            );
            agent.run(&sid("e2e-a"), "sh", &["-c", &script])
        };
        let own = probe("127.0.0.1");
        // envd answers (and, holding an access token, refuses the anonymous request).
        assert!(
            own["stdout"].as_str().unwrap().starts_with("HTTP/1.0 401"),
            "{own}"
        );
        let other = probe(b_addr);
        assert!(
            !other["stdout"].as_str().unwrap().contains("HTTP/"),
            "A reached B: {other}"
        );
        assert_ne!(other["exit_code"], 0, "A reached B: {other}");
        for id in [sid("e2e-a"), sid("e2e-b")] {
            let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
            assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        }
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs `--features failpoints` (just test)"
)]
async fn a_failure_after_each_create_step_rolls_back_everything() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        for (step, _) in CREATE_STEPS {
            agent.restart(Some(&format!("agent-create-after-{step}=return")));
            let (status, body) = agent.create(&sid("e2e-fail"));
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{step}: {body}");
            assert_eq!(body["error"]["code"], "agent_error", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("injected"),
                "{body}"
            );
            let (_, list) = agent.call(Method::GET, "/v1/sandboxes", None);
            assert_eq!(list["sandboxes"], json!([]), "{step}: {list}");
            wait_clean(&agent);
        }
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_a_killed_agent_left_unrecorded_is_removed_by_the_next_one() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, host_id, admin) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        let id = sid("e2e-orphan");
        let (status, body) = agent.create(&id);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        agent.kill_hard();
        // As if the agent died before it recorded the sandbox: nobody was promised anything.
        let layout = Layout::new(agent.root.path());
        std::fs::remove_file(layout.sandbox_record(&id)).unwrap();
        // The VM outlives the agent that started it...
        assert!(!agent.traces().is_empty());
        // ...until the next agent removes it before it serves anything.
        agent.restart(None);
        let (_, list) = agent.call(Method::GET, "/v1/sandboxes", None);
        assert_eq!(list["sandboxes"], json!([]), "{list}");
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    let (status, host) = cp
        .call(Method::GET, &format!("/v1/hosts/{host_id}"), &admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(host["status"], "online", "{host}");
    assert!(host["last_heartbeat_at"].is_string(), "{host}");
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_sandbox_is_paused_after_its_timeout_pings_keep_it_alive_and_a_call_resumes_it() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let id = sid("e2e-idle");
        let body = json!({"sandbox_id": id, "template": "busybox", "vcpus": 1,
                          "memory_mb": 256, "disk_mb": 256, "timeout_sec": 4});
        let (status, info) = agent.call(Method::POST, "/v1/sandboxes", Some(body));
        assert_eq!(status, StatusCode::CREATED, "{info}");
        // Pings (and any use) reset the idle timer.
        for _ in 0..4 {
            std::thread::sleep(std::time::Duration::from_secs(2));
            let (status, _) = agent.call(Method::POST, &format!("/v1/sandboxes/{id}/ping"), None);
            assert_eq!(status, StatusCode::NO_CONTENT);
            let (_, info) = agent.call(Method::GET, &format!("/v1/sandboxes/{id}"), None);
            assert_eq!(info["status"], "running", "{info}");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (status, info) = agent.call(Method::GET, &format!("/v1/sandboxes/{id}"), None);
            assert_eq!(
                status,
                StatusCode::OK,
                "an idle sandbox is paused, not destroyed"
            );
            if info["status"] == "paused" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the idle sandbox was not paused"
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        assert!(find_leftovers(&Layout::new(agent.root.path())).is_empty());
        // The next call resumes it transparently.
        let out = agent.run(&id, "echo", &["awake"]);
        assert_eq!(out["stdout"], "awake\n", "{out}");
        let (_, info) = agent.call(Method::GET, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(info["status"], "running", "{info}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_deletes_and_the_idle_reaper_tear_a_sandbox_down_exactly_once() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let id = sid("e2e-race");
        let body = json!({"sandbox_id": id, "template": "busybox", "vcpus": 1,
                          "memory_mb": 256, "disk_mb": 256, "timeout_sec": 2});
        let (status, info) = agent.call(Method::POST, "/v1/sandboxes", Some(body));
        assert_eq!(status, StatusCode::CREATED, "{info}");
        // The DELETEs go out the moment the reaper starts its pause, while the VM is saved.
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.log_lines(&["idle timeout reached", &id]).is_empty() {
            assert!(Instant::now() < deadline, "the reaper never acted");
            std::thread::sleep(Duration::from_millis(10));
        }
        let path = format!("/v1/sandboxes/{id}");
        let answers: Vec<(StatusCode, Value)> = std::thread::scope(|s| {
            let deletes: Vec<_> = (0..2)
                .map(|_| s.spawn(|| agent.call(Method::DELETE, &path, None)))
                .collect();
            deletes.into_iter().map(|d| d.join().unwrap()).collect()
        });
        for (status, body) in &answers {
            assert_eq!(*status, StatusCode::NO_CONTENT, "{body}");
        }
        let (status, _) = agent.call(Method::DELETE, &path, None);
        assert_eq!(status, StatusCode::NOT_FOUND, "a gone sandbox stays gone");
        assert_eq!(
            agent.log_lines(&["sandbox destroyed", &id]).len(),
            1,
            "{}",
            agent.log()
        );
        assert!(
            agent.log_lines(&["destroy failed"]).is_empty(),
            "{}",
            agent.log()
        );
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

const CONSOLE_CAP: u64 = 65536;

/// The console files stay within the cap; returns their sizes.
fn console_within_cap(files: &VmFiles) -> (u64, u64) {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let sizes = (size(&files.console_log), size(&files.previous_console_log));
    assert!(
        sizes.0 + sizes.1 <= CONSOLE_CAP,
        "console files hold {sizes:?} bytes, over the {CONSOLE_CAP}-byte cap"
    );
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sandbox_flooding_its_console_stays_within_the_cap_even_across_an_agent_restart() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let cap = CONSOLE_CAP.to_string();
    let (cp, agent, _, _) = stack_with_env(&[("AGENT_CONSOLE_LOG_MAX_BYTES", &cap)]).await;
    let agent = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        let id = &sid("e2e-flood");
        let (status, body) = agent.create(id);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let layout = Layout::new(agent.root.path());
        let files = VmFiles::for_sandbox(&layout, id);

        // About 230 KB of numbered lines, several times the cap.
        agent.run_as_root(
            id,
            "seq 1 40000 > /dev/console; echo FLOOD-END > /dev/console",
        );
        let started = Instant::now();
        while !console_tail(&files, 1).iter().any(|l| l == "FLOOD-END") {
            console_within_cap(&files);
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "FLOOD-END never reached the console log: {:?}",
                console_tail(&files, 5)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let (_, previous) = console_within_cap(&files);
        assert_eq!(previous, CONSOLE_CAP / 2, "the log rotated");
        let tail = console_tail(&files, 40);
        let end = tail.iter().position(|l| l == "FLOOD-END").unwrap();
        let numbers: Vec<String> = (39981..=40000).map(|n| n.to_string()).collect();
        assert_eq!(
            tail[end.saturating_sub(20)..end],
            numbers[..],
            "the latest lines are kept: {tail:?}"
        );
        let out = agent.run(id, "echo", &["still here"]);
        assert_eq!(out["stdout"], "still here\n", "{out}");

        // A flood that never ends, and then the agent dies without a chance to clean up.
        agent.run_as_root(
            id,
            "setsid sh -c 'yes flood > /dev/console' </dev/null >/dev/null 2>&1 &",
        );
        std::thread::sleep(Duration::from_secs(2));
        console_within_cap(&files);
        agent.kill_hard();

        // QEMU outlives the agent: its console pipe is closed, so it drops the output instead
        // of blocking or dying, and still answers its monitor.
        let leftovers = find_leftovers(&layout);
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        std::thread::sleep(Duration::from_secs(2));
        let sizes = console_within_cap(&files);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let status = runtime.block_on(async {
            let socket = &files.qmp_socket;
            let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
            let mut qmp = QmpClient::handshake(stream, socket).await.unwrap();
            qmp.query_status().await.unwrap()
        });
        assert!(status.running, "{status:?}");
        assert_eq!(find_leftovers(&layout), leftovers, "QEMU died");
        assert_eq!(
            console_within_cap(&files),
            sizes,
            "nothing writes the log now"
        );

        // The next agent adopts it and drains its console again, within the cap.
        agent.restart(None);
        let (_, info) = agent.call(Method::GET, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(info["status"], "running", "{info}");
        let started = Instant::now();
        while console_within_cap(&files) == sizes {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the adopted console is not drained"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(1));
        console_within_cap(&files);
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

/// A destroyed sandbox's slot, and so its guest address, goes to the next sandbox; the next
/// sandbox's very first proxied call must reach its own envd, not a connection kept to the old
/// guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sandbox_reusing_a_freed_slot_answers_its_first_call() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let mut addresses = Vec::new();
        for name in ["reuse-1", "reuse-2", "reuse-3"] {
            let id = sid(name);
            let (status, info) = agent.create(&id);
            assert_eq!(status, StatusCode::CREATED, "{info}");
            addresses.push(info["guest_addr"].as_str().unwrap().to_owned());
            let out = agent.run(&id, "echo", &[name]);
            assert_eq!(out["stdout"], format!("{name}\n"), "{out}");
            let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
            assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        }
        assert!(
            addresses.windows(2).all(|pair| pair[0] == pair[1]),
            "the test needs the slot reused: {addresses:?}"
        );
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

/// A guest that cuts its own network (`ip link set eth0 down`) can no longer be asked to shut
/// down; its destroy still ends quickly, leaving nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_without_network_is_destroyed_quickly() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let id = sid("e2e-offline");
        let (status, body) = agent.create(&id);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = agent.call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/envd/processes"),
            Some(json!({"process": {"cmd": "sh", "args": ["-c", "sleep 1; /sbin/ip link set eth0 down"],
                                    "user": "root"}})),
        );
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        std::thread::sleep(Duration::from_secs(3));
        let started = Instant::now();
        let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the destroy took {:?}",
            started.elapsed()
        );
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

/// A field of `/proc/<pid>/status`, e.g. `Seccomp`.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in the status of {pid}"))
        .trim()
        .to_owned()
}

fn vmm_pid(layout: &Layout, id: &str) -> u32 {
    find_leftovers(layout)
        .into_iter()
        .find(|l| l.sandbox_id == id)
        .unwrap_or_else(|| panic!("no VMM runs for {id}"))
        .pid
}

/// Checks the limits of a VM's cgroup directories (v2: one; v1: one per controller) and that
/// `pid` is in each; returns how many limits were read.
fn assert_cgroup_limits(
    dirs: &[std::path::PathBuf],
    pid: u32,
    vcpus: u64,
    memory_mib: u64,
) -> usize {
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
    };
    let memory = ((memory_mib + wrenn::vmm::cgroup::VMM_MEMORY_OVERHEAD_MIB) << 20).to_string();
    let mut checked = 0;
    for dir in dirs {
        let procs = read(dir.join("cgroup.procs")).unwrap_or_default();
        assert!(
            procs.lines().any(|p| p == pid.to_string()),
            "{pid} is not in {}: {procs}",
            dir.display()
        );
        for (file, expected) in [
            ("memory.limit_in_bytes", memory.clone()),
            ("memory.max", memory.clone()),
            ("cpu.cfs_quota_us", (vcpus * 100_000).to_string()),
            ("cpu.max", format!("{} 100000", vcpus * 100_000)),
            ("pids.max", (128 + vcpus).to_string()),
        ] {
            if let Some(value) = read(dir.join(file)) {
                assert_eq!(value, expected, "{}/{file}", dir.display());
                checked += 1;
            }
        }
    }
    checked
}

/// The VMM runs confined: an unprivileged uid, QEMU's seccomp filter, an empty root of its
/// own, and a cgroup limited by the sandbox's vCPUs and memory. A guest that allocates more
/// than its memory is stopped by its own kernel: the VMM stays within its cgroup, the agent
/// and the sandbox run on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_vmm_is_confined_and_a_guest_allocating_too_much_does_not_push_the_host() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _host_id, _admin) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let id = sid("e2e-confined");
        let (status, body) = agent.create(&id);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let layout = Layout::new(agent.root.path());
        let pid = vmm_pid(&layout, &id);

        let uids = status_field(pid, "Uid");
        assert!(uids.split_whitespace().all(|u| u != "0"), "uids {uids}");
        assert_eq!(status_field(pid, "Seccomp"), "2");
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
        assert_ne!(root, Path::new("/"));
        assert_eq!(root, layout.vmm_root(&id));
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "its root is empty"
        );

        let dirs: Vec<_> = agent
            .vm_cgroups()
            .into_iter()
            .filter(|d| d.ends_with(&id))
            .collect();
        assert!(!dirs.is_empty(), "no cgroup for {id}");
        assert!(assert_cgroup_limits(&dirs, pid, 1, 256) >= 3, "{dirs:?}");

        // Strings doubling until the guest's 256 MiB run out: its OOM killer ends the program.
        let (status, out) = agent.call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/envd/processes/run"),
            Some(json!({"process": {"cmd": "sh", "args": ["-c",
                "awk 'BEGIN { s = \"0123456789abcdef\"; while (1) s = s s }'; echo status=$?"],
                "user": "root"}, "timeout_sec": 120})),
        );
        assert_eq!(status, StatusCode::OK, "{out}");
        assert!(
            out["stdout"].as_str().unwrap().contains("status=137"),
            "the hog was killed: {out}"
        );
        let limit = (256 + wrenn::vmm::cgroup::VMM_MEMORY_OVERHEAD_MIB) << 10;
        let rss = support::agent::peak_rss_kib(pid);
        println!("VMM of a 256 MiB guest that used all its memory: peak RSS {rss} KiB, limit {limit} KiB");
        assert!(
            rss <= limit,
            "VMM peak RSS {rss} KiB over its cgroup's {limit} KiB"
        );
        assert!(agent.child.is_some());
        let out = agent.run(&id, "echo", &["still here"]);
        assert_eq!(out["stdout"], "still here\n", "{out}");
        assert_eq!(vmm_pid(&layout, &id), pid);

        let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        // wait_clean counts the VMs' cgroups among the traces.
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

/// After an agent crash, an adopted VM keeps its cgroup and one whose VMM died meanwhile has
/// its cgroup removed by the next agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cgroups_of_vms_that_died_with_the_agent_are_removed_and_adopted_vms_keep_theirs() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _host_id, _admin) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        let (kept, died) = (sid("e2e-cg-kept"), sid("e2e-cg-died"));
        for id in [&kept, &died] {
            let (status, body) = agent.create(id);
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
        let layout = Layout::new(agent.root.path());
        let (kept_pid, died_pid) = (vmm_pid(&layout, &kept), vmm_pid(&layout, &died));
        agent.kill_hard();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(died_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while find_leftovers(&layout).iter().any(|l| l.pid == died_pid) {
            assert!(Instant::now() < deadline, "the VMM did not die");
            std::thread::sleep(Duration::from_millis(50));
        }
        let cgroups_of = |agent: &support::agent::Agent, id: &str| -> Vec<_> {
            agent
                .vm_cgroups()
                .into_iter()
                .filter(|d| d.ends_with(id))
                .collect()
        };
        assert!(
            !cgroups_of(&agent, &died).is_empty(),
            "nobody removed it while no agent ran"
        );

        agent.restart(None);
        assert!(
            cgroups_of(&agent, &died).is_empty(),
            "{:?}",
            cgroups_of(&agent, &died)
        );
        let dirs = cgroups_of(&agent, &kept);
        assert!(
            assert_cgroup_limits(&dirs, kept_pid, 1, 256) >= 3,
            "{dirs:?}"
        );

        let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{kept}"), None);
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

/// The writable disk is the sandbox's quota: a guest that fills it gets "no space left", and
/// the host file stays at the size the sandbox was created with (it is a fixed-size sparse
/// file, which QEMU never grows), allocating no more than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_filling_its_disk_stops_at_the_sandbox_disk_size() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _host_id, _admin) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::MetadataExt;
        let id = sid("e2e-disk-full");
        let (status, body) = agent.create(&id);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let disk = Layout::new(agent.root.path()).sandbox_upper_disk(&id);
        let size = std::fs::metadata(&disk).unwrap().len();
        assert_eq!(size, 256 << 20);
        let (status, out) = agent.call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/envd/processes/run"),
            Some(json!({"process": {"cmd": "sh", "args": ["-c",
                "dd if=/dev/zero of=/home/user/fill bs=1M count=1024 2>&1; sync; echo status=$?"],
                "user": "root"}, "timeout_sec": 300})),
        );
        assert_eq!(status, StatusCode::OK, "{out}");
        let text = out["stdout"].as_str().unwrap();
        assert!(text.contains("No space left on device"), "{out}");
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), size, "the disk file grew");
        assert!(
            meta.blocks() * 512 <= size,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        let out = agent.run(&id, "echo", &["still here"]);
        assert_eq!(out["stdout"], "still here\n", "{out}");
        let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}

/// A stand-in for envd that a hostile guest could run: `silent` accepts connections and never
/// answers; `endless` answers every request with a 500 whose body never ends.
const HOSTILE_ENVD: &str = r#"
import socket, sys, threading
mode, port = sys.argv[1], int(sys.argv[2])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", port))
server.listen(256)
held = []
def endless(conn):
    try:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        while True:
            conn.sendall(chunk)
    except OSError:
        pass
    finally:
        conn.close()
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    if mode == "silent":
        held.append(conn)
    else:
        threading.Thread(target=endless, args=(conn,), daemon=True).start()
"#;

/// A running [`HOSTILE_ENVD`], stopped when dropped (a failing test too must not leave it
/// holding the VM test lock it inherited).
struct HostileEnvd(Child);

impl Drop for HostileEnvd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Turns sandbox `guest_addr`'s envd into a hostile one: inside the sandbox's network namespace,
/// new connections to envd are redirected to [`HOSTILE_ENVD`] before they reach the guest, and
/// the agent's open connections to the real one are cut, so the agent meets the hostile server
/// exactly where it expects envd.
fn impersonate_envd(agent: &support::agent::Agent, guest_addr: &str, mode: &str) -> HostileEnvd {
    use std::io::BufRead;
    let own = format!("{}-", agent.prefix);
    let namespace = support::agent::sh("ip netns list")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(&own))
        .find(|ns| {
            support::agent::sh(&format!("ip netns exec {ns} nft list ruleset")).contains(guest_addr)
        })
        .expect("the sandbox's namespace")
        .to_owned();
    let rules = format!(
        "table ip hostile_envd {{\n chain prerouting {{\n  type nat hook prerouting priority -150\n  \
         ip daddr {guest_addr} tcp dport 49983 redirect to :49984\n }}\n}}\n"
    );
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &namespace, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(nft.stdin.as_mut().unwrap(), rules.as_bytes()).unwrap();
    drop(nft.stdin.take());
    assert!(nft.wait().unwrap().success());
    let mut server = HostileEnvd(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &namespace,
                "python3",
                "-c",
                HOSTILE_ENVD,
                mode,
                "49984",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = String::new();
    std::io::BufReader::new(server.0.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    support::agent::sh(&format!("ss -K dst {guest_addr} dport = 49983"));
    server
}

/// Guests whose envd never answers, or answers without end, cost their own calls and nothing
/// else: the agent's memory stays put, another sandbox is paused on time meanwhile, and each
/// hostile sandbox is destroyed in well under 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_guests_cost_the_agent_neither_memory_nor_time() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let (cp, agent, _, _) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let (silent, endless, idle) = (sid("e2e-silent"), sid("e2e-endless"), sid("e2e-idle"));
        let mut addresses = Vec::new();
        for id in [&silent, &endless] {
            let (status, info) = agent.create(id);
            assert_eq!(status, StatusCode::CREATED, "{info}");
            addresses.push(info["guest_addr"].as_str().unwrap().to_owned());
        }
        let fakes = [
            impersonate_envd(&agent, &addresses[0], "silent"),
            impersonate_envd(&agent, &addresses[1], "endless"),
        ];
        let body = json!({"sandbox_id": idle, "template": "busybox", "vcpus": 1,
                          "memory_mb": 256, "disk_mb": 256, "timeout_sec": 6});
        let (status, info) = agent.call(Method::POST, "/v1/sandboxes", Some(body));
        assert_eq!(status, StatusCode::CREATED, "{info}");
        let idle_since = Instant::now();
        let before = agent.peak_rss_kib();

        // Calls into both, many at once, each client giving up after a few seconds.
        let call = |id: &str| {
            agent.call_bounded(
                Method::POST,
                &format!("/v1/sandboxes/{id}/envd/processes/run"),
                json!({"process": {"cmd": "true"}}),
                Duration::from_secs(4),
                1 << 20,
            )
        };
        std::thread::scope(|scope| {
            let calls: Vec<_> = (0..16)
                .flat_map(|_| [&silent, &endless])
                .map(|id| scope.spawn(move || (id.clone(), call(id))))
                .collect();
            for handle in calls {
                let (id, status) = handle.join().unwrap();
                if id == silent {
                    assert_eq!(status, None, "a silent envd answered");
                } else {
                    assert_eq!(status, Some(StatusCode::INTERNAL_SERVER_ERROR));
                }
            }
        });

        // The idle sandbox was paused on time all the same.
        loop {
            let (_, info) = agent.call(Method::GET, &format!("/v1/sandboxes/{idle}"), None);
            if info["status"] == "paused" {
                break;
            }
            assert!(
                idle_since.elapsed() < Duration::from_secs(40),
                "the idle sandbox was not paused: {info}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        for id in [&silent, &endless] {
            let started = Instant::now();
            let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None);
            assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "destroying {id} took {:?}",
                started.elapsed()
            );
        }
        drop(fakes);
        let grown = agent.peak_rss_kib().saturating_sub(before);
        assert!(grown < 32 * 1024, "the agent grew by {grown} KiB");
        let (status, body) = agent.call(Method::DELETE, &format!("/v1/sandboxes/{idle}"), None);
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}
