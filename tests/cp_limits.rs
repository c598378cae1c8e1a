//! A tenant cannot exhaust the control plane: a hostile agent's answers are cut at their cap
//! (and its file bytes stream through), a team's concurrent execs are limited with 429 and
//! `Retry-After`, every list is paged with cursors that survive inserts, signups are throttled
//! per address and hash a bounded number of passwords at once.
//!
//! The hostile agent is a fake (a small HTTP server in this test standing in for `wrenn agent`):
//! the point is an agent, or a guest behind it, that answers what no real one would. The 50
//! foreground execs of 16 MiB also run against it: under TCG on two shared cores, one guest
//! producing 50 x 16 MiB of output would take minutes and measure the guest, not the control
//! plane, whose share (buffering envd's answer) is the same whoever produced the bytes.

mod support;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::agent::peak_rss_kib;
use support::{assert_error, Auth, TestCp, User};
use uuid::Uuid;
use wrenn::agent::wire::{SandboxInfo, SandboxList, SandboxPhase};
use wrenn::id::SandboxId;
use wrenn::template::TemplateName;

const MIB: usize = 1 << 20;
/// What the fake's foreground run prints: envd's cap on one stream of a foreground run.
const RUN_OUTPUT: usize = 16 * MIB;
/// How long the fake takes to answer a run, so that concurrent execs overlap.
const RUN_TAKES: Duration = Duration::from_secs(2);
/// What the fake's downloads hold.
const DOWNLOAD: u64 = 1 << 30;

type FakeBody = BoxBody<Bytes, Infallible>;

/// `len` bytes (or without end), in 1 MiB chunks.
fn stream_of(len: Option<u64>) -> FakeBody {
    let chunk = Bytes::from(vec![b'x'; MIB]);
    let chunks = futures::stream::repeat(chunk).map(|c| Ok::<_, Infallible>(Frame::data(c)));
    match len {
        Some(len) => BodyExt::boxed(StreamBody::new(chunks.take((len as usize).div_ceil(MIB)))),
        None => BodyExt::boxed(StreamBody::new(chunks)),
    }
}

fn full(bytes: impl Into<Bytes>) -> FakeBody {
    BodyExt::boxed(Full::new(bytes.into()))
}

/// The fake agent's list: `sandbox`, running (the control plane's reconciler asks at start).
fn sandbox_list(sandbox: SandboxId) -> Vec<u8> {
    let now = chrono::Utc::now();
    serde_json::to_vec(&SandboxList {
        sandboxes: vec![SandboxInfo {
            sandbox_id: sandbox,
            status: SandboxPhase::Running,
            template: TemplateName::default_template(),
            vcpus: 1,
            memory_mb: 512,
            disk_mb: 5120,
            timeout_sec: 300,
            created_at: now,
            last_active_at: now,
            guest_addr: None,
            metadata: Default::default(),
        }],
        lost: Vec::new(),
        templates: Vec::new(),
    })
    .unwrap()
}

/// The fake agent's answers: its sandbox list holds `sandbox`; behind its envd proxy a run of
/// `endless` streams JSON without end, any other run answers 16 MiB of stdout after
/// [`RUN_TAKES`]; a directory listing never ends; a download is [`DOWNLOAD`] bytes.
async fn fake_answer(
    sandbox: SandboxId,
    request: Request<Incoming>,
) -> Result<Response<FakeBody>, Infallible> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let envd = path.split_once("/envd").map_or("", |(_, rest)| rest);
    let response = match (method, envd) {
        (Method::GET, "") if path == "/v1/sandboxes" => Response::new(full(sandbox_list(sandbox))),
        (Method::POST, "/processes/run") => {
            let run: Value = serde_json::from_slice(&body).unwrap_or_default();
            if run["process"]["cmd"] == "endless" {
                Response::new(stream_of(None))
            } else {
                tokio::time::sleep(RUN_TAKES).await;
                let done = json!({"stdout": "x".repeat(RUN_OUTPUT), "stderr": "", "exit_code": 0,
                                  "duration_ms": 2000, "encoding": "utf-8"});
                Response::new(full(serde_json::to_vec(&done).unwrap()))
            }
        }
        (Method::POST, "/files/list") => Response::new(stream_of(None)),
        (Method::GET, "/files") => {
            let mut response = Response::new(stream_of(Some(DOWNLOAD)));
            response
                .headers_mut()
                .insert("content-length", DOWNLOAD.into());
            response
        }
        _ => {
            let mut response = Response::new(full(
                r#"{"error":{"code":"not_found","message":"the fake has no such route"}}"#,
            ));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    };
    Ok(response)
}

