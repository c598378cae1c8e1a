DROP TABLE daily_usage;
DROP TABLE usage_samples;
ALTER TABLE teams DROP COLUMN plan_id;
DROP TABLE plans;
