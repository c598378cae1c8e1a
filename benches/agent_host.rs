//! Host-side costs of starting a sandbox: network create/destroy and upper-disk creation.
//! Run as root: `cargo bench --bench agent_host`. Prints figures; asserts nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use wrenn::agent::disk::{self, UpperDisks};
use wrenn::agent::network::{NetworkManager, NetworkOptions};
use wrenn::config::{Config, Layout};
use wrenn::egress::EgressPolicy;

const NETWORK_ROUNDS: usize = 20;
const DISK_ROUNDS: usize = 5;
const GIB: u64 = 1 << 30;

fn summary(samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    format!(
        "median {:7.1} ms   mean {:7.1} ms   min {:7.1} ms   max {:7.1} ms   (n={})",
        ms(samples[samples.len() / 2]),
        ms(mean),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

async fn network() {
    let mut options = NetworkOptions::from_config(&Config::default().agent);
    options.name_prefix = "wbench".to_owned();
    options.host_range = "10.201.200.0/24".parse().unwrap();
    options.transit_range = "10.202.200.0/24".parse().unwrap();
    let manager = NetworkManager::with_options(options)
        .await
        .expect("run as root");
    manager.cleanup_leftovers(&[]).await.unwrap();

    let (mut creates, mut destroys) = (Vec::new(), Vec::new());
    for i in 0..NETWORK_ROUNDS {
        let started = Instant::now();
        let net = manager
            .create(&format!("bench-{i}"), &Default::default())
            .await
            .unwrap();
        creates.push(started.elapsed());
        let started = Instant::now();
        manager.destroy(&net).await.unwrap();
        destroys.push(started.elapsed());
    }
    println!("network create            {}", summary(&mut creates));
    println!("network destroy           {}", summary(&mut destroys));

    // A runtime egress change: the new table is in the kernel when `set_egress` returns.
    let net = manager
        .create("bench-egress", &Default::default())
        .await
        .unwrap();
    let strict: EgressPolicy = serde_json::from_value(serde_json::json!({
        "default": "deny",
        "allow": ["198.51.100.0/24", "203.0.113.7", "pypi.org", "*.pythonhosted.org"],
        "deny": ["198.51.100.99"],
        "max_connections": 256,
        "bandwidth_mbps": 100,
    }))
    .unwrap();
    let mut updates = Vec::new();
    for i in 0..NETWORK_ROUNDS {
        let policy = if i % 2 == 0 {
            strict.clone()
        } else {
            EgressPolicy::default()
        };
        let started = Instant::now();
        manager
            .set_egress(net.slot, "bench-egress", policy)
            .await
            .unwrap();
        updates.push(started.elapsed());
    }
    manager.destroy(&net).await.unwrap();
    println!("egress policy update      {}", summary(&mut updates));

    // Eight sandboxes at once, as a burst of requests would.
    let ids: Vec<String> = (0..8).map(|i| format!("burst-{i}")).collect();
    let open = EgressPolicy::default();
    let started = Instant::now();
    let nets = futures::future::join_all(ids.iter().map(|id| manager.create(id, &open))).await;
    let burst = started.elapsed();
    for net in nets {
        manager.destroy(&net.unwrap()).await.unwrap();
    }
    println!(
        "network create x8 at once {:7.1} ms total",
        burst.as_secs_f64() * 1000.0
    );
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", "wbench"])
        .output();
}

async fn disks() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    let uppers = UpperDisks::open(layout.clone());
    for size_gib in [1u64, 5, 20] {
        let size = size_gib * GIB;
        let (mut direct, mut copied) = (Vec::new(), Vec::new());
        let mut allocated = 0;
        for round in 0..DISK_ROUNDS {
            let path = layout.sandbox_upper_disk(&format!("mkfs-{size_gib}-{round}"));
            let started = Instant::now();
            disk::create_upper(&path, size).await.unwrap();
            direct.push(started.elapsed());
            disk::remove(&path).unwrap();
        }
        let first = layout.sandbox_upper_disk(&format!("first-{size_gib}"));
        let started = Instant::now();
        uppers.create(&first, size).await.unwrap();
        let first_of_size = started.elapsed();
        for round in 0..DISK_ROUNDS {
            let path = layout.sandbox_upper_disk(&format!("copy-{size_gib}-{round}"));
            let started = Instant::now();
            uppers.create(&path, size).await.unwrap();
            copied.push(started.elapsed());
            allocated = disk::allocated_bytes(&path).unwrap();
            disk::remove(&path).unwrap();
        }
        println!(
            "disk {size_gib:>2} GiB upper, mkfs each  {}",
            summary(&mut direct)
        );
        println!(
            "disk {size_gib:>2} GiB upper, from blank {}   allocated {:.1} MiB; first of its size {:.1} ms",
            summary(&mut copied),
            allocated as f64 / (1 << 20) as f64,
            first_of_size.as_secs_f64() * 1000.0
        );
    }
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("agent_host benchmark: run it with `cargo bench --bench agent_host`");
        return;
    }
    network().await;
    disks().await;
}
