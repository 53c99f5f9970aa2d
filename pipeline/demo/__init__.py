"""The demo: the digits data, the demo models' training recipes, and the end-to-end demo job."""

DEMO_CONFIG = "jobs/configs/demo.yaml"  # the demo's guided generation config (a template for real runs)
