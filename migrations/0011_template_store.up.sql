-- Template images in the template store: a template whose image was published names its blob
-- (content-addressed by SHA-256), and every agent that lacks that version pulls it before its
-- first capsule. NULL: the image exists only on the hosts that built it.

ALTER TABLE templates ADD COLUMN image_sha256 TEXT
    CHECK (image_sha256 ~ '^[0-9a-f]{64}$');
