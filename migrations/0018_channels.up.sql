-- Notification channels: where a team's lifecycle events are sent (a signed webhook or a chat
-- provider), and the log of every delivery.
CREATE TABLE channels (
    id             UUID PRIMARY KEY,
    team_id        UUID NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    provider       TEXT NOT NULL CHECK (provider IN
                   ('discord', 'slack', 'teams', 'googlechat', 'telegram', 'matrix', 'webhook')),
    -- The provider's settings (URLs, tokens, the webhook's signing secret) as one JSON object
    -- sealed with AES-256-GCM: nonce, then ciphertext and tag. They are never stored in clear.
    config_sealed  BYTEA NOT NULL,
    event_types    TEXT[] NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (team_id, name)
);

-- One row per event and channel that wants it, written in the transaction that writes the
-- event, so no event is missed however replicas come and go. Any replica claims a due row
-- (FOR UPDATE SKIP LOCKED) by moving `next_attempt_at` past the send's timeout: a replica that
-- dies mid-send leaves the row to be retried.
CREATE TABLE channel_deliveries (
    id               BIGSERIAL PRIMARY KEY,
    channel_id       UUID NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    event_id         BIGINT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    event_type       TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The receiver's HTTP status on the last attempt; NULL when it was not reached.
    response_status  INTEGER,
    error            TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at      TIMESTAMPTZ,
    UNIQUE (channel_id, event_id)
);
CREATE INDEX channel_deliveries_due ON channel_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX channel_deliveries_channel ON channel_deliveries (channel_id, id DESC);

-- The channel event type of an event, or NULL when channels never carry it.
CREATE FUNCTION channel_event_type(kind TEXT, outcome TEXT, metadata JSONB) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN kind = 'capsule.create' AND outcome = 'success' THEN 'capsule.created'
        WHEN kind = 'capsule.destroy' AND outcome = 'success' THEN 'capsule.destroyed'
        -- Back from a snapshot is where the capsule already was: no news.
        WHEN kind = 'capsule.state.changed' AND metadata->>'from' = 'snapshotting' THEN NULL
        WHEN kind = 'capsule.state.changed' AND metadata->>'to' = 'running' THEN 'capsule.running'
        WHEN kind = 'capsule.state.changed' AND metadata->>'to' = 'paused' THEN 'capsule.paused'
        WHEN kind = 'template.snapshot.create' AND outcome = 'success'
            THEN 'template.snapshot.created'
        WHEN kind = 'template.snapshot.delete' AND outcome = 'success'
            THEN 'template.snapshot.deleted'
        WHEN kind IN ('host.up', 'host.down') THEN kind
    END
$$;

CREATE FUNCTION events_to_channels() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    wanted TEXT := channel_event_type(NEW.kind, NEW.outcome, NEW.metadata);
BEGIN
    IF wanted IS NOT NULL THEN
        INSERT INTO channel_deliveries (channel_id, event_id, event_type)
        SELECT id, NEW.id, wanted FROM channels
        WHERE team_id = NEW.team_id AND wanted = ANY (event_types);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER events_to_channels AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_to_channels();
