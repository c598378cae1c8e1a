//! Control traffic between the control plane and its agents is authenticated and encrypted:
//! plaintext and wrong certificates are refused both ways, a JWT secret rotation keeps running
//! capsules reachable while the agent refreshes in place, hosts cannot register addresses the
//! control plane must not dial, the registration token never appears on a command line, and a
//! full files root does not cost the host its credentials.
//!
//! Tests that start agents create network namespaces: run them under
//! `flock /tmp/wrenn-vm-tests.lock`.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use serde_json::{json, Value};
use support::agent::{self, Agent, AgentTls, TokenFrom};
use support::{assert_error, register_body, Auth, TestCp, JWT_SECRET};
use wrenn::agent::registration::{ControlPlane, RegistrationError};
use wrenn::cp::agent_client::{AgentError, AgentTarget};
use wrenn::cp::tokens::TokenKeys;
use wrenn::id::HostId;
use wrenn::secret::SecretText;

const NEW_SECRET: &[u8] = b"rotated-integration-secret-0123456789abcd";

/// A CA the control plane never heard of, and certificates from it.
struct ForeignCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl ForeignCa {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Wrenn control plane CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and key for `name` with `purpose`.
    fn issue(&self, name: &str, purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, wrenn::cp::ca::CLIENT_NAME);
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A server on loopback that answers every request with an agent's ping, over TLS with
/// `identity` (certificate and key PEM), or in plain HTTP without one.
async fn fake_agent(identity: Option<(String, String)>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = identity.map(|(cert, key)| {
        let key = wrenn::tls::certified_key(&cert, &key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(wrenn::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(wrenn::tls::ServerIdentity::new(key)));
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let app = axum::Router::new().fallback(|| async {
                    axum::Json(json!({"status": "ok", "host_id": "h", "version": "0",
                                      "vmm": "qemu", "sandboxes": 0}))
                });
                let service = hyper_util::service::TowerToHyperService::new(app);
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let io = hyper_util::rt::TokioIo::new(tls);
                            let _ = http.serve_connection(io, service).await;
                        }
                    }
                    None => {
                        let io = hyper_util::rt::TokioIo::new(tcp);
                        let _ = http.serve_connection(io, service).await;
                    }
                }
            });
        }
    });
    addr
}

async fn ping(cp: &TestCp, addr: SocketAddr) -> Result<(), AgentError> {
    let target = AgentTarget {
        host: HostId::new_random(),
        address: addr.to_string(),
        secret: "s".into(),
    };
    cp.state.capsules.agents.ping(&target).await.map(drop)
}

fn assert_refused(outcome: Result<(), AgentError>, what: &str) {
    match outcome {
        Err(AgentError::Unreachable { reason, .. }) => {
            assert!(!reason.is_empty(), "{what}");
        }
        other => panic!("{what}: {other:?}"),
    }
}

