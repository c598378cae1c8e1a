-- Template builds: a recipe run in a capsule and flattened into a base template. The control
-- plane replica that accepted a build runs it and renews `heartbeat_at`; any replica's
-- reconciler ends a build whose heartbeat stopped (its replica died) as `error`.

CREATE TABLE template_builds (
    id             UUID PRIMARY KEY,
    team_id        UUID NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    base_template  TEXT NOT NULL,
    recipe         TEXT NOT NULL,
    healthcheck    TEXT,
    vcpus          INTEGER NOT NULL CHECK (vcpus > 0),
    memory_mb      INTEGER NOT NULL CHECK (memory_mb > 0),
    status         TEXT NOT NULL
                   CHECK (status IN ('pending', 'running', 'success', 'error', 'cancelled')),
    current_step   INTEGER NOT NULL DEFAULT 0,
    total_steps    INTEGER NOT NULL,
    error          TEXT,
    sandbox_id     UUID,
    host_id        UUID,
    template_id    UUID REFERENCES templates (id) ON DELETE SET NULL,
    created_by     UUID REFERENCES users (id) ON DELETE SET NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at     TIMESTAMPTZ,
    completed_at   TIMESTAMPTZ,
    heartbeat_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One build in progress per template.
CREATE UNIQUE INDEX template_builds_one_active ON template_builds (team_id, name)
    WHERE status IN ('pending', 'running');
CREATE INDEX template_builds_team_created ON template_builds (team_id, created_at, id);

CREATE TABLE template_build_logs (
    build_id  UUID NOT NULL REFERENCES template_builds (id) ON DELETE CASCADE,
    seq       BIGINT GENERATED ALWAYS AS IDENTITY,
    at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    stream    TEXT NOT NULL CHECK (stream IN ('step', 'stdout', 'stderr', 'info', 'error')),
    text      TEXT NOT NULL,
    PRIMARY KEY (build_id, seq)
);
