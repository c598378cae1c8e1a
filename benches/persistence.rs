//! Pause and resume through the public API, on a local stack of real parts (as root: a private
//! PostgreSQL, the control plane, a registered `wrenn agent` and QEMU/TCG microVMs):
//!
//! - create → first exec, and resume → first exec (a call into a paused capsule resumes it);
//! - the no-lost-writes soak: one capsule writes fsync'd and unsynced files on its disk, tmpfs
//!   files and a counter in a process's memory, then is paused and resumed `WRENN_BENCH_CYCLES`
//!   times (default 1000), alternating an explicit resume with a resume by the next call. Every
//!   cycle writes a file of its own and checks every byte of every file and that the counter
//!   ran on; the lost-write count printed at the end must be 0;
//! - pause and resume times and the snapshot size on disk (p50/p95/max), and the host memory
//!   a paused capsule holds (its VMM processes' RSS: there are none).
//!
//! `cargo bench --bench persistence`; `WRENN_BENCH_MEMORY_MB` sets the guest size (default 512).
//! Pause cost as a function of guest size and dirty memory, at the VMM level, is printed by
//! `WRENN_BENCH_VMM=pause cargo bench --bench vmm` (docs/persistence.md).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::{Auth, TestCp};
use wrenn::config::Layout;

fn number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_latencies(label: &str, mut values: Vec<Duration>) {
    if values.is_empty() {
        return;
    }
    values.sort();
    let at = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
    println!(
        "  {label:<28} p50 {:8.1} ms   p95 {:8.1} ms   max {:8.1} ms   (n={})",
        ms(at(0.5)),
        ms(at(0.95)),
        ms(at(1.0)),
        values.len()
    );
}

struct Bench {
    cp: TestCp,
    key: Auth,
}

