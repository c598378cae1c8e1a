//! Notification channels against a real PostgreSQL and a real HTTP receiver: the reference
//! API's seven operations (shapes, roles, typed errors), settings sealed at rest, signed
//! webhooks verified independently, retries after a refusal, the chat providers' requests,
//! the delivery log, and two replicas delivering each event exactly once.

mod support;

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method as AxumMethod, Uri};
use hmac::{Hmac, Mac};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Sha256;
use support::schema::Spec;
use support::{assert_error, CpReplica, TestCp, User, QUIET_MONITOR};
use uuid::Uuid;
use wrenn::cp::state::AuthSettings;
use wrenn::db::events::{self, NewEvent};
use wrenn::id::{SandboxId, TeamId};

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PATCH: Method = Method::PATCH;
const PUT: Method = Method::PUT;
const DELETE: Method = Method::DELETE;

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }
}

/// An HTTP server that records every request and answers with the queued statuses, then 200.
#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Seen>>>,
    replies: Arc<Mutex<VecDeque<u16>>>,
    addr: Option<SocketAddr>,
}

impl Receiver {
    async fn start() -> Self {
        let mut receiver = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        receiver.addr = Some(listener.local_addr().unwrap());
        let state = receiver.clone();
        let app = axum::Router::new().fallback(
            move |method: AxumMethod, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move {
                    state.seen.lock().unwrap().push(Seen {
                        method: method.to_string(),
                        path: uri.to_string(),
                        headers,
                        body,
                    });
                    let status = state.replies.lock().unwrap().pop_front().unwrap_or(200);
                    (StatusCode::from_u16(status).unwrap(), "receiver says so")
                }
            },
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        receiver
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr.unwrap())
    }

    fn refuse_next(&self, statuses: &[u16]) {
        self.replies.lock().unwrap().extend(statuses);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    async fn wait_for(&self, count: usize) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self.seen();
            if seen.len() >= count {
                return seen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the receiver got {} of {count} requests",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A control plane whose failed deliveries are retried after a second, and which may send to
/// this machine's test receivers.
async fn start_cp() -> TestCp {
    let mut capsules = support::quiet_capsules();
    capsules.channel_retry_base = Duration::from_secs(1);
    capsules.channel_allow_private = true;
    TestCp::start_full(QUIET_MONITOR, capsules, AuthSettings::default()).await
}

fn team_of(user: &User) -> Uuid {
    user.team.parse::<TeamId>().unwrap().uuid()
}

fn capsule_event_row(team: Uuid, kind: &'static str, capsule: Uuid) -> NewEvent {
    NewEvent {
        team_id: team,
        kind,
        outcome: Some("success"),
        resource_type: "capsule",
        resource_id: capsule.to_string(),
        actor_type: "user",
        actor_id: Some("usr-someone".into()),
        actor_name: Some("Someone".into()),
        metadata: json!({"template": "minimal"}),
        error: None,
        sandbox_id: Some(capsule),
    }
}

/// Records an action on a new capsule, as the API does; returns the capsule.
async fn capsule_event(cp: &TestCp, team: Uuid, kind: &'static str) -> Uuid {
    let capsule = Uuid::new_v4();
    events::insert(&cp.db, &capsule_event_row(team, kind, capsule))
        .await
        .unwrap();
    capsule
}

fn verify(secret: &str, seen: &Seen) {
    let timestamp = seen.header("x-wrenn-timestamp");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&seen.body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(seen.header("x-wrenn-signature"), want, "signature");
    let sent: u64 = timestamp.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(sent) < 60, "timestamp {sent} is not now");
}

async fn deliveries(cp: &TestCp, user: &User, channel: &str) -> Vec<Value> {
    let (status, page) = cp
        .call(
            GET,
            &format!("/v1/channels/{channel}/deliveries"),
            &user.auth(),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["items"].as_array().unwrap().clone()
}

async fn wait_delivered(cp: &TestCp, user: &User, channel: &str, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let items = deliveries(cp, user, channel).await;
        if items.len() >= count && items.iter().all(|d| d["status"] != "pending") {
            return items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries not finished: {items:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_logged_and_their_secrets_sealed() {
    let cp = start_cp().await;
    let reference = Spec::reference();
    let ours = Spec::ours();
    let receiver = Receiver::start().await;
    let owner = cp.signup("owner@example.com").await;

    let hook_url = receiver.url("/hooks/wrenn");
    let (status, created) = cp
        .call(
            POST,
            "/v1/channels",
            &owner.auth(),
            Some(json!({
                "name": "ops hook",
                "provider": "webhook",
                "config": {"url": hook_url},
                "events": ["capsule.created", "capsule.destroyed", "capsule.created"],
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    reference.check_response("POST", "/v1/channels", 201, &created);
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ch-"), "{id}");
    assert_eq!(created["team_id"], owner.team.as_str());
    assert_eq!(created["provider"], "webhook");
    assert_eq!(
        created["events"],
        json!(["capsule.created", "capsule.destroyed"])
    );
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");

    // The secret is shown once; nothing of the settings is stored in clear.
    let (status, got) = cp
        .call(GET, &format!("/v1/channels/{id}"), &owner.auth(), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{got}");
    reference.check_response("GET", "/v1/channels/{id}", 200, &got);
    assert!(got.get("secret").is_none(), "{got}");
    let (status, list) = cp.call(GET, "/v1/channels", &owner.auth(), None).await;
    assert_eq!(status, StatusCode::OK);
    reference.check_response("GET", "/v1/channels", 200, &list);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let stored: Vec<u8> = sqlx::query_scalar("SELECT config_sealed FROM channels")
        .fetch_one(&cp.db)
        .await
        .unwrap();
    for clear in [secret.as_bytes(), hook_url.as_bytes(), b"hooks/wrenn"] {
        assert!(
            !stored.windows(clear.len()).any(|w| w == clear),
            "settings stored in clear"
        );
    }

    // An event the channel wants is delivered, signed; one it does not want is not.
    let team = team_of(&owner);
    capsule_event(&cp, team, "capsule.pause").await;
    let capsule = capsule_event(&cp, team, "capsule.create").await;
    let seen = receiver.wait_for(1).await;
    let hook = &seen[0];
    assert_eq!(
        (hook.method.as_str(), hook.path.as_str()),
        ("POST", "/hooks/wrenn")
    );
    assert_eq!(hook.header("content-type"), "application/json");
    assert_eq!(hook.header("x-wrenn-event"), "capsule.created");
    verify(&secret, hook);
    let body = hook.json();
    assert_eq!(body["type"], "capsule.created");
    assert_eq!(body["id"], hook.header("x-wrenn-delivery"));
    assert_eq!(body["team_id"], owner.team.as_str());
    assert_eq!(
        body["data"]["resource"],
        json!({"type": "capsule", "id": SandboxId(capsule).to_string()})
    );
    assert_eq!(body["data"]["actor"]["name"], "Someone");
    assert_eq!(body["data"]["metadata"]["template"], "minimal");
    let logged = wait_delivered(&cp, &owner, &id, 1).await;
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["status"], "delivered");
    assert_eq!(logged[0]["attempts"], 1);
    assert_eq!(logged[0]["response_status"], 200);
    ours.check_response(
        "GET",
        "/v1/channels/{id}/deliveries",
        200,
        &json!({"items": logged}),
    );

    // A refusal is retried, with the same delivery ID, until the receiver takes it.
    receiver.clear();
    receiver.refuse_next(&[500, 503]);
    capsule_event(&cp, team, "capsule.destroy").await;
    let seen = receiver.wait_for(3).await;
    let ids: BTreeSet<_> = seen.iter().map(|s| s.header("x-wrenn-delivery")).collect();
    assert_eq!(ids.len(), 1, "retries keep the delivery ID");
    for attempt in &seen {
        verify(&secret, attempt);
        assert_eq!(attempt.header("x-wrenn-event"), "capsule.destroyed");
    }
    let logged = wait_delivered(&cp, &owner, &id, 2).await;
    assert_eq!(logged[0]["event"], "capsule.destroyed");
    assert_eq!(logged[0]["status"], "delivered");
    assert_eq!(logged[0]["attempts"], 3);

    // A receiver that never takes it: the delivery fails after its last attempt (the event
    // comes with its delivery at the last attempt already), and the log says why.
    receiver.clear();
    receiver.refuse_next(&[410]);
    let mut tx = cp.db.begin().await.unwrap();
    let event = events::insert(
        &mut *tx,
        &capsule_event_row(team, "capsule.create", Uuid::new_v4()),
    )
    .await
    .unwrap();
    sqlx::query("UPDATE channel_deliveries SET attempts = 5 WHERE event_id = $1")
        .bind(event)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    receiver.wait_for(1).await;
    let logged = wait_delivered(&cp, &owner, &id, 3).await;
    assert_eq!(logged[0]["status"], "failed", "{logged:?}");
    assert_eq!(logged[0]["response_status"], 410);
    assert!(
        logged[0]["error"].as_str().unwrap().contains("410"),
        "{logged:?}"
    );

    // New settings replace the old entirely; a generated secret is shown by the call that made
    // it, and signs from then on.
    let (status, rotated) = cp
        .call(
            PUT,
            &format!("/v1/channels/{id}/config"),
            &owner.auth(),
            Some(json!({"config": {"url": receiver.url("/v2"), "secret": "chosen-secret"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    reference.check_response("PUT", "/v1/channels/{id}/config", 200, &rotated);
    assert!(
        rotated.get("secret").is_none(),
        "a chosen secret is not echoed"
    );
    receiver.clear();
    capsule_event(&cp, team, "capsule.create").await;
    let seen = receiver.wait_for(1).await;
    assert_eq!(seen[0].path, "/v2");
    verify("chosen-secret", &seen[0]);

    // The test operation sends without storing anything; a refusal is the caller's to fix.
    receiver.clear();
    let test = json!({"provider": "webhook", "config": {"url": receiver.url("/t"), "secret": "s"}});
    let (status, answer) = cp
        .call(POST, "/v1/channels/test", &owner.auth(), Some(test.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    reference.check_response("POST", "/v1/channels/test", 200, &answer);
    assert_eq!(answer, json!({"status": "ok"}));
    let seen = receiver.wait_for(1).await;
    assert_eq!(seen[0].json()["type"], "test");
    verify("s", &seen[0]);
    receiver.refuse_next(&[500]);
    let (status, answer) = cp
        .call(POST, "/v1/channels/test", &owner.auth(), Some(test))
        .await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        answer["error"]["message"].as_str().unwrap().contains("500"),
        "{answer}"
    );
    let closed = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let (status, answer) = cp
        .call(
            POST,
            "/v1/channels/test",
            &owner.auth(),
            Some(json!({"provider": "slack", "config": {"webhook_url": format!("http://{closed}/x")}})),
        )
        .await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM channels")
        .fetch_one(&cp.db)
        .await
        .unwrap();
    assert_eq!(count, 1);

    // Every change is in the audit log, and every test send with its outcome.
    let actions: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, status FROM audit_logs WHERE resource_type = 'channel'
         ORDER BY created_at",
    )
    .fetch_all(&cp.db)
    .await
    .unwrap();
    let want = [
        ("create", "success"),
        ("rotate_config", "success"),
        ("test", "success"),
        ("test", "error"),
        ("test", "error"),
    ]
    .map(|(a, s)| (a.to_owned(), s.to_owned()));
    assert_eq!(actions, want);

    let (status, body) = cp
        .call(DELETE, &format!("/v1/channels/{id}"), &owner.auth(), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = cp
        .call(GET, &format!("/v1/channels/{id}"), &owner.auth(), None)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM channel_deliveries")
        .fetch_one(&cp.db)
        .await
        .unwrap();
    assert_eq!(left, 0, "the log goes with its channel");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_checked_scoped_to_their_team_and_managed_by_its_admins() {
    let cp = start_cp().await;
    let owner = cp.signup("owner@example.com").await;
    let stranger = cp.signup("stranger@example.com").await;
    let bob = cp.signup("bob@example.com").await;
    let (status, body) = cp
        .call(
            POST,
            &format!("/v1/teams/{}/members", owner.team),
            &owner.auth(),
            Some(json!({"email": "bob@example.com"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let member = cp.switch(&bob, &owner.team).await;

    let hook = |name: &str| {
        json!({"name": name, "provider": "webhook", "config": {"url": "https://example.com/h"},
               "events": ["host.up"]})
    };
    for (body, complaint) in [
        (
            json!({"name": "x", "provider": "pager", "config": {}, "events": ["host.up"]}),
            "pager",
        ),
        (
            json!({"name": "x", "provider": "slack", "config": {}, "events": ["host.up"]}),
            "webhook_url",
        ),
        (
            json!({"name": "x", "provider": "slack", "config": {"webhook_url": "file:///etc/passwd"},
                   "events": ["host.up"]}),
            "http",
        ),
        (
            json!({"name": "x", "provider": "telegram", "config": {"bot_token": "t", "chat_id": "1",
                   "password": "p"}, "events": ["host.up"]}),
            "password",
        ),
        (
            json!({"name": "x", "provider": "webhook", "config": {"url": "https://e/h"},
                   "events": ["capsule.exploded"]}),
            "capsule.exploded",
        ),
        (
            json!({"name": "x", "provider": "webhook", "config": {"url": "https://e/h"}, "events": []}),
            "at least one",
        ),
        (
            json!({"name": "  ", "provider": "webhook", "config": {"url": "https://e/h"},
                "events": ["host.up"]}),
            "name",
        ),
        (
            json!({"name": "x", "provider": "webhook", "config": {"url": "https://e/h"}}),
            "events",
        ),
        (
            json!({"name": "x", "provider": "webhook", "config": {"url": 7}, "events": ["host.up"]}),
            "config",
        ),
    ] {
        let (status, answer) = cp
            .call(POST, "/v1/channels", &owner.auth(), Some(body))
            .await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(complaint), "{message} lacks {complaint}");
    }

    // By default nothing is sent to this machine or its networks, not even a test.
    let strict = TestCp::start().await;
    let admin = strict.signup("admin@example.com").await;
    let receiver = Receiver::start().await;
    let (status, answer) = strict
        .call(
            POST,
            "/v1/channels/test",
            &admin.auth(),
            Some(json!({"provider": "webhook", "config": {"url": receiver.url("/x")}})),
        )
        .await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("internal address"), "{message}");
    assert!(!message.contains(&receiver.url("/x")), "{message}");
    assert!(receiver.seen().is_empty());
    strict.stop().await;

    let (status, created) = cp
        .call(POST, "/v1/channels", &owner.auth(), Some(hook("alerts")))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let (status, answer) = cp
        .call(POST, "/v1/channels", &owner.auth(), Some(hook("alerts")))
        .await;
    assert_error(status, &answer, StatusCode::CONFLICT, "conflict");

    // Members see the team's channels; only owners and admins change them.
    let (status, list) = cp.call(GET, "/v1/channels", &member.auth(), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (status, answer) = cp
        .call(POST, "/v1/channels", &member.auth(), Some(hook("mine")))
        .await;
    assert_error(status, &answer, StatusCode::FORBIDDEN, "forbidden");
    let (status, answer) = cp
        .call(DELETE, &format!("/v1/channels/{id}"), &member.auth(), None)
        .await;
    assert_error(status, &answer, StatusCode::FORBIDDEN, "forbidden");

    // Another team's channel does not exist for these credentials.
    for (method, path, body) in [
        (GET, format!("/v1/channels/{id}"), None),
        (
            PATCH,
            format!("/v1/channels/{id}"),
            Some(json!({"name": "n", "events": ["host.up"]})),
        ),
        (
            PUT,
            format!("/v1/channels/{id}/config"),
            Some(json!({"config": {"url": "https://e/h"}})),
        ),
        (DELETE, format!("/v1/channels/{id}"), None),
        (GET, format!("/v1/channels/{id}/deliveries"), None),
    ] {
        let (status, answer) = cp.call(method, &path, &stranger.auth(), body).await;
        assert_error(status, &answer, StatusCode::NOT_FOUND, "not_found");
    }
    let (status, answer) = cp
        .call(GET, "/v1/channels/ch-nope", &owner.auth(), None)
        .await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");

    let (status, updated) = cp
        .call(
            PATCH,
            &format!("/v1/channels/{id}"),
            &owner.auth(),
            Some(json!({"name": "renamed", "events": ["host.down", "host.up"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    Spec::reference().check_response("PATCH", "/v1/channels/{id}", 200, &updated);
    assert_eq!(updated["name"], "renamed");
    assert_eq!(updated["events"], json!(["host.down", "host.up"]));
    let (status, answer) = cp
        .call(
            PUT,
            &format!("/v1/channels/{id}/config"),
            &owner.auth(),
            Some(json!({"config": {"webhook_url": "https://e/h"}})),
        )
        .await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
    // Rotating to a generated secret shows it, as creating does.
    let (status, rotated) = cp
        .call(
            PUT,
            &format!("/v1/channels/{id}/config"),
            &owner.auth(),
            Some(json!({"config": {"url": "https://e/h2"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert!(rotated["secret"].as_str().unwrap().starts_with("whsec_"));
    let (status, answer) = cp
        .call(
            GET,
            &format!("/v1/channels/{id}/deliveries?limit=0"),
            &owner.auth(),
            None,
        )
        .await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_providers_get_their_own_requests() {
    let cp = start_cp().await;
    let receiver = Receiver::start().await;
    let owner = cp.signup("owner@example.com").await;
    let channels = [
        (
            "slack",
            json!({"webhook_url": receiver.url("/slack/T0/B0/tok")}),
        ),
        (
            "discord",
            json!({"webhook_url": receiver.url("/discord/api/webhooks/1/tok")}),
        ),
        (
            "googlechat",
            json!({"webhook_url": receiver.url("/chat/v1/spaces/S/messages?key=k")}),
        ),
        (
            "teams",
            json!({"webhook_url": receiver.url("/teams/workflow")}),
        ),
        (
            "telegram",
            json!({"bot_token": "123:abc", "chat_id": "-100", "api_url": receiver.url("/tg")}),
        ),
        (
            "matrix",
            json!({"homeserver_url": receiver.url("/mx"), "access_token": "syt_tok",
                   "room_id": "!room:example.org"}),
        ),
    ];
    for (provider, config) in &channels {
        let (status, created) = cp
            .call(
                POST,
                "/v1/channels",
                &owner.auth(),
                Some(
                    json!({"name": provider, "provider": provider, "config": config,
                            "events": ["capsule.created"]}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert!(created.get("secret").is_none(), "{created}");
    }
    let capsule = capsule_event(&cp, team_of(&owner), "capsule.create").await;
    let seen = receiver.wait_for(channels.len()).await;
    let by_path = |prefix: &str| {
        seen.iter()
            .find(|s| s.path.starts_with(prefix))
            .unwrap_or_else(|| panic!("nothing sent to {prefix}: {seen:?}"))
            .clone()
    };
    let line = format!(
        "[Wrenn] capsule.created: capsule {} by Someone",
        SandboxId(capsule)
    );
    assert_eq!(by_path("/slack/").json(), json!({"text": line}));
    assert_eq!(by_path("/discord/").json(), json!({"content": line}));
    let chat = by_path("/chat/");
    assert_eq!(chat.path, "/chat/v1/spaces/S/messages?key=k");
    assert_eq!(chat.json(), json!({"text": line}));
    let teams = by_path("/teams/").json();
    assert_eq!(teams["attachments"][0]["content"]["body"][0]["text"], line);
    let telegram = by_path("/tg/");
    assert_eq!(telegram.path, "/tg/bot123:abc/sendMessage");
    assert_eq!(telegram.json(), json!({"chat_id": "-100", "text": line}));
    let matrix = by_path("/mx/");
    assert_eq!(matrix.method, "PUT");
    assert!(
        matrix.path.starts_with(
            "/mx/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/wrenn-"
        ),
        "{}",
        matrix.path
    );
    assert_eq!(matrix.header("authorization"), "Bearer syt_tok");
    assert_eq!(matrix.json(), json!({"msgtype": "m.text", "body": line}));
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_each_event_once() {
    let cp = start_cp().await;
    let receiver = Receiver::start().await;
    let owner = cp.signup("owner@example.com").await;
    let _replica = CpReplica::start_with_env(
        &cp,
        &[
            ("CP_CHANNEL_RETRY_SECS", "1"),
            ("CP_CHANNEL_ALLOW_PRIVATE_TARGETS", "true"),
        ],
    )
    .await;
    let (status, created) = cp
        .call(
            POST,
            "/v1/channels",
            &owner.auth(),
            Some(
                json!({"name": "h", "provider": "webhook", "config": {"url": receiver.url("/h")},
                        "events": ["capsule.created"]}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let team = team_of(&owner);
    let mut capsules = BTreeSet::new();
    for _ in 0..40 {
        capsules.insert(SandboxId(capsule_event(&cp, team, "capsule.create").await).to_string());
    }
    let seen = receiver.wait_for(40).await;
    // Anything past the 40th would be a duplicate.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen_now = receiver.seen();
    assert_eq!(seen_now.len(), 40, "duplicates were sent");
    let delivered: BTreeSet<String> = seen
        .iter()
        .map(|s| {
            s.json()["data"]["resource"]["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(delivered, capsules);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_become_channel_events_but_snapshots_do_not() {
    let cp = start_cp().await;
    let owner = cp.signup("owner@example.com").await;
    let (status, created) = cp
        .call(
            POST,
            "/v1/channels",
            &owner.auth(),
            Some(json!({"name": "h", "provider": "webhook",
                        "config": {"url": "http://127.0.0.1:9/"},
                        "events": ["capsule.running", "capsule.paused"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let team = team_of(&owner);
    for (from, to) in [
        ("starting", "running"),
        ("snapshotting", "running"),
        ("pausing", "paused"),
        ("snapshotting", "paused"),
        ("resuming", "running"),
        ("running", "stopped"),
    ] {
        let capsule = Uuid::new_v4();
        events::insert(
            &cp.db,
            &NewEvent {
                team_id: team,
                kind: "capsule.state.changed",
                outcome: None,
                resource_type: "capsule",
                resource_id: capsule.to_string(),
                actor_type: "system",
                actor_id: None,
                actor_name: None,
                metadata: json!({"from": from, "to": to}),
                error: None,
                sandbox_id: Some(capsule),
            },
        )
        .await
        .unwrap();
    }
    let queued: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM channel_deliveries ORDER BY id")
            .fetch_all(&cp.db)
            .await
            .unwrap();
    assert_eq!(
        queued,
        ["capsule.running", "capsule.paused", "capsule.running"]
    );
    cp.stop().await;
}
