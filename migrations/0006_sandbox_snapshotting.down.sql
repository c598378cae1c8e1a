-- A snapshot in progress is taken on a running sandbox; it is running again without the status.
UPDATE sandboxes SET status = 'running' WHERE status = 'snapshotting';
ALTER TABLE sandboxes DROP CONSTRAINT sandboxes_status_check;
ALTER TABLE sandboxes ADD CONSTRAINT sandboxes_status_check CHECK (status IN
    ('pending', 'starting', 'running', 'pausing', 'paused', 'resuming',
     'stopping', 'stopped', 'error', 'missing'));
