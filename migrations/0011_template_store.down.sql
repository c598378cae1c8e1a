ALTER TABLE templates DROP COLUMN image_sha256;
