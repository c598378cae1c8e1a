-- A capsule's egress policy (`egress` at create, `PUT /v1/capsules/{id}/network`), as the API
-- shows it. The empty object admits whatever the host admits.

ALTER TABLE sandboxes ADD COLUMN egress JSONB NOT NULL DEFAULT '{}'
    CHECK (jsonb_typeof(egress) = 'object');
