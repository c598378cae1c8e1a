//! Observability figures on real parts (a private PostgreSQL, the control plane served
//! in-process): what lifecycle events, notification channels and usage metering add to a
//! capsule's lifecycle writes (placement, starting, running, stopped; the VM itself excluded,
//! as it costs the same either way), the latency of one event fanned out to 100 SSE
//! subscribers, the latency of `GET /metrics` and `GET /v1/capsules/stats`, and the audit row
//! every mutating request (an exec among them) adds.
//!
//! `cargo bench --bench observability`. Sizes: `WRENN_BENCH_CAPSULES` (default 300 per
//! configuration), `WRENN_BENCH_SUBSCRIBERS` (default 100), `WRENN_BENCH_EVENTS` (default 50),
//! `WRENN_BENCH_REQUESTS` (default 500).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use support::{TestCp, User, QUIET_MONITOR};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use wrenn::cp::metering;
use wrenn::cp::scheduler::{self, Demand, Placement, SchedulerSettings};
use wrenn::cp::state::AuthSettings;
use wrenn::db::events::{self, NewEvent};
use wrenn::db::sandboxes::{self, SandboxStatus, Transition};
use wrenn::id::TeamId;

fn size(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "p50 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}  (n={})",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default(),
        samples.len()
    )
}

fn team_of(user: &User) -> Uuid {
    user.team.parse::<TeamId>().unwrap().uuid()
}

/// Places, starts and stops `count` capsules one after another, as the API's create and
/// destroy write them; returns capsules per second.
async fn lifecycle_rate(cp: &TestCp, team: Uuid, count: usize) -> f64 {
    let settings = SchedulerSettings {
        cpu_overcommit: 1000.0,
        memory_overcommit: 1000.0,
        disk_overcommit: 1000.0,
    };
    let started = Instant::now();
    for _ in 0..count {
        let placement = Placement {
            sandbox_id: Uuid::new_v4(),
            team_id: team,
            template_id: Uuid::nil(),
            template_name: "minimal".into(),
            template_sha256: None,
            holders_only: false,
            timeout_sec: 0,
            public_ports: Vec::new(),
            egress: json!({}),
            demand: Demand {
                vcpus: 1,
                memory_mb: 256,
                disk_mb: 512,
            },
        };
        scheduler::place(&cp.db, &settings, &placement)
            .await
            .expect("placed");
        for to in [
            SandboxStatus::Starting,
            SandboxStatus::Running,
            SandboxStatus::Stopped,
        ] {
            assert!(
                sandboxes::transition(&cp.db, placement.sandbox_id, Transition::to(to))
                    .await
                    .unwrap()
            );
        }
    }
    count as f64 / started.elapsed().as_secs_f64()
}

async fn set_event_triggers(cp: &TestCp, enabled: bool) {
    let verb = if enabled { "ENABLE" } else { "DISABLE" };
    sqlx::query(&format!(
        "ALTER TABLE sandboxes {verb} TRIGGER sandboxes_state_event"
    ))
    .execute(&cp.db)
    .await
    .unwrap();
}