/// The fake agent for `sandbox`, certified by the control plane's CA for the address it listens
/// on, as the control plane requires of agents.
async fn fake_agent(cp: &TestCp, sandbox: SandboxId) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ca = cp.state.ca.get().unwrap().clone();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let cert = ca
        .issue_agent_cert(
            wrenn::id::HostId::new_random(),
            &addr.to_string().parse().unwrap(),
            &csr,
        )
        .unwrap();
    let identity = wrenn::tls::ServerIdentity::new(
        wrenn::tls::certified_key(&cert.pem, &key.serialize_pem()).unwrap(),
    );
    let config =
        wrenn::tls::agent_server_config(std::sync::Arc::new(identity), ca.cert_pem()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper::service::service_fn(move |r| fake_answer(sandbox, r)),
                    )
                    .await;
            });
        }
    });
    addr
}

fn team_uuid(user: &User) -> Uuid {
    user.team.parse::<wrenn::id::TeamId>().unwrap().uuid()
}

/// A regular host at `address`, online, as a registered agent would be.
async fn online_host(cp: &TestCp, address: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO hosts (id, type, status, address, cpu_cores, memory_mb, disk_gb,
                            last_heartbeat_at)
         VALUES ($1, 'regular', 'online', $2, 8, 32768, 500, now())",
    )
    .bind(id)
    .bind(address)
    .execute(&cp.db)
    .await
    .unwrap();
    id
}

/// A running capsule `id` of `user`'s team on `host`, as a create would leave it.
async fn running_capsule(cp: &TestCp, user: &User, host: Uuid, id: Uuid) -> String {
    sqlx::query(
        "INSERT INTO sandboxes (id, team_id, host_id, template_id, template_name, status, vcpus,
                                memory_mb, started_at)
         VALUES ($1, $2, $3, '00000000-0000-0000-0000-000000000000', 'minimal', 'running', 1,
                 512, now())",
    )
    .bind(id)
    .bind(team_uuid(user))
    .bind(host)
    .execute(&cp.db)
    .await
    .unwrap();
    SandboxId(id).to_string()
}

