ALTER TABLE sandboxes DROP COLUMN public_ports;
