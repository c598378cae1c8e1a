-- Ports of a capsule the port proxy serves to anyone, without the team's credentials
-- (`public_ports` at create, `PUT /v1/capsules/{id}/network`). Empty: every port needs them.

ALTER TABLE sandboxes ADD COLUMN public_ports INTEGER[] NOT NULL DEFAULT '{}'
    CHECK (1 <= ALL (public_ports) AND 65535 >= ALL (public_ports));
