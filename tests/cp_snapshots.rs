//! Snapshot templates through the public API, with a real control plane, agent and QEMU/TCG
//! guests: `POST /v1/snapshots` takes a running (or paused) capsule's memory and disk into a
//! team template while the capsule runs on (or stays paused); capsules created from it continue
//! its processes, memory and files; names collide unless overwritten; other teams see nothing;
//! `DELETE /v1/snapshots/{name}` removes it from the registry and the host, and refuses the
//! platform's templates.

mod support;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::agent::{add_agent_in, wait_clean, VM_TURNS};
use support::schema::Spec;
use support::{assert_error, Auth, TestCp, User};

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PUT: Method = Method::PUT;
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

async fn create(cp: &TestCp, key: &Auth, template: &str) -> String {
    let (status, capsule) = cp
        .call(
            POST,
            "/v1/capsules",
            key,
            Some(json!({"template": template})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    capsule["id"].as_str().unwrap().to_owned()
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

async fn status_of(cp: &TestCp, key: &Auth, id: &str) -> Value {
    let (status, capsule) = cp.call(GET, &format!("/v1/capsules/{id}"), key, None).await;
    assert_eq!(status, StatusCode::OK, "{capsule}");
    capsule["status"].clone()
}

async fn snapshot(cp: &TestCp, key: &Auth, query: &str, body: Value) -> (StatusCode, Value) {
    cp.call(POST, &format!("/v1/snapshots{query}"), key, Some(body))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_template_continues_the_capsule_and_is_deleted_everywhere() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    // Templates it makes land in its own images directory, not among the shared test images.
    let (agent, _host) = add_agent_in(
        &cp,
        &admin.auth(),
        support::agent::Agent::new_root_with_own_images(),
        &[],
    )
    .await;
    let key = api_key(&cp, &admin).await;
    let source = create(&cp, &key, "busybox").await;
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

    let (status, template) = snapshot(
        &cp,
        &key,
        "",
        json!({"sandbox_id": source, "name": "snap-one"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{template}");
    Spec::reference().check_component("Template", &template);
    assert_eq!(template["name"], "snap-one");
    assert_eq!(template["type"], "snapshot");
    assert_eq!(template["memory_mb"], 256, "{template}");
    assert_eq!(template["platform"], false);
    // Registered, the template counts at its own size; the hold its making took is gone.
    let holds: i64 = sqlx::query_scalar("SELECT count(*) FROM template_reservations")
        .fetch_one(&cp.db)
        .await
        .unwrap();
    assert_eq!(holds, 0);
    // The source runs on, its memory intact.
    assert_eq!(status_of(&cp, &key, &source).await, "running");
    let out = exec(&cp, &key, &source, "cat /mnt/m/f").await;
    assert_eq!(out["stdout"], "in-memory\n", "{out}");

    // A capsule of the template continues from the instant it was taken.
    let child = create(&cp, &key, "snap-one").await;
    let out = exec(
        &cp,
        &key,
        &child,
        "kill -0 $(cat /root/counter.pid) && cat /mnt/m/f /root/d && cat /mnt/m/count
         sleep 1; cat /mnt/m/count; hostname",
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let lines: Vec<&str> = out["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(&lines[..2], ["in-memory", "on-disk"], "{out}");
    let (before, after): (u64, u64) = (lines[2].parse().unwrap(), lines[3].parse().unwrap());
    assert!(after > before, "the counter runs on in the child: {out}");
    assert_eq!(lines[4], child.to_ascii_lowercase(), "its own host name");
    exec(&cp, &key, &child, "echo child-only > /root/c && sync").await;
    let out = exec(&cp, &key, &source, "test -e /root/c; echo $?").await;
    assert_eq!(out["stdout"], "1\n", "the child's disk is its own: {out}");

    // Names: taken without overwrite, replaced with it; a platform name is never the team's.
    let again = json!({"sandbox_id": source, "name": "snap-one"});
    let (status, body) = snapshot(&cp, &key, "", again.clone()).await;
    assert_error(status, &body, StatusCode::CONFLICT, "conflict");
    let (status, body) = snapshot(&cp, &key, "?overwrite=true", again).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = snapshot(
        &cp,
        &key,
        "",
        json!({"sandbox_id": source, "name": "busybox"}),
    )
    .await;
    assert_error(status, &body, StatusCode::CONFLICT, "conflict");
    let (status, body) =
        snapshot(&cp, &key, "", json!({"sandbox_id": source, "name": "../x"})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");

    // A paused capsule stays paused; a generated name is used when none is given.
    let (status, body) = cp
        .call(POST, &format!("/v1/capsules/{source}/pause"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, generated) = snapshot(&cp, &key, "", json!({"sandbox_id": source})).await;
    assert_eq!(status, StatusCode::CREATED, "{generated}");
    assert!(generated["name"].as_str().unwrap().starts_with("snapshot-"));
    assert_eq!(status_of(&cp, &key, &source).await, "paused");

    // Another team sees neither the capsule nor the templates.
    let stranger = cp.signup("stranger@example.com").await;
    let stranger_key = api_key(&cp, &stranger).await;
    let (status, body) = snapshot(
        &cp,
        &stranger_key,
        "",
        json!({"sandbox_id": source, "name": "mine"}),
    )
    .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = cp
        .call(DELETE, "/v1/snapshots/snap-one", &stranger_key, None)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    // Deleting: the platform's are refused; the team's leave the registry and the host.
    let (status, body) = cp.call(DELETE, "/v1/snapshots/busybox", &key, None).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = cp.call(DELETE, "/v1/snapshots/snap-one", &key, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = cp.call(DELETE, "/v1/snapshots/snap-one", &key, None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, list) = cp
        .call(GET, "/v1/snapshots?type=snapshot", &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [generated["name"].as_str().unwrap()], "{list}");
    let images: Vec<String> = std::fs::read_dir(agent.root.path().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("snap-one"))
        .collect();
    assert!(images.is_empty(), "left on the host: {images:?}");
    let (status, body) = cp
        .call(
            POST,
            "/v1/capsules",
            &key,
            Some(json!({"template": "snap-one"})),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    // The child runs on after its template is gone.
    let out = exec(&cp, &key, &child, "cat /root/c").await;
    assert_eq!(out["stdout"], "child-only\n", "{out}");
    for id in [&source, &child] {
        let (status, body) = cp
            .call(DELETE, &format!("/v1/capsules/{id}"), &key, None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    wait_clean(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fork_of_eight_children_continues_the_capsule_in_each_on_its_own() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (agent, _host) =
        add_agent_in(&cp, &admin.auth(), support::agent::Agent::new_root(), &[]).await;
    // Room for the source and its children whatever this machine's size; the real check is
    // below, with a count no host has room for.
    sqlx::query("UPDATE hosts SET cpu_cores = 64, memory_mb = 65536, disk_gb = 4096")
        .execute(&cp.db)
        .await
        .unwrap();
    let key = api_key(&cp, &admin).await;
    let source = create(&cp, &key, "busybox").await;
    exec(
        &cp,
        &key,
        &source,
        "mkdir -p /mnt/m && mount -t tmpfs m /mnt/m && echo in-memory > /mnt/m/f
         sh -c 'while :; do sleep 0.2; done' >/dev/null 2>&1 &
         echo $! > /root/loop.pid; sync",
    )
    .await;

    let fork = format!("/v1/capsules/{source}/fork");
    for bad in [
        json!({"count": 0}),
        json!({"count": 100_000}),
        json!({"n": 2}),
    ] {
        let (status, body) = cp.call(POST, &fork, &key, Some(bad)).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    }
    // The team's pool refuses first; on a plan without limits, the host does.
    let (status, body) = cp
        .call(POST, &fork, &key, Some(json!({"count": 10_000})))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "pool_exhausted",
    );
    let (status, body) = cp
        .call(
            PUT,
            &format!("/v1/admin/teams/{}/plan", admin.team),
            &admin.auth(),
            Some(json!({"plan": "unlimited"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = cp
        .call(POST, &fork, &key, Some(json!({"count": 10_000})))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "no_hosts_available",
    );

    let started = std::time::Instant::now();
    let (status, children) = cp.call(POST, &fork, &key, Some(json!({"count": 8}))).await;
    assert_eq!(status, StatusCode::CREATED, "{children}");
    eprintln!("fork of 8 took {:?}", started.elapsed());
    let children: Vec<String> = children
        .as_array()
        .unwrap()
        .iter()
        .map(|child| {
            Spec::ours().check_component("Capsule", child);
            assert_eq!(child["status"], "running", "{child}");
            assert_eq!(child["template"], "busybox", "{child}");
            child["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(children.len(), 8);
    assert_eq!(status_of(&cp, &key, &source).await, "running");

    let mut seen = std::collections::BTreeSet::new();
    for (i, child) in children.iter().enumerate() {
        let out = exec(
            &cp,
            &key,
            child,
            &format!(
                "kill -0 $(cat /root/loop.pid) && cat /mnt/m/f && echo {i} > /root/who && sync
                 cat /proc/sys/kernel/random/uuid"
            ),
        )
        .await;
        assert_eq!(out["exit_code"], 0, "{out}");
        let lines: Vec<&str> = out["stdout"].as_str().unwrap().lines().collect();
        assert_eq!(lines[0], "in-memory", "{out}");
        assert!(seen.insert(lines[1].to_owned()), "a repeated UUID: {out}");
    }
    for (i, child) in children.iter().enumerate() {
        let out = exec(&cp, &key, child, "cat /root/who").await;
        assert_eq!(
            out["stdout"],
            format!("{i}\n"),
            "each child's disk is its own"
        );
    }
    let out = exec(&cp, &key, &source, "test -e /root/who; echo $?").await;
    assert_eq!(out["stdout"], "1\n", "{out}");

    // A paused capsule forks and stays paused.
    let (status, body) = cp
        .call(POST, &format!("/v1/capsules/{source}/pause"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, more) = cp.call(POST, &fork, &key, Some(json!({}))).await;
    assert_eq!(status, StatusCode::CREATED, "{more}");
    assert_eq!(status_of(&cp, &key, &source).await, "paused");
    let last = more[0]["id"].as_str().unwrap().to_owned();
    let out = exec(&cp, &key, &last, "cat /mnt/m/f").await;
    assert_eq!(out["stdout"], "in-memory\n", "{out}");

    for id in children.iter().chain([&source, &last]) {
        let (status, body) = cp
            .call(DELETE, &format!("/v1/capsules/{id}"), &key, None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    wait_clean(&agent);
    let forks = agent.root.path().join("snapshots/forks");
    let left: Vec<_> = std::fs::read_dir(&forks)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a fork's files were left: {left:?}");
}
