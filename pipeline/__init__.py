"""The factory around guidance/: reading and writing images and tables, Ray stages, storage, tracking."""
