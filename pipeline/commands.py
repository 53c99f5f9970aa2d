"""The job table: every ``jepa-minority`` command, the module that runs it and its one line.

Light to import (the CLI reads it before any job's dependencies load). The CLI dispatches on it and
``pipeline.submission`` submits any of its jobs but ``submit`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # run as ``python -m MODULE`` (a Ray job's entrypoint) or called as MODULE.main(argv)
    summary: str  # the one line the CLI's usage shows


COMMANDS = {
    "demo": Command("jobs.demo", "the embedded default end to end, with a visual report"),
    "generate": Command("jobs.generate", "the main job: JEPA-guided samples on Ray into Parquet"),
    "filter": Command("jobs.filter", "keep the rarest samples of a generated dataset"),
    "refresh": Command("jobs.refresh", "one scheduled dataset version, published when complete"),
    "score": Command("jobs.score", "rank image files by world-prior rarity"),
    "evaluate": Command("jobs.evaluate", "rarity and quality of generated runs against a reference"),
    "submit": Command("jobs.submit", "run any of these jobs on a Ray cluster, once"),
    "serve": Command("jobs.serve", "the samplers and scores over HTTP on Ray Serve, and a page of the rarest"),
}
SUBMITTABLE = tuple(name for name in COMMANDS if name != "submit")  # what ``submit`` may run as a Ray job
