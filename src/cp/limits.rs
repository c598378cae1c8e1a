//! What one team may run inside its capsules at once: foreground and background execs, file
//! transfers (uploads, downloads, directory listings) and WebSocket process sessions; and the
//! event streams it may hold open. Each is a
//! counter per team, held by a [`WorkPermit`] for as long as the work lasts (a download's permit
//! travels with its streamed body); over the limit the caller gets 429 `rate_limited` with
//! `Retry-After` instead of a share of the control plane's memory and connections.
//!
//! The counts are per control-plane process: a replica enforces its own limits. They bound what
//! one team can make one process hold (a foreground exec's answer is buffered, up to the
//! agent-answer cap), which is what they are for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::Config;
use crate::id::TeamId;

/// The kinds of work that are counted, each against its own limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Work {
    /// `POST /exec`, foreground or background.
    Exec,
    /// `files/write`, `files/read` (and their stream forms), `files/list`.
    Transfer,
    /// `exec/stream`, `processes/{selector}/stream` and `pty` WebSockets.
    Session,
    /// `GET /v1/events/stream`.
    EventStream,
}

impl Work {
    fn noun(self) -> &'static str {
        match self {
            Work::Exec => "execs",
            Work::Transfer => "file transfers",
            Work::Session => "process sessions",
            Work::EventStream => "event streams",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Work::Exec => "cp.team_max_execs",
            Work::Transfer => "cp.team_max_transfers",
            Work::Session => "cp.team_max_sessions",
            Work::EventStream => "cp.team_max_event_streams",
        }
    }
}

/// Concurrent work allowed per team; 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TeamLimitSettings {
    pub execs: usize,
    pub transfers: usize,
    pub sessions: usize,
    pub event_streams: usize,
}

impl TeamLimitSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            execs: config.cp.team_max_execs,
            transfers: config.cp.team_max_transfers,
            sessions: config.cp.team_max_sessions,
            event_streams: config.cp.team_max_event_streams,
        }
    }

    fn of(&self, work: Work) -> usize {
        match work {
            Work::Exec => self.execs,
            Work::Transfer => self.transfers,
            Work::Session => self.sessions,
            Work::EventStream => self.event_streams,
        }
    }
}

/// The configuration's defaults.
impl Default for TeamLimitSettings {
    fn default() -> Self {
        Self::from_config(&Config::default())
    }
}

/// How long a refused caller is told to wait: work in capsules usually ends within seconds.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("your team already has {limit} {} in progress ({}); try again when one has finished", .work.noun(), .work.key())]
pub struct TeamBusy {
    pub work: Work,
    pub limit: usize,
}

/// The work in progress of every team.
#[derive(Debug)]
pub struct TeamLimits {
    settings: TeamLimitSettings,
    in_use: Mutex<HashMap<(TeamId, Work), usize>>,
}

impl TeamLimits {
    pub fn new(settings: TeamLimitSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            in_use: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one more `work` for `team`, or refuses it when the team is at its limit.
    pub fn acquire(self: &Arc<Self>, team: TeamId, work: Work) -> Result<WorkPermit, TeamBusy> {
        let limit = self.settings.of(work);
        let mut in_use = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        let count = in_use.entry((team, work)).or_default();
        if limit > 0 && *count >= limit {
            return Err(TeamBusy { work, limit });
        }
        *count += 1;
        Ok(WorkPermit {
            limits: Arc::clone(self),
            key: (team, work),
        })
    }

    fn release(&self, key: (TeamId, Work)) {
        let mut in_use = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = in_use.get_mut(&key) {
            *count -= 1;
            // Idle teams take no room.
            if *count == 0 {
                in_use.remove(&key);
            }
        }
    }
}

/// One unit of a team's work in progress; dropping it ends the work.
#[derive(Debug)]
#[must_use = "the work is counted only while its permit is held"]
pub struct WorkPermit {
    limits: Arc<TeamLimits>,
    key: (TeamId, Work),
}

impl Drop for WorkPermit {
    fn drop(&mut self) {
        self.limits.release(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_team_and_kind_has_its_own_count_and_a_dropped_permit_frees_its_place() {
        let limits = TeamLimits::new(TeamLimitSettings {
            execs: 2,
            transfers: 1,
            sessions: 0,
            event_streams: 1,
        });
        let (a, b) = (
            TeamId(uuid::Uuid::from_u128(1)),
            TeamId(uuid::Uuid::from_u128(2)),
        );
        let first = limits.acquire(a, Work::Exec).unwrap();
        let _second = limits.acquire(a, Work::Exec).unwrap();
        let busy = limits.acquire(a, Work::Exec).unwrap_err();
        assert_eq!(busy.limit, 2);
        assert!(busy.to_string().contains("cp.team_max_execs"), "{busy}");
        let _other_team = limits.acquire(b, Work::Exec).unwrap();
        let _transfer = limits.acquire(a, Work::Transfer).unwrap();
        assert!(limits.acquire(a, Work::Transfer).is_err());
        drop(first);
        let _third = limits.acquire(a, Work::Exec).unwrap();
        let sessions: Vec<_> = (0..100)
            .map(|_| limits.acquire(a, Work::Session).unwrap())
            .collect();
        drop(sessions);
        assert!(!limits
            .in_use
            .lock()
            .unwrap()
            .contains_key(&(a, Work::Session)));
    }
}
