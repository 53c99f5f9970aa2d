"""Command-line options that several jobs share: where object storage is, where runs are tracked."""

from __future__ import annotations

import argparse

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
