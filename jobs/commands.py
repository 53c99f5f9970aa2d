"""The job table: every ``jepa-minority`` command, the module that runs it, its one line, and whether it is a job.

Light to import (the CLI reads it before any job's dependencies load). The CLI dispatches on it and lists its
one-liners; ``jobs.submission`` submits the commands that are jobs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # run as ``python -m MODULE`` (a Ray job's entrypoint) or called as MODULE.main(argv)
    summary: str  # the one line the CLI's usage shows
    submittable: bool = True  # a job that ``submit`` may run on a cluster (False: submit itself, local tools)


COMMANDS = {
    "demo": Command("jobs.demo", "the embedded default end to end, with a visual report"),
    "generate": Command("jobs.generate", "the main job: JEPA-guided samples on Ray into Parquet"),
    "filter": Command("jobs.filter", "keep the rarest samples of a generated dataset"),
    "export": Command("jobs.export", "a run or curated set as WebDataset tar shards, for training"),
    "refresh": Command("jobs.refresh", "one scheduled dataset version, published when complete"),
    "score": Command("jobs.score", "rank image files by world-prior rarity"),
    "evaluate": Command("jobs.evaluate", "rarity and quality of generated runs against a reference"),
    "check-prior": Command("jobs.check_prior", "does the encoder's JEPA-SCORE track rarity in your own data?"),
    "submit": Command("jobs.submit", "run any of these jobs on a Ray cluster, once", submittable=False),
    "serve": Command("jobs.serve", "the samplers and scores over HTTP on Ray Serve, and a page of the rarest"),
    "config": Command("jobs.config", "every key of a generation config with its type, default and meaning",
                      submittable=False),
}
SUBMITTABLE = tuple(name for name, command in COMMANDS.items() if command.submittable)
