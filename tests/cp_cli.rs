//! The `wrenn migrate` and `wrenn cp` commands as an operator runs them, against a real
//! PostgreSQL: migrations up/down/up, admin bootstrap, and `cp serve` start-up and shutdown.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use wrenn::db::{self, migrate};
use wrenn_test_support::pg::PgCluster;

const SECRET: &str = "cli-test-secret-0123456789abcdefghijkl";

fn wrenn(pg: &PgCluster, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wrenn"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", pg.url())
        .env("LOG_LEVEL", "warn")
        .current_dir(std::env::temp_dir());
    cmd
}

fn run(cmd: &mut Command) -> (bool, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    (
        status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    )
}

async fn tables(db: &db::Db) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

#[tokio::test]
async fn migrations_go_up_down_and_up_again() {
    let pg = PgCluster::start().unwrap();
    let db = db::connect_lazy(&pg.url()).unwrap();
    let total = migrate::status(&db).await.unwrap().len();
    assert!(total >= 3);
    assert!(migrate::status(&db)
        .await
        .unwrap()
        .iter()
        .all(|m| m.applied_at.is_none()));

    assert_eq!(migrate::up(&db).await.unwrap().len(), total);
    assert!(
        migrate::up(&db).await.unwrap().is_empty(),
        "up is idempotent"
    );
    let full = tables(&db).await;
    for table in [
        "teams",
        "users",
        "team_members",
        "team_api_keys",
        "hosts",
        "host_registration_tokens",
        "host_refresh_tokens",
        "host_tags",
        "templates",
        "sandboxes",
        "audit_logs",
    ] {
        assert!(
            full.contains(&table.to_owned()),
            "{table} missing from {full:?}"
        );
    }
    let minimal: (i32, i32, String) =
        sqlx::query_as("SELECT vcpus, memory_mb, type FROM templates WHERE name = 'minimal' AND id = '00000000-0000-0000-0000-000000000000'")
            .fetch_one(&db).await.unwrap();
    assert_eq!(minimal, (1, 512, "base".to_owned()));
    let platform: String = sqlx::query_scalar(
        "SELECT slug FROM teams WHERE id = '00000000-0000-0000-0000-000000000000'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(platform, "platform");

    // Each down reverts exactly the last migration; all the way down leaves no tables.
    let last = migrate::status(&db).await.unwrap().last().unwrap().version;
    assert_eq!(migrate::down(&db).await.unwrap(), Some(last));
    let status = migrate::status(&db).await.unwrap();
    assert!(status.last().unwrap().applied_at.is_none());
    assert!(status[..total - 1].iter().all(|m| m.applied_at.is_some()));
    for _ in 1..total {
        assert!(migrate::down(&db).await.unwrap().is_some());
    }
    assert_eq!(migrate::down(&db).await.unwrap(), None);
    assert!(tables(&db).await.is_empty(), "{:?}", tables(&db).await);
    assert_eq!(migrate::up(&db).await.unwrap().len(), total);
    assert_eq!(tables(&db).await, full);
}

#[test]
fn migrate_command_reports_and_reverts() {
    let pg = PgCluster::start().unwrap();
    let (ok, out) = run(&mut wrenn(&pg, &["migrate", "status"]));
    assert!(
        ok && out.contains("0001") && out.contains("pending"),
        "{out}"
    );
    let (ok, out) = run(&mut wrenn(&pg, &["migrate", "up"]));
    assert!(ok && out.contains("applied 0001"), "{out}");
    let (ok, out) = run(&mut wrenn(&pg, &["migrate", "up"]));
    assert!(ok && out.contains("up to date"), "{out}");
    // Down reverts the newest migration, whichever that is.
    let versions: Vec<i64> = migrate::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .collect();
    let newest = versions.iter().max().unwrap();
    let (ok, out) = run(&mut wrenn(&pg, &["migrate", "down"]));
    assert!(
        ok && out.contains(&format!("reverted {newest:04}")),
        "{out}"
    );
    let (ok, out) = run(&mut wrenn(&pg, &["migrate", "status"]));
    assert!(
        ok && out.lines().filter(|l| l.contains("applied")).count() == versions.len() - 1,
        "{out}"
    );
    let (ok, out) =
        run(wrenn(&pg, &["migrate", "up"])
            .env("DATABASE_URL", "postgres://wrenn@127.0.0.1:1/wrenn"));
    assert!(!ok && out.contains("cannot reach the database"), "{out}");
}

#[test]
fn admin_create_bootstraps_a_headless_install() {
    let pg = PgCluster::start().unwrap();
    assert!(run(&mut wrenn(&pg, &["migrate", "up"])).0);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "a long admin password\n").unwrap();
    let file = file.to_str().unwrap();
    let (ok, out) = run(&mut wrenn(
        &pg,
        &[
            "cp",
            "admin",
            "create",
            "--email",
            "ops@example.com",
            "--password-file",
            file,
        ],
    ));
    assert!(ok && out.contains("created platform admin usr-"), "{out}");
    let (ok, out) = run(&mut wrenn(
        &pg,
        &[
            "cp",
            "admin",
            "create",
            "--email",
            "OPS@example.com",
            "--password-file",
            file,
        ],
    ));
    assert!(ok && out.contains("already existed"), "{out}");
    std::fs::write(dir.path().join("short"), "short\n").unwrap();
    let short = dir.path().join("short");
    let (ok, out) = run(&mut wrenn(
        &pg,
        &[
            "cp",
            "admin",
            "create",
            "--email",
            "b@example.com",
            "--password-file",
            short.to_str().unwrap(),
        ],
    ));
    assert!(!ok && out.contains("at least 8"), "{out}");
    // The account made, and an account made an admin, are in its team's audit log as the
    // system's acts; an account that already was one is left as it is, unrecorded.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(async { db::connect_lazy(&pg.url()).unwrap() });
    runtime
        .block_on(
            sqlx::query("UPDATE users SET is_admin = false WHERE email = 'ops@example.com'")
                .execute(&db),
        )
        .unwrap();
    let promote = ["cp", "admin", "create", "--email", "ops@example.com"];
    let (ok, out) = run(wrenn(&pg, &promote).args(["--password-file", file]));
    assert!(ok && out.contains("already existed"), "{out}");
    let rows: Vec<(String, String, String, bool)> = runtime
        .block_on(
            sqlx::query_as(
                "SELECT actor_type, resource_type, action, team_id IS NOT NULL FROM audit_logs
                 ORDER BY created_at",
            )
            .fetch_all(&db),
        )
        .unwrap();
    let system_act = |action: &str| ("system".into(), "user".into(), action.into(), true);
    assert_eq!(rows, [system_act("create"), system_act("promote")]);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn serve_needs_a_jwt_secret_then_serves_and_stops_on_sigterm() {
    let pg = PgCluster::start().unwrap();
    assert!(run(&mut wrenn(&pg, &["migrate", "up"])).0);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (ok, out) = run(wrenn(&pg, &["cp", "serve"]).env("CP_LISTEN_ADDR", &listen));
    assert!(!ok && out.contains("JWT_SECRET"), "{out}");
    let (ok, out) = run(wrenn(&pg, &["cp", "serve"])
        .env("CP_LISTEN_ADDR", &listen)
        .env("JWT_SECRET", "too-short"));
    assert!(!ok && out.contains("at least 32 bytes"), "{out}");

    let mut child = wrenn(&pg, &["cp", "serve"])
        .env("CP_LISTEN_ADDR", &listen)
        .env("JWT_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(&listen) {
            use std::io::Write;
            write!(
                stream,
                "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).unwrap();
            break text;
        }
        assert!(Instant::now() < deadline, "cp serve never listened");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        body.starts_with("HTTP/1.1 200") && body.contains("\"database\":\"ok\""),
        "{body}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "cp serve exited with {status}");
}
