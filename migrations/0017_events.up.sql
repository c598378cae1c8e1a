-- Lifecycle events for `GET /v1/events/stream`: an outbox every control-plane replica reads.
-- An insert wakes the replicas' listeners (NOTIFY is delivered at commit, to every session
-- listening); each then reads the rows it has not seen. Clients resume from an event's `id`.
CREATE TABLE events (
    id             BIGSERIAL PRIMARY KEY,
    team_id        UUID NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    kind           TEXT NOT NULL,
    outcome        TEXT CHECK (outcome IN ('success', 'error')),
    resource_type  TEXT NOT NULL,
    resource_id    TEXT NOT NULL,
    actor_type     TEXT NOT NULL DEFAULT 'system'
                   CHECK (actor_type IN ('user', 'api_key', 'system')),
    actor_id       TEXT,
    actor_name     TEXT,
    metadata       JSONB NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    error          TEXT,
    -- The capsule a capsule event is about, shown as it is when the event is delivered.
    sandbox_id     UUID,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX events_team ON events (team_id, id);
CREATE INDEX events_time ON events (created_at);

CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('wrenn_events', NEW.id::text);
    RETURN NEW;
END $$;
CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_notify();

-- Every change of a capsule's status is an event, in the transaction that makes it, whoever
-- makes it (an API call, the reconciler, a host going away).
CREATE FUNCTION sandboxes_state_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (team_id, kind, resource_type, resource_id, metadata, sandbox_id)
    VALUES (NEW.team_id, 'capsule.state.changed', 'capsule', NEW.id::text,
            jsonb_build_object('from', OLD.status, 'to', NEW.status), NEW.id);
    RETURN NEW;
END $$;
CREATE TRIGGER sandboxes_state_event AFTER UPDATE OF status ON sandboxes
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION sandboxes_state_event();

-- A host coming up (registered, or heard from again) or going down (its heartbeats stopped) is
-- an event of the team that owns it; a regular host's go to the platform team.
CREATE FUNCTION hosts_state_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('online', 'unreachable') THEN
        INSERT INTO events (team_id, kind, resource_type, resource_id, metadata)
        VALUES (COALESCE(NEW.team_id, '00000000-0000-0000-0000-000000000000'),
                CASE NEW.status WHEN 'online' THEN 'host.up' ELSE 'host.down' END,
                'host', NEW.id::text,
                jsonb_strip_nulls(jsonb_build_object('host_ip', split_part(NEW.address, ':', 1),
                                                     'from', OLD.status)));
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER hosts_state_event AFTER UPDATE OF status ON hosts
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION hosts_state_event();
