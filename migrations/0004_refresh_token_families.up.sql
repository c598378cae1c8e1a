-- Refresh-token families, for reuse detection. A registration starts a family and every rotation
-- stays in it; presenting a token the family has already moved past means someone else holds a
-- copy, and the whole family is revoked. Host JWTs name their family and die with it.

ALTER TABLE host_refresh_tokens
    ADD COLUMN family_id   UUID,
    -- The token issued when this one was rotated; NULL while live and for tokens revoked
    -- without a successor (family revocation, or superseded by a retried rotation).
    ADD COLUMN replaced_by UUID;

-- Tokens issued before families existed each start their own.
UPDATE host_refresh_tokens SET family_id = id;
ALTER TABLE host_refresh_tokens ALTER COLUMN family_id SET NOT NULL;

-- Heartbeats ask whether their JWT's family still has a live token.
CREATE INDEX host_refresh_tokens_live_family ON host_refresh_tokens (family_id)
    WHERE revoked_at IS NULL;
