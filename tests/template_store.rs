//! The template store end to end: its S3 backend against a real S3-compatible server (Moto's, a
//! PyPI package `.ci/bootstrap` installs), and a template published by one host and pulled by
//! another before that host's first capsule of it.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::agent::{add_agent_in, wait_clean, Agent, VM_TURNS};
use support::{Auth, TestCp};
use wrenn::config::{Config, HttpUrl, Layout, StoreConfig};
use wrenn::cp::reconciler;
use wrenn::store::{StoreError, TemplateStore};
use wrenn_test_support::guest;

/// Where `.ci/bootstrap` links the installed version.
const MOTO_SERVER: &str = "/var/tmp/wrenn-tools/bin/moto_server";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Moto S3 server on a free port, stopped on drop.
struct S3Server {
    child: Child,
    port: u16,
}

impl S3Server {
    fn start() -> Self {
        let moto = std::env::var("WRENN_MOTO_SERVER").unwrap_or_else(|_| MOTO_SERVER.to_owned());
        assert!(
            Path::new(&moto).exists(),
            "{moto} is missing: run .ci/bootstrap"
        );
        let port = free_port();
        let child = Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while ureq::get(&server.url()).call().is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn create_bucket(&self, bucket: &str) {
        ureq::put(&format!("{}/{bucket}", self.url()))
            .send_empty()
            .unwrap();
    }

    fn config(&self, bucket: &str) -> StoreConfig {
        s3_config(&self.url(), bucket)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3_config(endpoint: &str, bucket: &str) -> StoreConfig {
    StoreConfig {
        url: Some(format!("s3://{bucket}/wrenn/templates").parse().unwrap()),
        s3_endpoint: Some(endpoint.parse::<HttpUrl>().unwrap()),
        s3_access_key_id: Some("test".into()),
        s3_secret_access_key: Some(wrenn::secret::SecretText::new("test".to_owned())),
        s3_allow_http: true,
        ..Config::default().store
    }
}

/// Bytes whose pattern does not repeat at any chunk boundary.
fn sample(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect()
}

#[tokio::test]
async fn the_s3_backend_publishes_once_fetches_verified_and_resumes() {
    let server = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    server.create_bucket("wrenn-test");
    let work = tempfile::tempdir().unwrap();
    let store =
        TemplateStore::open(&server.config("wrenn-test"), &Layout::new(work.path())).unwrap();

    // Over one multipart part and one ranged read, so both paths are crossed.
    let bytes = sample((40 << 20) + 4321);
    let image = work.path().join("rootfs.ext4");
    std::fs::write(&image, &bytes).unwrap();
    let blob = store.publish(&image, |_| {}).await.unwrap();
    assert_eq!(blob.size_bytes, bytes.len() as u64);
    assert_eq!(
        store.size_of(&blob.sha256).await.unwrap(),
        Some(blob.size_bytes)
    );
    assert_eq!(store.publish(&image, |_| {}).await.unwrap(), blob);

    let fetched = work.path().join("fetched");
    let mut reports = Vec::new();
    store
        .fetch(&blob, &fetched, |p| reports.push(p.to_string()))
        .await
        .unwrap();
    assert!(
        std::fs::read(&fetched).unwrap() == bytes,
        "fetched bytes differ"
    );
    assert!(
        reports.last().is_some_and(|r| r.contains("(100%)")),
        "{reports:?}"
    );

    // An interrupted pull resumes after what it has.
    let resumed = work.path().join("resumed");
    std::fs::write(Layout::partial(&resumed), &bytes[..(33 << 20)]).unwrap();
    let mut first = None;
    store
        .fetch(&blob, &resumed, |p| {
            first.get_or_insert(p.done);
        })
        .await
        .unwrap();
    assert!(
        first.unwrap() > 33 << 20,
        "started over instead of resuming"
    );
    assert!(
        std::fs::read(&resumed).unwrap() == bytes,
        "resumed bytes differ"
    );

    store.delete(&blob.sha256).await.unwrap();
    let error = store.fetch(&blob, &work.path().join("gone"), |_| {}).await;
    assert!(matches!(error, Err(StoreError::Missing(_))), "{error:?}");
}

#[tokio::test]
async fn an_unreachable_store_is_a_clear_error_not_a_hang() {
    let closed = free_port();
    let work = tempfile::tempdir().unwrap();
    let config = s3_config(&format!("http://127.0.0.1:{closed}"), "nowhere");
    let store = TemplateStore::open(&config, &Layout::new(work.path())).unwrap();
    let started = Instant::now();
    let error = store.size_of(&"a".repeat(64)).await.unwrap_err();
    assert!(matches!(error, StoreError::Unreachable { .. }), "{error:?}");
    assert!(
        error.to_string().contains("s3://nowhere/wrenn/templates"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );

    let mut plain = Config::default().store;
    plain.url = Some("s3://bucket".parse().unwrap());
    plain.s3_endpoint = Some("http://127.0.0.1:9".parse().unwrap());
    let refused = TemplateStore::open(&plain, &Layout::new(work.path())).unwrap_err();
    assert!(refused.to_string().contains("s3_allow_http"), "{refused}");
}

/// A files root with the shared test kernels and, when `with_busybox`, its own copy of the
/// busybox image (a link: the same bytes, but this agent's meta.json).
fn agent_root(with_busybox: bool) -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix("wrenn-agent-")
        .tempdir()
        .unwrap();
    let files = guest::test_files();
    std::os::unix::fs::symlink(files.kernels_dir(), root.path().join("kernels")).unwrap();
    if with_busybox {
        let layout = Layout::new(root.path());
        std::fs::create_dir_all(layout.image_dir("busybox")).unwrap();
        let image = files.image_rootfs("busybox");
        let own = layout.image_rootfs("busybox");
        if std::fs::hard_link(&image, &own).is_err() {
            std::fs::copy(&image, &own).unwrap();
        }
    }
    root
}

async fn add_host(
    cp: &TestCp,
    admin: &Auth,
    root: tempfile::TempDir,
    store: &Path,
) -> (Agent, String) {
    let url = format!("file://{}", store.display());
    add_agent_in(cp, admin, root, &[("STORE_URL", &url)]).await
}

fn meta(agent: &Agent) -> Value {
    let path: PathBuf = Layout::new(agent.root.path())
        .image_dir("busybox")
        .join("meta.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_the_template_pulls_it_from_the_store_before_its_first_capsule() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    let store = tempfile::tempdir().unwrap();
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await.auth();
    let (builder, builder_id) = add_host(&cp, &admin, agent_root(true), store.path()).await;
    let (puller, _) = add_host(&cp, &admin, agent_root(false), store.path()).await;
    assert!(!Layout::new(puller.root.path())
        .image_rootfs("busybox")
        .exists());

    // Nobody has reported the image yet: publishing has no host to ask.
    let publish = "/v1/admin/templates/busybox/publish";
    let (status, body) = cp.call(Method::POST, publish, &admin, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, body) = cp
        .call(
            Method::POST,
            "/v1/admin/templates/nonesuch/publish",
            &admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    reconciler::reconcile_once(&cp.state).await.unwrap();
    let (status, published) = cp.call(Method::POST, publish, &admin, None).await;
    assert_eq!(status, StatusCode::OK, "{published}");
    assert_eq!(published["host_id"], builder_id);
    let sha256 = published["sha256"].as_str().unwrap().to_owned();
    assert_eq!(meta(&builder)["sha256"], sha256.as_str());
    assert!(store.path().join("blobs/sha256").join(&sha256).is_file());

    // Only the host without the image is left to place a capsule on.
    let (status, body) = cp
        .call(
            Method::DELETE,
            &format!("/v1/hosts/{builder_id}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    drop(builder);

    let (status, capsule) = cp
        .call(
            Method::POST,
            "/v1/capsules",
            &admin,
            Some(json!({"template": "busybox"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();
    let pulled = meta(&puller);
    assert_eq!(pulled["sha256"], sha256.as_str());
    assert_eq!(pulled["source"], "store");
    assert!(
        !puller.log_lines(&["pulling: ", "(100%)"]).is_empty(),
        "no progress logged"
    );

    let (status, out) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/exec"),
            &admin,
            Some(json!({"cmd": "/bin/sh", "args": ["-c", "echo pulled-and-booted"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert!(
        out["stdout"]
            .as_str()
            .unwrap()
            .contains("pulled-and-booted"),
        "{out}"
    );

    // The sandbox holds its own link to the image it booted from.
    use std::os::unix::fs::MetadataExt;
    let base = Layout::new(puller.root.path()).sandbox_base_image(&id);
    assert_eq!(std::fs::metadata(&base).unwrap().nlink(), 2);

    let (status, body) = cp
        .call(Method::DELETE, &format!("/v1/capsules/{id}"), &admin, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    wait_clean(&puller);
    drop(puller);
    cp.stop().await;
}
