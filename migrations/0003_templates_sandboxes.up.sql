-- Templates (with the built-in `minimal`) and sandboxes.

CREATE TABLE templates (
    id          UUID PRIMARY KEY,
    team_id     UUID NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    type        TEXT NOT NULL CHECK (type IN ('base', 'snapshot')),
    vcpus       INTEGER NOT NULL CHECK (vcpus > 0),
    memory_mb   INTEGER NOT NULL CHECK (memory_mb > 0),
    size_bytes  BIGINT NOT NULL DEFAULT 0,
    metadata    JSONB NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (team_id, name)
);

INSERT INTO templates (id, team_id, name, type, vcpus, memory_mb)
VALUES ('00000000-0000-0000-0000-000000000000', '00000000-0000-0000-0000-000000000000',
        'minimal', 'base', 1, 512);

CREATE TABLE sandboxes (
    id              UUID PRIMARY KEY,
    team_id         UUID NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    host_id         UUID REFERENCES hosts (id) ON DELETE SET NULL,
    template_id     UUID NOT NULL REFERENCES templates (id),
    status          TEXT NOT NULL CHECK (status IN
                    ('pending', 'starting', 'running', 'pausing', 'paused', 'resuming',
                     'stopping', 'stopped', 'error', 'missing')),
    vcpus           INTEGER NOT NULL CHECK (vcpus > 0),
    memory_mb       INTEGER NOT NULL CHECK (memory_mb > 0),
    disk_mb         INTEGER NOT NULL DEFAULT 5120 CHECK (disk_mb > 0),
    timeout_sec     INTEGER NOT NULL DEFAULT 300 CHECK (timeout_sec >= 0),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at      TIMESTAMPTZ,
    last_active_at  TIMESTAMPTZ,
    last_updated    TIMESTAMPTZ NOT NULL DEFAULT now(),
    metadata        JSONB NOT NULL DEFAULT '{}'
);
CREATE INDEX sandboxes_host_status ON sandboxes (host_id, status);
CREATE INDEX sandboxes_team_status ON sandboxes (team_id, status);
