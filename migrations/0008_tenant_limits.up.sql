-- Defences against one tenant exhausting the control plane.

-- Signups are counted per client address in the same fixed windows as failed logins.
ALTER TABLE login_failures DROP CONSTRAINT login_failures_scope_check;
ALTER TABLE login_failures ADD CONSTRAINT login_failures_scope_check
    CHECK (scope IN ('email', 'address', 'signup_address'));

-- Keyset pagination: every list endpoint reads one page in its order from an index (hosts and
-- API keys already have theirs; a team's live capsules use sandboxes_live_for_team of 0007).
CREATE INDEX team_members_team_created ON team_members (team_id, created_at, user_id);
