DROP INDEX host_refresh_tokens_live_family;
ALTER TABLE host_refresh_tokens DROP COLUMN replaced_by, DROP COLUMN family_id;
