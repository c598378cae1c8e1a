//! Credential hardening against a real PostgreSQL: host refresh-token reuse detection (family
//! revocation, the retry grace window, re-registration) and the agent's reaction to a refused
//! refresh token.

mod support;

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::{assert_error, Auth, TestCp, User};
use tokio_util::sync::CancellationToken;
use wrenn::agent::registration::{self, ControlPlane, HostCredentials, RegistrationError};

const GET: Method = Method::GET;
const POST: Method = Method::POST;

fn register_body(token: &str) -> Value {
    json!({"token": token, "arch": "x86_64", "cpu_cores": 8, "memory_mb": 32768, "disk_gb": 500,
           "address": "10.0.0.5:50051"})
}

/// Creates a regular host and registers it; returns (host id, credentials body).
async fn registered_host(cp: &TestCp, admin: &User) -> (String, Value) {
    let (status, created) = cp
        .call(
            POST,
            "/v1/hosts",
            &admin.auth(),
            Some(json!({"type": "regular"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let host_id = created["host"]["id"].as_str().unwrap().to_owned();
    let token = created["registration_token"].as_str().unwrap();
    (host_id, register(cp, token).await)
}

async fn register(cp: &TestCp, registration_token: &str) -> Value {
    let (status, creds) = cp
        .call(
            POST,
            "/v1/hosts/register",
            &Auth::None,
            Some(register_body(registration_token)),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{creds}");
    creds
}

async fn refresh(cp: &TestCp, refresh_token: &Value) -> (StatusCode, Value) {
    cp.call(
        POST,
        "/v1/hosts/auth/refresh",
        &Auth::None,
        Some(json!({ "refresh_token": refresh_token })),
    )
    .await
}

async fn refreshed(cp: &TestCp, refresh_token: &Value) -> Value {
    let (status, body) = refresh(cp, refresh_token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn heartbeat(cp: &TestCp, host_id: &str, creds: &Value) -> (StatusCode, Value) {
    let auth = Auth::Host(creds["token"].as_str().unwrap().to_owned());
    cp.call(POST, &format!("/v1/hosts/{host_id}/heartbeat"), &auth, None)
        .await
}

async fn host_status(cp: &TestCp, admin: &User, host_id: &str) -> String {
    let (_, host) = cp
        .call(GET, &format!("/v1/hosts/{host_id}"), &admin.auth(), None)
        .await;
    host["status"].as_str().unwrap().to_owned()
}

async fn live_refresh_hashes(cp: &TestCp) -> Vec<Vec<u8>> {
    sqlx::query_scalar("SELECT token_hash FROM host_refresh_tokens WHERE revoked_at IS NULL")
        .fetch_all(&cp.db)
        .await
        .unwrap()
}

fn hash_of(token: &Value) -> Vec<u8> {
    Sha256::digest(token.as_str().unwrap().as_bytes()).to_vec()
}

fn assert_reuse_refused(status: StatusCode, body: &Value, host_id: &str) {
    assert_error(status, body, StatusCode::UNAUTHORIZED, "unauthorized");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("reuse"), "{message}");
    assert!(
        message.contains(&format!("/v1/hosts/{host_id}/token")),
        "{message}"
    );
}

#[tokio::test]
async fn reusing_a_rotated_refresh_token_revokes_every_credential_of_the_host() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (host_id, first) = registered_host(&cp, &admin).await;
    assert_eq!(
        heartbeat(&cp, &host_id, &first).await.0,
        StatusCode::NO_CONTENT
    );

    // The real agent rotates twice; a copy of the first token then shows up.
    let second = refreshed(&cp, &first["refresh_token"]).await;
    let third = refreshed(&cp, &second["refresh_token"]).await;
    let (status, body) = refresh(&cp, &first["refresh_token"]).await;
    assert_reuse_refused(status, &body, &host_id);

    // Every refresh token and host JWT of the registration is dead, the thief's and the agent's.
    assert!(live_refresh_hashes(&cp).await.is_empty());
    let (status, body) = refresh(&cp, &third["refresh_token"]).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    for creds in [&first, &second, &third] {
        let (status, body) = heartbeat(&cp, &host_id, creds).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    assert_eq!(host_status(&cp, &admin, &host_id).await, "unreachable");
    let audit: Value = sqlx::query_scalar(
        "SELECT metadata FROM audit_logs WHERE action = 'revoke_credentials' AND resource_id = $1",
    )
    .bind(&host_id)
    .fetch_one(&cp.db)
    .await
    .unwrap();
    assert_eq!(audit["reason"], "refresh_token_reuse");
    assert_eq!(audit["client"], "127.0.0.1");
    // Presenting a dead token again changes nothing.
    let (status, body) = refresh(&cp, &first["refresh_token"]).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    // The host registers again in place with a new registration token.
    let token_path = format!("/v1/hosts/{host_id}/token");
    let (status, issued) = cp.call(POST, &token_path, &admin.auth(), None).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let again = register(&cp, issued["registration_token"].as_str().unwrap()).await;
    assert_eq!(again["host"]["id"], host_id.as_str());
    assert_eq!(host_status(&cp, &admin, &host_id).await, "online");
    assert_ne!(again["agent_secret"], first["agent_secret"]);
    assert_eq!(
        heartbeat(&cp, &host_id, &again).await.0,
        StatusCode::NO_CONTENT
    );
    // Tokens of the revoked registration neither work nor harm the new one.
    for old in [&first, &second, &third] {
        let (status, _) = refresh(&cp, &old["refresh_token"]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = heartbeat(&cp, &host_id, old).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let renewed = refreshed(&cp, &again["refresh_token"]).await;
    assert_eq!(
        heartbeat(&cp, &host_id, &renewed).await.0,
        StatusCode::NO_CONTENT
    );
    // While the agent holds live credentials there is nothing to register again.
    let (status, body) = cp.call(POST, &token_path, &admin.auth(), None).await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_state");
    cp.stop().await;
}

#[tokio::test]
async fn a_refresh_retried_within_the_grace_window_is_not_reuse() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (host_id, first) = registered_host(&cp, &admin).await;

    // The answer to the first refresh is lost; the agent retries with the same token.
    let _lost = refreshed(&cp, &first["refresh_token"]).await;
    let retried = refreshed(&cp, &first["refresh_token"]).await;
    assert_eq!(
        live_refresh_hashes(&cp).await,
        [hash_of(&retried["refresh_token"])]
    );
    assert_eq!(
        heartbeat(&cp, &host_id, &retried).await.0,
        StatusCode::NO_CONTENT
    );

    // A retry racing the first attempt: both succeed, one after the other, and exactly one
    // refresh token stays live (the later one), so the agent uses what it receives last.
    let (a, b) = tokio::join!(
        refresh(&cp, &retried["refresh_token"]),
        refresh(&cp, &retried["refresh_token"])
    );
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK), "{a:?} {b:?}");
    let live = live_refresh_hashes(&cp).await;
    assert_eq!(live.len(), 1);
    let winner = [&a.1, &b.1]
        .into_iter()
        .find(|creds| hash_of(&creds["refresh_token"]) == live[0])
        .expect("the live token is one of the answers");
    let current = refreshed(&cp, &winner["refresh_token"]).await;

    // Past the grace window, the previous token is reuse even though its successor is unused.
    sqlx::query(
        "UPDATE host_refresh_tokens SET revoked_at = revoked_at - interval '61 seconds'
         WHERE revoked_at IS NOT NULL",
    )
    .execute(&cp.db)
    .await
    .unwrap();
    let (status, body) = refresh(&cp, &winner["refresh_token"]).await;
    assert_reuse_refused(status, &body, &host_id);
    let (status, _) = refresh(&cp, &current["refresh_token"]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    cp.stop().await;
}

#[tokio::test]
async fn only_the_immediately_previous_token_gets_the_grace() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;

    // The previous token's successor was already used: presenting it is reuse at once.
    let (host_id, first) = registered_host(&cp, &admin).await;
    let second = refreshed(&cp, &first["refresh_token"]).await;
    let _third = refreshed(&cp, &second["refresh_token"]).await;
    let (status, body) = refresh(&cp, &first["refresh_token"]).await;
    assert_reuse_refused(status, &body, &host_id);

    // A token superseded by a retry (someone else retried with the previous token) is reuse
    // when it shows up: its holder and the retrier cannot both be the real agent.
    let (host_id, first) = registered_host(&cp, &admin).await;
    let superseded = refreshed(&cp, &first["refresh_token"]).await;
    let retried = refreshed(&cp, &first["refresh_token"]).await;
    let (status, body) = refresh(&cp, &superseded["refresh_token"]).await;
    assert_reuse_refused(status, &body, &host_id);
    let (status, _) = refresh(&cp, &retried["refresh_token"]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    cp.stop().await;
}

fn agent_credentials(creds: &Value) -> HostCredentials {
    HostCredentials {
        host_id: creds["host"]["id"].as_str().unwrap().to_owned(),
        token: creds["token"].as_str().unwrap().to_owned(),
        refresh_token: creds["refresh_token"].as_str().unwrap().to_owned(),
        agent_secret: creds["agent_secret"].as_str().unwrap().to_owned(),
        revoked: None,
    }
}

fn control_plane(cp: &TestCp) -> ControlPlane {
    ControlPlane::new(format!("http://{}", cp.addr).parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refreshes_an_expired_host_token_and_saves_the_new_credentials() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (host_id, creds) = registered_host(&cp, &admin).await;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("host-token");
    // A host JWT the control plane no longer accepts, as after its 7 days.
    let mut saved = agent_credentials(&creds);
    saved.token = "expired".into();
    registration::save_credentials(&file, &saved).unwrap();

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(registration::heartbeat_loop(
        control_plane(&cp),
        saved.clone(),
        file.clone(),
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let current = registration::load_credentials(&file).unwrap();
        if current.refresh_token != saved.refresh_token {
            assert_ne!(current.token, "expired");
            assert_eq!(current.agent_secret, saved.agent_secret);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never refreshed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new host token works: the host keeps heartbeating.
    sqlx::query("UPDATE hosts SET last_heartbeat_at = NULL")
        .execute(&cp.db)
        .await
        .unwrap();
    let (_, host) = cp
        .call(GET, &format!("/v1/hosts/{host_id}"), &admin.auth(), None)
        .await;
    assert!(host["last_heartbeat_at"].is_null());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, host) = cp
            .call(GET, &format!("/v1/hosts/{host_id}"), &admin.auth(), None)
            .await;
        if !host["last_heartbeat_at"].is_null() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no heartbeat");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    agent.await.unwrap().unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_stops_and_says_to_register_again_when_its_refresh_token_is_refused() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (host_id, creds) = registered_host(&cp, &admin).await;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("host-token");
    let mut saved = agent_credentials(&creds);
    saved.token = "expired".into();
    registration::save_credentials(&file, &saved).unwrap();
    // A thief with a copy of the refresh token rotates it twice before the agent needs it.
    let stolen = refreshed(&cp, &creds["refresh_token"]).await;
    let thief = refreshed(&cp, &stolen["refresh_token"]).await;

    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        registration::heartbeat_loop(
            control_plane(&cp),
            saved,
            file.clone(),
            Duration::from_secs(1),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the agent gives up instead of retrying forever");
    let error = outcome.unwrap_err();
    assert!(
        matches!(error, RegistrationError::RefreshRejected { .. }),
        "{error}"
    );
    assert!(error.needs_registration());
    let message = error.to_string();
    for needle in [
        "reuse",
        "--register",
        &format!("POST /v1/hosts/{host_id}/token"),
    ] {
        assert!(message.contains(needle), "`{needle}` missing: {message}");
    }
    // The thief's credentials died with the agent's.
    let (status, _) = refresh(&cp, &thief["refresh_token"]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A restart stops at once with the same explanation, without asking the control plane.
    let error = registration::load_credentials(&file).unwrap_err();
    assert!(
        matches!(error, RegistrationError::CredentialsRevoked { .. }),
        "{error}"
    );
    assert!(error.needs_registration());
    assert!(error.to_string().contains("--register"), "{error}");
    cp.stop().await;
}
