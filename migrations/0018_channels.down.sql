DROP TRIGGER events_to_channels ON events;
DROP FUNCTION events_to_channels();
DROP FUNCTION channel_event_type(TEXT, TEXT, JSONB);
DROP TABLE channel_deliveries;
DROP TABLE channels;
