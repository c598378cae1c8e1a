//! Placement of new sandboxes: least-loaded over the online hosts a team may use, by free vCPU,
//! memory and disk after overcommit, preferring hosts that already hold the sandbox's template
//! image. The reservation (the sandbox row, `pending` on its host) is
//! made under a lock on the chosen host alone (see [`place`]), so concurrent creates never
//! over-commit a host and only those choosing the same host wait for each other.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::Acquire;
use uuid::Uuid;

use super::pool::{self, AdmitError, Ask, PoolExhausted};
use crate::db::host_templates;
use crate::db::hosts::{self, Host};
use crate::db::sandboxes::{self, PlacedSandbox, Reserved};
use crate::db::{template_reservations, Db, DbError};

/// How far a host's physical resources may be promised to sandboxes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerSettings {
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub disk_overcommit: f64,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            disk_overcommit: 2.0,
        }
    }
}

/// What a new sandbox asks of its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("no online hosts are available to this team")]
    NoHosts,
    #[error(
        "no online host has room for {} vCPU(s), {} MiB of memory and {} MiB of disk ({hosts} host(s) considered)",
        .demand.vcpus, .demand.memory_mb, .demand.disk_mb
    )]
    NoRoom { demand: Demand, hosts: usize },
    /// A snapshot template lives only on the hosts that made it.
    #[error("no online host available to this team holds template `{0}`")]
    NoHolder(String),
    /// The team's pool (its plan) has no room for it.
    #[error(transparent)]
    PoolExhausted(#[from] PoolExhausted),
    #[error("the team no longer exists")]
    TeamGone,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<AdmitError> for ScheduleError {
    fn from(error: AdmitError) -> Self {
        match error {
            AdmitError::Exhausted(exhausted) => ScheduleError::PoolExhausted(exhausted),
            AdmitError::TeamGone => ScheduleError::TeamGone,
            AdmitError::Db(db) => ScheduleError::Db(db),
        }
    }
}

/// A host's capacity after overcommit, what is already promised on it, and whether it holds
/// the template image (a host without it would have to fetch it first).
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub capacity: Capacity,
    pub reserved: Reserved,
    pub holds_template: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub vcpus: f64,
    pub memory_mb: f64,
    pub disk_mb: f64,
}

impl Capacity {
    pub fn of(host: &Host, settings: &SchedulerSettings) -> Self {
        let cores = f64::from(host.cpu_cores.unwrap_or(0).max(0));
        let memory = host.memory_mb.unwrap_or(0).max(0) as f64;
        let disk = host.disk_gb.unwrap_or(0).max(0) as f64 * 1024.0;
        Self {
            vcpus: cores * settings.cpu_overcommit,
            memory_mb: memory * settings.memory_overcommit,
            disk_mb: disk * settings.disk_overcommit,
        }
    }
}

/// The share of its capacity a host would have left after taking `demand`, judged by its
/// scarcest resource; `None` when the demand does not fit.
pub fn headroom(load: &Load, demand: &Demand) -> Option<f64> {
    let after = |capacity: f64, reserved: i64, wanted: i64| -> Option<f64> {
        let left = capacity - (reserved + wanted) as f64;
        (capacity > 0.0 && left >= 0.0).then(|| left / capacity)
    };
    let cpu = after(load.capacity.vcpus, load.reserved.vcpus, demand.vcpus)?;
    let memory = after(
        load.capacity.memory_mb,
        load.reserved.memory_mb,
        demand.memory_mb,
    )?;
    let disk = after(load.capacity.disk_mb, load.reserved.disk_mb, demand.disk_mb)?;
    Some(cpu.min(memory).min(disk))
}

/// The index of the host that fits and holds the template with the most room; failing that, of
/// the one that fits with the most room; ties broken by order.
pub fn choose(loads: &[Load], demand: &Demand) -> Option<usize> {
    let mut best: Option<(usize, (bool, f64))> = None;
    for (index, load) in loads.iter().enumerate() {
        if let Some(room) = headroom(load, demand) {
            let rank = (load.holds_template, room);
            if best.is_none_or(|(_, most)| rank > most) {
                best = Some((index, rank));
            }
        }
    }
    best.map(|(index, _)| index)
}

