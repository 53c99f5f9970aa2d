"""Command-line parts that several jobs share: the help layout, flags documented by a config field, where
object storage is and where runs are tracked, the one log format, how a job refuses bad input and how it runs
as a program. Light to import: `--help` loads no torch or Ray."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from pipeline.schema import RUN_FILE
from pipeline.configs import FieldDoc, field_docs
from pipeline.settings import TrackingConfig, UserError, to_dict
from pipeline.storage import StorageConfig, exists, read_bytes, resolve

TRACKING_KEYS = {f.name for f in dataclasses.fields(TrackingConfig)}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows every flag's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def job_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"jepa-minority {name}", description=description, formatter_class=HelpFormatter)


def config_flag(parser: argparse.ArgumentParser, flag: str, doc: FieldDoc, **kwargs) -> None:
    """A flag for one config field, its help the field's comment and default as written there. The flag's
    own default is None: leave it out of the config, which then applies its default (one home for it)."""
    text = kwargs.pop("help", doc.meaning)
    shown = text if "(default" in text else f"{text} (default: {doc.default})"  # a comment may word its default
    parser.add_argument(flag, help=shown.replace("%", "%%"), **kwargs)


def given(args: argparse.Namespace, *names: str) -> dict:
    """The named options the user gave (not None), to pass to a config as keyword arguments."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def build_config(cls: type, **values):
    """A job's config from its parsed flags, checked by the validator every config goes through
    (``pipeline.configs.parse``); nested configs given as objects are passed as their plain data."""
    from pipeline.configs import parse

    return parse(cls, {key: to_dict(value) if dataclasses.is_dataclass(value) else value for key, value in values.items()})


def add_storage_and_tracking(parser: argparse.ArgumentParser) -> None:
    storage, tracking = field_docs(StorageConfig), field_docs(TrackingConfig)
    parser.add_argument("--endpoint-url", help=f"{storage['endpoint_url'].meaning}; credentials come from the AWS "
                                               "environment")
    parser.add_argument("--region", help=storage["region"].meaning)
    parser.add_argument("--tracking-uri", help=f"{tracking['tracking_uri'].meaning} (default: the input run's, "
                                               f"from its {RUN_FILE}, else {TrackingConfig.tracking_uri})")
    parser.add_argument("--experiment", help=f"{tracking['experiment'].meaning} (default: the input run's, else "
                                             f"{TrackingConfig.experiment})")


def storage_config(args: argparse.Namespace) -> StorageConfig:
    return StorageConfig(args.endpoint_url, args.region)


def tracking_config(args: argparse.Namespace, input_uri: str) -> TrackingConfig:
    """--tracking-uri / --experiment where given, else where the input run was tracked (its _run.json's
    ``tracking``: store, artifact location, experiment), else the defaults: a job run by hand on a run's
    output logs beside that run."""
    run = resolve(input_uri, storage_config(args)).child(RUN_FILE)
    record = json.loads(read_bytes(run)) if exists(run) else {}
    recorded = record.get("tracking") or record.get("config", {}).get("tracking", {})
    if args.tracking_uri is not None and args.tracking_uri != recorded.get("tracking_uri"):
        recorded = {}  # another store: the run's experiment and artifact folder are not its
    chosen = {"tracking_uri": args.tracking_uri, "experiment": args.experiment}
    return TrackingConfig(**({key: value for key, value in recorded.items() if key in TRACKING_KEYS}
                             | {key: value for key, value in chosen.items() if value is not None}))


def configure_logging() -> None:
    """INFO logs on stderr, in the one format of every job."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


Main = Callable[[list[str] | None], int]


def refusing(command: str) -> Callable[[Main], Main]:
    """A job's ``main`` that answers bad input (a ``UserError``, however deep) with its one line on stderr and exit
    status 2: the one place the jobs catch it. Any other exception is a bug and keeps its traceback."""

    def wrap(main: Main) -> Main:
        @functools.wraps(main)
        def refusing_main(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except UserError as error:
                print(f"jepa-minority {command}: {error}", file=sys.stderr)
                return 2

        return refusing_main

    return wrap


def run_as_program(main: Callable[[], int]) -> NoReturn:
    """``python -m jobs.NAME`` (a Ray job's entrypoint): the jobs' logging, then exit with ``main``'s status."""
    configure_logging()
    raise SystemExit(main())
