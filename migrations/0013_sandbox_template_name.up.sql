-- A capsule keeps the name of the template it was created from, and outlives the template: a
-- team may delete a snapshot template (DELETE /v1/snapshots/{name}) while capsules created from
-- it run on.

ALTER TABLE sandboxes ADD COLUMN template_name TEXT;
UPDATE sandboxes s SET template_name = t.name FROM templates t WHERE t.id = s.template_id;
ALTER TABLE sandboxes ALTER COLUMN template_name SET NOT NULL;

ALTER TABLE sandboxes ALTER COLUMN template_id DROP NOT NULL;
ALTER TABLE sandboxes DROP CONSTRAINT sandboxes_template_id_fkey;
ALTER TABLE sandboxes ADD CONSTRAINT sandboxes_template_id_fkey
    FOREIGN KEY (template_id) REFERENCES templates (id) ON DELETE SET NULL;
