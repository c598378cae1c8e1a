-- The disk a snapshot template being made holds in its team's pool: from its admission until
-- its row is in `templates` (in the same transaction) or it failed. Each making has its own
-- hold, so one snapshot's end never releases another's. `expires_at` bounds what a control
-- plane that stopped meanwhile leaves behind.
CREATE TABLE template_reservations (
    id          UUID PRIMARY KEY,
    sandbox_id  UUID NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    team_id     UUID NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    disk_mb     BIGINT NOT NULL CHECK (disk_mb >= 0),
    expires_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX template_reservations_team ON template_reservations (team_id, expires_at);