/// What to insert once a host is chosen.
pub struct Placement {
    pub sandbox_id: Uuid,
    pub team_id: Uuid,
    pub template_id: Uuid,
    pub template_name: String,
    /// The template image's version in the store; hosts holding another version must pull.
    pub template_sha256: Option<String>,
    /// Only hosts holding the template may take the sandbox (a snapshot template, which no
    /// other host can fetch).
    pub holders_only: bool,
    pub timeout_sec: i32,
    /// The ports the port proxy serves without credentials.
    pub public_ports: Vec<i32>,
    /// The egress policy, as `sandboxes.egress` holds it.
    pub egress: serde_json::Value,
    pub demand: Demand,
}

/// Chooses a host for the sandbox and inserts its row `pending` there. The loads of every
/// candidate are read without locks; only the chosen host is locked, its load read again under
/// the lock and the row inserted if the demand still fits, so concurrent placements on other
/// hosts never wait and those on the same host cannot over-commit it. A host that filled up
/// meanwhile drops out and the next best is tried.
pub async fn place(
    db: &Db,
    settings: &SchedulerSettings,
    placement: &Placement,
) -> Result<Host, ScheduleError> {
    // An insert is never refused once the host has room; `None` cannot come back.
    claim_best(db, settings, Claim::Insert(placement))
        .await?
        .ok_or(ScheduleError::NoHosts)
}

/// What a placement writes under the chosen host's lock: a new capsule's row, or a paused
/// capsule's row moved there.
enum Claim<'a> {
    Insert(&'a Placement),
    Move(&'a Relocation),
}

impl Claim<'_> {
    fn team(&self) -> Uuid {
        match self {
            Claim::Insert(p) => p.team_id,
            Claim::Move(r) => r.team_id,
        }
    }

    fn demand(&self) -> Demand {
        match self {
            Claim::Insert(p) => p.demand,
            Claim::Move(r) => r.demand,
        }
    }

    /// What the claim adds to its team's pool: a new capsule in full; a paused one moving its
    /// vCPUs and the memory it did not hold; a missing one, counted as running, nothing.
    fn ask(&self, paused_memory_percent: i32) -> Ask {
        let demand = self.demand();
        match self {
            Claim::Insert(_) => Ask::running(1, demand.vcpus, demand.memory_mb, demand.disk_mb),
            Claim::Move(r) if r.from_status == sandboxes::SandboxStatus::Paused => {
                Ask::resume(demand.vcpus, demand.memory_mb, paused_memory_percent)
            }
            Claim::Move(_) => Ask::default(),
        }
    }

    fn template_name(&self) -> &str {
        match self {
            Claim::Insert(p) => &p.template_name,
            Claim::Move(r) => &r.template_name,
        }
    }

    /// Writes the claim on `host`; false when the row it moves has moved on meanwhile.
    async fn write(&self, conn: &mut sqlx::PgConnection, host: Uuid) -> Result<bool, DbError> {
        match self {
            Claim::Insert(p) => {
                sandboxes::insert_placed(&mut *conn, &p.row(host)).await?;
                Ok(true)
            }
            Claim::Move(r) => {
                sandboxes::relocate(conn, r.sandbox_id, r.from_host, r.from_status, host).await
            }
        }
    }
}

/// The heart of [`place`] and [`place_relocation`]: candidates' loads read without locks, then
/// the team's pool locked and the claim admitted to it, the best host locked, its load read
/// again and the claim written if it still fits; a host that filled up meanwhile drops out and
/// the next best is tried. `Ok(None)`: the claim's row moved on meanwhile.
async fn claim_best(
    db: &Db,
    settings: &SchedulerSettings,
    claim: Claim<'_>,
) -> Result<Option<Host>, ScheduleError> {
    super::prometheus::scheduled(decide(db, settings, claim).await)
}