#[tokio::test]
async fn the_control_plane_calls_only_agents_its_ca_certified_for_the_address_it_dials() {
    let cp = TestCp::start().await;
    let ca = cp.state.ca.get().unwrap().clone();
    let csr = |key: &KeyPair| {
        CertificateParams::default()
            .serialize_request(key)
            .unwrap()
            .pem()
            .unwrap()
    };
    let certified = |address: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = ca
            .issue_agent_cert(HostId::new_random(), &address.parse().unwrap(), &csr(&key))
            .unwrap();
        (cert.pem, key.serialize_pem())
    };

    // The positive control: certified by the control plane's CA for the address dialled.
    let genuine = fake_agent(Some(certified("127.0.0.1:1"))).await;
    ping(&cp, genuine).await.expect("a certified agent answers");

    assert_refused(ping(&cp, fake_agent(None).await).await, "plaintext agent");
    let foreign = ForeignCa::new();
    let impostor = foreign.issue("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
    assert_refused(
        ping(&cp, fake_agent(Some(impostor)).await).await,
        "agent with a foreign CA's certificate",
    );
    // Another host's genuine certificate, presented at an address it was not issued for.
    assert_refused(
        ping(&cp, fake_agent(Some(certified("10.0.0.9:1"))).await).await,
        "agent with a certificate for another address",
    );

    // The agent's side of the control channel trusts only verified certificates too: a control
    // plane served with a certificate from a CA the agent does not trust is unreachable, whether
    // it trusts the web PKI or pins a private CA (`agent.cp_ca_file`); the pinned CA is enough.
    let private_cp = fake_agent(Some(
        foreign.issue("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth),
    ))
    .await;
    let url = format!("https://{private_cp}");
    let other_ca = ForeignCa::new();
    for (agent_side, trusted) in [
        (ControlPlane::new(url.parse().unwrap()), false),
        (
            ControlPlane::pinned(url.parse().unwrap(), &other_ca.cert_pem).unwrap(),
            false,
        ),
        (
            ControlPlane::pinned(url.parse().unwrap(), &foreign.cert_pem).unwrap(),
            true,
        ),
    ] {
        let specs = wrenn::agent::registration::HostSpecs::detect(std::path::Path::new("/"));
        let outcome = tokio::task::spawn_blocking(move || {
            agent_side.register(&SecretText::new("t"), "10.0.0.5:50051", &specs)
        })
        .await
        .unwrap();
        match (outcome, trusted) {
            (Err(RegistrationError::Unreachable { reason, .. }), false) => {
                assert!(reason.to_lowercase().contains("certificate"), "{reason}")
            }
            // Through the handshake: the fake's answer is no registration.
            (Err(RegistrationError::Unexpected { status: 200, .. }), true) => {}
            (other, trusted) => panic!("trusted {trusted}: {other:?}"),
        }
    }
    cp.stop().await;
}

/// Sends `GET /v1/ping` in plain HTTP and returns what came back.
fn plaintext_ping(port: u16) -> String {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = tcp.write_all(b"GET /v1/ping HTTP/1.1\r\nhost: agent\r\n\r\n");
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn ping_with(tls: &AgentTls, agent: &Agent) -> Result<u16, String> {
    let http = tls.ureq(Duration::from_secs(10));
    http.get(agent.url("/v1/ping"))
        .header("authorization", format!("Bearer {}", agent.secret))
        .call()
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_only_the_control_plane_s_client_certificate() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (status, created) = cp
        .call(
            Method::POST,
            "/v1/hosts",
            &admin.auth(),
            Some(json!({"type": "regular"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["registration_token"].as_str().unwrap().to_owned();
    // The token comes from a file: no command line shows it.
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let (cp_url, tls) = (format!("http://{}", cp.addr), cp.agent_tls());
    let agent = tokio::task::spawn_blocking(move || {
        Agent::register_in(
            Agent::new_root(),
            &cp_url,
            TokenFrom::File(&token_file),
            tls,
            Vec::new(),
        )
    })
    .await
    .unwrap();
    let pid = agent.child.as_ref().unwrap().id();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&token));
    assert!(!agent.log().contains(&token), "the token was logged");

    // The control plane's identity works; every other client is turned away before any
    // request reaches the API.
    assert_eq!(ping_with(&agent.tls, &agent), Ok(200));
    let answer = plaintext_ping(agent.port);
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    let foreign = ForeignCa::new();
    let (cert_pem, key_pem) = foreign.issue("client", ExtendedKeyUsagePurpose::ClientAuth);
    let foreign_client = AgentTls {
        cert_pem,
        key_pem,
        ..agent.tls.clone()
    };
    assert!(ping_with(&foreign_client, &agent).is_err());
    // An agent's own certificate, from the same CA, is for serving only: one agent (a BYOC
    // machine) cannot call another.
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(agent.root.path().join("host-token")).unwrap(),
    )
    .unwrap();
    let own = AgentTls {
        cert_pem: saved["tls"]["cert_pem"].as_str().unwrap().to_owned(),
        key_pem: saved["tls"]["key_pem"].as_str().unwrap().to_owned(),
        ..agent.tls.clone()
    };
    assert!(ping_with(&own, &agent).is_err());
    // No client certificate at all.
    let anonymous = {
        use ureq::tls::{Certificate, RootCerts, TlsConfig};
        let ca = Certificate::from_pem(agent.tls.ca_pem.as_bytes()).unwrap();
        let config = TlsConfig::builder()
            .root_certs(RootCerts::Specific(Arc::new(vec![ca])))
            .build();
        let client: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(config)
            .build()
            .into();
        client
    };
    assert!(anonymous.get(agent.url("/v1/ping")).call().is_err());
    drop(agent);
    cp.stop().await;
}

#[tokio::test]
async fn a_missing_or_empty_registration_token_file_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    for (file, needle) in [
        (
            dir.path().join("missing"),
            "cannot read the registration token file",
        ),
        (empty, "is empty"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wrenn"))
            .args(["agent", "--register-file"])
            .arg(&file)
            .args(["--address", "10.0.0.5:50051"])
            .current_dir(dir.path())
            .env("AGENT_CP_URL", "http://127.0.0.1:9")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{stderr}");
    }
}

#[tokio::test]
async fn hosts_cannot_register_addresses_the_control_plane_must_not_dial() {
    let cp = TestCp::start_refusing_loopback().await;
    let owner = cp.signup("owner@example.com").await;
    let (status, created) = cp
        .call(
            Method::POST,
            "/v1/hosts",
            &owner.auth(),
            Some(json!({"type": "byoc", "team_id": owner.team})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["registration_token"].as_str().unwrap();
    let own = nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
        .find(|ip| !ip.is_loopback())
        .map(|ip| format!("{ip}:50051"));
    let mut refused = vec![
        "127.0.0.1:50051".to_owned(),
        "[::1]:50051".to_owned(),
        "169.254.169.254:80".to_owned(),
        "[fd00:ec2::254]:80".to_owned(),
        "169.254.10.1:50051".to_owned(),
        "[fe80::1]:50051".to_owned(),
        "0.0.0.0:50051".to_owned(),
        "localhost:50051".to_owned(),
    ];
    refused.extend(own);
    for address in &refused {
        let mut body = register_body(token);
        body["address"] = json!(address);
        let (status, answer) = cp
            .call(Method::POST, "/v1/hosts/register", &Auth::None, Some(body))
            .await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("address"), "{address}: {message}");
    }
    // The refusals left the one-time token unused.
    let creds = cp.register(token).await;
    assert_eq!(creds["host"]["address"], "10.0.0.5:50051");
    cp.stop().await;

    // A local stack allows loopback, and only loopback.
    let local = TestCp::start().await;
    let admin = local.signup("admin@example.com").await;
    let (status, created) = local
        .call(
            Method::POST,
            "/v1/hosts",
            &admin.auth(),
            Some(json!({"type": "regular"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = created["registration_token"].as_str().unwrap();
    let mut body = register_body(token);
    body["address"] = json!("169.254.169.254:80");
    let (status, answer) = local
        .call(
            Method::POST,
            "/v1/hosts/register",
            &Auth::None,
            Some(body.clone()),
        )
        .await;
    assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_request");
    body["address"] = json!("127.0.0.1:50051");
    let (status, answer) = local
        .call(Method::POST, "/v1/hosts/register", &Auth::None, Some(body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    local.stop().await;
}

async fn api_key(cp: &TestCp, auth: &Auth) -> Auth {
    let (status, key) = cp
        .call(
            Method::POST,
            "/v1/api-keys",
            auth,
            Some(json!({"name": "k"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    Auth::ApiKey(key["key"].as_str().unwrap().to_owned())
}

async fn exec_echo(cp: &TestCp, key: &Auth, id: &str, word: &str) {
    let (status, body) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/exec"),
            key,
            Some(json!({"cmd": "echo", "args": [word]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stdout"].as_str().unwrap().trim(), word, "{body}");
}

fn saved_host_token(agent: &Agent) -> String {
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(agent.root.path().join("host-token")).unwrap(),
    )
    .unwrap();
    saved["token"].as_str().unwrap().to_owned()
}

/// Waits until the host's heartbeat is newer than now.
async fn fresh_heartbeat(cp: &TestCp, host_id: &str) {
    let since = chrono::Utc::now();
    let host = HostId::from_str(host_id).unwrap().uuid();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let last: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT last_heartbeat_at FROM hosts WHERE id = $1")
                .bind(host)
                .fetch_one(&cp.db)
                .await
                .unwrap();
        if last.is_some_and(|t| t > since) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no heartbeat");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_jwt_secret_keeps_capsules_reachable_and_the_agent_refreshes_in_place() {
    let (mut cp, agent, host_id, admin) = agent::stack().await;
    let key = api_key(&cp, &admin).await;
    let (status, capsule) = cp
        .call(
            Method::POST,
            "/v1/capsules",
            &key,
            Some(json!({"template": "minimal", "vcpus": 1, "memory_mb": 256})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();
    exec_echo(&cp, &key, &id, "before").await;
    let pid = agent.child.as_ref().unwrap().id();
    let old_host_token = saved_host_token(&agent);

    // Step 1: the new secret signs, the old one is still accepted.
    let both = TokenKeys::new(NEW_SECRET)
        .unwrap()
        .with_previous([JWT_SECRET])
        .unwrap();
    cp.restart_with_tokens(both).await;
    let (status, _) = cp.call(Method::GET, "/v1/hosts", &admin, None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a user token of the old secret still works"
    );
    exec_echo(&cp, &key, &id, "during").await;
    fresh_heartbeat(&cp, &host_id).await;
    assert_eq!(
        saved_host_token(&agent),
        old_host_token,
        "nothing forced a refresh"
    );

    // Step 2: the old secret is gone. The agent's host token is refused, it refreshes without a
    // restart, and the capsule stays reachable throughout.
    cp.restart_with_tokens(TokenKeys::new(NEW_SECRET).unwrap())
        .await;
    let (status, _) = cp.call(Method::GET, "/v1/hosts", &admin, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    exec_echo(&cp, &key, &id, "after").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while saved_host_token(&agent) == old_host_token {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never refreshed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let renewed = saved_host_token(&agent);
    let keys = TokenKeys::new(NEW_SECRET).unwrap();
    assert!(keys.verify_host(&renewed).is_ok());
    fresh_heartbeat(&cp, &host_id).await;
    exec_echo(&cp, &key, &id, "renewed").await;
    assert_eq!(
        agent.child.as_ref().unwrap().id(),
        pid,
        "the agent restarted"
    );
    assert_eq!(ping_with(&agent.tls, &agent), Ok(200));

    let (status, _) = cp
        .call(Method::DELETE, &format!("/v1/capsules/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    drop(agent);
    cp.stop().await;
}

/// Fills the filesystem at `dir` until a write fails; returns the filler to free it later.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    // The last partial chunk may have fit: take every byte left.
    while file.write_all(&[0u8]).is_ok() {}
    let _ = file.sync_all();
    filler
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_files_root_keeps_the_agent_serving_with_its_refreshed_credentials() {
    let mut cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (status, created) = cp
        .call(
            Method::POST,
            "/v1/hosts",
            &admin.auth(),
            Some(json!({"type": "regular"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["registration_token"].as_str().unwrap().to_owned();
    let host_id = created["host"]["id"].as_str().unwrap().to_owned();
    // A files root on a small tmpfs of its own.
    let root = tempfile::Builder::new()
        .prefix("wrenn-agent-full-")
        .tempdir()
        .unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "wrenn-full-test"])
        .arg(root.path())
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(root.path().to_owned());
    Agent::link_test_files(root.path());
    let (cp_url, tls) = (format!("http://{}", cp.addr), cp.agent_tls());
    let agent = tokio::task::spawn_blocking(move || {
        Agent::register_in(root, &cp_url, TokenFrom::Env(&token), tls, Vec::new())
    })
    .await
    .unwrap();
    let before = std::fs::read_to_string(agent.root.path().join("host-token")).unwrap();
    let filler = fill(agent.root.path());

    // A new JWT secret refuses the agent's host token: it must refresh, and cannot save.
    cp.restart_with_tokens(TokenKeys::new(NEW_SECRET).unwrap())
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while agent
        .log_lines(&["credentials stay in memory only"])
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed save: {}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        std::fs::read_to_string(agent.root.path().join("host-token")).unwrap(),
        before,
        "the old credentials are intact"
    );
    assert!(!agent.root.path().join("host-token.tmp").exists());
    // Serving on with the refreshed credentials from memory: the new host token heartbeats, the
    // renewed certificate and secret serve the control plane.
    fresh_heartbeat(&cp, &host_id).await;
    assert_eq!(ping_with(&agent.tls, &agent), Ok(200));
    let target = AgentTarget {
        host: HostId::from_str(&host_id).unwrap(),
        address: format!("127.0.0.1:{}", agent.port),
        secret: agent.secret.clone(),
    };
    cp.state.capsules.agents.ping(&target).await.unwrap();

    // Space again: the next heartbeat saves what memory held.
    std::fs::remove_file(filler).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(agent.root.path().join("host-token")).unwrap() == before {
        assert!(tokio::time::Instant::now() < deadline, "never saved");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let keys = TokenKeys::new(NEW_SECRET).unwrap();
    assert!(keys.verify_host(&saved_host_token(&agent)).is_ok());
    drop(agent);
    cp.stop().await;
}

#[tokio::test]
async fn postgresql_is_reached_over_tls_when_the_url_asks_for_it() {
    let pg = tokio::task::spawn_blocking(wrenn_test_support::pg::PgCluster::start)
        .await
        .unwrap()
        .unwrap();
    let plain = wrenn::db::connect_lazy(&pg.url()).unwrap();
    // A server certificate for 127.0.0.1 from a CA of the test's, written into the data
    // directory by the server itself (so that it owns the files), then TLS switched on.
    let ca = ForeignCa::new();
    let (cert, key) = ca.issue("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
    let data: String = sqlx::query_scalar("SHOW data_directory")
        .fetch_one(&plain)
        .await
        .unwrap();
    for (file, pem) in [("server.crt", &cert), ("server.key", &key)] {
        sqlx::query(&format!(
            "COPY (SELECT unnest(string_to_array($${pem}$$, E'\\n'))) TO '{data}/{file}'"
        ))
        .execute(&plain)
        .await
        .unwrap();
    }
    // PostgreSQL refuses a key others may read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        format!("{data}/server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    sqlx::query("ALTER SYSTEM SET ssl = 'on'")
        .execute(&plain)
        .await
        .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&plain)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (root, other) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&root, &ca.cert_pem).unwrap();
    std::fs::write(&other, ForeignCa::new().cert_pem).unwrap();

    let verified = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        root.display()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let on_tls = loop {
        let db = wrenn::db::connect_lazy(&verified).unwrap();
        let answer: Result<bool, _> =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&db)
                .await;
        match answer {
            Ok(ssl) => break ssl,
            // The reload takes a moment to reach the postmaster.
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(error) => panic!("no TLS connection: {error}"),
        }
    };
    assert!(on_tls);
    // A server whose certificate the URL's CA did not issue is refused.
    let mistrusted = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        other.display()
    );
    let db = wrenn::db::connect_lazy(&mistrusted).unwrap();
    assert!(sqlx::query("SELECT 1").execute(&db).await.is_err());
}
