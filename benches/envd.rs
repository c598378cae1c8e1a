//! envd figures: exec round trip of `true` over loopback HTTP (p50/p99), 1 GiB upload and
//! download throughput against a raw TCP copy to and from the same disk, idle RSS and the binary's
//! size. Runs the static guest binary when `WRENN_STATIC_BIN` names it (as `just test` does),
//! else the `wrenn` binary this bench was built with.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use wrenn::envd::api::{ProcessSpec, RunRequest};
use wrenn_test_support::envd::EnvdProcess;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;

fn binary() -> PathBuf {
    std::env::var_os("WRENN_STATIC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wrenn")))
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Raw TCP upload: bytes over loopback into a file, as envd's upload does.
fn raw_upload(path: &Path) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target = path.to_owned();
    let receiver = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let mut file = std::fs::File::create(target).unwrap();
        let mut buffer = vec![0u8; CHUNK];
        loop {
            let n = socket.read(&mut buffer).unwrap();
            if n == 0 {
                break;
            }
            file.write_all(&buffer[..n]).unwrap();
        }
        file.flush().unwrap();
    });
    let started = Instant::now();
    let mut socket = TcpStream::connect(addr).unwrap();
    let chunk = vec![0x5au8; CHUNK];
    for _ in 0..GIB / CHUNK as u64 {
        socket.write_all(&chunk).unwrap();
    }
    drop(socket);
    receiver.join().unwrap();
    started.elapsed()
}

/// Raw TCP download: a file over loopback into nothing.
fn raw_download(path: &Path) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let source = path.to_owned();
    let sender = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let mut file = std::fs::File::open(source).unwrap();
        std::io::copy(&mut file, &mut socket).unwrap();
    });
    let started = Instant::now();
    let mut socket = TcpStream::connect(addr).unwrap();
    let mut buffer = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = socket.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    sender.join().unwrap();
    assert_eq!(total, GIB);
    started.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("envd benchmark: run it with `cargo bench --bench envd`");
        return;
    }
    let binary = binary();
    let envd = EnvdProcess::start(&binary).expect("envd starts");
    let client = envd.client();
    client.health().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = EnvdProcess::status_kib(envd.pid(), "VmRSS").unwrap_or(0);

    let request = RunRequest {
        process: ProcessSpec::new("true", &[]),
        timeout_sec: None,
    };
    for _ in 0..50 {
        client.run(&request).await.unwrap();
    }
    let mut latencies = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let started = Instant::now();
        client.run(&request).await.unwrap();
        latencies.push(started.elapsed());
    }
    latencies.sort();

    let dir = tempfile::Builder::new()
        .prefix("envd-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let envd_file = dir.path().join("envd.bin");
    let raw_file = dir.path().join("raw.bin");

    let raw_up = raw_upload(&raw_file);
    let raw_down = raw_download(&raw_file);

    let chunk = Bytes::from(vec![0x5au8; CHUNK]);
    let body = futures::stream::iter((0..GIB / CHUNK as u64).map(move |_| Ok(chunk.clone())));
    let started = Instant::now();
    let entry = client
        .write_file(envd_file.to_str().unwrap(), None, body)
        .await
        .unwrap();
    let envd_up = started.elapsed();
    assert_eq!(entry.size, GIB);

    let started = Instant::now();
    let mut download = client
        .read_file(envd_file.to_str().unwrap(), None)
        .await
        .unwrap()
        .body;
    let mut total = 0u64;
    while let Some(chunk) = download.next().await {
        total += chunk.unwrap().len() as u64;
    }
    let envd_down = started.elapsed();
    assert_eq!(total, GIB);

    let peak_rss = EnvdProcess::status_kib(envd.pid(), "VmHWM").unwrap_or(0);
    let size = std::fs::metadata(&binary).map(|m| m.len()).unwrap_or(0);

    println!("envd benchmark ({})", binary.display());
    println!(
        "  exec `true` round trip   p50 {:>8.3} ms   p99 {:>8.3} ms   ({} runs)",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.len()
    );
    println!(
        "  1 GiB upload             {:>8.0} MiB/s   raw TCP {:>8.0} MiB/s   ({:.0}% of raw)",
        mib_per_s(GIB, envd_up),
        mib_per_s(GIB, raw_up),
        100.0 * raw_up.as_secs_f64() / envd_up.as_secs_f64()
    );
    println!(
        "  1 GiB download           {:>8.0} MiB/s   raw TCP {:>8.0} MiB/s   ({:.0}% of raw)",
        mib_per_s(GIB, envd_down),
        mib_per_s(GIB, raw_down),
        100.0 * raw_down.as_secs_f64() / envd_down.as_secs_f64()
    );
    println!(
        "  idle RSS                 {:>8.1} MiB",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  peak RSS after transfers {:>8.1} MiB",
        peak_rss as f64 / 1024.0
    );
    println!(
        "  binary size              {:>8.1} MiB",
        size as f64 / (1 << 20) as f64
    );
}
