//! A template name gets the same answer from the control plane and from the agent, whatever its
//! length: both judge it with `wrenn::template::TemplateName`. Nothing boots here; the names are
//! registered but have no image on the host, so a valid name ends as "template not found".

mod support;

use hyper::{Method, StatusCode};
use serde_json::json;
use support::agent::{sid, stack};
use support::Auth;
use uuid::Uuid;

const LENGTHS: [usize; 7] = [1, 63, 64, 65, 128, 129, 4000];

fn name_of(length: usize) -> String {
    "t".repeat(length)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_name_of_any_length_gets_the_same_answer_at_the_control_plane_and_the_agent() {
    let (cp, agent, _host, admin) = stack().await;
    // Registered platform templates, so the control plane passes valid names to the agent.
    for length in LENGTHS {
        sqlx::query(
            "INSERT INTO templates (id, team_id, name, type, vcpus, memory_mb) \
             VALUES ($1, '00000000-0000-0000-0000-000000000000', $2, 'base', 1, 256)",
        )
        .bind(Uuid::new_v4())
        .bind(name_of(length))
        .execute(&cp.db)
        .await
        .unwrap();
    }
    let (status, key) = cp
        .call(
            Method::POST,
            "/v1/api-keys",
            &admin,
            Some(json!({"name": "names"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let key = Auth::ApiKey(key["key"].as_str().unwrap().to_owned());

    for length in LENGTHS {
        let name = name_of(length);
        let (cp_status, cp_body) = cp
            .call(
                Method::POST,
                "/v1/capsules",
                &key,
                Some(json!({"template": name, "vcpus": 1, "memory_mb": 256})),
            )
            .await;
        let agent = &agent;
        let body = json!({"sandbox_id": sid(&format!("names-{length}")), "template": name,
                          "vcpus": 1, "memory_mb": 256});
        let (agent_status, agent_body) =
            tokio::task::block_in_place(|| agent.call(Method::POST, "/v1/sandboxes", Some(body)));
        let want = if length <= 128 {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::BAD_REQUEST
        };
        assert_eq!(
            cp_status, want,
            "control plane, {length} characters: {cp_body}"
        );
        assert_eq!(
            agent_status, want,
            "agent, {length} characters: {agent_body}"
        );
        if want == StatusCode::BAD_REQUEST {
            assert_eq!(cp_body["error"]["code"], "invalid_request", "{cp_body}");
            assert_eq!(
                agent_body["error"]["code"], "invalid_request",
                "{agent_body}"
            );
        }
    }
    assert!(agent.sandbox_ids().is_empty());
}
