//! Each sandbox's use of its host, sampled every second while it runs: the VMM process's CPU
//! time normalised to the sandbox's vCPUs, the memory the guest uses (from envd), and the bytes
//! allocated to its disk. Samples go into bounded rings at three resolutions (every second for
//! 10 minutes, 30-second averages for 2 hours, 5-minute averages for 24 hours), which outlive a
//! pause and are kept [`RETENTION`] after the sandbox has left the host. They live in the
//! agent's memory; a stopping agent saves them for the next one (an agent that is killed
//! loses them).

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{SandboxManager, SandboxPhase};
use crate::agent::disk;
use crate::agent::wire::{MetricPoint, MetricsRange};
use crate::envd::client::EnvdClient;

pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a sandbox's rings are kept after its last sample: the longest range answered.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// A guest that does not answer within this much of an interval keeps its last memory figure.
const ENVD_WAIT: Duration = Duration::from_millis(700);

/// Points of one resolution: `step_secs` apart, at most `capacity`, each the average of the
/// samples in its step (the latest step still filling).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tier {
    step_secs: i64,
    capacity: usize,
    points: VecDeque<MetricPoint>,
    filling: Option<(MetricPoint, u32)>,
}

impl Tier {
    fn new(step_secs: i64, span_secs: i64) -> Self {
        let capacity = usize::try_from(span_secs / step_secs).unwrap_or(1);
        Self {
            step_secs,
            capacity,
            points: VecDeque::with_capacity(capacity.min(64)),
            filling: None,
        }
    }

    fn push(&mut self, sample: MetricPoint) {
        let step = sample.timestamp_unix.div_euclid(self.step_secs) * self.step_secs;
        match &mut self.filling {
            Some((sum, count)) if sum.timestamp_unix == step => {
                sum.cpu_pct += sample.cpu_pct;
                sum.mem_bytes += sample.mem_bytes;
                sum.disk_bytes += sample.disk_bytes;
                *count += 1;
            }
            _ => {
                if let Some(done) = self.filled() {
                    if self.points.len() == self.capacity {
                        self.points.pop_front();
                    }
                    self.points.push_back(done);
                }
                let start = MetricPoint {
                    timestamp_unix: step,
                    ..sample
                };
                self.filling = Some((start, 1));
            }
        }
    }

    /// The average of the step still filling.
    fn filled(&self) -> Option<MetricPoint> {
        let (sum, count) = self.filling?;
        let n = u64::from(count.max(1));
        Some(MetricPoint {
            timestamp_unix: sum.timestamp_unix,
            cpu_pct: sum.cpu_pct / n as f64,
            mem_bytes: sum.mem_bytes / n,
            disk_bytes: sum.disk_bytes / n,
        })
    }

    /// The points at or after `since`, oldest first, the step still filling last.
    fn since(&self, since: i64) -> Vec<MetricPoint> {
        self.points
            .iter()
            .copied()
            .chain(self.filled())
            .filter(|p| p.timestamp_unix >= since)
            .collect()
    }
}

/// One sandbox's rings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricRings {
    seconds: Tier,
    half_minutes: Tier,
    five_minutes: Tier,
    #[serde(with = "age")]
    last_sample: Instant,
}

/// An `Instant` saved as the Unix time it stood for, so it means the same to the next process.
mod age {
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(at: &Instant, s: S) -> Result<S::Ok, S::Error> {
        let unix = SystemTime::now()
            .checked_sub(at.elapsed())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        unix.as_secs().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        let unix = Duration::from_secs(u64::deserialize(d)?);
        let age = SystemTime::now()
            .duration_since(UNIX_EPOCH + unix)
            .unwrap_or_default();
        Ok(Instant::now().checked_sub(age).unwrap_or_else(Instant::now))
    }
}

/// Writes `rings` to `path` (through a temporary file, so a half-written file is never read).
fn save_rings(path: &Path, rings: &HashMap<String, MetricRings>) -> std::io::Result<()> {
    let partial = path.with_extension("json.part");
    std::fs::write(&partial, serde_json::to_vec(rings)?)?;
    std::fs::rename(&partial, path)
}

/// The rings a stopped agent saved at `path`, which is removed: they are read once.
fn take_saved_rings(path: &Path) -> std::io::Result<HashMap<String, MetricRings>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e),
    };
    std::fs::remove_file(path)?;
    Ok(serde_json::from_slice(&bytes)?)
}

impl Default for MetricRings {
    fn default() -> Self {
        Self {
            seconds: Tier::new(1, 600),
            half_minutes: Tier::new(30, 7200),
            five_minutes: Tier::new(300, 24 * 3600),
            last_sample: Instant::now(),
        }
    }
}

impl MetricRings {
    pub fn push(&mut self, sample: MetricPoint) {
        self.seconds.push(sample);
        self.half_minutes.push(sample);
        self.five_minutes.push(sample);
        self.last_sample = Instant::now();
    }

