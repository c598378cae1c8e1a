DROP TABLE host_tags;
DROP TABLE host_refresh_tokens;
DROP TABLE host_registration_tokens;
DROP TABLE hosts;
