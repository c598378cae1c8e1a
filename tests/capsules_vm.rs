//! The main job end to end with real parts: the public capsule API of a control plane over a
//! private PostgreSQL, a registered `wrenn agent`, and a QEMU/TCG microVM running the code.

mod support;

use hyper::Method;
use hyper::StatusCode;
use serde_json::json;
use support::agent::{stack, wait_clean};
use support::Auth;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_capsule_runs_code_through_the_control_plane_and_is_destroyed() {
    let _turn = support::agent::ONE_AGENT_AT_A_TIME.lock().await;
    let (cp, agent, _, admin) = stack().await;
    let (status, key) = cp
        .call(
            Method::POST,
            "/v1/api-keys",
            &admin,
            Some(json!({"name": "sdk"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let sdk = Auth::ApiKey(key["key"].as_str().unwrap().to_owned());

    let (status, capsule) = cp
        .call(
            Method::POST,
            "/v1/capsules",
            &sdk,
            Some(json!({"template": "minimal", "vcpus": 1, "memory_mb": 256})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    assert_eq!(capsule["status"], "running", "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();

    let (status, out) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/exec"),
            &sdk,
            Some(json!({"cmd": "/bin/sh", "args": ["-c", "echo hello from a microVM; id -un"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exit_code"], 0, "{out}");
    assert!(
        out["stdout"]
            .as_str()
            .unwrap()
            .starts_with("hello from a microVM\n"),
        "{out}"
    );

    let (status, list) = cp.call(Method::GET, "/v1/capsules", &sdk, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    let (status, body) = cp
        .call(Method::DELETE, &format!("/v1/capsules/{id}"), &sdk, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, list) = cp.call(Method::GET, "/v1/capsules", &sdk, None).await;
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    let agent = tokio::task::spawn_blocking(move || {
        wait_clean(&agent);
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}
