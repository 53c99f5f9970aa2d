"""The ``jepa-minority`` command: one subcommand per job module."""

from __future__ import annotations

import importlib
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

from pipeline.sourcedoc import module_summary

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
TOOLS = {"config": "jobs.config"}  # commands that are not jobs (never submitted to a cluster)


def description(module: str) -> str:
    """A command's one line: its module docstring's first line, read without importing the module."""
    return module_summary(module).split(": ", 1)[-1]


def usage() -> str:
    commands = COMMANDS | TOOLS
    width = max(map(len, commands))
    lines = [f"usage: jepa-minority [--version] {{{','.join(commands)}}} ...", "", "commands:"]
    lines += [f"  {name:<{width}}  {description(module)}" for name, module in commands.items()]
    lines += ["", "run 'jepa-minority COMMAND --help' for its options; config keys: 'jepa-minority config'"]
    return "\n".join(lines)


def package_version() -> str:
    try:
        return version("jepa-minority")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = COMMANDS | TOOLS
    if argv and argv[0] == "--version":
        print(f"jepa-minority {package_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"jepa-minority: unknown command {argv[0]!r}; choose one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
