//! The control-plane API over HTTP against a real PostgreSQL: happy paths checked against the
//! reference spec's schemas and statuses, the authorization matrix, bad input, the host
//! registration handshake, the host monitor and database outages.

mod support;

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::schema::Spec;
use support::{assert_error, register_body, Auth, TestCp, User};
use wrenn::cp::monitor::MonitorSettings;
use wrenn::db::sandboxes::{self, NewSandbox};
use wrenn::id::{HostId, SandboxId};

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PATCH: Method = Method::PATCH;
const DELETE: Method = Method::DELETE;

/// A client that checks every response against the reference spec.
struct Checked<'a> {
    cp: &'a TestCp,
    spec: &'a Spec,
}

impl Checked<'_> {
    /// Calls the API and checks the response against the reference spec for `template`.
    async fn checked(
        &self,
        method: Method,
        template: &str,
        path: &str,
        auth: &Auth,
        body: Option<Value>,
        want: StatusCode,
    ) -> Value {
        let (status, value) = self.cp.call(method.clone(), path, auth, body).await;
        assert_eq!(status, want, "{method} {path}: {value}");
        self.spec
            .check_response(method.as_str(), template, status.as_u16(), &value);
        value
    }
}

async fn signup_checked(cp: &TestCp, spec: &Spec, email: &str) -> User {
    let body = Checked { cp, spec }
        .checked(
            POST,
            "/v1/auth/signup",
            "/v1/auth/signup",
            &Auth::None,
            Some(json!({"email": email, "password": "correct horse battery", "name": "Ada"})),
            StatusCode::CREATED,
        )
        .await;
    spec.check_component("AuthResponse", &body);
    User::from_auth(&body)
}

