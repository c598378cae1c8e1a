DROP TABLE host_templates;
DROP INDEX templates_team_created;
-- Capsules that ran from the added templates keep their rows; the templates stay then.
DELETE FROM templates t
 WHERE t.id IN ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-000000000002',
                '00000000-0000-0000-0000-000000000003')
   AND NOT EXISTS (SELECT 1 FROM sandboxes s WHERE s.template_id = t.id);
UPDATE templates SET metadata = '{}' WHERE id = '00000000-0000-0000-0000-000000000000';
ALTER TABLE templates DROP COLUMN protected;
