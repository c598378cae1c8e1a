-- Capsules whose template was deleted cannot point at one again: their rows go.
DELETE FROM sandboxes WHERE template_id IS NULL;
ALTER TABLE sandboxes DROP CONSTRAINT sandboxes_template_id_fkey;
ALTER TABLE sandboxes ADD CONSTRAINT sandboxes_template_id_fkey
    FOREIGN KEY (template_id) REFERENCES templates (id);
ALTER TABLE sandboxes ALTER COLUMN template_id SET NOT NULL;
ALTER TABLE sandboxes DROP COLUMN template_name;
