//! `GET /v1/events/stream` against a real PostgreSQL and real control-plane processes: the
//! 0.3.0 SDK's `SSEEvent` shape, team scope, events made on one replica delivered by another,
//! and a client that reconnects with `Last-Event-ID` to a restarted replica missing nothing and
//! receiving nothing twice.

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use support::{Auth, CpReplica, TestCp, User};
use uuid::Uuid;
use wrenn::db::sandboxes::{self, NewSandbox, SandboxStatus, Transition};
use wrenn::id::{SandboxId, TeamId};

const WAIT: Duration = Duration::from_secs(20);

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<i64>,
    event: String,
    data: Value,
}

/// A streaming SSE client over one connection.
struct SseStream {
    body: Incoming,
    buffer: String,
    ready: VecDeque<Sse>,
}

impl SseStream {
    async fn open(addr: SocketAddr, auth: &Auth, last_event: Option<i64>) -> (StatusCode, Self) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let mut request = Request::get(format!("http://{addr}/v1/events/stream"));
        let Auth::ApiKey(key) = auth else {
            panic!("streams are opened with API keys here")
        };
        request = request.header("x-api-key", key);
        if let Some(id) = last_event {
            request = request.header("last-event-id", id.to_string());
        }
        let response = client
            .request(request.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        (
            status,
            Self {
                body: response.into_body(),
                buffer: String::new(),
                ready: VecDeque::new(),
            },
        )
    }

    async fn next(&mut self) -> Sse {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(event) = self.ready.pop_front() {
                    return event;
                }
                let frame = self.body.frame().await.expect("the stream ended").unwrap();
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                self.buffer.push_str(std::str::from_utf8(&data).unwrap());
                while let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let (mut id, mut event, mut data) = (None, String::new(), String::new());
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            id = Some(v.trim().parse().unwrap());
                        } else if let Some(v) = line.strip_prefix("event:") {
                            event = v.trim().to_owned();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                        }
                    }
                    if !data.is_empty() {
                        let data = serde_json::from_str(&data).unwrap();
                        self.ready.push_back(Sse { id, event, data });
                    }
                }
            }
        })
        .await
        .expect("an event within the wait")
    }

    /// The next event of `kind`, skipping others.
    async fn next_of(&mut self, kind: &str) -> Sse {
        loop {
            let event = self.next().await;
            if event.event == kind {
                return event;
            }
        }
    }
}

/// Checks an event against the 0.3.0 SDK's `SSEEvent` model.
fn check_shape(event: &Sse) {
    let data = &event.data;
    let kinds = [
        "connected",
        "capsule.create",
        "capsule.pause",
        "capsule.resume",
        "capsule.destroy",
        "capsule.state.changed",
        "template.snapshot.create",
        "template.snapshot.delete",
        "host.up",
        "host.down",
    ];
    assert!(kinds.contains(&data["event"].as_str().unwrap()), "{data}");
    assert_eq!(data["event"], event.event.as_str());
    if let Some(outcome) = data.get("outcome") {
        assert!(
            ["success", "error"].contains(&outcome.as_str().unwrap()),
            "{data}"
        );
    }
    if let Some(actor) = data.get("actor") {
        assert!(["user", "api_key", "system"].contains(&actor["type"].as_str().unwrap()));
    }
    for (_, value) in data["metadata"].as_object().unwrap() {
        assert!(value.is_string(), "metadata values are strings: {data}");
    }
    chrono::DateTime::parse_from_rfc3339(data["timestamp"].as_str().unwrap()).unwrap();
}

