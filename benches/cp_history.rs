//! What a long history costs the control plane's background work: one reconcile pass over 100
//! hosts and one placement, first with no sandbox history and then with 1 000 000 `stopped`
//! sandboxes on those hosts. Both read only the sandboxes that may still hold resources, so the
//! two columns should be close. The hosts' agent is a stand-in answering an empty sandbox list
//! (the figure is the control plane's database work, not an agent's).
//!
//! `cargo bench --bench cp_history` (optionally `-- ROWS`, default 1 000 000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::{Json, Router};
use rcgen::{CertificateParams, KeyPair};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use wrenn::agent::api::serve_tls;
use wrenn::agent::wire::SandboxList;
use wrenn::cp::ca::{self, Ca};
use wrenn::cp::reconciler;
use wrenn::cp::scheduler::{self, Demand, Placement, SchedulerSettings};
use wrenn::cp::state::{AppState, AuthSettings, CapsuleSettings};
use wrenn::cp::tokens::TokenKeys;
use wrenn::db::{self, migrate, Db};
use wrenn::id::{HostId, TeamId};
use wrenn::tls::{self, ServerIdentity};
use wrenn_test_support::pg::PgCluster;

const HOSTS: i32 = 100;
const PASSES: usize = 10;
const PLACEMENTS: usize = 200;

/// An agent with nothing running, for every host: served over TLS with a certificate of the
/// control plane's CA for the address dialled, as the agent client requires.
async fn empty_agent(ca: &Ca) -> String {
    let app = Router::new().route(
        "/v1/sandboxes",
        get(|| async {
            Json(SandboxList {
                sandboxes: Vec::new(),
                lost: Vec::new(),
                templates: Vec::new(),
            })
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let cert = ca
        .issue_agent_cert(HostId::new_random(), &addr.parse().unwrap(), &csr)
        .unwrap();
    let identity =
        ServerIdentity::new(tls::certified_key(&cert.pem, &key.serialize_pem()).unwrap());
    let config = tls::agent_server_config(Arc::new(identity), ca.cert_pem()).unwrap();
    tokio::spawn(serve_tls(listener, config, app, CancellationToken::new()));
    addr
}

async fn add_hosts(db: &Db) {
    sqlx::query(
        "INSERT INTO hosts (id, type, team_id, arch, cpu_cores, memory_mb, disk_gb, address,
                            status, last_heartbeat_at)
         SELECT gen_random_uuid(), 'regular', NULL, 'x86_64', 64, 262144, 4000,
                '10.1.' || n || '.1:50051', 'online', now()
         FROM generate_series(1, $1) AS n",
    )
    .bind(HOSTS)
    .execute(db)
    .await
    .unwrap();
}

async fn add_history(db: &Db, rows: i64) {
    sqlx::query(
        "INSERT INTO sandboxes (id, team_id, host_id, template_id, template_name, status, vcpus,
                                memory_mb, created_at, last_updated)
         SELECT gen_random_uuid(), $1, h.ids[1 + n % array_length(h.ids, 1)], $2, 'minimal',
                'stopped', 1, 512, now() - make_interval(secs => n),
                now() - make_interval(secs => n)
         FROM generate_series(1, $3) AS n,
              (SELECT array_agg(id) AS ids FROM hosts) AS h",
    )
    .bind(TeamId::PLATFORM.uuid())
    .bind(Uuid::nil())
    .bind(rows)
    .execute(db)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(db).await.unwrap();
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort_unstable();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

/// Median milliseconds of a reconcile pass and of a placement.
async fn measure(state: &AppState) -> (f64, f64) {
    let mut passes = Vec::with_capacity(PASSES);
    for _ in 0..PASSES {
        let started = Instant::now();
        let report = reconciler::reconcile_once(state).await.unwrap();
        passes.push(started.elapsed());
        assert!(report.unreachable_hosts.is_empty(), "{report:?}");
    }
    let mut placements = Vec::with_capacity(PLACEMENTS);
    for _ in 0..PLACEMENTS {
        let placement = Placement {
            sandbox_id: Uuid::new_v4(),
            team_id: TeamId::PLATFORM.uuid(),
            template_id: Uuid::nil(),
            template_name: "minimal".into(),
            template_sha256: None,
            holders_only: false,
            timeout_sec: 300,
            public_ports: Vec::new(),
            egress: serde_json::json!({}),
            demand: Demand {
                vcpus: 1,
                memory_mb: 512,
                disk_mb: 5120,
            },
        };
        let started = Instant::now();
        scheduler::place(&state.db, &SchedulerSettings::default(), &placement)
            .await
            .unwrap();
        placements.push(started.elapsed());
    }
    // The placed rows go to the history, so every round starts with no live sandbox.
    sqlx::query("UPDATE sandboxes SET status = 'stopped' WHERE status = 'pending'")
        .execute(&state.db)
        .await
        .unwrap();
    (median(passes), median(placements))
}

fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("cp_history benchmark: run it with `cargo bench --bench cp_history`");
        return;
    }
    let rows: i64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pg = PgCluster::start().expect("postgres starts");
        let pool = db::connect_lazy(&pg.url()).unwrap();
        migrate::up(&pool).await.unwrap();
        add_hosts(&pool).await;
        let ca = Arc::new(ca::load_or_create(&pool).await.unwrap());
        let capsules = CapsuleSettings {
            agent_addr_override: Some(empty_agent(&ca).await),
            ..CapsuleSettings::default()
        };
        let state = AppState::with_settings(
            pool.clone(),
            TokenKeys::new(b"benchmark-secret-0123456789abcdefghij").unwrap(),
            capsules,
            AuthSettings::default(),
        );
        state.ca.install(ca).unwrap();
        let (pass_empty, place_empty) = measure(&state).await;
        let filled = Instant::now();
        add_history(&pool, rows).await;
        println!(
            "{rows} stopped sandboxes on {HOSTS} hosts written in {:.1} s",
            filled.elapsed().as_secs_f64()
        );
        let (pass_full, place_full) = measure(&state).await;
        println!("| median over {PASSES} passes / {PLACEMENTS} placements | no history | {rows} stopped rows |");
        println!("|---|---|---|");
        println!("| reconcile pass, {HOSTS} hosts | {pass_empty:.1} ms | {pass_full:.1} ms |");
        println!("| placement | {place_empty:.2} ms | {place_full:.2} ms |");
        drop(pg);
    });
}
