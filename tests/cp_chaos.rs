//! Chaos around creates, with real parts: a control plane killed (SIGKILL) while its create
//! boots a VM, PostgreSQL restarted during a burst of creates, and the agent killed (SIGKILL)
//! after each step of a create. Whatever each create answered, the reconciler leaves no capsule
//! in a transitional status, and once the capsules are destroyed nothing is left on the host
//! (namespaces, links, nft elements, VMM processes, cgroups, files).

mod support;

use std::time::Duration;

use hyper::{Method, StatusCode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use support::agent::{add_agent, wait_clean, CREATE_STEPS, VM_TURNS};
use support::{Auth, CpReplica, TestCp};
use wrenn::cp::agent_client::{AgentClient, AgentTimeouts};
use wrenn::cp::reconciler;
use wrenn::cp::state::{AuthSettings, CapsuleSettings};

/// A create abandoned by its control plane is failed this long after its timeout plus a minute;
/// short, so the test sees the reconciler finish the job.
const CREATE_TIMEOUT: Duration = Duration::from_secs(20);
const SETTLE_WAIT: Duration = Duration::from_secs(180);

async fn transitional(cp: &TestCp) -> Vec<(String, String)> {
    sqlx::query_as::<_, (String, String)>(
        "SELECT id::text, status FROM sandboxes
         WHERE status IN ('pending', 'starting', 'stopping', 'pausing', 'resuming', 'snapshotting')",
    )
    .fetch_all(&cp.db)
    .await
    .unwrap()
}

/// Runs reconcile passes until no capsule is in a transitional status, then one more (it
/// destroys on the agent what the last one failed).
async fn settle(cp: &TestCp) {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    loop {
        // A pass may meet the database still recovering; the next one retries.
        let _ = reconciler::reconcile_once(&cp.state).await;
        let stuck = transitional(cp).await;
        if stuck.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still transitional: {stuck:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    reconciler::reconcile_once(&cp.state).await.unwrap();
}

/// Sends `POST /v1/capsules` to the control plane at `addr` in its own task, so the test can
/// kill something while the create is under way.
fn spawn_create(
    addr: std::net::SocketAddr,
    key: &str,
) -> tokio::task::JoinHandle<
    Result<hyper::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = hyper::Request::post(format!("http://{addr}/v1/capsules"))
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    tokio::spawn(client.request(request))
}

async fn api_key(cp: &TestCp, admin: &Auth) -> String {
    let (status, key) = cp
        .call(
            Method::POST,
            "/v1/api-keys",
            admin,
            Some(json!({"name": "chaos"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    key["key"].as_str().unwrap().to_owned()
}

fn short_create_timeout() -> CapsuleSettings {
    CapsuleSettings {
        agents: AgentClient::new(AgentTimeouts {
            request: Duration::from_secs(30),
            create: CREATE_TIMEOUT,
        }),
        ..support::quiet_capsules()
    }
}

async fn destroy_all(cp: &TestCp, key: &Auth) {
    let (status, list) = cp.call(Method::GET, "/v1/capsules", key, None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    for capsule in list.as_array().unwrap() {
        let id = capsule["id"].as_str().unwrap();
        let (status, body) = cp
            .call(Method::DELETE, &format!("/v1/capsules/{id}"), key, None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_outliving_their_control_plane_or_database_leave_nothing_stuck_or_behind() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let mut cp = TestCp::start_full(
        support::QUIET_MONITOR,
        short_create_timeout(),
        AuthSettings::default(),
    )
    .await;
    let admin = cp.signup("admin@example.com").await;
    let (agent, _) = add_agent(&cp, &admin.auth()).await;
    let plain_key = api_key(&cp, &admin.auth()).await;
    let key = Auth::ApiKey(plain_key.clone());

    // A control plane in its own process is killed once the agent has started its create.
    let replica = CpReplica::start(&cp).await;
    let create = spawn_create(replica.addr, &plain_key);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::task::block_in_place(|| agent.sandbox_ids()).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never started the create"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(Pid::from_raw(replica.pid() as i32), Signal::SIGKILL).unwrap();
    let _ = create.await;
    drop(replica);
    settle(&cp).await;

    // PostgreSQL restarts while three creates, sent to a control plane in its own process, are
    // under way.
    let replica = CpReplica::start(&cp).await;
    let burst: Vec<_> = (0..3)
        .map(|_| spawn_create(replica.addr, &plain_key))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::block_in_place(|| cp.pg.restart()).expect("postgres restarts");
    for create in burst {
        let answer = tokio::time::timeout(Duration::from_secs(300), create)
            .await
            .expect("every create answers")
            .unwrap();
        if let Ok(response) = answer {
            assert_ne!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    drop(replica);
    settle(&cp).await;

    destroy_all(&cp, &key).await;
    settle(&cp).await;
    tokio::task::block_in_place(|| wait_clean(&agent));
    assert!(transitional(&cp).await.is_empty());
    drop(agent);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs `--features failpoints` (just test)"
)]
async fn an_agent_killed_after_any_create_step_leaves_nothing_stuck_or_behind() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let cp = TestCp::start_full(
        support::QUIET_MONITOR,
        short_create_timeout(),
        AuthSettings::default(),
    )
    .await;
    let admin = cp.signup("admin@example.com").await;
    let (mut agent, _) = add_agent(&cp, &admin.auth()).await;
    let plain_key = api_key(&cp, &admin.auth()).await;
    let key = Auth::ApiKey(plain_key.clone());

    for (point, step) in CREATE_STEPS {
        // The create stops right after the step, and the agent is killed there.
        tokio::task::block_in_place(|| {
            agent.restart(Some(&format!("agent-create-after-{point}=return(hang)")))
        });
        let create = spawn_create(cp.addr, &plain_key);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while agent
            .log_lines(&["the create hangs after this step", step])
            .is_empty()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{point}: the create never reached the step"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::task::block_in_place(|| agent.kill_hard());
        let answer = tokio::time::timeout(Duration::from_secs(60), create)
            .await
            .expect("the create answers")
            .unwrap()
            .unwrap();
        assert_eq!(answer.status(), StatusCode::BAD_GATEWAY, "{point}");

        // The next agent removes what the killed one left; the reconciler settles the capsule.
        tokio::task::block_in_place(|| agent.restart(None));
        settle(&cp).await;
        tokio::task::block_in_place(|| wait_clean(&agent));
        let (status, list) = cp.call(Method::GET, "/v1/capsules", &key, None).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        assert_eq!(list, json!([]), "{point}: a failed create is not listed");
    }
    drop(agent);
    cp.stop().await;
}
