"""The ``jepa-minority`` command: one subcommand per job module."""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    "demo": "jobs.demo",  # the embedded default end to end, with a visual report
    "generate": "jobs.generate",  # the main job: JEPA-guided samples on Ray into Parquet
    "filter": "jobs.filter",  # keep the rarest samples of a generated dataset
    "refresh": "jobs.refresh",  # one scheduled dataset version, published when complete
    "score": "jobs.score",  # rank image files by world-prior rarity
    "evaluate": "jobs.evaluate",  # rarity and quality of generated runs against a reference
    "check-prior": "jobs.check_prior",  # does the encoder's JEPA-SCORE track rarity in your own data?
    "submit": "jobs.submit",  # run any of these jobs on a Ray cluster, once
    "serve": "jobs.serve",  # the samplers and scores over HTTP on Ray Serve, and a page of the rarest
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        print(f"usage: jepa-minority {{{known}}} ...\n  run 'jepa-minority COMMAND --help' for its options",
              file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"jepa-minority: unknown command {argv[0]!r}; choose one of: {known}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
