"""The ``jepa-minority`` command: one subcommand per job module (the table: pipeline/commands.py)."""

from __future__ import annotations

import importlib
import sys

from jobs.options import configure_logging
from pipeline.commands import COMMANDS


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(["usage: jepa-minority COMMAND ...", "", "commands:", *rows, "",
                      "run 'jepa-minority COMMAND --help' for its options"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"jepa-minority: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    configure_logging()
    return importlib.import_module(COMMANDS[argv[0]].module).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
