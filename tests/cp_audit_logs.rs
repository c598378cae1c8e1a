//! The audit log against a real PostgreSQL and a served control plane: mutating requests are
//! recorded with the caller, their address, the resource and the outcome (refusals too);
//! `GET /v1/audit-logs` pages through them newest first with a cursor, filters them, and shows
//! members only the team's `team`-scope rows.

mod support;

use std::collections::BTreeSet;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::schema::Spec;
use support::{assert_error, Auth, TestCp, User};

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PATCH: Method = Method::PATCH;
const DELETE: Method = Method::DELETE;

async fn log(cp: &TestCp, user: &User, query: &str) -> Value {
    let (status, page) = cp
        .call(GET, &format!("/v1/audit-logs{query}"), &user.auth(), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    Spec::ours().check_response("GET", "/v1/audit-logs", 200, &page);
    page
}

async fn add_member(cp: &TestCp, owner: &User, email: &str) {
    let path = format!("/v1/teams/{}/members", owner.team);
    let body = json!({"email": email});
    let (status, body) = cp.call(POST, &path, &owner.auth(), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

fn find<'a>(items: &'a [Value], resource: &str, action: &str) -> &'a Value {
    items
        .iter()
        .find(|i| i["resource_type"] == resource && i["action"] == action)
        .unwrap_or_else(|| panic!("no {resource} {action} in {items:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_requests_are_audited_and_paged_by_scope() {
    let cp = TestCp::start().await;
    let owner = cp.signup("owner@example.com").await;
    let bob = cp.signup("bob@example.com").await;
    add_member(&cp, &owner, "bob@example.com").await;
    let member = cp.switch(&bob, &owner.team).await;
    let (status, body) = cp
        .call(
            PATCH,
            &format!("/v1/teams/{}", owner.team),
            &owner.auth(),
            Some(json!({"name": "Research"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, key) = cp
        .call(
            POST,
            "/v1/api-keys",
            &owner.auth(),
            Some(json!({"name": "ci"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let api_key = Auth::ApiKey(key["key"].as_str().unwrap().to_owned());
    // Refused requests are recorded too: a member managing channels, a create with no host
    // (under the /api prefix and the /v1/sandboxes alias, recorded as the capsule route).
    let (status, body) = cp
        .call(
            POST,
            "/v1/channels",
            &member.auth(),
            Some(json!({"name": "c", "provider": "webhook",
                        "config": {"url": "https://e/h"}, "events": ["host.up"]})),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = cp
        .call(
            POST,
            "/api/v1/sandboxes",
            &api_key,
            Some(json!({"template": "minimal"})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Without credentials nobody is named: nothing is recorded.
    let (status, _) = cp
        .call(DELETE, "/v1/api-keys/key-x", &Auth::None, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let page = log(&cp, &owner, "").await;
    let items = page["items"].as_array().unwrap().clone();
    let rename = find(&items, "team", "rename");
    assert_eq!(rename["resource_id"], owner.team.as_str());
    assert_eq!(rename["actor_type"], "user");
    assert_eq!(rename["actor_id"], owner.id.as_str());
    assert_eq!(rename["status"], "success");
    assert_eq!(rename["scope"], "admin");
    assert_eq!(rename["address"], "127.0.0.1");
    assert!(rename["id"].as_str().unwrap().starts_with("log-"));
    let added = find(&items, "member", "add");
    assert_eq!(added["metadata"]["http_status"], 201);
    // The service's own row, in the transaction of the change.
    let created_key = find(&items, "api_key", "create");
    assert_eq!(created_key["resource_id"], key["id"]);
    let refused = find(&items, "channel", "create");
    assert_eq!(refused["status"], "error");
    assert_eq!(refused["actor_id"], bob.id.as_str());
    assert_eq!(refused["metadata"]["http_status"], 403);
    let create = find(&items, "capsule", "create");
    assert_eq!(create["status"], "error");
    assert_eq!(create["actor_type"], "api_key");
    assert_eq!(create["actor_id"], key["id"]);
    assert_eq!(create["scope"], "team");
    assert_eq!(create["metadata"]["path"], "/api/v1/sandboxes");
    assert!(page["next_before"].is_null() && page["next_before_id"].is_null());
    let times: Vec<&str> = items
        .iter()
        .map(|i| i["created_at"].as_str().unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "newest first");

    // Members see only the team's capsule and template rows.
    let seen = log(&cp, &member, "").await;
    let scopes: BTreeSet<&str> = seen["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["scope"].as_str().unwrap())
        .collect();
    assert_eq!(scopes, BTreeSet::from(["team"]));

    // Paging with the cursor returns every row once, in order.
    let mut paged = Vec::new();
    let mut query = "?limit=2".to_owned();
    loop {
        let page = log(&cp, &owner, &query).await;
        let batch = page["items"].as_array().unwrap();
        assert!(batch.len() <= 2);
        paged.extend(batch.iter().map(|i| i["id"].clone()));
        if page["next_before_id"].is_null() {
            break;
        }
        let before = page["next_before"].as_str().unwrap().replace('+', "%2B");
        query = format!(
            "?limit=2&before={before}&before_id={}",
            page["next_before_id"].as_str().unwrap()
        );
    }
    let all: Vec<Value> = items.iter().map(|i| i["id"].clone()).collect();
    assert_eq!(paged, all);

    let only = log(&cp, &owner, "?resource_type=api_key&action=create").await;
    assert_eq!(only["items"].as_array().unwrap().len(), 1);

    for query in [
        "?limit=0",
        "?limit=201",
        "?before=2026-01-01T00:00:00Z",
        "?before=2026-01-01T00:00:00Z&before_id=nope",
        "?before=yesterday&before_id=log-0",
        "?page=2",
    ] {
        let (status, body) = cp
            .call(GET, &format!("/v1/audit-logs{query}"), &owner.auth(), None)
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let (status, body) = cp.call(GET, "/v1/audit-logs", &api_key, None).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signups_and_logins_are_audited_in_the_accounts_team() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let carol = cp.signup("carol@example.com").await;
    // Carol is also a member of the admin's team, which must not hear of her failed logins.
    add_member(&cp, &admin, "carol@example.com").await;
    let login = |email: &'static str, password: &'static str| {
        let body = json!({"email": email, "password": password});
        cp.call(POST, "/v1/auth/login", &Auth::None, Some(body))
    };
    // A refusal is recorded off the answer's path: it lands a moment later.
    let db = &cp.db;
    let refused_logins = |count: i64| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let rows: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM audit_logs WHERE action = 'login' AND status = 'error'",
            )
            .fetch_one(db)
            .await
            .unwrap();
            if rows >= count {
                assert_eq!(rows, count);
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{rows} refused logins recorded"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let (status, body) = login("carol@example.com", "correct horse battery").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = login("carol@example.com", "wrong horse battery").await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    refused_logins(1).await;
    let rows_before: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_logs")
        .fetch_one(&cp.db)
        .await
        .unwrap();
    // An unknown email names no account and no team: the login limits count it, nothing else.
    let (status, body) = login("nobody@example.com", "correct horse battery").await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let rows_after: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_logs")
        .fetch_one(&cp.db)
        .await
        .unwrap();
    assert_eq!(rows_before, rows_after);

    let items = log(&cp, &carol, "?resource_type=user").await["items"]
        .as_array()
        .unwrap()
        .clone();
    let actions: Vec<(&str, &str)> = items
        .iter()
        .map(|i| (i["action"].as_str().unwrap(), i["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("login", "error"),
            ("login", "success"),
            ("signup", "success")
        ]
    );
    for row in &items {
        assert_eq!(row["resource_id"], carol.id.as_str());
        assert_eq!(row["address"], "127.0.0.1");
        assert_eq!(row["scope"], "admin");
    }
    let signup = find(&items, "user", "signup");
    assert_eq!(signup["actor_id"], carol.id.as_str());
    assert_eq!(signup["actor_name"], "Test User");
    // Whoever typed a wrong password is not Carol.
    assert!(items[0]["actor_id"].is_null(), "{:#}", items[0]);
    assert_eq!(items[0]["metadata"]["reason"], "wrong_password");
    assert_eq!(items[1]["actor_id"], carol.id.as_str());

    // A disabled account's correct password is refused, and recorded as the account's own try.
    let (status, body) = cp
        .call(
            Method::PUT,
            &format!("/v1/admin/users/{}/active", carol.id),
            &admin.auth(),
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = login("carol@example.com", "correct horse battery").await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "account_deactivated");
    refused_logins(2).await;
    let (actor, status, reason, team): (Option<String>, String, Option<String>, uuid::Uuid) =
        sqlx::query_as(
            "SELECT actor_id, status, metadata->>'reason', team_id FROM audit_logs
             WHERE action = 'login' ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .fetch_one(&cp.db)
        .await
        .unwrap();
    assert_eq!(actor.as_deref(), Some(carol.id.as_str()));
    assert_eq!(status, "error");
    assert_eq!(reason.as_deref(), Some("account_disabled"));
    let carols_team: wrenn::id::TeamId = carol.team.parse().unwrap();
    assert_eq!(team, carols_team.uuid(), "in Carol's own team");

    // Every row about her is in her own team, none in the other team she belongs to.
    let teams: Vec<Option<uuid::Uuid>> = sqlx::query_scalar(
        "SELECT DISTINCT team_id FROM audit_logs
         WHERE resource_type = 'user' AND resource_id = $1 AND action IN ('signup', 'login')",
    )
    .bind(carol.id.as_str())
    .fetch_all(&cp.db)
    .await
    .unwrap();
    assert_eq!(teams, [Some(carols_team.uuid())]);
    cp.stop().await;
}
