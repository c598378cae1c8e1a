//! The capsule state machine in the database: every status change is a compare-and-set against
//! the transition table, so illegal changes are refused by PostgreSQL itself, a create cannot
//! resurrect a row something else gave up, and deleting a team or host stops what a create is
//! still booting.

mod support;

use hyper::{Method, StatusCode};
use serde_json::json;
use support::TestCp;
use uuid::Uuid;
use wrenn::db::sandboxes::{self, NewSandbox, SandboxStatus, Transition};
use wrenn::db::Db;
use wrenn::id::{HostId, TeamId};

async fn insert(db: &Db, team: Uuid, host: Option<Uuid>, status: SandboxStatus) -> Uuid {
    let id = Uuid::new_v4();
    sandboxes::insert(
        db,
        NewSandbox {
            id,
            team_id: team,
            host_id: host,
            template_id: Uuid::nil(),
            status,
            vcpus: 1,
            memory_mb: 512,
        },
    )
    .await
    .unwrap();
    id
}

async fn status(db: &Db, id: Uuid) -> SandboxStatus {
    sandboxes::status_of(db, id).await.unwrap().unwrap()
}

#[tokio::test]
async fn the_database_applies_exactly_the_table() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let team = admin.team.parse::<TeamId>().unwrap().uuid();
    for from in SandboxStatus::ALL {
        for to in SandboxStatus::ALL {
            let id = insert(&cp.db, team, None, from).await;
            let applied = sandboxes::transition(&cp.db, id, Transition::to(to))
                .await
                .unwrap();
            assert_eq!(applied, from.can_become(to), "{from} -> {to}");
            let want = if applied { to } else { from };
            assert_eq!(status(&cp.db, id).await, want, "{from} -> {to}");
        }
    }
    // An expected status narrows the table, never widens it.
    let id = insert(&cp.db, team, None, SandboxStatus::Running).await;
    let from_paused = Transition::to(SandboxStatus::Stopping).from(SandboxStatus::Paused);
    assert!(!sandboxes::transition(&cp.db, id, from_paused)
        .await
        .unwrap());
    let illegal = Transition::to(SandboxStatus::Resuming).from(SandboxStatus::Running);
    assert!(!sandboxes::transition(&cp.db, id, illegal).await.unwrap());
    assert_eq!(status(&cp.db, id).await, SandboxStatus::Running);
    cp.stop().await;
}

#[tokio::test]
async fn a_change_after_the_reconcilers_view_wins() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let team = admin.team.parse::<TeamId>().unwrap().uuid();
    let seen = sandboxes::db_now(&cp.db).await.unwrap();
    let id = insert(&cp.db, team, None, SandboxStatus::Running).await;
    let stale = Transition {
        unchanged_since: Some(seen),
        ..Transition::to(SandboxStatus::Stopped).from(SandboxStatus::Running)
    };
    assert!(!sandboxes::transition(&cp.db, id, stale).await.unwrap());
    assert_eq!(status(&cp.db, id).await, SandboxStatus::Running);
    let now = sandboxes::db_now(&cp.db).await.unwrap();
    let fresh = Transition {
        unchanged_since: Some(now),
        ..stale
    };
    assert!(sandboxes::transition(&cp.db, id, fresh).await.unwrap());
    assert_eq!(status(&cp.db, id).await, SandboxStatus::Stopped);
    cp.stop().await;
}

#[tokio::test]
async fn a_create_cannot_revive_a_sandbox_marked_error() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let team = admin.team.parse::<TeamId>().unwrap().uuid();
    let id = insert(&cp.db, team, None, SandboxStatus::Starting).await;
    // The reconciler gives the create up.
    let give_up = Transition::to(SandboxStatus::Failed).from(SandboxStatus::Starting);
    assert!(sandboxes::transition(&cp.db, id, give_up).await.unwrap());
    let metadata = json!({"guest_ip": "10.11.0.2"});
    assert!(!sandboxes::mark_started(&cp.db, id, &metadata)
        .await
        .unwrap());
    let row = sandboxes::for_team(&cp.db, team, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, SandboxStatus::Failed);
    assert_eq!(row.started_at, None);
    assert_eq!(row.metadata, json!({}));
    // From `starting` it applies, recording the agent's answer.
    let id = insert(&cp.db, team, None, SandboxStatus::Starting).await;
    assert!(sandboxes::mark_started(&cp.db, id, &metadata)
        .await
        .unwrap());
    let row = sandboxes::for_team(&cp.db, team, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, SandboxStatus::Running);
    assert!(row.started_at.is_some());
    assert_eq!(row.metadata, metadata);
    cp.stop().await;
}