    /// The points of `range` up to `now_unix`, from the finest resolution that spans it.
    pub fn range(&self, range: MetricsRange, now_unix: i64) -> Vec<MetricPoint> {
        let since = now_unix - range.span_secs();
        let tier = match range {
            MetricsRange::FiveMinutes | MetricsRange::TenMinutes => &self.seconds,
            MetricsRange::OneHour | MetricsRange::TwoHours => &self.half_minutes,
            MetricsRange::SixHours | MetricsRange::TwelveHours | MetricsRange::OneDay => {
                &self.five_minutes
            }
        };
        tier.since(since)
    }
}

/// CPU time a process has used, from `/proc/<pid>/stat` (user + system, in clock ticks).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields follow the last `)`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// What the sampler remembers of a sandbox between samples.
struct Previous {
    pid: u32,
    ticks: u64,
    at: Instant,
    mem_bytes: u64,
}

/// One running sandbox as the sampler sees it.
pub(super) struct Sampled {
    pub id: String,
    pub pid: u32,
    pub vcpus: u32,
    pub envd: EnvdClient,
}

async fn guest_memory(envd: &EnvdClient) -> Option<u64> {
    match tokio::time::timeout(ENVD_WAIT, envd.metrics()).await {
        Ok(Ok(metrics)) => Some(metrics.mem_used),
        _ => None,
    }
}

fn disk_bytes(path: &Path) -> u64 {
    disk::allocated_bytes(path).unwrap_or(0)
}

impl SandboxManager {
    /// The sandbox's metrics over `range`; `None` when this host has none for it (never here,
    /// or gone longer than [`RETENTION`]).
    pub fn metrics(&self, id: &str, range: MetricsRange) -> Option<Vec<MetricPoint>> {
        let now = chrono::Utc::now().timestamp();
        let rings = self.metric_rings.lock().expect("metrics lock");
        rings.get(id).map(|r| r.range(range, now))
    }

    /// The running sandboxes with what sampling them needs.
    fn sampled(&self) -> Vec<Sampled> {
        let sandboxes: Vec<_> = self
            .sandboxes
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        sandboxes
            .iter()
            .filter_map(|sandbox| {
                let lifecycle = sandbox.lifecycle();
                if lifecycle.phase != SandboxPhase::Running {
                    return None;
                }
                let runtime = lifecycle.runtime.as_ref()?;
                Some(Sampled {
                    id: sandbox.id(),
                    pid: runtime.vm.pid(),
                    vcpus: sandbox.request.vcpus.max(1),
                    envd: runtime.envd.clone(),
                })
            })
            .collect()
    }

    fn record_sample(&self, id: &str, sample: MetricPoint) {
        let mut rings = self.metric_rings.lock().expect("metrics lock");
        rings.entry(id.to_owned()).or_default().push(sample);
    }

    /// Takes over the rings a stopped agent saved, beside any already sampled.
    pub fn restore_metrics(&self) {
        let path = self.layout.sandbox_metrics_file();
        match take_saved_rings(&path) {
            Ok(saved) if saved.is_empty() => {}
            Ok(saved) => {
                let mut rings = self.metric_rings.lock().expect("metrics lock");
                for (id, saved) in saved {
                    rings.entry(id).or_insert(saved);
                }
                tracing::info!(
                    sandboxes = rings.len(),
                    "metrics of the previous agent restored"
                );
            }
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "could not restore saved metrics")
            }
        }
        self.forget_stale_metrics();
    }

    fn save_metrics(&self) {
        let path = self.layout.sandbox_metrics_file();
        let rings = self.metric_rings.lock().expect("metrics lock").clone();
        if rings.is_empty() {
            return;
        }
        if let Err(error) = save_rings(&path, &rings) {
            tracing::warn!(%error, path = %path.display(), "could not save the sandboxes' metrics");
        }
    }

    fn forget_stale_metrics(&self) {
        let mut rings = self.metric_rings.lock().expect("metrics lock");
        rings.retain(|_, r| r.last_sample.elapsed() < RETENTION);
    }
}

/// Samples every running sandbox each [`SAMPLE_INTERVAL`] until `cancel` fires, then saves the
/// rings for the next agent (which takes them over with [`SandboxManager::restore_metrics`]).
pub async fn run(manager: Arc<SandboxManager>, cancel: CancellationToken) {
    sample(&manager, cancel).await;
    manager.save_metrics();
}

