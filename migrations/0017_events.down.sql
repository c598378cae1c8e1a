DROP TRIGGER hosts_state_event ON hosts;
DROP FUNCTION hosts_state_event();
DROP TRIGGER sandboxes_state_event ON sandboxes;
DROP FUNCTION sandboxes_state_event();
DROP TABLE events;
DROP FUNCTION events_notify();