impl Bench {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.cp.call(method, path, &self.key, body).await
    }

    async fn sh(&self, id: &str, script: &str) -> Value {
        let (status, out) = self
            .call(
                Method::POST,
                &format!("/v1/capsules/{id}/exec"),
                Some(json!({"cmd": "/bin/sh", "args": ["-c", script], "timeout_sec": 120})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        out
    }

    async fn create(&self, memory_mb: usize) -> String {
        let (status, capsule) = self
            .call(
                Method::POST,
                "/v1/capsules",
                Some(json!({"template": "minimal", "memory_mb": memory_mb})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{capsule}");
        capsule["id"].as_str().unwrap().to_owned()
    }

    async fn destroy(&self, id: &str) {
        let (status, body) = self
            .call(Method::DELETE, &format!("/v1/capsules/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
}

fn sha_lines(out: &Value) -> BTreeMap<String, String> {
    out["stdout"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (sum, path) = line.split_once("  ")?;
            Some((path.to_owned(), sum.to_owned()))
        })
        .collect()
}

/// Resident memory of every process whose command line names `id` (its VMM), in KiB.
fn vmm_rss_kib(id: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(id))
                .unwrap_or(false)
        })
        .filter_map(|e| {
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

async fn first_exec_figures(bench: &Bench, memory_mb: usize) {
    let (mut creates, mut resumes) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let started = Instant::now();
        let id = bench.create(memory_mb).await;
        bench.sh(&id, "true").await;
        creates.push(started.elapsed());
        for _ in 0..3 {
            let (status, body) = bench
                .call(Method::POST, &format!("/v1/capsules/{id}/pause"), None)
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let started = Instant::now();
            bench.sh(&id, "true").await;
            resumes.push(started.elapsed());
        }
        bench.destroy(&id).await;
    }
    println!("first exec through the control plane ({memory_mb} MiB guest)");
    print_latencies("create -> first exec", creates);
    print_latencies("paused -> first exec", resumes);
}

async fn soak(bench: &Bench, layout: &Layout, memory_mb: usize, cycles: usize) {
    let id = bench.create(memory_mb).await;
    let setup = bench
        .sh(
            &id,
            "set -e
             mkdir -p /var/soak /mnt/soak
             mount -t tmpfs -o size=64m soak /mnt/soak
             head -c 8388608 /dev/urandom > /var/soak/synced.bin
             sync
             head -c 4194304 /dev/urandom > /var/soak/unsynced.bin
             head -c 4194304 /dev/urandom > /mnt/soak/tmpfs.bin
             (i=0; while :; do i=$((i+1)); echo $i > /mnt/soak/count; sleep 0.05; done) \
               </dev/null >/dev/null 2>&1 &
             sha256sum /var/soak/synced.bin /var/soak/unsynced.bin /mnt/soak/tmpfs.bin",
        )
        .await;
    let mut expected = sha_lines(&setup);
    assert_eq!(expected.len(), 3, "{setup}");
    let count = |out: &Value| -> u64 {
        out["stdout"]
            .as_str()
            .and_then(|s| s.lines().last())
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut last_count = 0;
    let (mut pauses, mut resumes, mut auto_resumes) = (Vec::new(), Vec::new(), Vec::new());
    let mut sizes: Vec<u64> = Vec::new();
    let mut paused_rss_kib = 0;
    let (mut lost_writes, mut failed_cycles) = (0usize, 0usize);
    let started = Instant::now();
    for cycle in 0..cycles {
        // Each cycle's own file, unsynced, rewritten in place of the previous cycle's.
        let path = format!("/var/soak/cycle-{}.bin", cycle % 16);
        let wrote = bench
            .sh(
                &id,
                &format!("head -c 65536 /dev/urandom > {path} && sha256sum {path}"),
            )
            .await;
        expected.extend(sha_lines(&wrote));
        let t = Instant::now();
        let (status, body) = bench
            .call(Method::POST, &format!("/v1/capsules/{id}/pause"), None)
            .await;
        if status != StatusCode::OK {
            eprintln!("cycle {cycle}: pause failed: {status} {body}");
            failed_cycles += 1;
            continue;
        }
        pauses.push(t.elapsed());
        sizes.push(wrenn::vmm::SnapshotFiles::for_sandbox(layout, &id).allocated_bytes());
        paused_rss_kib = paused_rss_kib.max(vmm_rss_kib(&id));
        let paths: Vec<&str> = expected.keys().map(String::as_str).collect();
        let check = format!("sha256sum {}; cat /mnt/soak/count", paths.join(" "));
        let t = Instant::now();
        if cycle % 2 == 0 {
            let (status, body) = bench
                .call(Method::POST, &format!("/v1/capsules/{id}/resume"), None)
                .await;
            if status != StatusCode::OK {
                eprintln!("cycle {cycle}: resume failed: {status} {body}");
                failed_cycles += 1;
                continue;
            }
            resumes.push(t.elapsed());
        } else {
            bench.sh(&id, "true").await;
            auto_resumes.push(t.elapsed());
        }
        let out = bench.sh(&id, &check).await;
        let found = sha_lines(&out);
        let bad = expected
            .iter()
            .filter(|(path, sum)| found.get(*path) != Some(*sum))
            .count();
        let now = count(&out);
        if bad > 0 || now < last_count {
            eprintln!("cycle {cycle}: {bad} files differ, counter {now} after {last_count}: {out}");
        }
        lost_writes += bad + usize::from(now < last_count);
        last_count = now;
    }
    let elapsed = started.elapsed();
    bench.destroy(&id).await;
    println!(
        "no-lost-writes soak ({memory_mb} MiB guest, {cycles} pause/resume cycles in {:.0} s)",
        elapsed.as_secs_f64()
    );
    println!("  lost writes                  {lost_writes}");
    println!("  failed cycles                {failed_cycles}");
    print_latencies("pause (API)", pauses);
    print_latencies("resume (API)", resumes);
    print_latencies("resume by the next exec", auto_resumes);
    sizes.sort_unstable();
    if let (Some(min), Some(max)) = (sizes.first(), sizes.last()) {
        println!(
            "  snapshot on disk             {:.1} .. {:.1} MiB",
            *min as f64 / 1048576.0,
            *max as f64 / 1048576.0
        );
    }
    println!("  VMM RSS while paused         {paused_rss_kib} KiB");
}

fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("persistence benchmark: run it with `cargo bench --bench persistence`");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("persistence benchmark: the local stack boots VMs and needs root; skipped");
        return;
    }
    let memory_mb = number("WRENN_BENCH_MEMORY_MB", 512);
    let cycles = number("WRENN_BENCH_CYCLES", 1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "# local stack: QEMU/TCG microVMs (1 vCPU), {} host CPUs",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let (cp, agent, _, admin) = support::agent::stack().await;
        let (status, key) = cp
            .call(
                Method::POST,
                "/v1/api-keys",
                &admin,
                Some(json!({"name": "bench"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        let bench = Bench {
            key: Auth::ApiKey(key["key"].as_str().unwrap().to_owned()),
            cp,
        };
        let layout = Layout::new(agent.root.path());
        first_exec_figures(&bench, memory_mb).await;
        soak(&bench, &layout, memory_mb, cycles).await;
        support::agent::wait_clean(&agent);
        drop(agent);
        bench.cp.stop().await;
    });
}