async fn sample(manager: &SandboxManager, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let per_second = ticks_per_second();
    let mut previous: HashMap<String, Previous> = HashMap::new();
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let running = manager.sampled();
        let memories =
            futures::future::join_all(running.iter().map(|s| guest_memory(&s.envd))).await;
        let now = chrono::Utc::now().timestamp();
        let mut seen = HashMap::with_capacity(running.len());
        for (sandbox, memory) in running.iter().zip(memories) {
            let ticks_now = cpu_ticks(sandbox.pid);
            let at = Instant::now();
            let before = previous
                .remove(&sandbox.id)
                .filter(|p| p.pid == sandbox.pid);
            let cpu_pct = match (&before, ticks_now) {
                (Some(before), Some(ticks)) => {
                    let used = ticks.saturating_sub(before.ticks) as f64 / per_second;
                    let wall = at.duration_since(before.at).as_secs_f64().max(1e-3);
                    (used / wall / f64::from(sandbox.vcpus) * 100.0).clamp(0.0, 100.0)
                }
                _ => 0.0,
            };
            let mem_bytes = memory.or(before.as_ref().map(|b| b.mem_bytes)).unwrap_or(0);
            let disk = disk_bytes(&manager.layout.sandbox_upper_disk(&sandbox.id));
            manager.record_sample(
                &sandbox.id,
                MetricPoint {
                    timestamp_unix: now,
                    cpu_pct,
                    mem_bytes,
                    disk_bytes: disk,
                },
            );
            if let Some(ticks) = ticks_now {
                seen.insert(
                    sandbox.id.clone(),
                    Previous {
                        pid: sandbox.pid,
                        ticks,
                        at,
                        mem_bytes,
                    },
                );
            }
        }
        previous = seen;
        ticks += 1;
        if ticks % 600 == 0 {
            manager.forget_stale_metrics();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: i64, cpu: f64, mem: u64) -> MetricPoint {
        MetricPoint {
            timestamp_unix: t,
            cpu_pct: cpu,
            mem_bytes: mem,
            disk_bytes: 4096,
        }
    }

    #[test]
    fn coarser_tiers_average_their_steps_and_every_tier_is_bounded() {
        let mut rings = MetricRings::default();
        // A multiple of every step, as a real clock passes one.
        let start = 1_800_000_000;
        for t in 0..(25 * 3600) {
            rings.push(point(start + t, (t % 60) as f64, 1000 + (t % 2) as u64 * 2));
        }
        let now = start + 25 * 3600;
        let seconds = rings.range(MetricsRange::TenMinutes, now);
        assert!(seconds.len() <= 601, "{}", seconds.len());
        assert_eq!(seconds.last().unwrap().timestamp_unix, now - 1);
        let half = rings.range(MetricsRange::TwoHours, now);
        assert_eq!(half.len(), 240);
        assert!(half
            .windows(2)
            .all(|w| w[1].timestamp_unix - w[0].timestamp_unix == 30));
        // 30 samples of 0..29 or 30..59: the average of either half.
        let cpu = half[0].cpu_pct;
        assert!(cpu == 14.5 || cpu == 44.5, "{cpu}");
        assert_eq!(half[0].mem_bytes, 1001);
        let day = rings.range(MetricsRange::OneDay, now);
        assert_eq!(day.len(), 288);
        assert!((day[0].cpu_pct - 29.5).abs() < 1e-9);
        assert_eq!(rings.five_minutes.points.len(), 288);
        assert_eq!(rings.seconds.points.len(), 600);
    }

    #[test]
    fn a_short_range_of_a_new_sandbox_holds_what_there_is() {
        let mut rings = MetricRings::default();
        rings.push(point(1000, 50.0, 10));
        rings.push(point(1001, 70.0, 30));
        let hour = rings.range(MetricsRange::OneHour, 1001);
        assert_eq!(hour.len(), 1);
        assert_eq!(hour[0].timestamp_unix, 990);
        assert!((hour[0].cpu_pct - 60.0).abs() < 1e-9);
        assert_eq!(rings.range(MetricsRange::FiveMinutes, 1001).len(), 2);
        assert!(rings.range(MetricsRange::FiveMinutes, 5000).is_empty());
    }

    #[test]
    fn saved_rings_are_read_back_once_with_their_age() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandbox-metrics.json");
        assert!(take_saved_rings(&path).unwrap().is_empty(), "nothing saved");
        let mut rings = MetricRings::default();
        for t in 0..100 {
            rings.push(point(1_800_000_000 + t, t as f64, 7));
        }
        rings.last_sample = Instant::now() - Duration::from_secs(3600);
        let saved = HashMap::from([("cl-a".to_owned(), rings.clone())]);
        save_rings(&path, &saved).unwrap();
        let read = take_saved_rings(&path).unwrap();
        assert!(!path.exists(), "read once");
        let back = &read["cl-a"];
        let now = 1_800_000_100;
        for range in [
            MetricsRange::TenMinutes,
            MetricsRange::TwoHours,
            MetricsRange::OneDay,
        ] {
            assert_eq!(back.range(range, now), rings.range(range, now));
        }
        let age = back.last_sample.elapsed().as_secs();
        assert!((3599..=3602).contains(&age), "{age}");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(take_saved_rings(&path).is_err());
    }

    #[test]
    fn cpu_ticks_reads_this_process() {
        let ticks = cpu_ticks(std::process::id()).expect("own stat");
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        assert!(cpu_ticks(std::process::id()).unwrap() >= ticks);
        assert!(cpu_ticks(u32::MAX).is_none());
    }
}
