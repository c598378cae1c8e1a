//! The throwaway PostgreSQL harness: it starts, serves real connections, survives a restart,
//! and leaves nothing behind whether the test ends normally, panics or is killed.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;
use wrenn_test_support::pg::PgCluster;

fn data_dir_of(port: u16) -> Option<PathBuf> {
    // The cluster's socket directory holds `.s.PGSQL.<port>`; find it under the temp dir.
    let needle = format!(".s.PGSQL.{port}");
    std::fs::read_dir(std::env::temp_dir())
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join(&needle).exists())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test]
async fn starts_accepts_connections_restarts_and_cleans_up() {
    let mut pg = PgCluster::start().unwrap();
    let port = pg.port();
    let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    let (one,): (i32,) = sqlx::query_as("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    sqlx::raw_sql("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let dir = data_dir_of(port).expect("cluster directory");

    pg.stop();
    assert!(sqlx::PgConnection::connect(&pg.url()).await.is_err());
    pg.restart().unwrap();
    let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    let (v,): (i32,) = sqlx::query_as("SELECT v FROM kept")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, 7, "data survives a restart");
    drop(conn);

    drop(pg);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!port_open(port));
}

#[test]
fn two_clusters_are_independent() {
    let a = PgCluster::start().unwrap();
    let b = PgCluster::start().unwrap();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.url(), b.url());
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let port = std::panic::catch_unwind(|| {
        let pg = PgCluster::start().unwrap();
        let port = pg.port();
        std::panic::panic_any(port);
    })
    .unwrap_err();
    let port = *port.downcast::<u16>().unwrap();
    assert!(!port_open(port));
    assert!(data_dir_of(port).is_none());
}

/// Runs inside a child process started by `a_killed_process_still_cleans_up`.
#[test]
#[ignore = "helper for a_killed_process_still_cleans_up"]
fn child_that_gets_killed() {
    let pg = PgCluster::start().unwrap();
    println!("PORT={}", pg.port());
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_killed_process_still_cleans_up() {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_that_gets_killed",
            "--ignored",
            "--nocapture",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let port: u16 = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("PORT=").map(|p| p.parse().unwrap()))
        .expect("child printed its port");
    assert!(port_open(port));
    let dir = data_dir_of(port).expect("cluster directory");
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the killed child's postgres to stop", || !port_open(port));
    wait_until("the killed child's cluster directory to go", || {
        !dir.exists()
    });
}
