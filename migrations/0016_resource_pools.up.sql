-- Pool-based pricing: each team runs whatever fits in its plan's resource pool, and what it
-- reserves is metered.

-- A plan's limits on what a team may hold at once; NULL is no limit. A paused capsule holds its
-- disk in full and `paused_memory_percent` of its memory. Exactly one plan is the default,
-- which new teams get.
CREATE TABLE plans (
    id                     UUID PRIMARY KEY,
    name                   TEXT NOT NULL UNIQUE,
    vcpus                  BIGINT CHECK (vcpus >= 0),
    memory_mb              BIGINT CHECK (memory_mb >= 0),
    disk_mb                BIGINT CHECK (disk_mb >= 0),
    max_capsules           BIGINT CHECK (max_capsules >= 0),
    paused_memory_percent  INTEGER NOT NULL DEFAULT 50
                           CHECK (paused_memory_percent BETWEEN 0 AND 100),
    is_default             BOOLEAN NOT NULL DEFAULT false,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX plans_one_default ON plans (is_default) WHERE is_default;

INSERT INTO plans (id, name, vcpus, memory_mb, disk_mb, max_capsules, paused_memory_percent,
                   is_default)
VALUES ('00000000-0000-0000-0000-000000000000', 'default', 16, 32768, 262144, 32, 50, true),
       ('00000000-0000-0000-0000-000000000001', 'unlimited', NULL, NULL, NULL, NULL, 50, false);

ALTER TABLE teams ADD COLUMN plan_id UUID REFERENCES plans (id);
UPDATE teams SET plan_id = CASE WHEN id = '00000000-0000-0000-0000-000000000000'
                                THEN '00000000-0000-0000-0000-000000000001'::uuid
                                ELSE '00000000-0000-0000-0000-000000000000'::uuid END;
ALTER TABLE teams ALTER COLUMN plan_id SET NOT NULL;
CREATE INDEX teams_plan ON teams (plan_id);

-- What each team reserved, sampled at fixed instants of the database's clock: every replica
-- samples, and the key keeps one sample per team and instant. `memory_mb` counts paused
-- capsules at their plan's share.
CREATE TABLE usage_samples (
    team_id     UUID NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    sampled_at  TIMESTAMPTZ NOT NULL,
    running     INTEGER NOT NULL,
    paused      INTEGER NOT NULL,
    vcpus       BIGINT NOT NULL,
    memory_mb   BIGINT NOT NULL,
    PRIMARY KEY (team_id, sampled_at)
);
CREATE INDEX usage_samples_time ON usage_samples (sampled_at);

-- The samples rolled up per UTC day as they are taken.
CREATE TABLE daily_usage (
    team_id         UUID NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    day             DATE NOT NULL,
    cpu_minutes     DOUBLE PRECISION NOT NULL DEFAULT 0,
    ram_mb_minutes  DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (team_id, day)
);