async fn decide(
    db: &Db,
    settings: &SchedulerSettings,
    claim: Claim<'_>,
) -> Result<Option<Host>, ScheduleError> {
    let mut candidates = hosts::schedulable_for_team(db, claim.team()).await?;
    if let Claim::Move(relocation) = &claim {
        candidates.retain(|host| host.id != relocation.from_host);
    }
    if candidates.is_empty() {
        return Err(ScheduleError::NoHosts);
    }
    let considered = candidates.len();
    let ids: Vec<Uuid> = candidates.iter().map(|h| h.id).collect();
    let reserved: HashMap<Uuid, Reserved> = sandboxes::reserved_on_hosts(db, &ids)
        .await?
        .into_iter()
        .collect();
    let wanted_sha256 = match &claim {
        Claim::Insert(placement) => placement.template_sha256.as_deref(),
        Claim::Move(_) => None,
    };
    let holding: HashSet<Uuid> =
        host_templates::holding(db, &ids, claim.template_name(), wanted_sha256)
            .await?
            .into_iter()
            .collect();
    if let Claim::Insert(placement) = &claim {
        if placement.holders_only {
            candidates.retain(|host| holding.contains(&host.id));
            if candidates.is_empty() {
                return Err(ScheduleError::NoHolder(placement.template_name.clone()));
            }
        }
    }
    let demand = claim.demand();
    let mut loads: Vec<Load> = candidates
        .iter()
        .map(|host| Load {
            capacity: Capacity::of(host, settings),
            reserved: reserved.get(&host.id).copied().unwrap_or_default(),
            holds_template: holding.contains(&host.id),
        })
        .collect();
    while let Some(index) = choose(&loads, &demand) {
        let mut conn = db.acquire().await.map_err(DbError::from)?;
        let mut tx = conn.begin().await.map_err(DbError::from)?;
        let chosen = candidates[index].id;
        pool::admit_locked(&mut tx, claim.team(), |plan| {
            claim.ask(plan.limits.paused_memory_percent)
        })
        .await?;
        if let Some(host) = hosts::lock_schedulable(&mut *tx, chosen, claim.team()).await? {
            let load = Load {
                capacity: Capacity::of(&host, settings),
                reserved: sandboxes::reserved_on_host(&mut *tx, chosen).await?,
                holds_template: loads[index].holds_template,
            };
            if headroom(&load, &demand).is_some() {
                let written = claim.write(&mut tx, chosen).await?;
                tx.commit().await.map_err(DbError::from)?;
                return Ok(written.then_some(host));
            }
        }
        candidates.swap_remove(index);
        loads.swap_remove(index);
    }
    Err(ScheduleError::NoRoom {
        demand,
        hosts: considered,
    })
}

/// Reserves room on `host` for `children` of sandbox `source` (each asking `demand`), inserted
/// `pending` there: a fork's children share their source's host, which holds its memory. Under
/// the team's pool lock and the host's lock, like [`place`].
pub async fn place_fork(
    db: &Db,
    settings: &SchedulerSettings,
    host: Uuid,
    team: Uuid,
    source: Uuid,
    children: &[Uuid],
    demand: Demand,
) -> Result<(), ScheduleError> {
    super::prometheus::scheduled(
        decide_fork(db, settings, host, team, source, children, demand).await,
    )
}

