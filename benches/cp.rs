//! Control-plane request figures: fills a private PostgreSQL with 10 000 hosts and 10 000 API
//! keys spread over 100 teams, serves the API in-process on a free port, and prints p50/p99
//! latency and throughput of `GET /v1/hosts`, `GET /v1/api-keys` (JWT) and API-key-authenticated
//! `GET /v1/api-keys` at 1 and 32 concurrent clients; then, as the admin who sees all 10 000
//! hosts, one page of `GET /v1/hosts` (the default 1000 rows, and 100) and a walk of all of them
//! page by page.
//!
//! `cargo bench --bench cp` (optionally `-- SECONDS` per measurement, default 5).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use uuid::Uuid;
use wrenn::cp::monitor::MonitorSettings;
use wrenn::cp::state::AppState;
use wrenn::cp::tokens::{sha256, TokenKeys};
use wrenn::db::{self, migrate};
use wrenn::id::{TeamId, UserId};
use wrenn_test_support::pg::PgCluster;

const TEAMS: usize = 100;
const PER_TEAM: usize = 100;

struct Fixture {
    jwts: Vec<String>,
    api_keys: Vec<String>,
    admin_jwt: String,
}

async fn fill(db: &db::Db, tokens: &TokenKeys) -> Fixture {
    let mut jwts = Vec::new();
    let mut api_keys = Vec::new();
    let (mut key_ids, mut key_teams, mut key_hashes, mut key_prefixes, mut key_creators) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut user_ids, mut team_ids) = (Vec::new(), Vec::new());
    for t in 0..TEAMS {
        let (user, team) = (Uuid::new_v4(), Uuid::new_v4());
        user_ids.push(user);
        team_ids.push(team);
        jwts.push(tokens.issue_user(
            UserId(user),
            TeamId(team),
            &format!("u{t}@bench"),
            "bench",
            false,
        ));
        for k in 0..PER_TEAM {
            let key = format!("wrn_{:08x}{:024x}", t, k);
            key_ids.push(Uuid::new_v4());
            key_teams.push(team);
            key_hashes.push(sha256(&key));
            key_prefixes.push(format!("{}...", &key[..12]));
            key_creators.push(user);
            api_keys.push(key);
        }
    }
    let admin = Uuid::new_v4();
    let admin_jwt = tokens.issue_user(
        UserId(admin),
        TeamId::PLATFORM,
        "admin@bench",
        "admin",
        true,
    );
    sqlx::query(
        "INSERT INTO users (id, email, password_hash, name, is_admin)
         SELECT id, 'u' || n || '@bench', 'x', 'bench', false FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, n)",
    )
    .bind(&user_ids)
    .execute(db)
    .await
    .unwrap();
    sqlx::query("INSERT INTO users (id, email, password_hash, name, is_admin) VALUES ($1, 'admin@bench', 'x', 'admin', true)")
        .bind(admin)
        .execute(db)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO teams (id, name, slug)
         SELECT id, 'Team ' || n, 'bench-' || n FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, n)",
    )
    .bind(&team_ids)
    .execute(db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO team_members (team_id, user_id, role, is_default)
         SELECT t, u, 'owner', true FROM unnest($1::uuid[], $2::uuid[]) AS m(t, u)",
    )
    .bind(&team_ids)
    .bind(&user_ids)
    .execute(db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO team_api_keys (id, team_id, name, key_hash, key_prefix, created_by)
         SELECT id, team, 'bench', hash, prefix, creator
         FROM unnest($1::uuid[], $2::uuid[], $3::bytea[], $4::text[], $5::uuid[]) AS k(id, team, hash, prefix, creator)",
    )
    .bind(&key_ids)
    .bind(&key_teams)
    .bind(&key_hashes)
    .bind(&key_prefixes)
    .bind(&key_creators)
    .execute(db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO hosts (id, type, team_id, arch, cpu_cores, memory_mb, disk_gb, address, status,
                            last_heartbeat_at, created_by)
         SELECT gen_random_uuid(), 'byoc', t, 'x86_64', 16, 65536, 500, '10.0.' || (n % 250) || '.' || (n / 250 % 250) || ':50051',
                'online', now(), u
         FROM unnest($1::uuid[], $2::uuid[]) AS m(t, u), generate_series(1, $3) AS n",
    )
    .bind(&team_ids)
    .bind(&user_ids)
    .bind(PER_TEAM as i32)
    .execute(db)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(db).await.unwrap();
    Fixture {
        jwts,
        api_keys,
        admin_jwt,
    }
}

