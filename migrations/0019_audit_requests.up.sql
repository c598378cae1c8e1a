-- The audit log as `GET /v1/audit-logs` shows it: every mutating API request by an identified
-- caller, with the caller's name and address and the outcome, and who in the team sees it.
ALTER TABLE audit_logs
    ADD COLUMN actor_name      TEXT,
    -- `team`: every member sees the row; `admin`: only the team's owners and admins.
    ADD COLUMN scope           TEXT NOT NULL DEFAULT 'team' CHECK (scope IN ('team', 'admin')),
    ADD COLUMN status          TEXT NOT NULL DEFAULT 'success'
                               CHECK (status IN ('success', 'error')),
    ADD COLUMN client_address  TEXT;
-- What was already recorded is the management of keys, members, hosts, plans and teams.
UPDATE audit_logs SET scope = 'admin' WHERE resource_type NOT IN ('capsule', 'template', 'build');
