-- Stopped and failed sandboxes stay in the table for history and grow without bound, while the
-- reconciler, the scheduler and capsule lists only ever read the sandboxes that may still hold
-- resources (see `SandboxStatus::is_live`). These partial indexes hold only those, so the cost
-- of a reconcile pass or a placement follows what runs, not everything that ever ran. Queries
-- that use them spell the predicate exactly as here.
CREATE INDEX sandboxes_live_on_host ON sandboxes (host_id)
    INCLUDE (status, vcpus, memory_mb, disk_mb)
    WHERE status NOT IN ('stopped', 'error');
CREATE INDEX sandboxes_live_for_team ON sandboxes (team_id, created_at, id)
    WHERE status NOT IN ('stopped', 'error');
