//! The guest's wall clock. A guest resumed from a snapshot wakes with the wall clock it had when
//! it was paused (its monotonic clock did not advance while paused, which is right for its
//! timers); the host tells envd the real time in `/init` and envd sets `CLOCK_REALTIME` to it.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_settime, ClockId};

/// A difference within this is the request's own transit time, not a stale clock.
const TOLERANCE_MS: u64 = 10;

/// The latest time accepted: 2200-01-01. The kernel refuses to set a clock within 30 years of
/// where its 64-bit nanosecond time ends (2262), and nothing earlier than this is plausible
/// for a host either.
const LATEST_UNIX_MS: i64 = 7_258_118_400_000;

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("`wall_clock_unix_ms` {0} is not a time between 1970 and 2200")]
    OutOfRange(i64),
    #[error("could not read the guest's wall clock: {0}")]
    Read(Errno),
    #[error("could not set the guest's wall clock to {unix_ms} ms after the epoch: {errno}")]
    Set { unix_ms: i64, errno: Errno },
}

/// A host wall-clock time, checked to be one the guest's clock can be set to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    unix_ms: i64,
}

impl WallClock {
    pub fn from_unix_ms(unix_ms: i64) -> Result<Self, ClockError> {
        if (0..=LATEST_UNIX_MS).contains(&unix_ms) {
            Ok(Self { unix_ms })
        } else {
            Err(ClockError::OutOfRange(unix_ms))
        }
    }

    fn as_timespec(self) -> TimeSpec {
        // `unsigned_abs` of a time checked to be after the epoch is the time itself.
        TimeSpec::from_duration(Duration::from_millis(self.unix_ms.unsigned_abs()))
    }

    /// Sets the system's wall clock to this time unless it is within [`TOLERANCE_MS`] of it
    /// already.
    pub fn apply(self) -> Result<(), ClockError> {
        let now = clock_gettime(ClockId::CLOCK_REALTIME).map_err(ClockError::Read)?;
        let now_ms = now.tv_sec() * 1000 + now.tv_nsec() / 1_000_000;
        // How far the guest's clock is behind the host's (negative: ahead).
        let behind_ms = self.unix_ms - now_ms;
        if behind_ms.unsigned_abs() <= TOLERANCE_MS {
            return Ok(());
        }
        clock_settime(ClockId::CLOCK_REALTIME, self.as_timespec()).map_err(|errno| {
            ClockError::Set {
                unix_ms: self.unix_ms,
                errno,
            }
        })?;
        tracing::info!(behind_ms, "set the wall clock to the host's");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_times_the_clock_can_take_are_accepted() {
        assert!(WallClock::from_unix_ms(0).is_ok());
        assert!(WallClock::from_unix_ms(1_767_225_600_000).is_ok());
        assert!(WallClock::from_unix_ms(LATEST_UNIX_MS).is_ok());
        for bad in [-1, LATEST_UNIX_MS + 1, i64::MIN, i64::MAX] {
            let err = WallClock::from_unix_ms(bad).unwrap_err();
            assert!(
                matches!(err, ClockError::OutOfRange(v) if v == bad),
                "{err}"
            );
        }
    }

    #[test]
    fn the_time_converts_to_seconds_and_nanoseconds() {
        let ts = WallClock::from_unix_ms(1_767_225_600_123)
            .unwrap()
            .as_timespec();
        assert_eq!((ts.tv_sec(), ts.tv_nsec()), (1_767_225_600, 123_000_000));
    }
}