#[tokio::test]
async fn deleting_a_team_stops_a_create_in_flight() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let (status_code, team) = cp
        .call(
            Method::POST,
            "/v1/teams",
            &admin.auth(),
            Some(json!({"name": "Doomed"})),
        )
        .await;
    assert_eq!(status_code, StatusCode::CREATED, "{team}");
    let team_id = team["id"].as_str().unwrap().to_owned();
    let owner = cp.switch(&admin, &team_id).await;
    let team = team_id.parse::<TeamId>().unwrap().uuid();
    let booting = insert(&cp.db, team, None, SandboxStatus::Starting).await;
    let placed = insert(&cp.db, team, None, SandboxStatus::Pending).await;
    let lost = insert(&cp.db, team, None, SandboxStatus::Missing).await;
    let failed = insert(&cp.db, team, None, SandboxStatus::Failed).await;
    let (status_code, body) = cp
        .call(
            Method::DELETE,
            &format!("/v1/teams/{team_id}"),
            &owner.auth(),
            None,
        )
        .await;
    assert_eq!(status_code, StatusCode::NO_CONTENT, "{body}");
    for id in [booting, placed, lost] {
        assert_eq!(status(&cp.db, id).await, SandboxStatus::Stopped);
    }
    assert_eq!(status(&cp.db, failed).await, SandboxStatus::Failed);
    // The create's agent answers now: its final compare-and-set is refused, so it cleans up.
    assert!(!sandboxes::mark_started(&cp.db, booting, &json!({}))
        .await
        .unwrap());
    let to_starting = Transition::to(SandboxStatus::Starting).from(SandboxStatus::Pending);
    assert!(!sandboxes::transition(&cp.db, placed, to_starting)
        .await
        .unwrap());
    assert_eq!(status(&cp.db, booting).await, SandboxStatus::Stopped);
    cp.stop().await;
}

#[tokio::test]
async fn force_deleting_a_host_stops_a_create_in_flight() {
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let team = admin.team.parse::<TeamId>().unwrap().uuid();
    let (host_id, _) = cp.registered_host(&admin, json!({"type": "regular"})).await;
    let host = host_id.parse::<HostId>().unwrap().uuid();
    let booting = insert(&cp.db, team, Some(host), SandboxStatus::Starting).await;
    let lost = insert(&cp.db, team, Some(host), SandboxStatus::Missing).await;
    let path = format!("/v1/hosts/{host_id}");
    let (status_code, body) = cp.call(Method::DELETE, &path, &admin.auth(), None).await;
    assert_eq!(status_code, StatusCode::CONFLICT, "{body}");
    let mut listed: Vec<&str> = body["error"]["sandbox_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    listed.sort_unstable();
    assert_eq!(
        listed.len(),
        2,
        "a missing capsule still holds its host: {body}"
    );
    let (status_code, body) = cp
        .call(
            Method::DELETE,
            &format!("{path}?force=true"),
            &admin.auth(),
            None,
        )
        .await;
    assert_eq!(status_code, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(status(&cp.db, booting).await, SandboxStatus::Stopped);
    assert_eq!(status(&cp.db, lost).await, SandboxStatus::Stopped);
    assert!(!sandboxes::mark_started(&cp.db, booting, &json!({}))
        .await
        .unwrap());
    assert_eq!(status(&cp.db, booting).await, SandboxStatus::Stopped);
    cp.stop().await;
}

/// A deleted template's image blob stays in the store while capsules of that template live on:
/// their paused copies (resume on any host) lie over it.
#[tokio::test]
async fn a_template_blob_is_in_use_while_capsules_of_the_deleted_template_live() {
    use wrenn::db::templates;
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let team = admin.team.parse::<TeamId>().unwrap().uuid();
    let sha256 = "ab".repeat(32);
    let template = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO templates (id, team_id, name, type, vcpus, memory_mb, image_sha256) \
         VALUES ($1, $2, 'mine', 'base', 1, 256, $3)",
    )
    .bind(template)
    .bind(team)
    .bind(&sha256)
    .execute(&cp.db)
    .await
    .unwrap();
    let capsule = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO sandboxes (id, team_id, template_id, template_name, status, vcpus, memory_mb)
         VALUES ($1, $2, $3, 'mine', 'paused', 1, 256)",
    )
    .bind(capsule)
    .bind(team)
    .bind(template)
    .execute(&cp.db)
    .await
    .unwrap();
    assert!(templates::delete(&cp.db, template).await.unwrap());
    assert!(templates::blob_in_use(&cp.db, &sha256, team, "mine")
        .await
        .unwrap());
    // Another team's capsules of a template of that name are not this blob's.
    assert!(
        !templates::blob_in_use(&cp.db, &sha256, Uuid::new_v4(), "mine")
            .await
            .unwrap()
    );
    let stopped = Transition::to(SandboxStatus::Stopped).from(SandboxStatus::Paused);
    assert!(sandboxes::transition(&cp.db, capsule, stopped)
        .await
        .unwrap());
    assert!(!templates::blob_in_use(&cp.db, &sha256, team, "mine")
        .await
        .unwrap());
    cp.stop().await;
}
