//! Progress of long work (template pulls, publishes, imports) in one shape, so the CLI, the
//! agent's log and build logs all say the same thing: bytes done of the total, the rate and the
//! time left.

use std::fmt;
use std::time::{Duration, Instant};

/// A snapshot of one transfer's progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub elapsed: Duration,
}

impl Progress {
    /// Bytes per second so far; none before there is anything to measure.
    pub fn rate(&self) -> Option<f64> {
        let secs = self.elapsed.as_secs_f64();
        (secs > 0.0 && self.done > 0).then(|| self.done as f64 / secs)
    }

    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate()?;
        let left = self.total.saturating_sub(self.done) as f64;
        // A total announced by the other side can be absurd; no ETA then, rather than a panic.
        Duration::try_from_secs_f64(left / rate).ok()
    }
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = self
            .done
            .saturating_mul(100)
            .checked_div(self.total)
            .unwrap_or(100);
        write!(
            f,
            "{} of {} ({percent}%)",
            Bytes(self.done),
            Bytes(self.total)
        )?;
        if let Some(rate) = self.rate() {
            write!(f, ", {}/s", Bytes(rate as u64))?;
        }
        match self.eta() {
            Some(eta) if self.done < self.total => write!(f, ", ETA {} s", eta.as_secs().max(1)),
            _ => Ok(()),
        }
    }
}

/// Bytes in binary units with one decimal.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

/// Calls `report` at most once per `every`, and always for the last update, so a fast transfer
/// does not flood a log and a slow one still shows it is moving.
pub struct Throttled<F> {
    report: F,
    every: Duration,
    started: Instant,
    last: Option<Instant>,
}

impl<F: FnMut(&Progress)> Throttled<F> {
    pub fn new(every: Duration, report: F) -> Self {
        Self {
            report,
            every,
            started: Instant::now(),
            last: None,
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        let now = Instant::now();
        let due = self.last.is_none_or(|last| now - last >= self.every);
        if due || done >= total {
            self.last = Some(now);
            (self.report)(&Progress {
                done,
                total,
                elapsed: now - self.started,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_bytes_rate_and_time_left() {
        let progress = Progress {
            done: 50 << 20,
            total: 200 << 20,
            elapsed: Duration::from_secs(2),
        };
        assert_eq!(
            progress.to_string(),
            "50.0 MiB of 200.0 MiB (25%), 25.0 MiB/s, ETA 6 s"
        );
        let finished = Progress {
            done: 10,
            total: 10,
            elapsed: Duration::ZERO,
        };
        assert_eq!(finished.to_string(), "10 B of 10 B (100%)");
    }

    #[test]
    fn reports_the_first_and_last_update_and_at_most_one_per_interval() {
        let mut seen = Vec::new();
        let mut throttled =
            Throttled::new(Duration::from_secs(3600), |p: &Progress| seen.push(p.done));
        for done in [1, 2, 3, 10] {
            throttled.update(done, 10);
        }
        assert_eq!(seen, [1, 10]);
    }
}
