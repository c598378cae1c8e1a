-- The template registry: the built-in templates `minimal` (the default, now Debian), `python`,
-- `code-runner-beta` and `busybox`, platform templates visible to every team (`protected` ones
-- cannot be deleted; `metadata` carries what the 0.3.0 SDK's Template model shows), and which
-- hosts hold which template images.

ALTER TABLE templates ADD COLUMN protected BOOLEAN NOT NULL DEFAULT false;

UPDATE templates SET protected = true,
       metadata = '{"description": "Debian bookworm with bash, git, curl and sudo"}'
 WHERE id = '00000000-0000-0000-0000-000000000000';

INSERT INTO templates (id, team_id, name, type, vcpus, memory_mb, protected, metadata)
VALUES ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-000000000000',
        'python', 'base', 1, 512, true,
        '{"description": "the minimal template with Python 3, pip and venv"}'),
       ('00000000-0000-0000-0000-000000000002', '00000000-0000-0000-0000-000000000000',
        'busybox', 'base', 1, 256, true,
        '{"description": "a static busybox userland; the fastest boot"}'),
       ('00000000-0000-0000-0000-000000000003', '00000000-0000-0000-0000-000000000000',
        'code-runner-beta', 'base', 1, 1024, true,
        '{"description": "the python template with a Jupyter server on port 8888 and the wrenn kernel"}');

-- Listing a team's templates with the platform's, in creation order.
CREATE INDEX templates_team_created ON templates (team_id, created_at, id);

-- The template images each host reported at its last reconcile.
CREATE TABLE host_templates (
    host_id        UUID NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    template_name  TEXT NOT NULL,
    size_bytes     BIGINT NOT NULL CHECK (size_bytes >= 0),
    sha256         TEXT,
    PRIMARY KEY (host_id, template_name)
);
CREATE INDEX host_templates_name ON host_templates (template_name);
