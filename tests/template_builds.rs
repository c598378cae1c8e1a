//! Template builds end to end: a recipe with a `COPY` archive built in a real VM, flattened into
//! a template, and a capsule started from it; a failing step and a cancel that leave nothing
//! behind; bad recipes and archives refused before anything runs.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::agent::{add_agent_in, wait_clean, Agent, VM_TURNS};
use support::{assert_error, Auth, TestCp};
use wrenn::config::Layout;

const BUILD_WAIT: Duration = Duration::from_secs(300);

/// A tar.gz holding `hello.txt` and `sub/inner.txt`, or whatever `entries` names.
fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn multipart(config: &Value, archive: &[u8]) -> (String, Vec<u8>) {
    let boundary = "wrenn-build-boundary";
    let mut body = Vec::new();
    write!(
        body,
        "--{boundary}\r\nContent-Disposition: form-data; name=\"config\"\r\nContent-Type: application/json\r\n\r\n{config}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"context.tar.gz\"\r\nContent-Type: application/gzip\r\n\r\n"
    )
    .unwrap();
    body.extend_from_slice(archive);
    write!(body, "\r\n--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn submit_multipart(
    cp: &TestCp,
    admin: &Auth,
    config: Value,
    archive: &[u8],
) -> (StatusCode, Value) {
    let Auth::Bearer(token) = admin else {
        panic!("builds need a user token")
    };
    let (content_type, body) = multipart(&config, archive);
    let authorization = format!("Bearer {token}");
    cp.raw(
        Method::POST,
        "/v1/admin/builds",
        &[("authorization", authorization.as_str())],
        Some(&content_type),
        body,
    )
    .await
}

/// Follows the build's log to its end; returns its lines and the finished build.
async fn follow(cp: &TestCp, admin: &Auth, id: &str) -> (Vec<Value>, Value) {
    let deadline = Instant::now() + BUILD_WAIT;
    let mut lines = Vec::new();
    let mut after = 0;
    loop {
        let (status, body) = cp
            .call(
                Method::GET,
                &format!("/v1/admin/builds/{id}/logs?after={after}&follow=true"),
                admin,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // NDJSON comes back as a JSON string when it is not one document.
        let text = match &body {
            Value::String(text) => text.clone(),
            Value::Null => String::new(),
            other => format!("{other}\n"),
        };
        for line in text.lines().filter(|l| !l.is_empty()) {
            let line: Value = serde_json::from_str(line).unwrap();
            after = line["seq"].as_i64().unwrap();
            lines.push(line);
        }
        let (status, build) = cp
            .call(Method::GET, &format!("/v1/admin/builds/{id}"), admin, None)
            .await;
        assert_eq!(status, StatusCode::OK, "{build}");
        if ["success", "error", "cancelled"].contains(&build["status"].as_str().unwrap()) {
            return (lines, build);
        }
        assert!(
            Instant::now() < deadline,
            "build {id} did not finish: {build}"
        );
    }
}

fn log_text(lines: &[Value]) -> String {
    lines
        .iter()
        .map(|l| {
            format!(
                "[{}] {}",
                l["stream"].as_str().unwrap(),
                l["text"].as_str().unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn exec(cp: &TestCp, auth: &Auth, id: &str, script: &str) -> Value {
    let (status, out) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/exec"),
            auth,
            Some(json!({"cmd": "/bin/sh", "args": ["-c", script]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    out
}

fn no_build_leftovers(agent: &Agent) {
    wait_clean(agent);
    let images = Layout::new(agent.root.path()).images_dir();
    let strays: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(
        strays.is_empty(),
        "intermediate files left in {}: {strays:?}",
        images.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipe_with_an_archive_becomes_a_template_that_capsules_start_from() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await.auth();
    let (agent, _) = add_agent_in(&cp, &admin, Agent::new_root_with_own_images(), &[]).await;

    let recipe = "FROM busybox\n\
                  ENV GREETING=hello NAME=${GREETING}-world\n\
                  RUN echo \"building as $(id -u) with $NAME\" && mkdir -p /opt/app\n\
                  WORKDIR /opt/app\n\
                  COPY hello.txt sub .\n\
                  RUN cat hello.txt inner.txt > combined.txt\n\
                  USER builder\n\
                  RUN id -un > $HOME/who\n\
                  START sh -c 'while true; do sleep 1; done'\n";
    let context = archive(&[
        ("hello.txt", b"hello from the archive\n"),
        ("sub/inner.txt", b"inner\n"),
    ]);
    let (status, build) = submit_multipart(
        &cp,
        &admin,
        json!({"name": "built-app", "recipe": recipe, "healthcheck": "--interval=1s test -s /opt/app/combined.txt"}),
        &context,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{build}");
    let id = build["id"].as_str().unwrap().to_owned();
    assert_eq!(build["total_steps"], 8);

    let (lines, build) = follow(&cp, &admin, &id).await;
    let log = log_text(&lines);
    assert_eq!(build["status"], "success", "{build}\n{log}");
    assert!(
        log.contains("[step] step 1/8 (line 2): ENV GREETING NAME"),
        "{log}"
    );
    assert!(
        log.contains("[stdout] building as 0 with hello-world"),
        "{log}"
    );
    assert!(log.contains("healthy after"), "{log}");
    assert!(log.contains("registered template `built-app`"), "{log}");
    assert_eq!(build["current_step"], 8);

    // The template is listed and starts capsules with what the recipe made.
    let (status, templates) = cp.call(Method::GET, "/v1/snapshots", &admin, None).await;
    assert_eq!(status, StatusCode::OK, "{templates}");
    assert!(templates.to_string().contains("built-app"), "{templates}");
    let (status, capsule) = cp
        .call(
            Method::POST,
            "/v1/capsules",
            &admin,
            Some(json!({"template": "built-app"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let capsule_id = capsule["id"].as_str().unwrap().to_owned();
    let out = exec(
        &cp,
        &admin,
        &capsule_id,
        "cat /opt/app/combined.txt; echo \"$NAME\"; id -un; cat /home/builder/who; pwd; ps | grep -c 'while true'",
    )
    .await;
    let stdout = out["stdout"].as_str().unwrap();
    assert_eq!(
        stdout.lines().take(6).collect::<Vec<_>>(),
        [
            "hello from the archive",
            "inner",
            "hello-world",
            "builder",
            "builder",
            "/opt/app"
        ],
        "{out}"
    );
    assert!(!stdout.contains("wrenn-build"), "{out}");
    let (status, _) = cp
        .call(
            Method::DELETE,
            &format!("/v1/capsules/{capsule_id}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    no_build_leftovers(&agent);
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_and_a_cancel_register_nothing_and_leave_nothing() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await.auth();
    let (agent, _) = add_agent_in(&cp, &admin, Agent::new_root_with_own_images(), &[]).await;

    let (status, build) = cp
        .call(
            Method::POST,
            "/v1/admin/builds",
            &admin,
            Some(json!({"name": "broken", "base_template": "busybox",
                        "recipe": ["RUN echo first", "RUN echo to stderr >&2; exit 3", "RUN echo never"]})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{build}");
    let (lines, build) = follow(&cp, &admin, build["id"].as_str().unwrap()).await;
    let log = log_text(&lines);
    assert_eq!(build["status"], "error", "{build}");
    assert_eq!(build["error"], "line 2: exited with status 3", "{build}");
    assert!(log.contains("[stderr] to stderr"), "{log}");
    assert!(!log.contains("never"), "{log}");

    let (status, build) = cp
        .call(
            Method::POST,
            "/v1/admin/builds",
            &admin,
            Some(json!({"name": "slow", "base_template": "busybox", "recipe": "RUN echo started; sleep 600"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{build}");
    let id = build["id"].as_str().unwrap().to_owned();
    // Cancel once the step runs, so the cancel has a VM and a process to stop.
    let deadline = Instant::now() + BUILD_WAIT;
    loop {
        let (_, body) = cp
            .call(
                Method::GET,
                &format!("/v1/admin/builds/{id}/logs"),
                &admin,
                None,
            )
            .await;
        if body.to_string().contains("started") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow step never started: {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (status, cancelled) = cp
        .call(
            Method::POST,
            &format!("/v1/admin/builds/{id}/cancel"),
            &admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let (status, again) = cp
        .call(
            Method::POST,
            &format!("/v1/admin/builds/{id}/cancel"),
            &admin,
            None,
        )
        .await;
    assert_error(status, &again, StatusCode::CONFLICT, "conflict");

    // The worker stops the step and removes the capsule within a few heartbeats.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !agent.sandbox_ids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the cancelled build's capsule is still there"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (_, templates) = cp.call(Method::GET, "/v1/snapshots", &admin, None).await;
    assert!(!templates.to_string().contains("broken"), "{templates}");
    assert!(!templates.to_string().contains("\"slow\""), "{templates}");
    no_build_leftovers(&agent);
    drop(agent);
    cp.stop().await;
}

#[tokio::test]
async fn bad_recipes_and_archives_are_refused_before_anything_runs() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await.auth();
    let member = cp.signup("member@example.com").await.auth();
    let build = |body: Value| {
        let (cp, admin) = (&cp, &admin);
        async move {
            cp.call(Method::POST, "/v1/admin/builds", admin, Some(body))
                .await
        }
    };

    let (status, body) = build(json!({"name": "x", "recipe": "RUN true\nFETCH http://x"})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2: unknown instruction `FETCH`"),
        "{body}"
    );
    let (status, body) = build(json!({"name": "x", "recipe": "COPY a /b"})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(body.to_string().contains("archive"), "{body}");
    let (status, body) = build(json!({"name": "x", "recipe": "FROM nonesuch\nRUN true"})).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = build(json!({"name": "minimal", "recipe": "RUN true"})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = build(json!({"name": "Bad Name", "recipe": "RUN true"})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body) =
        build(json!({"name": "x", "recipe": "RUN true", "healthcheck": "--every=1s true"})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    // A team's plain member builds nothing; its owner (see the team test) may.
    let owner = cp.signup("owner@example.com").await;
    let (status, body) = cp
        .call(
            Method::POST,
            &format!("/v1/teams/{}/members", owner.team),
            &owner.auth(),
            Some(json!({"email": "member@example.com"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, switched) = cp
        .call(
            Method::POST,
            "/v1/auth/switch-team",
            &member,
            Some(json!({"team_id": owner.team})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{switched}");
    let plain_member = Auth::Bearer(switched["token"].as_str().unwrap().to_owned());
    let (status, body) = cp
        .call(
            Method::POST,
            "/v1/admin/builds",
            &plain_member,
            Some(json!({"name": "x", "recipe": "RUN true"})),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");

    let escaping = {
        // The tar crate will not write `..`; set the raw header name.
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        let name = b"../../etc/evil";
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        header.set_cksum();
        builder.append(&header, &b"x"[..]).unwrap();
        builder.into_inner().unwrap()
    };
    let config = json!({"name": "x", "recipe": "COPY evil /evil"});
    let (status, body) = submit_multipart(&cp, &admin, config.clone(), &escaping).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(body.to_string().contains("`..`"), "{body}");
    let (status, body) = submit_multipart(&cp, &admin, config, b"not an archive at all").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");

    let (status, body) = cp.call(Method::GET, "/v1/admin/builds", &admin, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body.as_array().map(Vec::len),
        Some(0),
        "nothing was recorded: {body}"
    );
    let (status, body) = cp
        .call(
            Method::GET,
            &format!("/v1/admin/builds/{}", uuid::Uuid::new_v4()),
            &admin,
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    cp.stop().await;
}

#[tokio::test]
async fn a_build_whose_control_plane_died_is_ended_by_the_next_reconcile() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await.auth();
    // As a replica leaves it when it dies mid-build: running, its lease no longer renewed.
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO template_builds (id, team_id, name, base_template, recipe, vcpus, memory_mb,
                                      status, total_steps, started_at, heartbeat_at)
         VALUES ($1, '00000000-0000-0000-0000-000000000000', 'orphan', 'busybox', 'RUN true',
                 1, 256, 'running', 1, now(), now() - interval '5 minutes')",
    )
    .bind(id)
    .execute(&cp.db)
    .await
    .unwrap();
    let report = wrenn::cp::reconciler::reconcile_once(&cp.state)
        .await
        .unwrap();
    assert_eq!(report.abandoned_builds, 1);
    let (status, build) = cp
        .call(Method::GET, &format!("/v1/admin/builds/{id}"), &admin, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{build}");
    assert_eq!(build["status"], "error");
    assert!(
        build["error"].as_str().unwrap().contains("stopped"),
        "{build}"
    );
    let (_, templates) = cp.call(Method::GET, "/v1/snapshots", &admin, None).await;
    assert!(!templates.to_string().contains("orphan"), "{templates}");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_owner_builds_a_template_only_that_team_sees() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await.auth();
    let owner = cp.signup("owner@example.com").await.auth();
    let stranger = cp.signup("stranger@example.com").await.auth();
    let (agent, _) = add_agent_in(&cp, &admin, Agent::new_root_with_own_images(), &[]).await;

    // The team's own `busybox` would shadow the platform's for it; here the name is new.
    let (status, build) = cp
        .call(
            Method::POST,
            "/v1/admin/builds",
            &owner,
            Some(json!({"name": "ours", "base_template": "busybox",
                        "recipe": "RUN echo team-built > /marker"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{build}");
    let id = build["id"].as_str().unwrap().to_owned();
    let (lines, build) = follow(&cp, &owner, &id).await;
    assert_eq!(build["status"], "success", "{build}\n{}", log_text(&lines));

    // Other teams neither see the build nor the template.
    let (status, body) = cp
        .call(
            Method::GET,
            &format!("/v1/admin/builds/{id}"),
            &stranger,
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (_, listed) = cp.call(Method::GET, "/v1/snapshots", &stranger, None).await;
    assert!(!listed.to_string().contains("\"ours\""), "{listed}");
    let (status, body) = cp
        .call(
            Method::POST,
            "/v1/capsules",
            &stranger,
            Some(json!({"template": "ours"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (_, listed) = cp.call(Method::GET, "/v1/snapshots", &owner, None).await;
    assert!(listed.to_string().contains("\"ours\""), "{listed}");
    let (status, capsule) = cp
        .call(
            Method::POST,
            "/v1/capsules",
            &owner,
            Some(json!({"template": "ours"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let capsule_id = capsule["id"].as_str().unwrap().to_owned();
    let out = exec(&cp, &owner, &capsule_id, "cat /marker").await;
    assert_eq!(out["stdout"], "team-built\n", "{out}");
    // On the host the team's image has a name no other team's template can have.
    let images = Layout::new(agent.root.path()).images_dir();
    let names: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ours"))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("ours.t"), "{names:?}");
    let (status, _) = cp
        .call(
            Method::DELETE,
            &format!("/v1/capsules/{capsule_id}"),
            &owner,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    no_build_leftovers(&agent);
    drop(agent);
    cp.stop().await;
}