#[tokio::test]
async fn every_endpoint_happy_path_matches_the_reference() {
    let cp = TestCp::start().await;
    let spec = Spec::reference();
    let ours = Spec::ours();
    let api = Checked {
        cp: &cp,
        spec: &spec,
    };

    let (status, health) = cp.call(GET, "/health", &Auth::None, None).await;
    assert_eq!(status, StatusCode::OK);
    ours.check_response("GET", "/health", 200, &health);
    let (status, yaml) = cp.call(GET, "/openapi.yaml", &Auth::None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(yaml.as_str().unwrap().contains("/v1/hosts/register"));

    // Accounts.
    let admin = signup_checked(&cp, &spec, "admin@example.com").await;
    let bob = signup_checked(&cp, &spec, "bob@example.com").await;
    let login = api
        .checked(
            POST,
            "/v1/auth/login",
            "/v1/auth/login",
            &Auth::None,
            Some(json!({"email": "ADMIN@example.com", "password": "correct horse battery"})),
            StatusCode::OK,
        )
        .await;
    assert_eq!(login["user_id"], admin.id.as_str());
    assert_eq!(login["team_id"], admin.team.as_str());
    let me = api
        .checked(GET, "/v1/me", "/v1/me", &admin.auth(), None, StatusCode::OK)
        .await;
    assert_eq!(me["email"], "admin@example.com");
    let renamed = api
        .checked(
            PATCH,
            "/v1/me",
            "/v1/me",
            &admin.auth(),
            Some(json!({"name": "Ada L"})),
            StatusCode::OK,
        )
        .await;
    assert_eq!(renamed["name"], "Ada L");
    // The same API answers under /api for SDK base URLs ending in /api.
    let (status, me2) = cp.call(GET, "/api/v1/me", &admin.auth(), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me2["name"], "Ada L");

    // Teams and members.
    let teams = api
        .checked(
            GET,
            "/v1/teams",
            "/v1/teams",
            &admin.auth(),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(teams.as_array().unwrap().len(), 1);
    assert_eq!(teams[0]["role"], "owner");
    let team = api
        .checked(
            POST,
            "/v1/teams",
            "/v1/teams",
            &admin.auth(),
            Some(json!({"name": "Research Lab"})),
            StatusCode::CREATED,
        )
        .await;
    let team_id = team["id"].as_str().unwrap().to_owned();
    assert_eq!(team["role"], "owner");
    let admin_t = cp.switch(&admin, &team_id).await;
    api.checked(
        POST,
        "/v1/auth/switch-team",
        "/v1/auth/switch-team",
        &admin.auth(),
        Some(json!({"team_id": team_id})),
        StatusCode::OK,
    )
    .await;
    let t = format!("/v1/teams/{team_id}");
    api.checked(
        PATCH,
        "/v1/teams/{id}",
        &t,
        &admin_t.auth(),
        Some(json!({"name": "Research"})),
        StatusCode::NO_CONTENT,
    )
    .await;
    let member = api
        .checked(
            POST,
            "/v1/teams/{id}/members",
            &format!("{t}/members"),
            &admin_t.auth(),
            Some(json!({"email": "bob@example.com"})),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(member["role"], "member");
    api.checked(
        PATCH,
        "/v1/teams/{id}/members/{uid}",
        &format!("{t}/members/{}", bob.id),
        &admin_t.auth(),
        Some(json!({"role": "admin"})),
        StatusCode::NO_CONTENT,
    )
    .await;
    let members = api
        .checked(
            GET,
            "/v1/teams/{id}/members",
            &format!("{t}/members"),
            &admin_t.auth(),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(members.as_array().unwrap().len(), 2);
    let detail = api
        .checked(
            GET,
            "/v1/teams/{id}",
            &t,
            &admin_t.auth(),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(detail["team"]["name"], "Research");
    assert!(detail["members"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["user_id"] == bob.id.as_str() && m["role"] == "admin"));
    let bob_t = cp.switch(&bob, &team_id).await;
    api.checked(
        POST,
        "/v1/teams/{id}/leave",
        &format!("{t}/leave"),
        &bob_t.auth(),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    let (_, again) = cp
        .call(
            POST,
            &format!("{t}/members"),
            &admin_t.auth(),
            Some(json!({"email": "bob@example.com"})),
        )
        .await;
    assert_eq!(again["role"], "member");
    api.checked(
        DELETE,
        "/v1/teams/{id}/members/{uid}",
        &format!("{t}/members/{}", bob.id),
        &admin_t.auth(),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;

    // API keys: the plaintext once, then listing by JWT and by the key itself.
    let key = api
        .checked(
            POST,
            "/v1/api-keys",
            "/v1/api-keys",
            &admin.auth(),
            Some(json!({"name": "ci"})),
            StatusCode::CREATED,
        )
        .await;
    let plaintext = key["key"].as_str().unwrap().to_owned();
    assert!(
        plaintext.starts_with("wrn_") && plaintext.len() == 36,
        "{plaintext}"
    );
    assert!(plaintext.starts_with(key["key_prefix"].as_str().unwrap().trim_end_matches("...")));
    assert!(key["last_used"].is_null());
    let default_named = api
        .checked(
            POST,
            "/v1/api-keys",
            "/v1/api-keys",
            &admin.auth(),
            Some(json!({})),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(default_named["name"], "Unnamed API Key");
    let listed = api
        .checked(
            GET,
            "/v1/api-keys",
            "/v1/api-keys",
            &Auth::ApiKey(plaintext.clone()),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("key").is_none()),
        "plaintext listed: {listed}"
    );
    let listed = api
        .checked(
            GET,
            "/v1/api-keys",
            "/v1/api-keys",
            &admin.auth(),
            None,
            StatusCode::OK,
        )
        .await;
    let used = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key["id"])
        .unwrap();
    assert!(
        used["last_used"].is_string(),
        "last_used not recorded: {used}"
    );
    api.checked(
        DELETE,
        "/v1/api-keys/{id}",
        &format!("/v1/api-keys/{}", key["id"].as_str().unwrap()),
        &admin.auth(),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    let (status, _) = cp
        .call(GET, "/v1/api-keys", &Auth::ApiKey(plaintext), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "revoked key still works");

    // Hosts: create, register, heartbeat, refresh, inspect, tag, delete.
    let created = api.checked(POST,
        "/v1/hosts",
        "/v1/hosts",
        &admin.auth(),
        Some(json!({"type": "regular", "provider": "bare-metal", "availability_zone": "eu-west"})),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(created["host"]["status"], "pending");
    let host_id = created["host"]["id"].as_str().unwrap().to_owned();
    let h = format!("/v1/hosts/{host_id}");
    let regenerated = api
        .checked(
            POST,
            "/v1/hosts/{id}/token",
            &format!("{h}/token"),
            &admin.auth(),
            None,
            StatusCode::CREATED,
        )
        .await;
    let token = regenerated["registration_token"].as_str().unwrap();
    assert_eq!(token.len(), 64);
    let creds = api
        .checked(
            POST,
            "/v1/hosts/register",
            "/v1/hosts/register",
            &Auth::None,
            Some(register_body(token)),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(creds["host"]["status"], "online");
    assert_eq!(creds["host"]["cpu_cores"], 8);
    assert_eq!(creds["host"]["address"], "10.0.0.5:50051");
    assert_eq!(creds["agent_secret"].as_str().unwrap().len(), 64);
    let host_token = Auth::Host(creds["token"].as_str().unwrap().to_owned());
    api.checked(
        POST,
        "/v1/hosts/{id}/heartbeat",
        &format!("{h}/heartbeat"),
        &host_token,
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    let refreshed = api
        .checked(
            POST,
            "/v1/hosts/auth/refresh",
            "/v1/hosts/auth/refresh",
            &Auth::None,
            Some(json!({"refresh_token": creds["refresh_token"]})),
            StatusCode::OK,
        )
        .await;
    assert_ne!(refreshed["refresh_token"], creds["refresh_token"]);
    assert_eq!(
        refreshed["agent_secret"], creds["agent_secret"],
        "refresh keeps the agent secret"
    );
    api.checked(
        POST,
        "/v1/hosts/{id}/heartbeat",
        &format!("{h}/heartbeat"),
        &Auth::Host(refreshed["token"].as_str().unwrap().to_owned()),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    let got = api
        .checked(
            GET,
            "/v1/hosts/{id}",
            &h,
            &admin.auth(),
            None,
            StatusCode::OK,
        )
        .await;
    assert!(got["last_heartbeat_at"].is_string());
    assert_eq!(got["created_by"], admin.id.as_str());
    let hosts = api
        .checked(
            GET,
            "/v1/hosts",
            "/v1/hosts",
            &admin.auth(),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(hosts.as_array().unwrap().len(), 1);
    api.checked(
        POST,
        "/v1/hosts/{id}/tags",
        &format!("{h}/tags"),
        &admin.auth(),
        Some(json!({"tag": "gpu"})),
        StatusCode::NO_CONTENT,
    )
    .await;
    api.checked(
        POST,
        "/v1/hosts/{id}/tags",
        &format!("{h}/tags"),
        &admin.auth(),
        Some(json!({"tag": "eu-1"})),
        StatusCode::NO_CONTENT,
    )
    .await;
    let tags = api
        .checked(
            GET,
            "/v1/hosts/{id}/tags",
            &format!("{h}/tags"),
            &admin.auth(),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(tags, json!(["eu-1", "gpu"]));
    api.checked(
        DELETE,
        "/v1/hosts/{id}/tags/{tag}",
        &format!("{h}/tags/gpu"),
        &admin.auth(),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    let preview = api
        .checked(
            GET,
            "/v1/hosts/{id}/delete-preview",
            &format!("{h}/delete-preview"),
            &admin.auth(),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(preview["sandbox_ids"], json!([]));
    api.checked(
        DELETE,
        "/v1/hosts/{id}",
        &h,
        &admin.auth(),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    let (status, _) = cp
        .call(POST, &format!("{h}/heartbeat"), &host_token, None)
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a deleted host's heartbeat is 404 so the agent stops"
    );

    // A BYOC host by a team owner who is not a platform admin.
    let (_, byoc) = cp
        .registered_host(&bob, json!({"type": "byoc", "team_id": bob.team}))
        .await;
    assert_eq!(byoc["host"]["type"], "byoc");
    assert_eq!(byoc["host"]["team_id"], bob.team.as_str());
    let bob_hosts = api
        .checked(
            GET,
            "/v1/hosts",
            "/v1/hosts",
            &bob.auth(),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(bob_hosts.as_array().unwrap().len(), 1);

    // Deleting a team.
    api.checked(
        DELETE,
        "/v1/teams/{id}",
        &t,
        &admin_t.auth(),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    let (status, body) = cp.call(GET, &t, &admin_t.auth(), None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    // What changed was recorded, with who did it.
    let audited: Vec<(String, String, String)> =
        sqlx::query_as("SELECT resource_type, action, actor_type FROM audit_logs")
            .fetch_all(&cp.db)
            .await
            .unwrap();
    for (resource, action, actor) in [
        ("api_key", "create", "user"),
        ("api_key", "revoke", "user"),
        ("host", "create", "user"),
        ("host", "register", "host"),
        ("host", "delete", "user"),
        ("team", "delete", "user"),
    ] {
        let want = (resource.to_owned(), action.to_owned(), actor.to_owned());
        assert!(audited.contains(&want), "{want:?} not audited: {audited:?}");
    }
    cp.stop().await;
}

#[tokio::test]
async fn authorization_matrix() {
    let cp = TestCp::start().await;
    let admin = cp.signup("root@example.com").await;
    let alice = cp.signup("alice@example.com").await;
    let bob = cp.signup("bob@example.com").await;
    let mallory = cp.signup("mallory@example.com").await;
    let a_team = format!("/v1/teams/{}", alice.team);

    // Bob joins Alice's team as a plain member.
    let (status, _) = cp
        .call(
            POST,
            &format!("{a_team}/members"),
            &alice.auth(),
            Some(json!({"email": bob.email})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let bob_in_a = cp.switch(&bob, &alice.team).await;

    let (_, key) = cp
        .call(
            POST,
            "/v1/api-keys",
            &alice.auth(),
            Some(json!({"name": "alice"})),
        )
        .await;
    let alice_key = key["key"].as_str().unwrap().to_owned();
    let alice_key_id = key["id"].as_str().unwrap().to_owned();
    let (_, key) = cp
        .call(
            POST,
            "/v1/api-keys",
            &mallory.auth(),
            Some(json!({"name": "mallory"})),
        )
        .await;
    let mallory_key = key["key"].as_str().unwrap().to_owned();
    let (byoc_id, creds) = cp
        .registered_host(&alice, json!({"type": "byoc", "team_id": alice.team}))
        .await;
    let byoc = format!("/v1/hosts/{byoc_id}");
    let (regular_id, _) = cp.registered_host(&admin, json!({"type": "regular"})).await;

    // Team B (mallory) cannot see or change team A's team, members, keys or BYOC hosts.
    let forbidden_or_missing = [StatusCode::FORBIDDEN, StatusCode::NOT_FOUND];
    for (method, path, body) in [
        (GET, a_team.clone(), None),
        (PATCH, a_team.clone(), Some(json!({"name": "pwned"}))),
        (DELETE, a_team.clone(), None),
        (GET, format!("{a_team}/members"), None),
        (
            POST,
            format!("{a_team}/members"),
            Some(json!({"email": "mallory@example.com"})),
        ),
        (
            PATCH,
            format!("{a_team}/members/{}", bob.id),
            Some(json!({"role": "admin"})),
        ),
        (DELETE, format!("{a_team}/members/{}", bob.id), None),
        (DELETE, format!("/v1/api-keys/{alice_key_id}"), None),
        (GET, byoc.clone(), None),
        (DELETE, byoc.clone(), None),
        (GET, format!("{byoc}/tags"), None),
        (POST, format!("{byoc}/tags"), Some(json!({"tag": "x"}))),
        (GET, format!("{byoc}/delete-preview"), None),
        (POST, format!("{byoc}/token"), None),
        (
            POST,
            "/v1/hosts".to_owned(),
            Some(json!({"type": "byoc", "team_id": alice.team})),
        ),
        (
            POST,
            "/v1/hosts".to_owned(),
            Some(json!({"type": "regular"})),
        ),
        (GET, format!("/v1/hosts/{regular_id}"), None),
    ] {
        let (status, body_out) = cp.call(method.clone(), &path, &mallory.auth(), body).await;
        assert!(
            forbidden_or_missing.contains(&status),
            "mallory {method} {path}: {status} {body_out}"
        );
        assert!(body_out["error"]["code"].is_string(), "{body_out}");
    }
    let (status, body) = cp
        .call(
            POST,
            "/v1/auth/switch-team",
            &mallory.auth(),
            Some(json!({"team_id": alice.team})),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (_, listed) = cp.call(GET, "/v1/hosts", &mallory.auth(), None).await;
    assert_eq!(listed, json!([]));
    let (_, listed) = cp
        .call(GET, "/v1/api-keys", &Auth::ApiKey(mallory_key), None)
        .await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["team_id"], mallory.team.as_str());
    let (_, listed) = cp
        .call(GET, "/v1/api-keys", &Auth::ApiKey(alice_key.clone()), None)
        .await;
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["team_id"] == alice.team.as_str()));

    // A plain member (bob in team A) can look but not administer.
    let (status, _) = cp.call(GET, &byoc, &bob_in_a.auth(), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = cp
        .call(GET, &format!("{a_team}/members"), &bob_in_a.auth(), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    for (method, path, body) in [
        (PATCH, a_team.clone(), Some(json!({"name": "mine"}))),
        (DELETE, a_team.clone(), None),
        (
            POST,
            format!("{a_team}/members"),
            Some(json!({"email": "mallory@example.com"})),
        ),
        (
            PATCH,
            format!("{a_team}/members/{}", alice.id),
            Some(json!({"role": "member"})),
        ),
        (DELETE, format!("{a_team}/members/{}", alice.id), None),
        (DELETE, format!("/v1/api-keys/{alice_key_id}"), None),
        (DELETE, byoc.clone(), None),
        (POST, format!("{byoc}/tags"), Some(json!({"tag": "x"}))),
        (
            POST,
            "/v1/hosts".to_owned(),
            Some(json!({"type": "byoc", "team_id": alice.team})),
        ),
        (
            POST,
            "/v1/hosts".to_owned(),
            Some(json!({"type": "regular"})),
        ),
    ] {
        let (status, body_out) = cp.call(method.clone(), &path, &bob_in_a.auth(), body).await;
        assert_error(status, &body_out, StatusCode::FORBIDDEN, "forbidden");
    }
    // Owners: not platform admins, cannot leave, cannot be demoted.
    let (status, body) = cp
        .call(
            POST,
            "/v1/hosts",
            &alice.auth(),
            Some(json!({"type": "regular"})),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = cp
        .call(POST, &format!("{a_team}/leave"), &alice.auth(), None)
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = cp
        .call(
            PATCH,
            &format!("{a_team}/members/{}", alice.id),
            &alice.auth(),
            Some(json!({"role": "member"})),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    // A team's token cannot act on another team it belongs to without switching.
    let (status, body) = cp.call(GET, &a_team, &bob.auth(), None).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    // The platform admin sees every host.
    let (_, all) = cp.call(GET, "/v1/hosts", &admin.auth(), None).await;
    assert_eq!(all.as_array().unwrap().len(), 2);

    // Tokens: host tokens cannot call user endpoints; user JWTs cannot heartbeat; forged,
    // expired and wrong-type tokens are 401.
    let host_token = creds["token"].as_str().unwrap().to_owned();
    for auth in [
        Auth::Host(host_token.clone()),
        Auth::Bearer(host_token.clone()),
    ] {
        let (status, body) = cp.call(GET, "/v1/me", &auth, None).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
        let (status, body) = cp.call(GET, "/v1/api-keys", &auth, None).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    for auth in [
        Auth::Bearer(alice.token.clone()),
        Auth::Host(alice.token.clone()),
        Auth::ApiKey(alice_key.clone()),
    ] {
        let (status, body) = cp
            .call(POST, &format!("{byoc}/heartbeat"), &auth, None)
            .await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let (status, body) = cp
        .call(
            POST,
            &format!("/v1/hosts/{regular_id}/heartbeat"),
            &Auth::Host(host_token),
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let forged = wrenn::cp::tokens::TokenKeys::new(&[9u8; 32])
        .unwrap()
        .issue_user(
            alice.id.parse().unwrap(),
            alice.team.parse().unwrap(),
            &alice.email,
            "x",
            true,
        );
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": alice.id, "team_id": alice.team, "email": alice.email, "name": "x", "is_admin": false,
                "typ": "user", "iat": 1, "exp": 2}),
        &jsonwebtoken::EncodingKey::from_secret(support::JWT_SECRET),
    ).unwrap();
    for auth in [
        Auth::Bearer(forged),
        Auth::Bearer(expired),
        Auth::Bearer("garbage".into()),
        Auth::ApiKey("wrn_nope".into()),
        Auth::None,
    ] {
        let (status, body) = cp.call(GET, "/v1/api-keys", &auth, None).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    cp.stop().await;
}

#[tokio::test]
async fn bad_input_is_a_clear_400_never_a_500() {
    let cp = TestCp::start().await;
    let user = cp.signup("x@example.com").await;
    let auth_header = format!("Bearer {}", user.token);
    let h: &[(&str, &str)] = &[("authorization", &auth_header)];
    let json = Some("application/json");
    let cases: Vec<(&str, Option<&str>, Vec<u8>, &str)> = vec![
        ("/v1/teams", json, b"{\"name\": ".to_vec(), "invalid JSON"),
        ("/v1/teams", json, b"{\"name\": 5}".to_vec(), "`name`"),
        (
            "/v1/teams",
            json,
            b"{\"name\": \"ok\", \"owner\": 1}".to_vec(),
            "owner",
        ),
        ("/v1/teams", json, b"{}".to_vec(), "name"),
        ("/v1/teams", json, b"[]".to_vec(), "invalid JSON body"),
        ("/v1/teams", json, b"".to_vec(), "empty"),
        (
            "/v1/teams",
            None,
            b"{\"name\": \"ok\"}".to_vec(),
            "Content-Type",
        ),
        (
            "/v1/teams",
            json,
            b"{\"name\": \"bad-name!\"}".to_vec(),
            "name",
        ),
        ("/v1/hosts", json, b"{\"type\": \"gpu\"}".to_vec(), "type"),
        (
            "/v1/hosts",
            json,
            b"{\"type\": \"byoc\"}".to_vec(),
            "team_id",
        ),
        (
            "/v1/hosts",
            json,
            b"{\"type\": \"byoc\", \"team_id\": \"team-nope\"}".to_vec(),
            "team_id",
        ),
        (
            "/v1/auth/switch-team",
            json,
            b"{\"team_id\": \"usr-0000000000000000000000000\"}".to_vec(),
            "team_id",
        ),
        (
            "/v1/auth/signup",
            json,
            b"{\"email\": \"a@b\", \"password\": \"short\", \"name\": \"n\"}".to_vec(),
            "password",
        ),
        (
            "/v1/auth/signup",
            json,
            b"{\"email\": \"nope\", \"password\": \"long enough\", \"name\": \"n\"}".to_vec(),
            "email",
        ),
        (
            "/v1/hosts/register",
            json,
            b"{\"token\": \"t\", \"address\": \"not an address\"}".to_vec(),
            "address",
        ),
        (
            "/v1/hosts/register",
            json,
            b"{\"token\": \"t\", \"address\": \"1.2.3.4:5\", \"cpu_cores\": -1}".to_vec(),
            "cpu_cores",
        ),
    ];
    for (path, ct, body, needle) in cases {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let (status, out) = cp.raw(POST, path, h, ct, body).await;
        assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");
        let message = out["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{path} {shown}: `{message}` should mention {needle}"
        );
    }
    // Oversized bodies: 413 with the envelope.
    let big = format!("{{\"name\": \"{}\"}}", "a".repeat(2 * 1024 * 1024));
    let (status, out) = cp.raw(POST, "/v1/teams", h, json, big.into_bytes()).await;
    assert_error(status, &out, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    // Bad IDs in paths name the parameter.
    for path in [
        "/v1/hosts/nope",
        "/v1/hosts/team-0000000000000000000000000",
        "/v1/teams/team-zzzzzzzzzzzzzzzzzzzzzzzzz",
        "/v1/api-keys/key-1",
    ] {
        let (status, out) = cp
            .raw(
                if path.contains("api-keys") {
                    DELETE
                } else {
                    GET
                },
                path,
                h,
                None,
                vec![],
            )
            .await;
        assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(
            out["error"]["message"].as_str().unwrap().contains("`id`"),
            "{out}"
        );
    }
    let (status, out) = cp
        .raw(
            DELETE,
            &format!("/v1/teams/{}/members/bob", user.team),
            h,
            None,
            vec![],
        )
        .await;
    assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        out["error"]["message"].as_str().unwrap().contains("`uid`"),
        "{out}"
    );
    let (status, out) = cp
        .raw(
            DELETE,
            &format!("/v1/hosts/{}?force=maybe", HostId::new_random()),
            h,
            None,
            vec![],
        )
        .await;
    assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");
    // Unknown routes and methods keep the envelope.
    let (status, out) = cp.raw(GET, "/v1/nothing", h, None, vec![]).await;
    assert_error(status, &out, StatusCode::NOT_FOUND, "not_found");
    let (status, out) = cp.raw(Method::PUT, "/v1/teams", h, None, vec![]).await;
    assert_error(
        status,
        &out,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    // Duplicate signup and wrong password.
    let (status, out) = cp
        .call(
            POST,
            "/v1/auth/signup",
            &Auth::None,
            Some(json!({"email": "X@example.com", "password": "long enough", "name": "n"})),
        )
        .await;
    assert_error(status, &out, StatusCode::CONFLICT, "email_taken");
    let (status, out) = cp
        .call(
            POST,
            "/v1/auth/login",
            &Auth::None,
            Some(json!({"email": "x@example.com", "password": "wrong password"})),
        )
        .await;
    assert_error(status, &out, StatusCode::UNAUTHORIZED, "unauthorized");
    // Adding an existing member is 400 as the spec says; an unknown email 404.
    let (status, out) = cp
        .call(
            POST,
            &format!("/v1/teams/{}/members", user.team),
            &user.auth(),
            Some(json!({"email": "x@example.com"})),
        )
        .await;
    assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, out) = cp
        .call(
            POST,
            &format!("/v1/teams/{}/members", user.team),
            &user.auth(),
            Some(json!({"email": "who@example.com"})),
        )
        .await;
    assert_error(status, &out, StatusCode::NOT_FOUND, "not_found");
    cp.stop().await;
}

#[tokio::test]
async fn registration_tokens_are_single_use_expire_and_rotate() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;

    // Two agents race with one token: exactly one registers.
    let (_, created) = cp
        .call(
            POST,
            "/v1/hosts",
            &admin.auth(),
            Some(json!({"type": "regular"})),
        )
        .await;
    let token = created["registration_token"].as_str().unwrap().to_owned();
    let host_path = format!("/v1/hosts/{}", created["host"]["id"].as_str().unwrap());
    let (a, b) = tokio::join!(
        cp.call(
            POST,
            "/v1/hosts/register",
            &Auth::None,
            Some(register_body(&token))
        ),
        cp.call(
            POST,
            "/v1/hosts/register",
            &Auth::None,
            Some(register_body(&token))
        ),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::CREATED, StatusCode::UNAUTHORIZED],
        "{a:?} {b:?}"
    );
    let creds = if a.0 == StatusCode::CREATED { a.1 } else { b.1 };
    let (status, out) = cp
        .call(
            POST,
            "/v1/hosts/register",
            &Auth::None,
            Some(register_body(&token)),
        )
        .await;
    assert_error(status, &out, StatusCode::UNAUTHORIZED, "unauthorized");
    // A registered host gets no new registration token.
    let (status, out) = cp
        .call(POST, &format!("{host_path}/token"), &admin.auth(), None)
        .await;
    assert_error(status, &out, StatusCode::CONFLICT, "invalid_state");

    // Expiry after one hour (moved into the past here).
    let (_, created) = cp
        .call(
            POST,
            "/v1/hosts",
            &admin.auth(),
            Some(json!({"type": "regular"})),
        )
        .await;
    let old_token = created["registration_token"].as_str().unwrap().to_owned();
    let pending = format!("/v1/hosts/{}", created["host"]["id"].as_str().unwrap());
    let expires: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT expires_at FROM host_registration_tokens ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(&cp.db)
    .await
    .unwrap();
    let lifetime = expires - chrono::Utc::now();
    assert!(
        (3590..=3600).contains(&lifetime.num_seconds()),
        "{lifetime}"
    );
    sqlx::query("UPDATE host_registration_tokens SET expires_at = now() - interval '1 second'")
        .execute(&cp.db)
        .await
        .unwrap();
    let (status, out) = cp
        .call(
            POST,
            "/v1/hosts/register",
            &Auth::None,
            Some(register_body(&old_token)),
        )
        .await;
    assert_error(status, &out, StatusCode::UNAUTHORIZED, "unauthorized");
    // A regenerated token works; it also retires any older unused one.
    let (_, first) = cp
        .call(POST, &format!("{pending}/token"), &admin.auth(), None)
        .await;
    let (_, second) = cp
        .call(POST, &format!("{pending}/token"), &admin.auth(), None)
        .await;
    let (status, _) = cp
        .call(
            POST,
            "/v1/hosts/register",
            &Auth::None,
            Some(register_body(first["registration_token"].as_str().unwrap())),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "superseded token still works"
    );
    let (status, out) = cp
        .call(
            POST,
            "/v1/hosts/register",
            &Auth::None,
            Some(register_body(
                second["registration_token"].as_str().unwrap(),
            )),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{out}");

    // Refresh tokens rotate: once the next one has been used, the old one is dead (reuse
    // detection and the retry grace window are covered in cp_credentials.rs).
    let old_refresh = creds["refresh_token"].clone();
    let (status, fresh) = cp
        .call(
            POST,
            "/v1/hosts/auth/refresh",
            &Auth::None,
            Some(json!({"refresh_token": old_refresh})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{fresh}");
    let (status, _) = cp
        .call(
            POST,
            "/v1/hosts/auth/refresh",
            &Auth::None,
            Some(json!({"refresh_token": fresh["refresh_token"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, out) = cp
        .call(
            POST,
            "/v1/hosts/auth/refresh",
            &Auth::None,
            Some(json!({"refresh_token": old_refresh})),
        )
        .await;
    assert_error(status, &out, StatusCode::UNAUTHORIZED, "unauthorized");
    cp.stop().await;
}

#[tokio::test]
async fn deleting_a_host_with_capsules_needs_force() {
    let cp = TestCp::start().await;
    let spec = Spec::reference();
    let admin = cp.signup("admin@example.com").await;
    let (host_id, _) = cp.registered_host(&admin, json!({"type": "regular"})).await;
    let host: HostId = host_id.parse().unwrap();
    let sandbox = SandboxId::new_random();
    sandboxes::insert(
        &cp.db,
        NewSandbox {
            id: sandbox.uuid(),
            team_id: admin.team.parse::<wrenn::id::TeamId>().unwrap().uuid(),
            host_id: Some(host.uuid()),
            template_id: uuid::Uuid::nil(),
            status: sandboxes::SandboxStatus::Running,
            vcpus: 1,
            memory_mb: 512,
        },
    )
    .await
    .unwrap();
    let path = format!("/v1/hosts/{host_id}");
    let (status, out) = cp.call(DELETE, &path, &admin.auth(), None).await;
    assert_error(status, &out, StatusCode::CONFLICT, "host_has_sandboxes");
    spec.check_response("DELETE", "/v1/hosts/{id}", 409, &out);
    assert_eq!(out["error"]["sandbox_ids"], json!([sandbox.to_string()]));
    let (_, preview) = cp
        .call(GET, &format!("{path}/delete-preview"), &admin.auth(), None)
        .await;
    assert_eq!(preview["sandbox_ids"], json!([sandbox.to_string()]));
    let (status, _) = cp
        .call(DELETE, &format!("{path}?force=true"), &admin.auth(), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let status: String = sqlx::query_scalar("SELECT status FROM sandboxes WHERE id = $1")
        .bind(sandbox.uuid())
        .fetch_one(&cp.db)
        .await
        .unwrap();
    assert_eq!(status, "stopped");
    cp.stop().await;
}

async fn host_status(cp: &TestCp, admin: &User, path: &str) -> String {
    let (_, host) = cp.call(GET, path, &admin.auth(), None).await;
    host["status"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn host_monitor_marks_silent_hosts_unreachable_and_heartbeats_revive_them() {
    let cp = TestCp::start_with(MonitorSettings {
        interval: Duration::from_millis(100),
        unreachable_after: Duration::from_secs(1),
    })
    .await;
    let admin = cp.signup("admin@example.com").await;
    let (host_id, creds) = cp.registered_host(&admin, json!({"type": "regular"})).await;
    let (pending_id, _) = {
        let (_, created) = cp
            .call(
                POST,
                "/v1/hosts",
                &admin.auth(),
                Some(json!({"type": "regular"})),
            )
            .await;
        (created["host"]["id"].as_str().unwrap().to_owned(), ())
    };
    let path = format!("/v1/hosts/{host_id}");
    let host_auth = Auth::Host(creds["token"].as_str().unwrap().to_owned());
    // Heartbeats keep it online past the threshold.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, _) = cp
            .call(POST, &format!("{path}/heartbeat"), &host_auth, None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(host_status(&cp, &admin, &path).await, "online");
    }
    // Silence makes it unreachable.
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_status(&cp, &admin, &path).await != "unreachable" {
        assert!(Instant::now() < deadline, "host never became unreachable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The next heartbeat brings it back at once.
    let (status, _) = cp
        .call(POST, &format!("{path}/heartbeat"), &host_auth, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(host_status(&cp, &admin, &path).await, "online");
    // Pending hosts are not the monitor's business.
    assert_eq!(
        host_status(&cp, &admin, &format!("/v1/hosts/{pending_id}")).await,
        "pending"
    );
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_503_and_recovers_without_restart() {
    let mut cp = TestCp::start().await;
    let user = cp.signup("x@example.com").await;
    let (_, key) = cp
        .call(POST, "/v1/api-keys", &user.auth(), Some(json!({})))
        .await;
    let key = Auth::ApiKey(key["key"].as_str().unwrap().to_owned());

    tokio::task::block_in_place(|| cp.pg.stop());
    let (status, health) = cp.call(GET, "/health", &Auth::None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    assert_eq!(health["database"], "unavailable");
    for (path, auth) in [("/v1/me", user.auth()), ("/v1/api-keys", key.clone())] {
        let (status, body) = cp.call(GET, path, &auth, None).await;
        assert_error(
            status,
            &body,
            StatusCode::SERVICE_UNAVAILABLE,
            "db_unavailable",
        );
    }
    let (status, body) = cp
        .call(
            POST,
            "/v1/auth/login",
            &Auth::None,
            Some(json!({"email": "x@example.com", "password": "correct horse battery"})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "db_unavailable",
    );

    tokio::task::block_in_place(|| cp.pg.restart()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = cp.call(GET, "/health", &Auth::None, None).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "health never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = cp.call(GET, "/v1/me", &user.auth(), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = cp.call(GET, "/v1/api-keys", &key, None).await;
    assert_eq!(status, StatusCode::OK);
    cp.stop().await;
}

/// A call into a capsule checks its credentials in the same query that finds the capsule, with
/// nothing cached: a revoked key, a removed member and a stopped capsule lose access on the very
/// next request.
#[tokio::test]
async fn capsule_calls_lose_access_at_once() {
    let cp = TestCp::start().await;
    let owner = cp.signup("owner@example.com").await;
    let bob = cp.signup("bob@example.com").await;
    let team = owner.team.parse::<wrenn::id::TeamId>().unwrap();
    let sandbox = SandboxId::new_random();
    sandboxes::insert(
        &cp.db,
        NewSandbox {
            id: sandbox.uuid(),
            team_id: team.uuid(),
            host_id: None,
            template_id: uuid::Uuid::nil(),
            status: sandboxes::SandboxStatus::Running,
            vcpus: 1,
            memory_mb: 512,
        },
    )
    .await
    .unwrap();
    let ping = format!("/v1/capsules/{sandbox}/ping");
    let (status, key) = cp
        .call(
            POST,
            "/v1/api-keys",
            &owner.auth(),
            Some(json!({"name": "ci"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let key = Auth::ApiKey(key["key"].as_str().unwrap().to_owned());

    // Found and running, but its host is gone: the credentials passed.
    let (status, out) = cp.call(POST, &ping, &key, None).await;
    assert_error(
        status,
        &out,
        StatusCode::SERVICE_UNAVAILABLE,
        "host_unavailable",
    );
    let other = format!("/v1/capsules/{}/ping", SandboxId::new_random());
    let (status, out) = cp.call(POST, &other, &key, None).await;
    assert_error(status, &out, StatusCode::NOT_FOUND, "not_found");
    let (status, out) = cp
        .call(POST, "/v1/capsules/nope/ping", &Auth::None, None)
        .await;
    assert_error(status, &out, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, out) = cp.call(POST, "/v1/capsules/nope/ping", &key, None).await;
    assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");

    // Another team's member does not see it; a member of this team does, until removed.
    let (status, out) = cp.call(POST, &ping, &bob.auth(), None).await;
    assert_error(status, &out, StatusCode::NOT_FOUND, "not_found");
    let members = format!("/v1/teams/{}/members", owner.team);
    let (status, out) = cp
        .call(
            POST,
            &members,
            &owner.auth(),
            Some(json!({"email": bob.email})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{out}");
    let bob_in_team = cp.switch(&bob, &owner.team).await;
    let (status, out) = cp.call(POST, &ping, &bob_in_team.auth(), None).await;
    assert_error(
        status,
        &out,
        StatusCode::SERVICE_UNAVAILABLE,
        "host_unavailable",
    );
    let (status, out) = cp
        .call(
            DELETE,
            &format!("{members}/{}", bob.id),
            &owner.auth(),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{out}");
    let (status, out) = cp.call(POST, &ping, &bob_in_team.auth(), None).await;
    assert_error(status, &out, StatusCode::FORBIDDEN, "forbidden");

    // A stopped capsule is no longer running.
    let stop = sandboxes::Transition::to(sandboxes::SandboxStatus::Stopped);
    assert!(sandboxes::transition(&cp.db, sandbox.uuid(), stop)
        .await
        .unwrap());
    let (status, out) = cp.call(POST, &ping, &key, None).await;
    assert_error(status, &out, StatusCode::CONFLICT, "invalid_state");

    // A revoked key is refused on the next request.
    let (_, keys) = cp.call(GET, "/v1/api-keys", &owner.auth(), None).await;
    let key_id = keys[0]["id"].as_str().unwrap();
    let (status, out) = cp
        .call(
            DELETE,
            &format!("/v1/api-keys/{key_id}"),
            &owner.auth(),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{out}");
    let (status, out) = cp.call(POST, &ping, &key, None).await;
    assert_error(status, &out, StatusCode::UNAUTHORIZED, "unauthorized");
    cp.stop().await;
}

/// The reconciler visits hosts side by side: an agent that accepts the connection and never
/// answers holds up its own host's visit, not another host's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_agent_does_not_hold_up_reconciling_other_hosts() {
    use wrenn::cp::agent_client::{AgentClient, AgentTimeouts};
    use wrenn::cp::state::{AuthSettings, CapsuleSettings};

    // The kernel completes connections into the backlog; nothing ever reads them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hour = Duration::from_secs(3600);
    let capsules = CapsuleSettings {
        agents: AgentClient::new(AgentTimeouts {
            request: hour,
            create: hour,
        }),
        ..support::quiet_capsules()
    };
    let cp = TestCp::start_full(support::QUIET_MONITOR, capsules, AuthSettings::default()).await;
    let admin = cp.signup("admin@example.com").await;
    let mut sandbox_on = Vec::new();
    for (address, status) in [
        (silent.local_addr().unwrap().to_string(), "online"),
        ("10.0.0.5:50051".to_owned(), "unreachable"),
    ] {
        let (host, _) = cp.registered_host(&admin, json!({"type": "regular"})).await;
        let host = host.parse::<HostId>().unwrap().uuid();
        sqlx::query("UPDATE hosts SET address = $1, status = $2 WHERE id = $3")
            .bind(address)
            .bind(status)
            .bind(host)
            .execute(&cp.db)
            .await
            .unwrap();
        let sandbox = SandboxId::new_random();
        sandboxes::insert(
            &cp.db,
            NewSandbox {
                id: sandbox.uuid(),
                team_id: wrenn::id::TeamId::PLATFORM.uuid(),
                host_id: Some(host),
                template_id: uuid::Uuid::nil(),
                status: sandboxes::SandboxStatus::Running,
                vcpus: 1,
                memory_mb: 512,
            },
        )
        .await
        .unwrap();
        sandbox_on.push(sandbox.uuid());
    }
    let status_of = |id: uuid::Uuid| {
        let db = cp.db.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM sandboxes WHERE id = $1")
                .bind(id)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };

    // The hanging host was registered first, so a pass going host by host would never get
    // past it.
    let pass = tokio::spawn({
        let state = cp.state.clone();
        async move { wrenn::cp::reconciler::reconcile_once(&state).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_of(sandbox_on[1]).await != "missing" {
        assert!(
            Instant::now() < deadline,
            "the unreachable host was never visited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status_of(sandbox_on[0]).await, "running");
    assert!(!pass.is_finished());
    pass.abort();
    cp.stop().await;
}

async fn new_key(cp: &TestCp, user: &User) -> (String, Auth) {
    let (status, key) = cp
        .call(
            POST,
            "/v1/api-keys",
            &user.auth(),
            Some(json!({"name": "k"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    (
        key["id"].as_str().unwrap().to_owned(),
        Auth::ApiKey(key["key"].as_str().unwrap().to_owned()),
    )
}

/// The API keys a member created stop working when they leave the team or their account is
/// disabled; keys of other members and of the member's other teams do not.
#[tokio::test]
async fn removed_members_and_disabled_accounts_lose_their_api_keys() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let owner = cp.signup("owner@example.com").await;
    let bob = cp.signup("bob@example.com").await;
    let carol = cp.signup("carol@example.com").await;
    let members = format!("/v1/teams/{}/members", owner.team);
    for user in [&bob, &carol] {
        let (status, out) = cp
            .call(
                POST,
                &members,
                &owner.auth(),
                Some(json!({"email": user.email})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{out}");
    }
    let (_, owner_key) = new_key(&cp, &owner).await;
    let bob_in_team = cp.switch(&bob, &owner.team).await;
    let (_, bob_team_key) = new_key(&cp, &bob_in_team).await;
    let (_, bob_own_key) = new_key(&cp, &bob).await;
    let carol_in_team = cp.switch(&carol, &owner.team).await;
    let (_, carol_team_key) = new_key(&cp, &carol_in_team).await;
    let works = |auth: Auth| {
        let cp = &cp;
        async move { cp.call(GET, "/v1/capsules", &auth, None).await.0 == StatusCode::OK }
    };
    for key in [&owner_key, &bob_team_key, &bob_own_key, &carol_team_key] {
        assert!(works(key.clone()).await);
    }

    // Bob leaves the owner's team (removed by the owner): his key there is gone.
    let (status, out) = cp
        .call(
            DELETE,
            &format!("{members}/{}", bob.id),
            &owner.auth(),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{out}");
    let (status, out) = cp.call(GET, "/v1/capsules", &bob_team_key, None).await;
    assert_error(status, &out, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(works(bob_own_key.clone()).await);
    assert!(works(owner_key.clone()).await);
    let (_, keys) = cp.call(GET, "/v1/api-keys", &owner.auth(), None).await;
    assert_eq!(keys.as_array().unwrap().len(), 2, "{keys}");

    // Only platform admins enable and disable accounts, never their own.
    let active = |user: &User| format!("/v1/admin/users/{}/active", user.id);
    let disable = Some(json!({"active": false}));
    let (status, out) = cp
        .call(Method::PUT, &active(&carol), &owner.auth(), disable.clone())
        .await;
    assert_error(status, &out, StatusCode::FORBIDDEN, "forbidden");
    let (status, out) = cp
        .call(Method::PUT, &active(&admin), &admin.auth(), disable.clone())
        .await;
    assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");
    let unknown = format!(
        "/v1/admin/users/{}/active",
        wrenn::id::UserId(uuid::Uuid::new_v4())
    );
    let (status, out) = cp
        .call(Method::PUT, &unknown, &admin.auth(), disable.clone())
        .await;
    assert_error(status, &out, StatusCode::NOT_FOUND, "not_found");
    for body in [
        json!({}),
        json!({"active": "no"}),
        json!({"active": true, "x": 1}),
    ] {
        let (status, out) = cp
            .call(Method::PUT, &active(&carol), &admin.auth(), Some(body))
            .await;
        assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");
    }

    // Disabling Carol: her keys and tokens stop working, and so does her password.
    let (status, out) = cp
        .call(Method::PUT, &active(&carol), &admin.auth(), disable.clone())
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{out}");
    let (status, out) = cp.call(GET, "/v1/capsules", &carol_team_key, None).await;
    assert_error(status, &out, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, out) = cp
        .call(GET, "/v1/capsules", &carol_in_team.auth(), None)
        .await;
    assert_error(status, &out, StatusCode::FORBIDDEN, "account_deactivated");
    let login = json!({"email": carol.email, "password": "correct horse battery"});
    let (status, out) = cp
        .call(POST, "/v1/auth/login", &Auth::None, Some(login.clone()))
        .await;
    assert_error(status, &out, StatusCode::FORBIDDEN, "account_deactivated");
    assert!(works(owner_key.clone()).await);

    // Enabled again she signs in, but her deleted keys stay deleted.
    let (status, out) = cp
        .call(
            Method::PUT,
            &active(&carol),
            &admin.auth(),
            Some(json!({"active": true})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{out}");
    let (status, out) = cp
        .call(POST, "/v1/auth/login", &Auth::None, Some(login))
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let (status, out) = cp.call(GET, "/v1/capsules", &carol_team_key, None).await;
    assert_error(status, &out, StatusCode::UNAUTHORIZED, "unauthorized");
    cp.stop().await;
}

/// A WebSocket client, before it has authenticated, cannot make the control plane take a
/// message beyond the limit: the socket is closed, and the control plane serves on.
#[tokio::test]
async fn an_oversized_websocket_message_closes_the_socket_before_authentication() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let cp = TestCp::start().await;
    let id = SandboxId::new_random();
    let url = format!("ws://{}/v1/capsules/{id}/pty", cp.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let huge = "x".repeat(5 << 20);
    // The send itself may already fail once the server has closed the socket.
    let _ = ws.send(Message::Text(huge.into())).await;
    // Over the limit the message is never read: the one error frame says so, then the socket
    // closes.
    let answers = tokio::time::timeout(Duration::from_secs(10), async {
        let mut answers = Vec::new();
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return answers,
                Some(Ok(message)) => answers.push(message),
            }
        }
    })
    .await
    .expect("the socket stayed open");
    let texts: Vec<String> = answers
        .iter()
        .filter_map(|m| m.to_text().ok().map(str::to_owned))
        .collect();
    assert_eq!(texts.len(), 1, "{answers:?}");
    assert!(
        texts[0].contains("could not be read") && texts[0].contains("too long"),
        "{texts:?}"
    );
    let (status, _) = cp.call(GET, "/health", &Auth::None, None).await;
    assert_eq!(status, StatusCode::OK);
    cp.stop().await;
}

#[tokio::test]
async fn templates_list_the_builtins_for_every_team_by_type() {
    let cp = TestCp::start().await;
    let spec = Spec::reference();
    let ours = Spec::ours();
    let user = cp.signup("ada@example.com").await;
    let (status, key) = cp
        .call(
            POST,
            "/v1/api-keys",
            &user.auth(),
            Some(json!({"name": "t"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let key = Auth::ApiKey(key["key"].as_str().unwrap().to_owned());

    for auth in [&key, &user.auth()] {
        let (status, list) = cp.call(GET, "/v1/snapshots", auth, None).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        spec.check_response("GET", "/v1/snapshots", 200, &list);
        ours.check_response("GET", "/v1/snapshots", 200, &list);
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["minimal", "python", "busybox", "code-runner-beta"],
            "{list}"
        );
        let minimal = &list[0];
        assert_eq!(
            (
                &minimal["type"],
                &minimal["vcpus"],
                &minimal["memory_mb"],
                &minimal["platform"],
                &minimal["protected"]
            ),
            (
                &json!("base"),
                &json!(1),
                &json!(512),
                &json!(true),
                &json!(true)
            ),
            "{minimal}"
        );
        assert!(minimal["metadata"]["description"].is_string(), "{minimal}");
    }

    let (_, bases) = cp.call(GET, "/v1/snapshots?type=base", &key, None).await;
    assert_eq!(bases.as_array().unwrap().len(), 4, "{bases}");
    let (_, snapshots) = cp
        .call(GET, "/v1/snapshots?type=snapshot", &key, None)
        .await;
    assert_eq!(snapshots, json!([]));
    let (status, page) = cp.call(GET, "/v1/snapshots?limit=1", &key, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page.as_array().unwrap().len(), 1, "{page}");
    let (status, body) = cp.call(GET, "/v1/snapshots?type=docker", &key, None).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("docker"));
    let (status, body) = cp.call(GET, "/v1/snapshots", &Auth::None, None).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    // A template nobody has is a 404 naming it, before any host is asked.
    let (status, body) = cp
        .call(
            POST,
            "/v1/capsules",
            &key,
            Some(json!({"template": "no-such-template"})),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-template"),
        "{body}"
    );
    cp.stop().await;
}