/// One request to `addr`: status, headers and the body as JSON.
async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    auth: &Auth,
    body: Option<Value>,
) -> (StatusCode, hyper::HeaderMap, Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Auth::Bearer(token) = auth {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some(body) => {
            builder = builder.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(&body).unwrap())
        }
        None => Bytes::new(),
    };
    let response = client
        .request(builder.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_agent_and_fifty_big_execs_cost_the_control_plane_bounded_memory() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let sandbox = SandboxId(Uuid::new_v4());
    let fake = fake_agent(&cp, sandbox).await;
    let host = online_host(&cp, &fake.to_string()).await;
    let capsule = running_capsule(&cp, &admin, host, sandbox.uuid()).await;
    // The calls go through a control plane in its own process (default limits: 8 execs and 16
    // transfers per team), so its peak memory is the control plane's alone.
    let replica = support::CpReplica::start(&cp).await;
    let before = peak_rss_kib(replica.pid());
    let auth = admin.auth();
    let exec = |cmd: &'static str| {
        let auth = auth.clone();
        let path = format!("/v1/capsules/{capsule}/exec");
        async move {
            request(
                replica.addr,
                Method::POST,
                &path,
                &auth,
                Some(json!({"cmd": cmd})),
            )
            .await
        }
    };

    // 50 foreground execs at once, each answered with 16 MiB of output: the team's first 8 run,
    // the rest are told to come back.
    let answers = futures::future::join_all((0..50).map(|_| exec("big"))).await;
    let (mut done, mut limited) = (0, 0);
    for (status, headers, body) in &answers {
        match *status {
            StatusCode::OK => {
                assert_eq!(body["stdout"].as_str().map(str::len), Some(RUN_OUTPUT));
                done += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert_error(*status, body, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
                assert_eq!(headers["retry-after"], "1");
                limited += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    println!("50 concurrent 16 MiB execs: {done} answered, {limited} rate-limited");
    assert!(done >= 8, "{done} execs ran");
    assert!(limited >= 1, "none was limited");

    // An answer without end is cut at the cap, not read to the end or until the timeout (30 s
    // plus the run's 30 s).
    let started = Instant::now();
    let (status, _, body) = exec("endless").await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "agent_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the agent's answer exceeded 64 MiB"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    let (status, _, body) = request(
        replica.addr,
        Method::POST,
        &format!("/v1/capsules/{capsule}/files/list"),
        &auth,
        Some(json!({"path": "/"})),
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY, "agent_error");

    // A 1 GiB file streams through.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let Auth::Bearer(token) = &auth else {
        unreachable!()
    };
    let response = client
        .request(
            Request::post(format!(
                "http://{}/v1/capsules/{capsule}/files/stream/read",
                replica.addr
            ))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"path":"/big"}"#)))
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    assert_eq!(received, DOWNLOAD);

    // 8 execs held at once, each about 3 x its 16 MiB (envd's answer, the parsed output, the
    // public answer), plus the 64 MiB an endless answer is read to twice (collected and
    // joined). Unlimited, the 50 execs alone would hold 2.4 GiB and the endless answer all of
    // the process's memory.
    let grown = peak_rss_kib(replica.pid()).saturating_sub(before) / 1024;
    let bound = 8 * 3 * 16 + 2 * 64 + 64;
    println!("control plane peak RSS growth: {grown} MiB (bound {bound} MiB)");
    assert!(grown < bound, "the control plane grew {grown} MiB");
    drop(replica);
    cp.stop().await;
}

/// Walks `path` page by page with `limit`, while `insert` adds rows; returns every ID seen, in
/// order, asserting none repeats.
async fn walk(cp: &TestCp, user: &User, path: &str, limit: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut unique = HashSet::new();
    let mut next = format!("{path}?limit={limit}");
    loop {
        let headers = [("authorization", format!("Bearer {}", user.token))];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, response_headers, page) = cp
            .raw_with_headers(Method::GET, &next, &headers, None, Vec::new())
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let rows = page.as_array().unwrap();
        assert!(rows.len() <= limit);
        for row in rows {
            let id = row["id"].as_str().unwrap().to_owned();
            assert!(unique.insert(id.clone()), "{id} came twice");
            seen.push(id);
        }
        let Some(cursor) = response_headers.get("x-next-cursor") else {
            assert!(response_headers.get("link").is_none());
            return seen;
        };
        let cursor = cursor.to_str().unwrap();
        let link = response_headers["link"].to_str().unwrap();
        assert_eq!(
            link,
            format!("<{path}?limit={limit}&cursor={cursor}>; rel=\"next\"")
        );
        next = format!("{path}?limit={limit}&cursor={cursor}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pagination_walks_ten_thousand_hosts_and_capsules_without_duplicates_or_gaps_during_inserts(
) {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let team = team_uuid(&admin);
    // Half the rows share one creation time, so the walk must order ties by ID.
    sqlx::query(
        "INSERT INTO hosts (id, type, status, created_at)
         SELECT gen_random_uuid(), 'regular', 'pending',
                CASE WHEN g % 2 = 0 THEN now() - interval '1 hour'
                     ELSE now() - g * interval '1 ms' END
         FROM generate_series(1, 10000) g",
    )
    .execute(&cp.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sandboxes (id, team_id, template_id, template_name, status, vcpus,
                                memory_mb, created_at)
         SELECT gen_random_uuid(), $1, '00000000-0000-0000-0000-000000000000', 'minimal',
                CASE WHEN g % 10 = 0 THEN 'stopped' ELSE 'running' END, 1, 512,
                CASE WHEN g % 2 = 0 THEN now() - interval '1 hour'
                     ELSE now() - g * interval '1 ms' END
         FROM generate_series(1, 11111) g",
    )
    .bind(team)
    .execute(&cp.db)
    .await
    .unwrap();
    let ids = |query: &'static str| {
        let db = cp.db.clone();
        async move {
            sqlx::query_scalar::<_, Uuid>(query)
                .fetch_all(&db)
                .await
                .unwrap()
        }
    };
    let hosts_before: HashSet<String> = ids("SELECT id FROM hosts")
        .await
        .into_iter()
        .map(|id| wrenn::id::HostId(id).to_string())
        .collect();
    let capsules_before: HashSet<String> =
        ids("SELECT id FROM sandboxes WHERE status <> 'stopped'")
            .await
            .into_iter()
            .map(|id| SandboxId(id).to_string())
            .collect();
    assert_eq!(
        (hosts_before.len(), capsules_before.len()),
        (10_000, 10_000)
    );

    // Rows keep arriving while the walks run.
    let inserting = tokio::spawn({
        let db = cp.db.clone();
        async move {
            for _ in 0..400 {
                sqlx::query(
                    "INSERT INTO hosts (id, type, status) VALUES ($1, 'regular', 'pending')",
                )
                .bind(Uuid::new_v4())
                .execute(&db)
                .await
                .unwrap();
                sqlx::query(
                    "INSERT INTO sandboxes (id, team_id, template_id, template_name, status,
                                            vcpus, memory_mb)
                     VALUES ($1, $2, '00000000-0000-0000-0000-000000000000', 'minimal',
                             'running', 1, 512)",
                )
                .bind(Uuid::new_v4())
                .bind(team)
                .execute(&db)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let hosts = walk(&cp, &admin, "/v1/hosts", 317).await;
    let capsules = walk(&cp, &admin, "/v1/capsules", 500).await;
    inserting.await.unwrap();
    let (hosts, capsules): (HashSet<String>, HashSet<String>) =
        (hosts.into_iter().collect(), capsules.into_iter().collect());
    let missing_hosts = hosts_before
        .iter()
        .filter(|id| !hosts.contains(*id))
        .count();
    let missing_capsules = capsules_before
        .iter()
        .filter(|id| !capsules.contains(*id))
        .count();
    assert_eq!((missing_hosts, missing_capsules), (0, 0));
    println!(
        "walked {} hosts and {} capsules ({} and {} inserted during the walk)",
        hosts.len(),
        capsules.len(),
        hosts.len() - 10_000,
        capsules.len() - 10_000
    );

    // Without parameters: the reference's bare array, at most the maximum, and a next page
    // announced rather than rows silently dropped.
    let (status, headers, page) = cp
        .raw_with_headers(
            Method::GET,
            "/v1/hosts",
            &[("authorization", &format!("Bearer {}", admin.token))],
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page.as_array().unwrap().len(), 1000);
    let cursor = headers["x-next-cursor"].to_str().unwrap();
    assert_eq!(
        headers["link"].to_str().unwrap(),
        format!("</v1/hosts?cursor={cursor}>; rel=\"next\"")
    );
    // The same under `/api`, whose links keep the prefix.
    let (status, headers, _) = cp
        .raw_with_headers(
            Method::GET,
            "/api/v1/capsules?limit=2",
            &[("authorization", &format!("Bearer {}", admin.token))],
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["link"]
        .to_str()
        .unwrap()
        .starts_with("</api/v1/capsules?limit=2&cursor="));

    // Bad limits and cursors are typed 400s on every list.
    let garbled = format!("{}x", &cursor[..cursor.len() - 1]);
    for path in [
        "/v1/hosts",
        "/v1/capsules",
        "/v1/sandboxes",
        "/v1/api-keys",
        "/v1/teams",
        &format!("/v1/teams/{}/members", admin.team),
    ] {
        for query in [
            "limit=0".to_owned(),
            "limit=1001".to_owned(),
            "limit=ten".to_owned(),
            "limit=-1".to_owned(),
            "cursor=not-a-cursor".to_owned(),
            "cursor=".to_owned(),
            format!("cursor={}", &cursor[..10]),
            format!("cursor={garbled}AAAA"),
        ] {
            let (status, body) = cp
                .call(Method::GET, &format!("{path}?{query}"), &admin.auth(), None)
                .await;
            assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
        }
    }
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_holds_at_most_64_tags() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (host, _) = cp.registered_host(&admin, json!({"type": "regular"})).await;
    let tag = |n: usize| {
        let cp = &cp;
        let path = format!("/v1/hosts/{host}/tags");
        let auth = admin.auth();
        async move {
            cp.call(
                Method::POST,
                &path,
                &auth,
                Some(json!({"tag": format!("t{n}")})),
            )
            .await
        }
    };
    // Added concurrently, they still stop at the bound.
    let added = futures::future::join_all((0..80).map(tag)).await;
    let created = added
        .iter()
        .filter(|(status, _)| *status == StatusCode::NO_CONTENT)
        .count();
    assert_eq!(created, 64);
    for (status, body) in added.iter().filter(|(s, _)| *s != StatusCode::NO_CONTENT) {
        assert_error(*status, body, StatusCode::CONFLICT, "conflict");
    }
    let (status, tags) = cp
        .call(
            Method::GET,
            &format!("/v1/hosts/{host}/tags"),
            &admin.auth(),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let tags: Vec<String> = serde_json::from_value(tags).unwrap();
    assert_eq!(tags.len(), 64);
    // Adding one it has is still a no-op.
    let (status, _) = cp
        .call(
            Method::POST,
            &format!("/v1/hosts/{host}/tags"),
            &admin.auth(),
            Some(json!({"tag": tags[0]})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_lists_page_in_their_order_and_teams_keep_the_default_first() {
    let cp = TestCp::start().await;
    let user = cp.signup("owner@example.com").await;
    for n in 0..5 {
        let (status, body) = cp
            .call(
                Method::POST,
                "/v1/teams",
                &user.auth(),
                Some(json!({"name": format!("team {n}")})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = cp
            .call(
                Method::POST,
                "/v1/api-keys",
                &user.auth(),
                Some(json!({"name": format!("key {n}")})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (_, all) = cp.call(Method::GET, "/v1/teams", &user.auth(), None).await;
    let all: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(all[0], user.team, "the default team comes first");
    let teams = walk(&cp, &user, "/v1/teams", 2).await;
    assert_eq!(teams, all);
    assert_eq!(walk(&cp, &user, "/v1/api-keys", 2).await.len(), 5);
    cp.stop().await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_signups_hash_at_most_k_passwords_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use wrenn::cp::state::{AuthSettings, Limit};

    const K: usize = 3;
    let auth = AuthSettings {
        password_hash_permits: K,
        signup_per_address: Limit {
            max_failures: 0,
            window: Duration::from_secs(60),
        },
        ..AuthSettings::default()
    };
    let cp = TestCp::start_configured(support::QUIET_MONITOR, auth).await;
    // Every hash passes this fail point while it holds its permit, and stays until K hashes run
    // at once (or a while passed): on a busy machine the hashes would otherwise rarely overlap
    // enough to show the bound.
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    fail::cfg_callback("cp-password-hash", {
        let (running, most) = (running.clone(), most.clone());
        move || {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while running.load(Ordering::SeqCst) < K && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            running.fetch_sub(1, Ordering::SeqCst);
        }
    })
    .unwrap();
    let signups = futures::future::join_all((0..200).map(|n| {
        let cp = &cp;
        async move {
            cp.call(
                Method::POST,
                "/v1/auth/signup",
                &Auth::None,
                Some(json!({"email": format!("user{n}@example.com"),
                            "password": "correct horse battery", "name": "U"})),
            )
            .await
        }
    }))
    .await;
    fail::remove("cp-password-hash");
    for (status, body) in &signups {
        assert_eq!(*status, StatusCode::CREATED, "{body}");
    }
    let most = most.load(Ordering::SeqCst);
    println!("200 concurrent signups: at most {most} password hashes at once (K = {K})");
    assert!(most <= K, "{most} hashes ran at once");
    assert_eq!(
        most, K,
        "the signups never overlapped; the test proves nothing"
    );
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signup_is_throttled_per_address_and_can_be_closed() {
    use wrenn::config::SignupMode;
    use wrenn::cp::state::{AuthSettings, Limit};

    let throttled = AuthSettings {
        signup_per_address: Limit {
            max_failures: 3,
            window: Duration::from_secs(600),
        },
        // Test requests all come from loopback; trusting it lets each name its client.
        trusted_proxies: "127.0.0.1".parse().unwrap(),
        ..AuthSettings::default()
    };
    let cp = TestCp::start_configured(support::QUIET_MONITOR, throttled).await;
    let signup = |n: usize, client: &'static str| {
        let cp = &cp;
        async move {
            let body = json!({"email": format!("u{n}@example.com"),
                              "password": "correct horse battery", "name": "U"});
            cp.raw_with_headers(
                Method::POST,
                "/v1/auth/signup",
                &[("x-forwarded-for", client)],
                Some("application/json"),
                serde_json::to_vec(&body).unwrap(),
            )
            .await
        }
    };
    for n in 0..3 {
        let (status, _, body) = signup(n, "192.0.2.1").await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, headers, body) = signup(3, "192.0.2.1").await;
    assert_error(status, &body, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=600).contains(&retry), "{retry}");
    let (status, _, body) = signup(4, "192.0.2.2").await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "another address signs up: {body}"
    );
    cp.stop().await;

    let closed = AuthSettings {
        signup: SignupMode::Closed,
        ..AuthSettings::default()
    };
    let cp = TestCp::start_configured(support::QUIET_MONITOR, closed).await;
    let (status, body) = cp
        .call(
            Method::POST,
            "/v1/auth/signup",
            &Auth::None,
            Some(
                json!({"email": "a@example.com", "password": "correct horse battery", "name": "A"}),
            ),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn team_limits_apply_alike_to_rest_calls_and_websocket_sessions() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    use wrenn::cp::limits::{TeamLimitSettings, Work};
    use wrenn::cp::state::AuthSettings;

    let capsules = wrenn::cp::state::CapsuleSettings {
        team_limits: TeamLimitSettings {
            execs: 1,
            transfers: 1,
            sessions: 1,
            event_streams: 1,
        },
        ..support::quiet_capsules()
    };
    let cp = TestCp::start_full(support::QUIET_MONITOR, capsules, AuthSettings::default()).await;
    let admin = cp.signup("admin@example.com").await;
    let other = cp.signup("other@example.com").await;
    let sandbox = SandboxId(Uuid::new_v4());
    let fake = fake_agent(&cp, sandbox).await;
    let host = online_host(&cp, &fake.to_string()).await;
    let capsule = running_capsule(&cp, &admin, host, sandbox.uuid()).await;
    let team = admin.team.parse::<wrenn::id::TeamId>().unwrap();
    // Work already in progress for the team: one of each kind, its whole allowance.
    let _held = [Work::Exec, Work::Transfer, Work::Session]
        .map(|work| cp.state.team_limits.acquire(team, work).unwrap());

    let rest = [
        ("exec", json!({"cmd": "true"})),
        ("files/list", json!({"path": "/"})),
        ("files/read", json!({"path": "/big"})),
        ("files/stream/read", json!({"path": "/big"})),
    ];
    for (route, body) in rest {
        let headers = [("authorization", format!("Bearer {}", admin.token))];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, response_headers, body) = cp
            .raw_with_headers(
                Method::POST,
                &format!("/v1/capsules/{capsule}/{route}"),
                &headers,
                Some("application/json"),
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
        assert_error(status, &body, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        assert_eq!(response_headers["retry-after"], "1", "{route}");
    }
    let boundary = "b";
    let upload = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"path\"\r\n\r\n/x\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nhi\r\n--{boundary}--\r\n"
    );
    let (status, body) = cp
        .raw(
            Method::POST,
            &format!("/v1/capsules/{capsule}/files/write"),
            &[("authorization", &format!("Bearer {}", admin.token))],
            Some(&format!("multipart/form-data; boundary={boundary}")),
            upload.into_bytes(),
        )
        .await;
    assert_error(status, &body, StatusCode::TOO_MANY_REQUESTS, "rate_limited");

    for route in ["exec/stream", "pty", "processes/42/stream"] {
        let url = format!("ws://{}/v1/capsules/{capsule}/{route}", cp.addr);
        // Authenticated by header: refused before the upgrade, as a plain 429.
        let mut request = url.as_str().into_client_request().unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", admin.token).parse().unwrap(),
        );
        match tokio_tungstenite::connect_async(request).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{route}");
                assert_eq!(response.headers()["retry-after"], "1");
            }
            other => panic!("{route}: {:?}", other.map(|_| ())),
        }
        // Authenticated by frame: one fatal error frame naming the limit.
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        ws.send(Message::Text(
            json!({"type": "auth", "token": admin.token})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
        let frame = loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(text) => break serde_json::from_str::<Value>(&text).unwrap(),
                _ => continue,
            }
        };
        assert_eq!(frame["type"], "error", "{frame}");
        assert!(
            frame["data"]
                .as_str()
                .unwrap()
                .contains("cp.team_max_sessions"),
            "{frame}"
        );
    }

    // Another team's work is its own: its exec reaches the (fake) agent.
    let sandbox = SandboxId(Uuid::new_v4());
    let theirs = running_capsule(&cp, &other, host, sandbox.uuid()).await;
    let (status, body) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{theirs}/exec"),
            &other.auth(),
            Some(json!({"cmd": "true"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // And once the team's work ends, its calls run again.
    drop(_held);
    let (status, body) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{capsule}/exec"),
            &admin.auth(),
            Some(json!({"cmd": "true"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    cp.stop().await;
}
