-- Hosts, their one-time registration tokens, rotating refresh tokens and tags.

CREATE TABLE hosts (
    id                       UUID PRIMARY KEY,
    type                     TEXT NOT NULL CHECK (type IN ('regular', 'byoc')),
    team_id                  UUID REFERENCES teams (id) ON DELETE CASCADE,
    provider                 TEXT,
    availability_zone        TEXT,
    arch                     TEXT,
    cpu_cores                INTEGER,
    memory_mb                BIGINT,
    disk_gb                  BIGINT,
    address                  TEXT,
    status                   TEXT NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'online', 'unreachable')),
    last_heartbeat_at        TIMESTAMPTZ,
    metadata                 JSONB NOT NULL DEFAULT '{}',
    versions                 JSONB NOT NULL DEFAULT '{}',
    -- The agent secret is derived (HMAC of the JWT secret, host ID and generation), never stored;
    -- its hash tells whether a changed JWT secret has invalidated it.
    agent_secret_generation  INTEGER NOT NULL DEFAULT 0,
    agent_secret_hash        BYTEA,
    created_by               UUID REFERENCES users (id) ON DELETE SET NULL,
    created_at               TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at               TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((type = 'byoc') = (team_id IS NOT NULL))
);
CREATE INDEX hosts_created ON hosts (created_at, id);
CREATE INDEX hosts_team ON hosts (team_id, created_at, id) WHERE team_id IS NOT NULL;
CREATE INDEX hosts_online_heartbeat ON hosts (last_heartbeat_at) WHERE status = 'online';

CREATE TABLE host_registration_tokens (
    id          UUID PRIMARY KEY,
    host_id     UUID NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    token_hash  BYTEA NOT NULL UNIQUE,
    created_by  UUID REFERENCES users (id) ON DELETE SET NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL,
    used_at     TIMESTAMPTZ
);
CREATE INDEX host_registration_tokens_host ON host_registration_tokens (host_id);

CREATE TABLE host_refresh_tokens (
    id          UUID PRIMARY KEY,
    host_id     UUID NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    token_hash  BYTEA NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL,
    revoked_at  TIMESTAMPTZ
);
CREATE INDEX host_refresh_tokens_host ON host_refresh_tokens (host_id);

CREATE TABLE host_tags (
    host_id  UUID NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    tag      TEXT NOT NULL,
    PRIMARY KEY (host_id, tag)
);
