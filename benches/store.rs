//! Template store figures: publish and pull throughput of a template-sized file through each
//! backend, a directory and an S3-compatible server (Moto's, which `.ci/bootstrap` installs;
//! a real S3 or MinIO is faster), and how long a pull resumed half way takes. `just bench-store`
//! runs it; `-- --mib N` sets the file size (default 512).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wrenn::config::{Config, Layout, StoreConfig};
use wrenn::store::TemplateStore;

const MOTO_SERVER: &str = "/var/tmp/wrenn-tools/bin/moto_server";

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1048576.0 / took.as_secs_f64()
}

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto() -> (Moto, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = std::env::var("WRENN_MOTO_SERVER").unwrap_or_else(|_| MOTO_SERVER.to_owned());
    let child = Command::new(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts (run .ci/bootstrap)");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while ureq::get(&url).call().is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    ureq::put(&format!("{url}/bench")).send_empty().unwrap();
    (Moto(child), url)
}

async fn measure(label: &str, config: &StoreConfig, work: &Path, image: &Path, size: u64) {
    let store = TemplateStore::open(config, &Layout::new(work)).unwrap();
    let started = Instant::now();
    let blob = store.publish(image, |_| {}).await.unwrap();
    let publish = started.elapsed();
    let again = Instant::now();
    store.publish(image, |_| {}).await.unwrap();
    let republish = again.elapsed();

    let dest = work.join(format!("pulled-{label}"));
    let started = Instant::now();
    store.fetch(&blob, &dest, |_| {}).await.unwrap();
    let pull = started.elapsed();
    std::fs::remove_file(&dest).unwrap();

    let half = size / 2;
    let partial = Layout::partial(&dest);
    let mut source = std::fs::File::open(image).unwrap();
    let mut target = std::fs::File::create(&partial).unwrap();
    std::io::copy(&mut std::io::Read::take(&mut source, half), &mut target).unwrap();
    let started = Instant::now();
    store.fetch(&blob, &dest, |_| {}).await.unwrap();
    let resumed = started.elapsed();
    std::fs::remove_file(&dest).unwrap();
    store.delete(&blob.sha256).await.unwrap();

    println!(
        "{label:<10} publish {:>7.1} MiB/s   again (already held) {:>6.3} s   pull {:>7.1} MiB/s   resumed from half {:>6.2} s",
        mib_per_s(size, publish),
        republish.as_secs_f64(),
        mib_per_s(size, pull),
        resumed.as_secs_f64(),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !args.iter().any(|a| a == "--bench") {
        println!("template store benchmark: run it with `just bench-store`");
        return;
    }
    let mib: u64 = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let work = tempfile::Builder::new()
        .prefix("wrenn-bench-store-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let image = work.path().join("image");
    let size = mib << 20;
    // Incompressible and not sparse, as an image's used blocks are.
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&image).unwrap());
        let mut block = [0u8; 1 << 16];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..(size / block.len() as u64) {
            for chunk in block.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes());
            }
            file.write_all(&block).unwrap();
        }
    }
    println!("template store, a {mib} MiB image");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = StoreConfig {
        url: Some(
            format!("file://{}", work.path().join("dir-store").display())
                .parse()
                .unwrap(),
        ),
        ..Config::default().store
    };
    runtime.block_on(measure("directory", &dir, work.path(), &image, size));
    let (_moto, endpoint) = moto();
    let s3 = StoreConfig {
        url: Some("s3://bench/templates".parse().unwrap()),
        s3_endpoint: Some(endpoint.parse().unwrap()),
        s3_access_key_id: Some("bench".into()),
        s3_secret_access_key: Some(wrenn::secret::SecretText::new("bench".to_owned())),
        s3_allow_http: true,
        ..Config::default().store
    };
    runtime.block_on(measure("s3 (moto)", &s3, work.path(), &image, size));
}
