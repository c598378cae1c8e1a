DROP TABLE audit_logs;
DROP TABLE team_api_keys;
DROP TABLE team_members;
DROP TABLE users;
DROP TABLE teams;
