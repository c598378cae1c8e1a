ALTER TABLE audit_logs
    DROP COLUMN client_address,
    DROP COLUMN status,
    DROP COLUMN scope,
    DROP COLUMN actor_name;
