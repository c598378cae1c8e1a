//! Credential hardening against a real PostgreSQL: host refresh-token reuse detection (family
//! revocation, the retry grace window, re-registration), the agent's reaction to a refused
//! refresh token, and login rate limiting per email and per client address.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::{assert_error, Auth, TestCp, User, QUIET_MONITOR};
use tokio_util::sync::CancellationToken;
use wrenn::agent::registration::{
    self, ControlPlane, HostCredentials, RegistrationError, ServeNothing,
};
use wrenn::cp::services::login_limits::{self, Limit, LoginLimits};
use wrenn::cp::state::AuthSettings;
use wrenn::secret::SecretText;

const GET: Method = Method::GET;
const POST: Method = Method::POST;

/// Creates a regular host and registers it; returns (host id, credentials body).
async fn registered_host(cp: &TestCp, admin: &User) -> (String, Value) {
    cp.registered_host(admin, json!({"type": "regular"})).await
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
    let again = cp
        .register(issued["registration_token"].as_str().unwrap())
        .await;
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

/// The credentials an agent saved, from a registration body (without its certificate: the
/// agent's first heartbeat refreshes to get one).
fn agent_credentials(creds: &Value) -> HostCredentials {
    let text = |key: &str| SecretText::new(creds[key].as_str().unwrap());
    HostCredentials {
        host_id: creds["host"]["id"].as_str().unwrap().to_owned(),
        token: text("token"),
        refresh_token: text("refresh_token"),
        agent_secret: text("agent_secret"),
        tls: None,
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
    saved.token = SecretText::new("expired");
    registration::save_credentials(&file, &saved).unwrap();

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(registration::heartbeat_loop(
        control_plane(&cp),
        saved.clone(),
        file.clone(),
        Duration::from_secs(1),
        Arc::new(ServeNothing),
        shutdown.clone(),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let current = registration::load_credentials(&file).unwrap();
        if current.refresh_token != saved.refresh_token {
            assert_ne!(current.token.expose(), "expired");
            assert!(current.tls.is_some(), "the refresh brought a certificate");
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
    saved.token = SecretText::new("expired");
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
            Arc::new(ServeNothing),
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

const PASSWORD: &str = "correct horse battery";

/// A control plane with small login limits that trusts X-Forwarded-For from the test client
/// (127.0.0.1), so each test request can come from any address it names.
async fn throttled_cp(per_email: u32, per_address: u32, trust_loopback: bool) -> TestCp {
    let window = Duration::from_secs(60);
    let auth = AuthSettings {
        login_limits: LoginLimits {
            per_email: Limit {
                max_failures: per_email,
                window,
            },
            per_address: Limit {
                max_failures: per_address,
                window,
            },
        },
        trusted_proxies: if trust_loopback {
            "127.0.0.1".parse().unwrap()
        } else {
            Default::default()
        },
        ..AuthSettings::default()
    };
    TestCp::start_configured(QUIET_MONITOR, auth).await
}

/// A login as sent through a proxy on behalf of `client`.
async fn login(
    cp: &TestCp,
    email: &str,
    password: &str,
    client: &str,
) -> (StatusCode, hyper::HeaderMap, Value) {
    let body = json!({ "email": email, "password": password });
    cp.raw_with_headers(
        POST,
        "/v1/auth/login",
        &[("x-forwarded-for", client)],
        Some("application/json"),
        serde_json::to_vec(&body).unwrap(),
    )
    .await
}

async fn login_status(cp: &TestCp, email: &str, password: &str, client: &str) -> StatusCode {
    login(cp, email, password, client).await.0
}

fn assert_rate_limited(
    (status, headers, body): &(StatusCode, hyper::HeaderMap, Value),
    whose: &str,
) {
    assert_error(*status, body, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(whose), "{message}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
}

async fn end_every_window(cp: &TestCp) {
    sqlx::query("UPDATE login_failures SET window_ends_at = now() - interval '1 second'")
        .execute(&cp.db)
        .await
        .unwrap();
}

#[tokio::test]
async fn failed_logins_for_one_email_are_limited_from_every_address() {
    let cp = throttled_cp(3, 100, true).await;
    cp.signup("ada@example.com").await;
    cp.signup("bob@example.com").await;
    for client in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        let status = login_status(&cp, "ada@example.com", "wrong password", client).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // Now even the right password, from an address that never failed, waits for the window.
    let refused = login(&cp, "ADA@example.com", PASSWORD, "198.51.100.1").await;
    assert_rate_limited(&refused, "for this email");
    // Other accounts, from the same addresses, are not affected.
    let status = login_status(&cp, "bob@example.com", PASSWORD, "203.0.113.1").await;
    assert_eq!(status, StatusCode::OK);
    // An email without an account is limited the same way, so 429s reveal nothing.
    for _ in 0..3 {
        let status = login_status(&cp, "nobody@example.com", "guess", "203.0.113.9").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let refused = login(&cp, "nobody@example.com", "guess", "203.0.113.9").await;
    assert_rate_limited(&refused, "for this email");

    // The window ends; only failures count, a correct password never does.
    end_every_window(&cp).await;
    let attempts = [
        ("wrong", StatusCode::UNAUTHORIZED),
        (PASSWORD, StatusCode::OK),
        (PASSWORD, StatusCode::OK),
        (PASSWORD, StatusCode::OK),
        ("wrong", StatusCode::UNAUTHORIZED),
        ("wrong", StatusCode::UNAUTHORIZED),
        (PASSWORD, StatusCode::TOO_MANY_REQUESTS),
    ];
    for (password, want) in attempts {
        let status = login_status(&cp, "ada@example.com", password, "198.51.100.1").await;
        assert_eq!(status, want, "{password}");
    }
    cp.stop().await;
}

#[tokio::test]
async fn failed_logins_from_one_address_are_limited_for_that_address_only() {
    let cp = throttled_cp(3, 5, true).await;
    cp.signup("ada@example.com").await;
    let attacker = "203.0.113.7";
    for n in 0..5 {
        let email = format!("guess{n}@example.com");
        let status = login_status(&cp, &email, "wrong", attacker).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let refused = login(&cp, "ada@example.com", PASSWORD, attacker).await;
    assert_rate_limited(&refused, "from this address");
    // Ada is not blocked by someone else's failures elsewhere.
    let status = login_status(&cp, "ada@example.com", PASSWORD, "198.51.100.2").await;
    assert_eq!(status, StatusCode::OK);
    // Refused attempts did not spend Ada's email budget: she can still fail three times.
    for _ in 0..10 {
        let status = login_status(&cp, "ada@example.com", "wrong", attacker).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    }
    for _ in 0..3 {
        let status = login_status(&cp, "ada@example.com", "wrong", "198.51.100.2").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    // IPv6 clients count by their /64.
    end_every_window(&cp).await;
    for host in 1..=5 {
        let client = format!("2001:db8:1:2::{host}");
        let status = login_status(&cp, &format!("v6-{host}@example.com"), "wrong", &client).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let refused = login(&cp, "ada@example.com", PASSWORD, "2001:db8:1:2:ffff::1").await;
    assert_rate_limited(&refused, "from this address");
    let status = login_status(&cp, "ada@example.com", PASSWORD, "2001:db8:1:3::1").await;
    assert_eq!(status, StatusCode::OK);
    cp.stop().await;
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_does_not_evade_the_address_limit() {
    // No trusted proxies, and the email limit off: only the TCP peer's limit applies.
    let cp = throttled_cp(0, 2, false).await;
    cp.signup("ada@example.com").await;
    for n in 0..2 {
        let status = login_status(&cp, "ada@example.com", "wrong", &format!("192.0.2.{n}")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let refused = login(&cp, "ada@example.com", PASSWORD, "192.0.2.99").await;
    assert_rate_limited(&refused, "from this address");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_guesses_get_no_more_password_checks_than_the_limit() {
    let cp = throttled_cp(3, 100, true).await;
    cp.signup("ada@example.com").await;
    let guesses = (0..12).map(|n| {
        let client = format!("203.0.113.{n}");
        let cp = &cp;
        async move { login_status(cp, "ada@example.com", "wrong", &client).await }
    });
    let mut statuses = futures::future::join_all(guesses).await;
    statuses.sort();
    let mut want = vec![StatusCode::UNAUTHORIZED; 3];
    want.extend([StatusCode::TOO_MANY_REQUESTS; 9]);
    assert_eq!(statuses, want);
    cp.stop().await;
}

#[tokio::test]
async fn ended_windows_are_pruned() {
    let cp = throttled_cp(3, 5, true).await;
    login_status(&cp, "ada@example.com", "wrong", "203.0.113.1").await;
    login_status(&cp, "bob@example.com", "wrong", "203.0.113.2").await;
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM login_failures")
            .fetch_one(&cp.db)
            .await
            .unwrap()
    };
    assert_eq!(rows().await, 4);
    assert_eq!(login_limits::prune(&cp.db).await.unwrap(), 0);
    sqlx::query(
        "UPDATE login_failures SET window_ends_at = now() - interval '1 second'
         WHERE scope = 'email'",
    )
    .execute(&cp.db)
    .await
    .unwrap();
    assert_eq!(login_limits::prune(&cp.db).await.unwrap(), 2);
    assert_eq!(rows().await, 2);
    cp.stop().await;
}