async fn key_of(cp: &TestCp, user: &User) -> Auth {
    let (status, body) = cp
        .call(
            Method::POST,
            "/v1/api-keys",
            &user.auth(),
            Some(json!({"name": "events"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    Auth::ApiKey(body["key"].as_str().unwrap().to_owned())
}

async fn capsule_row(cp: &TestCp, team: Uuid) -> Uuid {
    let id = Uuid::new_v4();
    sandboxes::insert(
        &cp.db,
        NewSandbox {
            id,
            team_id: team,
            host_id: None,
            template_id: Uuid::nil(),
            status: SandboxStatus::Running,
            vcpus: 1,
            memory_mb: 256,
        },
    )
    .await
    .unwrap();
    id
}

async fn change(cp: &TestCp, id: Uuid, to: SandboxStatus) {
    assert!(sandboxes::transition(&cp.db, id, Transition::to(to))
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_every_replica_in_team_scope_and_resume_after_a_restart() {
    let cp = TestCp::start().await;
    let user = cp.signup("user@example.com").await;
    let other = cp.signup("other@example.com").await;
    let key = key_of(&cp, &user).await;
    let other_key = key_of(&cp, &other).await;
    let team = user.team.parse::<TeamId>().unwrap().uuid();
    let other_team = other.team.parse::<TeamId>().unwrap().uuid();

    let (status, mut stream) = SseStream::open(cp.addr, &key, None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, mut others) = SseStream::open(cp.addr, &other_key, None).await;
    let hello = stream.next().await;
    assert_eq!(hello.event, "connected");
    check_shape(&hello);
    others.next_of("connected").await;

    // A status change, whoever makes it, is an event with from and to and the capsule.
    let capsule = capsule_row(&cp, team).await;
    change(&cp, capsule, SandboxStatus::Pausing).await;
    let changed = stream.next_of("capsule.state.changed").await;
    check_shape(&changed);
    let data = &changed.data;
    assert_eq!(
        data["metadata"],
        json!({"from": "running", "to": "pausing"})
    );
    assert_eq!(data["resource"]["id"], SandboxId(capsule).to_string());
    assert_eq!(data["resource"]["type"], "capsule");
    assert_eq!(data["actor"]["type"], "system");
    assert!(data.get("outcome").is_none(), "{data}");
    assert_eq!(data["sandbox"]["id"], SandboxId(capsule).to_string());
    assert_eq!(data["sandbox"]["status"], "pausing");

    // An action has its outcome and actor: a create with no host to run it fails.
    let (status, _) = cp
        .call(Method::POST, "/v1/capsules", &key, Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let created = stream.next_of("capsule.create").await;
    check_shape(&created);
    assert_eq!(created.data["outcome"], "error");
    assert_eq!(created.data["actor"]["type"], "api_key");
    assert!(created.data["actor"]["id"]
        .as_str()
        .unwrap()
        .starts_with("key-"));
    assert!(
        created.data["error"].as_str().unwrap().contains("host"),
        "{}",
        created.data
    );

    // The other team sees none of it, and gets its own.
    let theirs = capsule_row(&cp, other_team).await;
    change(&cp, theirs, SandboxStatus::Stopped).await;
    let seen = others.next_of("capsule.state.changed").await;
    assert_eq!(seen.data["resource"]["id"], SandboxId(theirs).to_string());

    // Another replica delivers what this one made.
    let mut replica = CpReplica::start(&cp).await;
    let (_, mut remote) = SseStream::open(replica.addr, &key, None).await;
    remote.next_of("connected").await;
    change(&cp, capsule, SandboxStatus::Paused).await;
    let here = stream.next_of("capsule.state.changed").await;
    let there = remote.next_of("capsule.state.changed").await;
    assert_eq!(here.id, there.id);
    assert_eq!(there.data["metadata"]["to"], "paused");

    // The replica restarts; meanwhile events happen. Reconnecting with the last ID it had
    // misses nothing and repeats nothing.
    let last = there.id.unwrap();
    drop(remote);
    drop(replica);
    let mut missed = Vec::new();
    for to in [
        SandboxStatus::Resuming,
        SandboxStatus::Running,
        SandboxStatus::Stopped,
    ] {
        change(&cp, capsule, to).await;
        missed.push(to.as_str());
    }
    replica = CpReplica::start(&cp).await;
    let (status, mut resumed) = SseStream::open(replica.addr, &key, Some(last)).await;
    assert_eq!(status, StatusCode::OK);
    resumed.next_of("connected").await;
    let mut got = Vec::new();
    let mut ids = Vec::new();
    while got.len() < missed.len() {
        let event = resumed.next().await;
        check_shape(&event);
        ids.push(event.id.unwrap());
        if event.event == "capsule.state.changed" {
            got.push(event.data["metadata"]["to"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(got, missed);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(ids[0] > last);
    // And live events follow the replay, once.
    let again = capsule_row(&cp, team).await;
    change(&cp, again, SandboxStatus::Stopped).await;
    let live = resumed.next_of("capsule.state.changed").await;
    assert_eq!(live.data["resource"]["id"], SandboxId(again).to_string());
    assert!(live.id.unwrap() > *ids.last().unwrap());

    // A host of the team going down and coming back.
    // (The first user to sign up, `user`, is a platform admin.)
    let (host, _) = cp.registered_host(&user, json!({"type": "regular"})).await;
    let host = host.parse::<wrenn::id::HostId>().unwrap().uuid();
    sqlx::query("UPDATE hosts SET type = 'byoc', team_id = $2 WHERE id = $1")
        .bind(host)
        .bind(team)
        .execute(&cp.db)
        .await
        .unwrap();
    sqlx::query("UPDATE hosts SET status = 'unreachable' WHERE id = $1")
        .bind(host)
        .execute(&cp.db)
        .await
        .unwrap();
    let down = stream.next_of("host.down").await;
    check_shape(&down);
    assert_eq!(
        down.data["resource"]["id"],
        wrenn::id::HostId(host).to_string()
    );
    assert_eq!(down.data["metadata"]["host_ip"], "10.0.0.5");

    // A bad Last-Event-ID is refused; no credentials, 401.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let Auth::ApiKey(raw_key) = &key else {
        unreachable!()
    };
    let response = client
        .request(
            Request::builder()
                .method(Method::GET)
                .uri(format!("http://{}/v1/events/stream", cp.addr))
                .header("x-api-key", raw_key)
                .header("last-event-id", "yesterday")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let (status, _) = cp
        .call(Method::GET, "/v1/events/stream", &Auth::None, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    drop(replica);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_holds_a_bounded_number_of_streams_and_a_closed_one_frees_its_place() {
    let cp = TestCp::start().await;
    let user = cp.signup("user@example.com").await;
    let other = cp.signup("other@example.com").await;
    let key = key_of(&cp, &user).await;
    let other_key = key_of(&cp, &other).await;
    let replica = CpReplica::start_with_env(&cp, &[("CP_TEAM_MAX_EVENT_STREAMS", "2")]).await;

    let mut open = Vec::new();
    for _ in 0..2 {
        let (status, mut stream) = SseStream::open(replica.addr, &key, None).await;
        assert_eq!(status, StatusCode::OK);
        stream.next_of("connected").await;
        open.push(stream);
    }
    let (status, refused) = SseStream::open(replica.addr, &key, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let body = refused.body.collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("cp.team_max_event_streams"), "{message}");
    // Another team is not held back by this one.
    let (status, _other) = SseStream::open(replica.addr, &other_key, None).await;
    assert_eq!(status, StatusCode::OK);

    // A client that goes away gives its place back.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, mut stream) = SseStream::open(replica.addr, &key, None).await;
        if status == StatusCode::OK {
            stream.next_of("connected").await;
            break;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(replica);
    cp.stop().await;
}
