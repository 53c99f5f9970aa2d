"""The demo: the digits data, the demo models' training recipes, and the end-to-end demo job."""
