//! Schemathesis (PyPI; `.ci/bootstrap` installs it) fuzzes the running control plane from the
//! document it serves at `GET /openapi.yaml`: generated requests, valid and invalid, to every
//! operation, signed in as a platform admin with an API key of their team. No response may be a
//! server error, and every response must have a documented status, and match that status's
//! documented schema and content type.

mod support;

use std::process::Command;

use hyper::{Method, StatusCode};
use serde_json::json;
use support::{Auth, TestCp};

/// Where `.ci/bootstrap` links the installed version.
const SCHEMATHESIS: &str = "/var/tmp/wrenn-tools/bin/schemathesis";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generated_requests_never_get_a_server_error_or_an_undocumented_answer() {
    let schemathesis =
        std::env::var("WRENN_SCHEMATHESIS").unwrap_or_else(|_| SCHEMATHESIS.to_owned());
    assert!(
        std::path::Path::new(&schemathesis).exists(),
        "{schemathesis} is missing: run .ci/bootstrap"
    );
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (status, key) = cp
        .call(
            Method::POST,
            "/v1/api-keys",
            &admin.auth(),
            Some(json!({"name": "fuzz"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let key = key["key"].as_str().unwrap().to_owned();
    let Auth::Bearer(token) = admin.auth() else {
        unreachable!()
    };
    let url = format!("http://{}/openapi.yaml", cp.addr);
    let run = tokio::task::spawn_blocking(move || {
        Command::new(&schemathesis)
            .args([
                "run",
                &url,
                "--header",
                &format!("Authorization: Bearer {token}"),
                "--header",
                &format!("X-API-Key: {key}"),
                "--checks",
                "not_a_server_error,status_code_conformance,response_schema_conformance,\
                 content_type_conformance",
                "--max-examples",
                "20",
                // Two workers trip CPython 3.11's "AST constructor recursion depth mismatch"
                // inside Schemathesis; one is fast enough.
                "--workers",
                "1",
                "--seed",
                "1",
                // Without a host, creating a capsule is a 503 `no_hosts_available` by design;
                // tests/cp_capsules.rs covers creates against real agents.
                "--exclude-operation-id",
                "createCapsule",
                "--exclude-operation-id",
                "createCapsuleSandbox",
                // Likewise publishing and importing a template image ask a host; the template
                // tests cover them against real agents.
                "--exclude-operation-id",
                "publishTemplate",
                "--exclude-operation-id",
                "importTemplate",
                "--no-color",
            ])
            .output()
            .expect("schemathesis runs")
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    cp.stop().await;
}
