DROP TABLE template_reservations;
