//! Guest resource figures read from /proc and statvfs: CPU busy share between two samples,
//! memory used as `MemTotal - MemAvailable`, and the root filesystem's usage.

use std::sync::Mutex;

use super::api::Metrics;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct CpuSample {
    busy: u64,
    total: u64,
}

/// Remembers the previous CPU sample so each reading covers the time since the last one.
pub struct MetricsSampler {
    last: Mutex<CpuSample>,
}

impl Default for MetricsSampler {
    fn default() -> Self {
        Self {
            last: Mutex::new(read_cpu().unwrap_or_default()),
        }
    }
}

impl MetricsSampler {
    pub fn sample(&self) -> Metrics {
        let now = read_cpu().unwrap_or_default();
        let previous = std::mem::replace(
            &mut *self.last.lock().unwrap_or_else(|p| p.into_inner()),
            now,
        );
        let total = now.total.saturating_sub(previous.total);
        let busy = now.busy.saturating_sub(previous.busy);
        let cpu_used_pct = if total == 0 {
            0.0
        } else {
            busy as f64 * 100.0 / total as f64
        };
        let (mem_total, mem_available) = read_memory().unwrap_or((0, 0));
        let (disk_total, disk_used) = read_disk().unwrap_or((0, 0));
        Metrics {
            cpu_count: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            cpu_used_pct: (cpu_used_pct * 100.0).round() / 100.0,
            mem_used: mem_total.saturating_sub(mem_available),
            mem_total,
            disk_used,
            disk_total,
        }
    }
}

fn read_cpu() -> Option<CpuSample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu(&stat)
}

fn parse_cpu(stat: &str) -> Option<CpuSample> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is already in user.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some(CpuSample {
        busy: total.saturating_sub(idle),
        total,
    })
}

fn read_memory() -> Option<(u64, u64)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

fn read_disk() -> Option<(u64, u64)> {
    let stat = nix::sys::statvfs::statvfs("/").ok()?;
    let fragment = stat.fragment_size();
    let total = stat.blocks() * fragment;
    let used = (stat.blocks() - stat.blocks_free()) * fragment;
    Some((total, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let cpu = parse_cpu("cpu  10 0 10 70 10 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(
            cpu,
            CpuSample {
                busy: 20,
                total: 100
            }
        );
        let mem = parse_meminfo("MemTotal: 2048 kB\nMemFree: 10 kB\nMemAvailable: 1024 kB\n");
        assert_eq!(mem, Some((2048 * 1024, 1024 * 1024)));
    }
}
