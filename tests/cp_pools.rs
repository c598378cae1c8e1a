//! Team resource pools and usage metering against a real PostgreSQL: the plan admin API and the
//! pool view, admission under concurrency (creates, resumes, forks, snapshot templates: the
//! scheduler's own transactions, many at once), metering over a scripted timeline compared with
//! an independent calculation, and two replicas metering at once without double counting.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::schema::Spec;
use support::{assert_error, Auth, CpReplica, TestCp, User};
use uuid::Uuid;
use wrenn::cp::pool::Ask;
use wrenn::cp::scheduler::{self, Demand, Placement, ScheduleError};
use wrenn::db::sandboxes::{self, NewSandbox, SandboxStatus, Transition};
use wrenn::db::{template_reservations, usage};
use wrenn::id::TeamId;

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PATCH: Method = Method::PATCH;
const PUT: Method = Method::PUT;
const DELETE: Method = Method::DELETE;

fn team_of(user: &User) -> Uuid {
    user.team.parse::<TeamId>().unwrap().uuid()
}

async fn new_key(cp: &TestCp, user: &User) -> Auth {
    let (status, body) = cp
        .call(
            POST,
            "/v1/api-keys",
            &user.auth(),
            Some(json!({"name": "k"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    Auth::ApiKey(body["key"].as_str().unwrap().to_owned())
}

async fn put_on_plan(cp: &TestCp, admin: &User, team: &str, plan: &str) {
    let (status, body) = cp
        .call(
            PUT,
            &format!("/v1/admin/teams/{team}/plan"),
            &admin.auth(),
            Some(json!({"plan": plan})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn create_plan(cp: &TestCp, admin: &User, body: Value) -> Value {
    let (status, plan) = cp
        .call(POST, "/v1/admin/plans", &admin.auth(), Some(body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    plan
}

#[tokio::test]
async fn admins_manage_plans_and_teams_see_their_pool() {
    let cp = TestCp::start().await;
    let ours = Spec::ours();
    let admin = cp.signup("admin@example.com").await;
    let user = cp.signup("user@example.com").await;
    let key = new_key(&cp, &user).await;

    let (status, list) = cp.call(GET, "/v1/admin/plans", &admin.auth(), None).await;
    assert_eq!(status, StatusCode::OK);
    ours.check_response("GET", "/v1/admin/plans", 200, &list);
    let names: Vec<&str> = list["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "unlimited"]);
    assert_eq!(list["plans"][0]["default"], true);

    // Only platform admins manage plans.
    let (status, out) = cp.call(GET, "/v1/admin/plans", &user.auth(), None).await;
    assert_error(status, &out, StatusCode::FORBIDDEN, "forbidden");
    let (status, out) = cp
        .call(
            POST,
            "/v1/admin/plans",
            &user.auth(),
            Some(json!({"name": "x"})),
        )
        .await;
    assert_error(status, &out, StatusCode::FORBIDDEN, "forbidden");

    // Bad input is a 400 naming the field.
    for (body, field) in [
        (json!({"name": "-bad"}), "name"),
        (json!({"name": "ok", "vcpus": -1}), "vcpus"),
        (json!({"name": "ok", "memory_mb": 1u64 << 50}), "memory_mb"),
        (
            json!({"name": "ok", "paused_memory_percent": 101}),
            "paused_memory_percent",
        ),
        (json!({"name": "ok", "disk_mb": "lots"}), "disk_mb"),
        (json!({"name": "ok", "cpus": 1}), "cpus"),
    ] {
        let (status, out) = cp
            .call(POST, "/v1/admin/plans", &admin.auth(), Some(body.clone()))
            .await;
        assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");
        let message = out["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }

    let small = create_plan(
        &cp,
        &admin,
        json!({"name": "small", "vcpus": 2, "memory_mb": 1024, "disk_mb": 20480,
               "max_capsules": 2, "paused_memory_percent": 25}),
    )
    .await;
    ours.check_response("POST", "/v1/admin/plans", 201, &small);
    assert_eq!(small["default"], false);
    let (status, out) = cp
        .call(
            POST,
            "/v1/admin/plans",
            &admin.auth(),
            Some(json!({"name": "small"})),
        )
        .await;
    assert_error(status, &out, StatusCode::CONFLICT, "conflict");

    // The pool view: the default plan until the team is moved.
    let pool_path = format!("/v1/teams/{}/pool", user.team);
    let (status, pool) = cp.call(GET, &pool_path, &key, None).await;
    assert_eq!(status, StatusCode::OK, "{pool}");
    ours.check_response("GET", "/v1/teams/{id}/pool", 200, &pool);
    assert_eq!(pool["plan"], "default");
    put_on_plan(&cp, &admin, &user.team, "small").await;
    let team = team_of(&user);
    for (status, vcpus, memory_mb) in [
        (SandboxStatus::Running, 1, 512),
        (SandboxStatus::Paused, 1, 1000),
        (SandboxStatus::Stopped, 4, 4096),
    ] {
        sandboxes::insert(
            &cp.db,
            NewSandbox {
                id: Uuid::new_v4(),
                team_id: team,
                host_id: None,
                template_id: Uuid::nil(),
                status,
                vcpus,
                memory_mb,
            },
        )
        .await
        .unwrap();
    }
    let (_, pool) = cp.call(GET, &pool_path, &user.auth(), None).await;
    ours.check_response("GET", "/v1/teams/{id}/pool", 200, &pool);
    assert_eq!(pool["plan"], "small");
    assert_eq!(pool["limits"]["vcpus"], 2);
    assert_eq!(pool["limits"]["paused_memory_percent"], 25);
    assert_eq!(pool["used"]["capsules"], 1);
    assert_eq!(pool["used"]["vcpus"], 1);
    // 512 running, and a quarter of the paused capsule's 1000 MiB.
    assert_eq!(pool["used"]["memory_mb"], 512 + 250);
    assert_eq!(pool["paused"]["capsules"], 1);
    assert_eq!(pool["paused"]["memory_mb"], 250);
    let disk = pool["used"]["disk_mb"].as_i64().unwrap();
    assert!(disk > 0, "{pool}");

    // Another team's pool is not for these credentials; admins see any.
    let other = cp.signup("other@example.com").await;
    let (status, out) = cp
        .call(GET, &format!("/v1/teams/{}/pool", other.team), &key, None)
        .await;
    assert_error(status, &out, StatusCode::FORBIDDEN, "forbidden");
    let (status, _) = cp.call(GET, &pool_path, &admin.auth(), None).await;
    assert_eq!(status, StatusCode::OK);

    // A change names what it changes; null lifts a limit.
    let (status, changed) = cp
        .call(
            PATCH,
            "/v1/admin/plans/small",
            &admin.auth(),
            Some(json!({"vcpus": null, "max_capsules": 3})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    ours.check_response("PATCH", "/v1/admin/plans/{name}", 200, &changed);
    assert_eq!(changed["vcpus"], Value::Null);
    assert_eq!(changed["max_capsules"], 3);
    assert_eq!(changed["memory_mb"], 1024);
    let (status, out) = cp
        .call(
            PATCH,
            "/v1/admin/plans/small",
            &admin.auth(),
            Some(json!({"default": false})),
        )
        .await;
    assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, out) = cp
        .call(
            PATCH,
            "/v1/admin/plans/nope",
            &admin.auth(),
            Some(json!({})),
        )
        .await;
    assert_error(status, &out, StatusCode::NOT_FOUND, "not_found");

    // Deleting: not the default, not while a team is on it.
    let (status, out) = cp
        .call(DELETE, "/v1/admin/plans/default", &admin.auth(), None)
        .await;
    assert_error(status, &out, StatusCode::CONFLICT, "conflict");
    let (status, out) = cp
        .call(DELETE, "/v1/admin/plans/small", &admin.auth(), None)
        .await;
    assert_error(status, &out, StatusCode::CONFLICT, "conflict");
    assert!(out["error"]["message"].as_str().unwrap().contains("1 team"));

    // A new default plan is what new teams get.
    create_plan(
        &cp,
        &admin,
        json!({"name": "starter", "vcpus": 1, "default": true}),
    )
    .await;
    let (_, list) = cp.call(GET, "/v1/admin/plans", &admin.auth(), None).await;
    let defaults: Vec<&str> = list["plans"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["default"] == true)
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(defaults, ["starter"]);
    let newcomer = cp.signup("new@example.com").await;
    let (_, pool) = cp
        .call(
            GET,
            &format!("/v1/teams/{}/pool", newcomer.team),
            &newcomer.auth(),
            None,
        )
        .await;
    assert_eq!(pool["plan"], "starter");
    put_on_plan(&cp, &admin, &user.team, "starter").await;
    let (status, _) = cp
        .call(DELETE, "/v1/admin/plans/small", &admin.auth(), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, out) = cp
        .call(GET, "/v1/admin/plans/small", &admin.auth(), None)
        .await;
    assert_error(status, &out, StatusCode::NOT_FOUND, "not_found");
    let (status, out) = cp
        .call(
            PUT,
            &format!("/v1/admin/teams/{}/plan", user.team),
            &admin.auth(),
            Some(json!({"plan": "small"})),
        )
        .await;
    assert_error(status, &out, StatusCode::NOT_FOUND, "not_found");

    // Every change is in the audit log.
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_logs WHERE resource_type IN ('plan', 'team')
         AND action LIKE ANY (ARRAY['create', 'update', 'delete', 'plan.assign'])
         ORDER BY created_at",
    )
    .fetch_all(&cp.db)
    .await
    .unwrap();
    for action in ["create", "update", "delete", "plan.assign"] {
        assert!(actions.iter().any(|a| a == action), "{actions:?}");
    }
    cp.stop().await;
}

/// A team on a plan that fits `capsules` running capsules of 1 vCPU and 512 MiB, and a host
/// with room for many more.
async fn team_on_small_plan(cp: &TestCp, admin: &User, capsules: i64) -> (User, Uuid, Uuid) {
    let user = cp
        .signup(&format!("user-{}@example.com", Uuid::new_v4()))
        .await;
    let name = format!(
        "fits-{capsules}-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    create_plan(
        cp,
        admin,
        json!({"name": name, "max_capsules": capsules, "vcpus": 64, "memory_mb": 1 << 20,
               "disk_mb": 1 << 30}),
    )
    .await;
    put_on_plan(cp, admin, &user.team, &name).await;
    let (host, _) = cp.registered_host(admin, json!({"type": "regular"})).await;
    let host = host.parse::<wrenn::id::HostId>().unwrap().uuid();
    let team = team_of(&user);
    (user, team, host)
}

const SMALL: Demand = Demand {
    vcpus: 1,
    memory_mb: 512,
    disk_mb: 1024,
};

fn placement(team: Uuid) -> Placement {
    Placement {
        sandbox_id: Uuid::new_v4(),
        team_id: team,
        template_id: Uuid::nil(),
        template_name: "minimal".into(),
        template_sha256: None,
        holders_only: false,
        timeout_sec: 0,
        public_ports: Vec::new(),
        egress: json!({}),
        demand: SMALL,
    }
}

async fn live_count(cp: &TestCp, team: Uuid, status: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM sandboxes WHERE team_id = $1 AND status = $2")
        .bind(team)
        .bind(status)
        .fetch_one(&cp.db)
        .await
        .unwrap()
}

fn exhausted(outcome: &Result<impl std::fmt::Debug, ScheduleError>) -> bool {
    match outcome {
        Err(ScheduleError::PoolExhausted(refusal)) => {
            assert_eq!(refusal.resource.as_str(), "capsules", "{refusal}");
            true
        }
        Ok(_) => false,
        Err(other) => panic!("unexpected refusal: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_resumes_and_forks_never_overshoot_the_pool() {
    let cp = TestCp::start().await;
    let settings = cp.state.capsules.scheduler;
    let admin = cp.signup("admin@example.com").await;

    // 20 creates at once against a pool that fits 5.
    let (_, team, _) = team_on_small_plan(&cp, &admin, 5).await;
    let creates = (0..20).map(|_| {
        let db = cp.db.clone();
        let placement = placement(team);
        tokio::spawn(async move { scheduler::place(&db, &settings, &placement).await })
    });
    let outcomes: Vec<_> = futures::future::join_all(creates)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let refused = outcomes.iter().filter(|o| exhausted(o)).count();
    assert_eq!(refused, 15);
    assert_eq!(live_count(&cp, team, "pending").await, 5);

    // Paused capsules hold no place; 10 of them resumed at once fit in the 2 places left.
    let (_, team, host) = team_on_small_plan(&cp, &admin, 3).await;
    scheduler::place(&cp.db, &settings, &placement(team))
        .await
        .unwrap();
    let mut paused = Vec::new();
    for _ in 0..10 {
        let id = Uuid::new_v4();
        sandboxes::insert(
            &cp.db,
            NewSandbox {
                id,
                team_id: team,
                host_id: Some(host),
                template_id: Uuid::nil(),
                status: SandboxStatus::Paused,
                vcpus: 1,
                memory_mb: 512,
            },
        )
        .await
        .unwrap();
        paused.push(id);
    }
    let resumes = paused.iter().map(|&id| {
        let db = cp.db.clone();
        tokio::spawn(async move {
            let change = Transition::to(SandboxStatus::Resuming).from(SandboxStatus::Paused);
            scheduler::change_admitted(&db, team, id, change, |plan| {
                Ask::resume(1, 512, plan.limits.paused_memory_percent)
            })
            .await
        })
    });
    let outcomes: Vec<_> = futures::future::join_all(resumes)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let refused = outcomes.iter().filter(|o| exhausted(o)).count();
    assert_eq!(refused, 8);
    assert!(outcomes.iter().all(|o| !matches!(o, Ok(false))));
    assert_eq!(live_count(&cp, team, "resuming").await, 2);
    assert_eq!(live_count(&cp, team, "paused").await, 8);

    // Forks of one source, 10 at once, each of 2 children, against a pool that fits 5 more.
    let (_, team, host) = team_on_small_plan(&cp, &admin, 6).await;
    let source = placement(team);
    scheduler::place(&cp.db, &settings, &source).await.unwrap();
    let forks = (0..10).map(|_| {
        let db = cp.db.clone();
        let source = source.sandbox_id;
        tokio::spawn(async move {
            let children = [Uuid::new_v4(), Uuid::new_v4()];
            scheduler::place_fork(&db, &settings, host, team, source, &children, SMALL).await
        })
    });
    let outcomes: Vec<_> = futures::future::join_all(forks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let admitted = outcomes.iter().filter(|o| !exhausted(o)).count();
    assert_eq!(admitted, 2);
    assert_eq!(live_count(&cp, team, "pending").await, 5);

    // Snapshot templates of two capsules at once, in a disk pool with room for one: the first
    // holds its place while it is made, so the second is refused.
    let user = cp.signup("snapshots@example.com").await;
    let team = team_of(&user);
    let (host, _) = cp.registered_host(&admin, json!({"type": "regular"})).await;
    let host = host.parse::<wrenn::id::HostId>().unwrap().uuid();
    // Two capsules' 5120 MiB disks, and one template of 512 MiB memory and 5120 MiB disk.
    create_plan(
        &cp,
        &admin,
        json!({"name": "one-snapshot", "disk_mb": 2 * 5120 + 512 + 5120}),
    )
    .await;
    put_on_plan(&cp, &admin, &user.team, "one-snapshot").await;
    let mut capsules = Vec::new();
    for _ in 0..2 {
        let id = Uuid::new_v4();
        let capsule = NewSandbox {
            id,
            team_id: team,
            host_id: Some(host),
            template_id: Uuid::nil(),
            status: SandboxStatus::Running,
            vcpus: 1,
            memory_mb: 512,
        };
        sandboxes::insert(&cp.db, capsule).await.unwrap();
        capsules.push(id);
    }
    let snapshots = capsules.iter().map(|&id| {
        let db = cp.db.clone();
        tokio::spawn(async move {
            let change = Transition::to(SandboxStatus::Snapshotting).from(SandboxStatus::Running);
            let ask = Ask::snapshot(512, 5120);
            scheduler::snapshot_admitted(&db, team, id, change, ask, Duration::from_secs(600)).await
        })
    });
    let outcomes: Vec<_> = futures::future::join_all(snapshots)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let refusals: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            Err(ScheduleError::PoolExhausted(refusal)) => Some(refusal),
            Ok(Some(_)) => None,
            other => panic!("unexpected outcome: {other:?}"),
        })
        .collect();
    let held = outcomes
        .iter()
        .find_map(|o| o.as_ref().ok().copied().flatten())
        .unwrap();
    assert_eq!(refusals.len(), 1, "{outcomes:?}");
    assert_eq!(refusals[0].resource.as_str(), "disk_mb");
    assert_eq!(refusals[0].used, 2 * 5120 + 512 + 5120);
    assert_eq!(live_count(&cp, team, "snapshotting").await, 1);
    let template_disk = || async {
        let path = format!("/v1/teams/{}/pool", user.team);
        let (status, pool) = cp.call(GET, &path, &user.auth(), None).await;
        assert_eq!(status, StatusCode::OK, "{pool}");
        pool["paused"]["template_disk_mb"].as_i64().unwrap()
    };
    assert_eq!(template_disk().await, 512 + 5120);
    // Registered (or failed), the template no longer holds a place of its own; nor does a
    // hold that lapsed (its control plane stopped meanwhile). Each making has its own hold:
    // the end of one never releases another's, of the same capsule or not.
    let hour = Duration::from_secs(3600);
    let second = template_reservations::hold(&cp.db, capsules[0], team, 100, hour)
        .await
        .unwrap();
    template_reservations::release(&cp.db, held).await.unwrap();
    assert_eq!(template_disk().await, 100);
    template_reservations::release(&cp.db, second)
        .await
        .unwrap();
    assert_eq!(template_disk().await, 0);
    template_reservations::hold(&cp.db, capsules[0], team, 4096, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(template_disk().await, 0);
    // A fork moves its source to `snapshotting` too, but holds no template place.
    for id in &capsules {
        let fork = Transition::to(SandboxStatus::Snapshotting).from(SandboxStatus::Running);
        sandboxes::transition(&cp.db, *id, fork).await.unwrap();
    }
    assert_eq!(live_count(&cp, team, "snapshotting").await, 2);
    assert_eq!(template_disk().await, 0);
    cp.stop().await;
}

/// One scripted capsule: its size and its status at each sample.
struct Scripted {
    id: Uuid,
    vcpus: i32,
    memory_mb: i32,
    statuses: Vec<SandboxStatus>,
}

#[tokio::test]
async fn metering_matches_an_independent_calculation_over_a_scripted_timeline() {
    let cp = TestCp::start().await;
    let reference = Spec::reference();
    let admin = cp.signup("admin@example.com").await;
    let user = cp.signup("user@example.com").await;
    let key = new_key(&cp, &user).await;
    create_plan(
        &cp,
        &admin,
        json!({"name": "metered", "paused_memory_percent": 50}),
    )
    .await;
    put_on_plan(&cp, &admin, &user.team, "metered").await;
    let team = team_of(&user);

    // Five minutes before midnight UTC three days ago: the timeline crosses into the next day.
    let now = sandboxes::db_now(&cp.db).await.unwrap();
    let midnight = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let start = midnight - chrono::Duration::days(2) - chrono::Duration::minutes(5);
    let interval = 10;
    let steps = 60;
    use SandboxStatus::{Paused, Running, Stopped};
    let script = |spans: &[(usize, SandboxStatus)]| -> Vec<SandboxStatus> {
        (0..steps)
            .map(|i| {
                spans
                    .iter()
                    .rev()
                    .find(|(from, _)| i >= *from)
                    .map_or(Stopped, |(_, s)| *s)
            })
            .collect()
    };
    let capsules = [
        // Runs, is paused for 15 samples, runs again.
        Scripted {
            id: Uuid::new_v4(),
            vcpus: 2,
            memory_mb: 1025,
            statuses: script(&[(0, Running), (30, Paused), (45, Running)]),
        },
        // Starts later, stops early.
        Scripted {
            id: Uuid::new_v4(),
            vcpus: 1,
            memory_mb: 512,
            statuses: script(&[(10, Running), (20, Stopped)]),
        },
    ];
    for capsule in &capsules {
        sandboxes::insert(
            &cp.db,
            NewSandbox {
                id: capsule.id,
                team_id: team,
                host_id: None,
                template_id: Uuid::nil(),
                status: SandboxStatus::Pending,
                vcpus: capsule.vcpus,
                memory_mb: capsule.memory_mb,
            },
        )
        .await
        .unwrap();
    }
    let mut expected: BTreeMap<chrono::NaiveDate, (f64, f64)> = BTreeMap::new();
    let mut peak = (0i64, 0i64, 0i64);
    for step in 0..steps {
        let at: DateTime<Utc> = start + chrono::Duration::seconds(interval * step as i64);
        let (mut running, mut vcpus, mut memory) = (0i64, 0i64, 0i64);
        for capsule in &capsules {
            let status = capsule.statuses[step];
            sqlx::query("UPDATE sandboxes SET status = $2 WHERE id = $1")
                .bind(capsule.id)
                .bind(status.as_str())
                .execute(&cp.db)
                .await
                .unwrap();
            match status {
                Running => {
                    running += 1;
                    vcpus += i64::from(capsule.vcpus);
                    memory += i64::from(capsule.memory_mb);
                }
                Paused => memory += (i64::from(capsule.memory_mb) + 1) / 2,
                _ => {}
            }
        }
        peak = (peak.0.max(running), peak.1.max(vcpus), peak.2.max(memory));
        let day = expected.entry(at.date_naive()).or_default();
        day.0 += vcpus as f64 * interval as f64 / 60.0;
        day.1 += memory as f64 * interval as f64 / 60.0;
        // Two replicas sample the same instant at once: it counts once.
        let (a, b) = tokio::join!(
            usage::sample(&cp.db, at, interval as f64),
            usage::sample(&cp.db, at, interval as f64)
        );
        let sampled = a.unwrap() + b.unwrap();
        assert!(sampled <= 1, "step {step}: sampled {sampled} times");
    }
    assert_eq!(expected.len(), 2, "the timeline crosses midnight");
    sqlx::query("UPDATE sandboxes SET status = 'stopped' WHERE team_id = $1")
        .bind(team)
        .execute(&cp.db)
        .await
        .unwrap();

    let from = expected.keys().next().unwrap();
    let path = format!("/v1/capsules/usage?from={from}&to={}", now.date_naive());
    let (status, body) = cp.call(GET, &path, &key, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    reference.check_response("GET", "/v1/capsules/usage", 200, &body);
    assert_eq!(body["from"], from.to_string());
    let points = body["points"].as_array().unwrap();
    assert_eq!(points.len(), 4, "from three days ago to today");
    for point in points {
        let day: chrono::NaiveDate = point["date"].as_str().unwrap().parse().unwrap();
        let (cpu, ram) = expected.get(&day).copied().unwrap_or_default();
        let close = |a: &Value, b: f64| (a.as_f64().unwrap() - b).abs() < 1e-6;
        assert!(close(&point["cpu_minutes"], cpu), "{point} vs {cpu}");
        assert!(close(&point["ram_mb_minutes"], ram), "{point} vs {ram}");
    }

    // Stats: the peaks of the last 30 days and a series that holds them; `current` is now.
    sandboxes::insert(
        &cp.db,
        NewSandbox {
            id: Uuid::new_v4(),
            team_id: team,
            host_id: None,
            template_id: Uuid::nil(),
            status: SandboxStatus::Running,
            vcpus: 1,
            memory_mb: 256,
        },
    )
    .await
    .unwrap();
    let (status, stats) = cp
        .call(GET, "/v1/capsules/stats?range=30d", &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    reference.check_response("GET", "/v1/capsules/stats", 200, &stats);
    assert_eq!(stats["range"], "30d");
    assert_eq!(
        stats["current"],
        json!({"running_count": 1, "vcpus_reserved": 1, "memory_mb_reserved": 256,
               "sampled_at": stats["current"]["sampled_at"]})
    );
    assert_eq!(
        stats["peaks"],
        json!({"running_count": peak.0, "vcpus": peak.1, "memory_mb": peak.2})
    );
    let series = &stats["series"];
    assert_eq!(series["labels"].as_array().unwrap().len(), 120);
    let max = |key: &str| {
        series[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .max()
    };
    assert_eq!(max("vcpus"), Some(peak.1));
    assert_eq!(max("memory_mb"), Some(peak.2));
    for range in ["5m", "1h", "6h", "24h"] {
        let (status, stats) = cp
            .call(
                GET,
                &format!("/v1/capsules/stats?range={range}"),
                &key,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        reference.check_response("GET", "/v1/capsules/stats", 200, &stats);
    }
    let (_, default_range) = cp.call(GET, "/v1/capsules/stats", &key, None).await;
    assert_eq!(default_range["range"], "1h");

    // Bad input.
    for path in [
        "/v1/capsules/stats?range=2d",
        "/v1/capsules/usage?from=yesterday",
        "/v1/capsules/usage?from=2026-02-30",
        "/v1/capsules/usage?to=-262143-01-01",
        "/v1/capsules/usage?from=2026-03-02&to=2026-03-01",
        "/v1/capsules/usage?from=2026-01-01&to=2026-06-01",
    ] {
        let (status, out) = cp.call(GET, path, &key, None).await;
        assert_error(status, &out, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let (status, _) = cp.call(GET, "/v1/capsules/stats", &Auth::None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    cp.stop().await;
}

#[tokio::test]
async fn two_replicas_meter_every_instant_once() {
    let cp = TestCp::start().await;
    let user = cp.signup("user@example.com").await;
    let team = team_of(&user);
    let interval = [("CP_USAGE_SAMPLE_INTERVAL_SECS", "1")];
    let replicas = [
        CpReplica::start_with_env(&cp, &interval).await,
        CpReplica::start_with_env(&cp, &interval).await,
    ];
    let id = Uuid::new_v4();
    sandboxes::insert(
        &cp.db,
        NewSandbox {
            id,
            team_id: team,
            host_id: None,
            template_id: Uuid::nil(),
            status: SandboxStatus::Running,
            vcpus: 3,
            memory_mb: 700,
        },
    )
    .await
    .unwrap();
    let began = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    sqlx::query("UPDATE sandboxes SET status = 'stopped' WHERE id = $1")
        .bind(id)
        .execute(&cp.db)
        .await
        .unwrap();
    let elapsed = began.elapsed().as_secs_f64();
    // Let a sample in flight land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(replicas);
    let samples: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM usage_samples WHERE team_id = $1 AND vcpus > 0")
            .bind(team)
            .fetch_one(&cp.db)
            .await
            .unwrap();
    let instants = elapsed.ceil() as i64 + 1;
    assert!(
        (4..=instants).contains(&samples),
        "{samples} samples in {elapsed:.1} s"
    );
    let (cpu, ram): (f64, f64) = sqlx::query_as(
        "SELECT COALESCE(SUM(cpu_minutes), 0), COALESCE(SUM(ram_mb_minutes), 0)
         FROM daily_usage WHERE team_id = $1",
    )
    .bind(team)
    .fetch_one(&cp.db)
    .await
    .unwrap();
    let expected_cpu = samples as f64 * 3.0 / 60.0;
    let expected_ram = samples as f64 * 700.0 / 60.0;
    assert!((cpu - expected_cpu).abs() < 1e-6, "{cpu} vs {expected_cpu}");
    assert!((ram - expected_ram).abs() < 1e-6, "{ram} vs {expected_ram}");
    cp.stop().await;
}
