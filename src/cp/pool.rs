//! Team resource pools: a team's plan says how many vCPUs, how much memory and disk and how many
//! running capsules it may hold at once, and every operation that would hold more (a create, a
//! fork, a resume, a snapshot template) is admitted against it under a lock on the team's pool,
//! in the transaction that records the operation, so concurrent operations cannot overshoot.
//! A paused capsule holds its disk in full and its plan's share of its memory.

use std::fmt;

use crate::db::plans::{self, Plan, PoolUse};
use crate::db::DbError;

/// One of the limits a plan sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolResource {
    Capsules,
    Vcpus,
    MemoryMb,
    DiskMb,
}

impl PoolResource {
    /// The name the API uses for it, in the pool view and in refusals.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolResource::Capsules => "capsules",
            PoolResource::Vcpus => "vcpus",
            PoolResource::MemoryMb => "memory_mb",
            PoolResource::DiskMb => "disk_mb",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            PoolResource::Capsules => "running capsule(s)",
            PoolResource::Vcpus => "vCPU(s)",
            PoolResource::MemoryMb => "MiB of memory",
            PoolResource::DiskMb => "MiB of disk",
        }
    }
}

impl fmt::Display for PoolResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operation adds to its team's pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ask {
    pub capsules: i64,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
}

impl Ask {
    /// `count` new running capsules of this size (a create, a fork's children).
    pub fn running(count: i64, vcpus: i64, memory_mb: i64, disk_mb: i64) -> Self {
        Ask {
            capsules: count,
            vcpus: vcpus.saturating_mul(count),
            memory_mb: memory_mb.saturating_mul(count),
            disk_mb: disk_mb.saturating_mul(count),
        }
    }

    /// A paused capsule of this size running again: its vCPUs and the memory it did not hold
    /// while paused; its disk it held all along.
    pub fn resume(vcpus: i64, memory_mb: i64, paused_memory_percent: i32) -> Self {
        Ask {
            capsules: 1,
            vcpus,
            memory_mb: memory_mb - paused_share(memory_mb, paused_memory_percent),
            disk_mb: 0,
        }
    }

    /// A snapshot template of a capsule of this size: at most its memory and its disk. Held
    /// from its admission on (`template_reservations`, which `plans::pool_use` counts).
    pub fn snapshot(memory_mb: i64, disk_mb: i64) -> Self {
        Ask {
            disk_mb: memory_mb.saturating_add(disk_mb),
            ..Ask::default()
        }
    }
}

/// The memory a paused capsule of `memory_mb` holds: the plan's share, rounded up (as
/// `plans::pool_use` counts it).
pub fn paused_share(memory_mb: i64, paused_memory_percent: i32) -> i64 {
    let percent = i64::from(paused_memory_percent.clamp(0, 100));
    (memory_mb.saturating_mul(percent) + 99) / 100
}

/// An operation the team's pool has no room for: 429 `pool_exhausted`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the team's {resource} pool is exhausted: {used} of {limit} {unit} in use and {asked} more asked (plan `{plan}`)",
    unit = .resource.unit()
)]
pub struct PoolExhausted {
    pub resource: PoolResource,
    pub limit: i64,
    pub used: i64,
    pub asked: i64,
    pub plan: String,
}