#[derive(Clone, Copy)]
enum Credential {
    Jwt,
    ApiKey,
    Admin,
}

async fn measure(
    addr: std::net::SocketAddr,
    fixture: Arc<Fixture>,
    path: &'static str,
    cred: Credential,
    clients: usize,
    span: Duration,
) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let deadline = Instant::now() + span;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, fixture) = (client.clone(), fixture.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let team = i % TEAMS;
                let mut req = Request::get(format!("http://{addr}{path}"));
                req = match cred {
                    Credential::Jwt => {
                        req.header("authorization", format!("Bearer {}", fixture.jwts[team]))
                    }
                    Credential::Admin => {
                        req.header("authorization", format!("Bearer {}", fixture.admin_jwt))
                    }
                    Credential::ApiKey => req.header(
                        "x-api-key",
                        &fixture.api_keys[(i * 7919) % fixture.api_keys.len()],
                    ),
                };
                let t0 = Instant::now();
                let response = client
                    .request(req.body(Empty::new()).unwrap())
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert!(body.len() > 2);
                latencies.push(t0.elapsed());
                i += clients;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    let label = match cred {
        Credential::Jwt => "JWT",
        Credential::ApiKey => "X-API-Key",
        Credential::Admin => "admin JWT",
    };
    println!(
        "{:<16} {:<10} {:>3} clients  {:>7} req  p50 {:>8.2} ms  p99 {:>8.2} ms  {:>8.0} req/s",
        path,
        label,
        clients,
        all.len(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        all.len() as f64 / elapsed.as_secs_f64()
    );
}

/// Reads every host page by page (1000 rows each, following `X-Next-Cursor`) as the admin.
async fn walk_hosts(addr: std::net::SocketAddr, admin_jwt: &str) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let started = Instant::now();
    let (mut pages, mut rows, mut cursor) = (0, 0, None::<String>);
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/v1/hosts?cursor={cursor}"),
            None => "/v1/hosts".to_owned(),
        };
        let request = Request::get(format!("http://{addr}{path}"))
            .header("authorization", format!("Bearer {admin_jwt}"))
            .body(Empty::new())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        cursor = response
            .headers()
            .get("x-next-cursor")
            .map(|c| c.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let page: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        pages += 1;
        rows += page.len();
        if cursor.is_none() {
            break;
        }
    }
    println!(
        "walk /v1/hosts   admin JWT    {rows} hosts in {pages} pages: {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
}

fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("cp benchmark: run it with `cargo bench --bench cp`");
        return;
    }
    let seconds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pg = PgCluster::start().expect("postgres starts");
        let pool = db::connect_lazy(&pg.url()).unwrap();
        migrate::up(&pool).await.unwrap();
        let tokens = TokenKeys::new(b"benchmark-secret-0123456789abcdefghij").unwrap();
        let t0 = Instant::now();
        let fixture = Arc::new(fill(&pool, &tokens).await);
        println!(
            "filled {} teams, {} hosts, {} API keys in {:.1} s; {} s per measurement; server and clients share this machine",
            TEAMS,
            TEAMS * PER_TEAM,
            TEAMS * PER_TEAM,
            t0.elapsed().as_secs_f64(),
            seconds
        );
        let state = AppState::new(pool, tokens);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let monitor = MonitorSettings { interval: Duration::from_secs(15), unreachable_after: Duration::from_secs(3600) };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(wrenn::cp::run(listener, state, monitor, async {
            let _ = rx.await;
        }));
        let span = Duration::from_secs(seconds);
        for clients in [1, 32] {
            measure(addr, fixture.clone(), "/v1/hosts", Credential::Jwt, clients, span).await;
            measure(addr, fixture.clone(), "/v1/api-keys", Credential::Jwt, clients, span).await;
            measure(addr, fixture.clone(), "/v1/api-keys", Credential::ApiKey, clients, span).await;
        }
        measure(addr, fixture.clone(), "/v1/hosts", Credential::Admin, 1, span).await;
        measure(addr, fixture.clone(), "/v1/hosts?limit=100", Credential::Admin, 1, span).await;
        walk_hosts(addr, &fixture.admin_jwt).await;
        let _ = tx.send(());
        server.await.unwrap().unwrap();
        drop(pg);
    });
}
