"""What the jobs share: where object storage is, where runs are tracked, how a job runs as a program."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import NoReturn

from pipeline.settings import TrackingConfig
from pipeline.storage import StorageConfig


def add_storage_and_tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", help="S3-protocol endpoint (credentials come from the AWS environment)")
    parser.add_argument("--region")
    parser.add_argument("--tracking-uri", default=TrackingConfig.tracking_uri)
    parser.add_argument("--experiment", default=TrackingConfig.experiment)


def storage_config(args: argparse.Namespace) -> StorageConfig:
    return StorageConfig(args.endpoint_url, args.region)


def tracking_config(args: argparse.Namespace) -> TrackingConfig:
    return TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment)


def configure_logging() -> None:
    """INFO logs on stderr, in the one format of every job."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_as_program(main: Callable[[], int]) -> NoReturn:
    """``python -m jobs.NAME`` (a Ray job's entrypoint): the jobs' logging, then exit with ``main``'s status."""
    configure_logging()
    raise SystemExit(main())
