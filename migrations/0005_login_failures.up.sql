-- Failed password logins, counted per email and per client address in the database so that every
-- control-plane replica enforces the same limits. One row per (scope, subject) is one fixed
-- window that starts with its first failure; a failure after the window ended starts the next
-- one in the same row, and the control plane deletes rows whose window ended.

CREATE TABLE login_failures (
    scope           TEXT NOT NULL CHECK (scope IN ('email', 'address')),
    -- SHA-256 of the lower-cased email, or of the client address (IPv6: its /64), so the
    -- table holds no emails.
    subject         BYTEA NOT NULL,
    -- Failed attempts in the window, plus attempts whose password check is still running.
    failures        BIGINT NOT NULL,
    window_ends_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (scope, subject)
);
CREATE INDEX login_failures_window_ends ON login_failures (window_ends_at);
