-- The control plane's certificate authority for mTLS with host agents, one row shared by every
-- replica: the first replica to start inserts it, the others read the winner. The key that
-- derives the secrets presented to agents lives beside it, apart from the JWT secret, so
-- rotating that secret does not change what agents expect.

CREATE TABLE control_plane_ca (
    id smallint PRIMARY KEY CHECK (id = 1),
    cert_pem text NOT NULL,
    key_pem text NOT NULL,
    agent_secret_key bytea NOT NULL CHECK (length(agent_secret_key) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