async fn decide_fork(
    db: &Db,
    settings: &SchedulerSettings,
    host: Uuid,
    team: Uuid,
    source: Uuid,
    children: &[Uuid],
    demand: Demand,
) -> Result<(), ScheduleError> {
    let count = i64::try_from(children.len()).unwrap_or(i64::MAX);
    let total = Demand {
        vcpus: demand.vcpus.saturating_mul(count),
        memory_mb: demand.memory_mb.saturating_mul(count),
        disk_mb: demand.disk_mb.saturating_mul(count),
    };
    let mut conn = db.acquire().await.map_err(DbError::from)?;
    let mut tx = conn.begin().await.map_err(DbError::from)?;
    pool::admit_locked(&mut tx, team, |_| {
        Ask::running(count, demand.vcpus, demand.memory_mb, demand.disk_mb)
    })
    .await?;
    let Some(locked) = hosts::lock_schedulable(&mut *tx, host, team).await? else {
        return Err(ScheduleError::NoHosts);
    };
    let load = Load {
        capacity: Capacity::of(&locked, settings),
        reserved: sandboxes::reserved_on_host(&mut *tx, host).await?,
        holds_template: true,
    };
    if headroom(&load, &total).is_none() {
        return Err(ScheduleError::NoRoom {
            demand: total,
            hosts: 1,
        });
    }
    sandboxes::insert_forked(&mut *tx, source, children).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

/// A paused capsule that must resume away from its host (gone, or full): it may go to any
/// other online host of its team with room, as a create would (those holding its template
/// first), and is moved there `resuming`.
pub struct Relocation {
    pub sandbox_id: Uuid,
    pub team_id: Uuid,
    pub from_host: Uuid,
    pub from_status: sandboxes::SandboxStatus,
    pub template_name: String,
    pub demand: Demand,
}

/// Chooses a host for `relocation` and moves the capsule's row there under that host's lock,
/// like [`place`]. `Ok(None)`: the row moved on meanwhile (a destroy, another resume).
pub async fn place_relocation(
    db: &Db,
    settings: &SchedulerSettings,
    relocation: &Relocation,
) -> Result<Option<Host>, ScheduleError> {
    claim_best(db, settings, Claim::Move(relocation)).await
}

/// Applies `change` to capsule `id` of `team` if its team's pool has room for what `ask_of`
/// asks (given the team's plan): a resume. False when the capsule's status no longer allows
/// the change. The change and the admission are one transaction under the pool's lock.
pub async fn change_admitted(
    db: &Db,
    team: Uuid,
    id: Uuid,
    change: sandboxes::Transition<'_>,
    ask_of: impl FnOnce(&crate::db::plans::Plan) -> Ask,
) -> Result<bool, ScheduleError> {
    let decided = decide_change(db, team, id, change, ask_of, None).await;
    super::prometheus::scheduled(decided).map(|applied| applied.is_some())
}

/// Like [`change_admitted`], for a snapshot template about to be made of capsule `id`: what
/// `ask` asks of the disk pool is held (`template_reservations`) for at most `hold`, until the
/// template is registered or fails. Answers the hold's ID; `None` when the status no longer
/// allows the change.
pub async fn snapshot_admitted(
    db: &Db,
    team: Uuid,
    id: Uuid,
    change: sandboxes::Transition<'_>,
    ask: Ask,
    hold: Duration,
) -> Result<Option<Uuid>, ScheduleError> {
    let decided = decide_change(db, team, id, change, |_| ask, Some(hold)).await;
    super::prometheus::scheduled(decided).map(Option::flatten)
}

async fn decide_change(
    db: &Db,
    team: Uuid,
    id: Uuid,
    change: sandboxes::Transition<'_>,
    ask_of: impl FnOnce(&crate::db::plans::Plan) -> Ask,
    template_hold: Option<Duration>,
) -> Result<Option<Option<Uuid>>, ScheduleError> {
    let mut conn = db.acquire().await.map_err(DbError::from)?;
    let mut tx = conn.begin().await.map_err(DbError::from)?;
    let (plan, used) = crate::db::plans::lock_pool(&mut tx, team)
        .await?
        .ok_or(ScheduleError::TeamGone)?;
    if !sandboxes::transition(&mut *tx, id, change).await? {
        return Ok(None);
    }
    // Read before the change: the capsule is counted as it was.
    let ask = ask_of(&plan);
    pool::admit(&plan, &used, &ask)?;
    let held = match template_hold {
        Some(hold) => {
            Some(template_reservations::hold(&mut *tx, id, team, ask.disk_mb, hold).await?)
        }
        None => None,
    };
    tx.commit().await.map_err(DbError::from)?;
    Ok(Some(held))
}

/// Whether `host` has room for `demand` now (a read, without its lock): whether a paused capsule
/// can resume at home or should move.
pub async fn has_room(
    db: &Db,
    settings: &SchedulerSettings,
    host: &Host,
    demand: &Demand,
) -> Result<bool, ScheduleError> {
    let load = Load {
        capacity: Capacity::of(host, settings),
        reserved: sandboxes::reserved_on_host(db, host.id).await?,
        holds_template: true,
    };
    Ok(headroom(&load, demand).is_some())
}

impl Placement {
    fn row(&self, host_id: Uuid) -> PlacedSandbox {
        let as_i32 = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
        PlacedSandbox {
            id: self.sandbox_id,
            team_id: self.team_id,
            host_id,
            template_id: self.template_id,
            vcpus: as_i32(self.demand.vcpus),
            memory_mb: as_i32(self.demand.memory_mb),
            disk_mb: as_i32(self.demand.disk_mb),
            timeout_sec: self.timeout_sec,
            public_ports: self.public_ports.clone(),
            egress: self.egress.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vcpus: f64, memory_mb: f64, disk_mb: f64, reserved: (i64, i64, i64)) -> Load {
        Load {
            capacity: Capacity {
                vcpus,
                memory_mb,
                disk_mb,
            },
            reserved: Reserved {
                vcpus: reserved.0,
                memory_mb: reserved.1,
                disk_mb: reserved.2,
            },
            holds_template: false,
        }
    }

    const SMALL: Demand = Demand {
        vcpus: 1,
        memory_mb: 512,
        disk_mb: 5120,
    };

    #[test]
    fn picks_the_host_with_most_room_by_its_scarcest_resource() {
        let loads = [
            load(8.0, 8192.0, 100_000.0, (0, 6144, 0)),
            load(8.0, 8192.0, 100_000.0, (4, 2048, 0)),
        ];
        assert_eq!(choose(&loads, &SMALL), Some(1));
    }

    #[test]
    fn prefers_a_host_holding_the_template_while_it_has_room() {
        let busy_with_image = Load {
            holds_template: true,
            ..load(8.0, 8192.0, 100_000.0, (4, 4096, 0))
        };
        let idle = load(8.0, 8192.0, 100_000.0, (0, 0, 0));
        assert_eq!(choose(&[idle, busy_with_image], &SMALL), Some(1));
        let full_with_image = Load {
            holds_template: true,
            ..load(1.0, 8192.0, 100_000.0, (1, 0, 0))
        };
        assert_eq!(choose(&[full_with_image, idle], &SMALL), Some(1));
    }

    #[test]
    fn refuses_when_any_resource_runs_out() {
        assert_eq!(
            choose(&[load(1.0, 8192.0, 100_000.0, (1, 0, 0))], &SMALL),
            None
        );
        assert_eq!(
            choose(&[load(8.0, 1024.0, 100_000.0, (0, 768, 0))], &SMALL),
            None
        );
        assert_eq!(
            choose(&[load(8.0, 8192.0, 6000.0, (0, 0, 1000))], &SMALL),
            None
        );
        assert_eq!(choose(&[load(0.0, 0.0, 0.0, (0, 0, 0))], &SMALL), None);
        assert_eq!(choose(&[], &SMALL), None);
    }

    #[test]
    fn an_exact_fit_is_accepted() {
        assert_eq!(
            choose(&[load(1.0, 512.0, 5120.0, (0, 0, 0))], &SMALL),
            Some(0)
        );
    }

    #[test]
    fn overcommit_scales_capacity() {
        let settings = SchedulerSettings {
            cpu_overcommit: 2.0,
            memory_overcommit: 1.5,
            disk_overcommit: 1.0,
        };
        let host = Host {
            id: Uuid::nil(),
            host_type: crate::db::hosts::HostType::Regular,
            team_id: None,
            provider: None,
            availability_zone: None,
            arch: None,
            cpu_cores: Some(4),
            memory_mb: Some(1000),
            disk_gb: Some(10),
            address: None,
            status: crate::db::hosts::HostStatus::Online,
            last_heartbeat_at: None,
            metadata: serde_json::Value::Null,
            versions: serde_json::Value::Null,
            agent_secret_generation: 0,
            agent_secret_hash: None,
            created_by: None,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        };
        assert_eq!(
            Capacity::of(&host, &settings),
            Capacity {
                vcpus: 8.0,
                memory_mb: 1500.0,
                disk_mb: 10240.0
            }
        );
    }
}
