DROP TABLE sandboxes;
DROP TABLE templates;