async fn lifecycle_figures(cp: &TestCp, admin: &User) {
    let count = size("WRENN_BENCH_CAPSULES", 300);
    let (status, body) = cp
        .call(
            Method::PUT,
            &format!("/v1/admin/teams/{}/plan", admin.team),
            &admin.auth(),
            Some(json!({"plan": "unlimited"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    cp.registered_host(admin, json!({"type": "regular"})).await;
    sqlx::query("UPDATE hosts SET cpu_cores = 1024, memory_mb = 1048576, disk_gb = 1048576")
        .execute(&cp.db)
        .await
        .unwrap();
    let team = team_of(admin);
    lifecycle_rate(cp, team, count / 10).await; // warm-up

    set_event_triggers(cp, false).await;
    let bare = lifecycle_rate(cp, team, count).await;
    set_event_triggers(cp, true).await;
    let with_events = lifecycle_rate(cp, team, count).await;
    let (status, body) = cp
        .call(
            Method::POST,
            "/v1/channels",
            &admin.auth(),
            Some(json!({"name": "bench", "provider": "webhook",
                        "config": {"url": "http://127.0.0.1:9/"},
                        "events": ["capsule.running", "capsule.paused"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let with_channel = lifecycle_rate(cp, team, count).await;
    let channel = body["id"].as_str().unwrap().to_owned();
    let (status, _) = cp
        .call(
            Method::DELETE,
            &format!("/v1/channels/{channel}"),
            &admin.auth(),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let cancel = CancellationToken::new();
    let meter = tokio::spawn(metering::run(
        cp.db.clone(),
        Duration::from_millis(200),
        cancel.clone(),
    ));
    let with_metering = lifecycle_rate(cp, team, count).await;
    cancel.cancel();
    meter.await.unwrap();
    println!("capsule lifecycle writes (place, starting, running, stopped), capsules per second:");
    println!("  no events                       {bare:>8.1}");
    println!(
        "  + lifecycle events              {with_events:>8.1}  ({:+.1}%)",
        (with_events / bare - 1.0) * 100.0
    );
    println!(
        "  + a channel queuing deliveries  {with_channel:>8.1}  ({:+.1}%)",
        (with_channel / bare - 1.0) * 100.0
    );
    println!(
        "  events + metering every 200 ms  {with_metering:>8.1}  ({:+.1}%)",
        (with_metering / bare - 1.0) * 100.0
    );
}

async fn fan_out_figures(cp: &TestCp, admin: &User) {
    let subscribers = size("WRENN_BENCH_SUBSCRIBERS", 100);
    let event_count = size("WRENN_BENCH_EVENTS", 50);
    let (status, key) = cp
        .call(
            Method::POST,
            "/v1/api-keys",
            &admin.auth(),
            Some(json!({"name": "sse"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let key = key["key"].as_str().unwrap().to_owned();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let connected = Arc::new(tokio::sync::Barrier::new(subscribers + 1));
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Empty<Bytes>>();
    let began = Instant::now();
    let mut readers = Vec::new();
    for _ in 0..subscribers {
        let request = Request::get(format!("http://{}/v1/events/stream", cp.addr))
            .header("X-API-Key", &key)
            .body(Empty::new())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let (sent, latencies, connected) = (sent.clone(), latencies.clone(), connected.clone());
        readers.push(tokio::spawn(async move {
            let mut body = response.into_body().into_data_stream();
            let mut buffer = String::new();
            let mut seen = 0;
            let mut announced = false;
            while let Some(Ok(chunk)) = body.next().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let message: String = buffer.drain(..end + 2).collect();
                    if !announced && message.contains("connected") {
                        announced = true;
                        connected.wait().await;
                        continue;
                    }
                    let Some(marker) = message.split("bench-").nth(1) else {
                        continue;
                    };
                    let id: String = marker.chars().take_while(char::is_ascii_digit).collect();
                    let at = sent.lock().unwrap().get(&id).copied();
                    if let Some(at) = at {
                        latencies.lock().unwrap().push(at.elapsed());
                        seen += 1;
                    }
                    if seen == event_count {
                        return;
                    }
                }
            }
        }));
    }
    connected.wait().await;
    let connect_time = began.elapsed();
    let team = team_of(admin);
    for n in 0..event_count {
        let mut tx = cp.db.begin().await.unwrap();
        events::insert(
            &mut *tx,
            &NewEvent {
                team_id: team,
                kind: "template.snapshot.create",
                outcome: Some("success"),
                resource_type: "template",
                resource_id: format!("bench-{n}"),
                actor_type: "system",
                actor_id: None,
                actor_name: None,
                metadata: json!({}),
                error: None,
                sandbox_id: None,
            },
        )
        .await
        .unwrap();
        // Noted before the commit: a subscriber may read the event before this task runs on.
        sent.lock().unwrap().insert(n.to_string(), Instant::now());
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for reader in readers {
        tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("every subscriber got every event")
            .unwrap();
    }
    let latencies = std::mem::take(&mut *latencies.lock().unwrap());
    println!(
        "SSE fan-out: {subscribers} subscribers connected in {connect_time:.2?}; commit to receipt:"
    );
    println!("  {}", summary(latencies));
}

async fn endpoint_figures(cp: &TestCp, admin: &User) {
    let requests = size("WRENN_BENCH_REQUESTS", 500);
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for (name, path, bearer) in [
        ("GET /metrics", "/metrics", None),
        (
            "GET /v1/capsules/stats?range=1h",
            "/v1/capsules/stats?range=1h",
            Some(format!("Bearer {}", admin.token)),
        ),
    ] {
        let mut samples = Vec::with_capacity(requests);
        for _ in 0..requests {
            let mut request = Request::get(format!("http://{}{path}", cp.addr));
            if let Some(bearer) = &bearer {
                request = request.header("Authorization", bearer);
            }
            let started = Instant::now();
            let response = client
                .request(request.body(Empty::new()).unwrap())
                .await
                .unwrap();
            let status = response.status();
            response.into_body().collect().await.unwrap();
            samples.push(started.elapsed());
            assert_eq!(status, StatusCode::OK);
        }
        println!("{name:<34} {}", summary(samples));
    }
}

/// What the audit layer adds to each mutating request (an exec among them): one row, written
/// once the response is made and before it is sent.
async fn audit_figures(cp: &TestCp, admin: &User) {
    use wrenn::db::audit_logs::{self, Entry, RequestEntry};
    let requests = size("WRENN_BENCH_REQUESTS", 500);
    let team = team_of(admin);
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let entry = RequestEntry {
            entry: Entry {
                team_id: Some(team),
                actor_type: "api_key",
                actor_id: Some("key-bench".into()),
                resource_type: "capsule",
                resource_id: Some("cl-bench".into()),
                action: "exec",
                metadata: json!({"method": "POST", "path": "/v1/capsules/{id}/exec",
                                 "params": {"id": "cl-bench"}, "http_status": 200}),
            },
            actor_name: None,
            status: "success",
            client_address: Some("203.0.113.7".into()),
        };
        let started = Instant::now();
        audit_logs::insert_request(&cp.db, entry).await.unwrap();
        samples.push(started.elapsed());
    }
    println!("{:<34} {}", "audit row of a request", summary(samples));
}

fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("observability benchmark: run it with `cargo bench --bench observability`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut capsules = support::quiet_capsules();
        capsules.channel_allow_private = true;
        // One team holds every subscriber of the fan-out.
        capsules.team_limits.event_streams = 0;
        let cp = TestCp::start_full(QUIET_MONITOR, capsules, AuthSettings::default()).await;
        let admin = cp.signup("admin@example.com").await;
        println!("server, PostgreSQL and clients share this machine");
        lifecycle_figures(&cp, &admin).await;
        fan_out_figures(&cp, &admin).await;
        endpoint_figures(&cp, &admin).await;
        audit_figures(&cp, &admin).await;
        cp.stop().await;
    });
}
