DROP INDEX sandboxes_live_for_team;
DROP INDEX sandboxes_live_on_host;
