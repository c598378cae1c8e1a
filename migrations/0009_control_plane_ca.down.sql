DROP TABLE control_plane_ca;