/// Whether `ask` fits in `plan` beside `used`. Only what the operation adds is checked, so a
/// team above a limit its plan lowered can still do what holds no more of it.
pub fn admit(plan: &Plan, used: &PoolUse, ask: &Ask) -> Result<(), PoolExhausted> {
    let limits = &plan.limits;
    let checks = [
        (
            PoolResource::Capsules,
            limits.max_capsules,
            used.running,
            ask.capsules,
        ),
        (PoolResource::Vcpus, limits.vcpus, used.vcpus, ask.vcpus),
        (
            PoolResource::MemoryMb,
            limits.memory_mb,
            used.memory_mb,
            ask.memory_mb,
        ),
        (
            PoolResource::DiskMb,
            limits.disk_mb,
            used.disk_mb,
            ask.disk_mb,
        ),
    ];
    for (resource, limit, used, asked) in checks {
        let Some(limit) = limit else { continue };
        if asked > 0 && used.saturating_add(asked) > limit {
            return Err(PoolExhausted {
                resource,
                limit,
                used,
                asked,
                plan: plan.name.clone(),
            });
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Exhausted(#[from] PoolExhausted),
    /// The team was deleted meanwhile.
    #[error("the team no longer exists")]
    TeamGone,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Locks `team`'s pool for the rest of the transaction on `conn` and admits what `ask_of` asks
/// given the team's plan. The caller records the operation in the same transaction.
pub async fn admit_locked(
    conn: &mut sqlx::PgConnection,
    team: uuid::Uuid,
    ask_of: impl FnOnce(&Plan) -> Ask,
) -> Result<(), AdmitError> {
    let (plan, used) = plans::lock_pool(conn, team)
        .await?
        .ok_or(AdmitError::TeamGone)?;
    admit(&plan, &used, &ask_of(&plan))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::plans::PlanLimits;

    fn plan(limits: PlanLimits) -> Plan {
        Plan {
            id: uuid::Uuid::nil(),
            name: "small".into(),
            limits,
            is_default: false,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    const SMALL: PlanLimits = PlanLimits {
        vcpus: Some(4),
        memory_mb: Some(2048),
        disk_mb: Some(10240),
        max_capsules: Some(3),
        paused_memory_percent: 50,
    };

    #[test]
    fn fits_up_to_each_limit_and_names_the_first_it_would_pass() {
        let plan = plan(SMALL);
        let used = PoolUse {
            running: 2,
            vcpus: 3,
            memory_mb: 1536,
            disk_mb: 5120,
            ..PoolUse::default()
        };
        assert_eq!(admit(&plan, &used, &Ask::running(1, 1, 512, 5120)), Ok(()));
        let refused = admit(&plan, &used, &Ask::running(1, 2, 512, 5120)).unwrap_err();
        assert_eq!(refused.resource, PoolResource::Vcpus);
        assert_eq!((refused.limit, refused.used, refused.asked), (4, 3, 2));
        assert_eq!(
            refused.to_string(),
            "the team's vcpus pool is exhausted: 3 of 4 vCPU(s) in use and 2 more asked (plan `small`)"
        );
        let refused = admit(&plan, &used, &Ask::running(2, 0, 0, 0)).unwrap_err();
        assert_eq!(refused.resource, PoolResource::Capsules);
    }

    #[test]
    fn no_limit_admits_anything_and_asking_nothing_passes_a_full_pool() {
        let unlimited = plan(PlanLimits {
            vcpus: None,
            memory_mb: None,
            disk_mb: None,
            max_capsules: None,
            paused_memory_percent: 50,
        });
        let huge = Ask::running(1000, 64, 1 << 20, 1 << 30);
        assert_eq!(admit(&unlimited, &PoolUse::default(), &huge), Ok(()));
        let over = PoolUse {
            running: 9,
            vcpus: 9,
            memory_mb: 9999,
            disk_mb: 99999,
            ..PoolUse::default()
        };
        assert_eq!(admit(&plan(SMALL), &over, &Ask::default()), Ok(()));
    }

    #[test]
    fn a_resume_asks_the_memory_a_paused_capsule_did_not_hold() {
        assert_eq!(paused_share(512, 50), 256);
        assert_eq!(paused_share(513, 50), 257);
        assert_eq!(paused_share(512, 0), 0);
        assert_eq!(paused_share(512, 100), 512);
        let ask = Ask::resume(2, 1025, 50);
        assert_eq!(ask.memory_mb + paused_share(1025, 50), 1025);
        assert_eq!((ask.capsules, ask.vcpus, ask.disk_mb), (1, 2, 0));
    }
}
