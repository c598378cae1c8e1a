//! Host-agent figures with real parts: a control plane over a private PostgreSQL, a registered
//! `wrenn agent`, and QEMU/TCG sandboxes from the `minimal` image. Prints per-phase create
//! timings (disk, network, VMM spawn, boot to envd ready, envd init), destroy time, and the
//! agent's own memory per running sandbox (VMM processes excluded). Run as root:
//! `cargo bench --bench agent [-- N]` (N sandboxes, default 4).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Instant;

use hyper::{Method, StatusCode};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    // `cargo test` runs benches once with no arguments; the figures need root and minutes.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if std::env::args().any(|a| a == "--bench") && !nix::unistd::geteuid().is_root() {
        println!("agent bench: needs root; skipped");
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let count: usize = args.first().and_then(|n| n.parse().ok()).unwrap_or(4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (cp, agent, _, _) = runtime.block_on(support::agent::stack());
    let pid = agent.child.as_ref().unwrap().id();
    let idle_rss = rss_kib(pid);

    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut totals = Vec::new();
    for i in 0..count {
        let started = Instant::now();
        let (status, info) = agent.create(&support::agent::sid(&format!("bench-{i}")));
        assert_eq!(status, StatusCode::CREATED, "{info}");
        totals.push(started.elapsed().as_secs_f64() * 1000.0);
        for (key, value) in info["metadata"].as_object().unwrap() {
            if let Some(phase) = key.strip_prefix("create_ms.") {
                let ms: f64 = value.as_str().unwrap().parse().unwrap();
                phases.entry(phase.to_owned()).or_default().push(ms);
            }
        }
    }
    let busy_rss = rss_kib(pid);
    let mut destroys = Vec::new();
    for i in 0..count {
        let started = Instant::now();
        let (status, body) = agent.call(
            Method::DELETE,
            &format!(
                "/v1/sandboxes/{}",
                support::agent::sid(&format!("bench-{i}"))
            ),
            None,
        );
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        destroys.push(started.elapsed().as_secs_f64() * 1000.0);
    }

    println!("agent: {count} sandboxes (minimal image, 1 vCPU, 256 MiB, QEMU/TCG), medians");
    for (phase, values) in &phases {
        println!(
            "  create phase {phase:<14} {:>9.1} ms",
            median(values.clone())
        );
    }
    println!("  create total (API)         {:>9.1} ms", median(totals));
    println!("  destroy (API)              {:>9.1} ms", median(destroys));
    println!(
        "  agent RSS idle {idle_rss} KiB, with {count} running {busy_rss} KiB: {:.0} KiB per sandbox",
        (busy_rss.saturating_sub(idle_rss)) as f64 / count as f64
    );
    drop(agent);
    runtime.block_on(cp.stop());
}
