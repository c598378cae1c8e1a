DROP TABLE template_build_logs;
DROP TABLE template_builds;
