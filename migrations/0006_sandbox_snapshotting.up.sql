-- `snapshotting`: a running sandbox whose snapshot is being taken.

ALTER TABLE sandboxes DROP CONSTRAINT sandboxes_status_check;
ALTER TABLE sandboxes ADD CONSTRAINT sandboxes_status_check CHECK (status IN
    ('pending', 'starting', 'running', 'pausing', 'paused', 'resuming', 'snapshotting',
     'stopping', 'stopped', 'error', 'missing'));
