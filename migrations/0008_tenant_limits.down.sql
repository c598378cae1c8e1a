DROP INDEX team_members_team_created;
DELETE FROM login_failures WHERE scope = 'signup_address';
ALTER TABLE login_failures DROP CONSTRAINT login_failures_scope_check;
ALTER TABLE login_failures ADD CONSTRAINT login_failures_scope_check
    CHECK (scope IN ('email', 'address'));
