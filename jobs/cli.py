"""The ``jepa-minority`` command: one subcommand per entry of the job table (jobs/commands.py)."""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from jobs.options import configure_logging
from jobs.commands import COMMANDS


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: jepa-minority [--version] {{{','.join(COMMANDS)}}} ...", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "run 'jepa-minority COMMAND --help' for its options; config keys: 'jepa-minority config'"]
    return "\n".join(lines)


def package_version() -> str:
    try:
        return version("jepa-minority")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        print(f"jepa-minority {package_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"jepa-minority: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    configure_logging()
    return importlib.import_module(COMMANDS[argv[0]].module).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
