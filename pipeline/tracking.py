"""MLflow tracking, on the driver only, through ``MlflowClient`` (no global fluent state).

One run per job, opened as ``with RunTracker(...) as run:``: flat params from the resolved config, metrics,
artifacts (made by report.py), and dataset lineage; the run ends FINISHED, or FAILED with its error recorded.
The default store is a local sqlite file; an ``http://`` tracking server works the same.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
from mlflow import MlflowClient
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetRecord
from mlflow.entities import DatasetInput, InputTag, Metric, Param

from pipeline.schema import GENERATED_DIR, RAREST_DIR, VERSIONS_DIR
from pipeline.settings import TrackingConfig

PARAM_LIMIT = 6000  # MLflow's longest param value
TAG_LIMIT = 8000  # MLflow's longest tag value
ERROR_TAG = "error"  # a failed run's error, type and message


def folder_name(uri: str) -> str:
    """The last part of a folder's path; for a refresh's versions/V/generated (or rarest), V/generated."""
    parts = uri.rstrip("/").split("/")
    versioned = len(parts) > 2 and parts[-3] == VERSIONS_DIR and parts[-1] in (GENERATED_DIR, RAREST_DIR)
    return "/".join(parts[-2:]) if versioned else parts[-1]


def source_name(source: str) -> str:
    """A model or weights source by its last name: models/digits-ddpm -> digits-ddpm, org/name -> name."""
    return source.rstrip("/").rsplit("/", 1)[-1]


def run_name(job: str, *parts: str | None) -> str:
    """A run name that says what ran, what tells runs apart first: the last part (the output folder, by
    every caller) leads, then the job and the rest: ``jepa: generate jepa digits-ddpm`` (output, job,
    method, model). MLflow's runs table cuts long names at the end."""
    given = [part for part in parts if part]
    return f"{given[-1]}: {' '.join([job, *given[:-1]])}" if given else job


def _local_tracking_paths(tracking: TrackingConfig) -> tuple[str, str | None]:
    """Make relative sqlite / artifact paths absolute, and their folders exist."""
    uri, artifacts = tracking.tracking_uri, None
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
        artifacts = Path(tracking.artifact_location).expanduser().resolve().as_uri()
    elif urlparse(uri).scheme in ("", "file"):
        raise ValueError(f"tracking.tracking_uri {uri!r}: use sqlite:///path/mlflow.db or an http(s):// server")
    return uri, artifacts


def dataset_record(dataset: Dataset, profile: dict | None = None) -> DatasetRecord:
    """What a run logs for a dataset, built from its public ``to_dict()`` (name, digest, source, schema, profile);
    ``profile`` given here replaces the dataset's own."""
    fields = dataset.to_dict()
    return DatasetRecord(
        name=fields["name"], digest=fields["digest"], source_type=fields["source_type"], source=fields["source"],
        schema=fields.get("schema"), profile=json.dumps(profile) if profile is not None else fields.get("profile"),
    )


class RunTracker:
    """One MLflow run, as a context manager: ``with RunTracker(...) as run:``.

    On leaving, the run ends FINISHED; on an error it ends FAILED (KILLED on Ctrl-C) with the error
    recorded as its ``error`` tag, and the error propagates. A body that finishes without an error but
    fails its own check sets ``run.succeeded = False``. A child run names its ``parent`` run.
    """

    def __init__(self, tracking: TrackingConfig, run_name: str, tags: dict[str, str],
                 parent: RunTracker | None = None):
        uri, artifacts = _local_tracking_paths(tracking)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(tracking.experiment)
        experiment_id = (
            experiment.experiment_id if experiment
            else self.client.create_experiment(tracking.experiment, artifact_location=artifacts)
        )
        tags = tags | ({"mlflow.parentRunId": parent.run_id} if parent else {})
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self.tracking_uri = uri
        self.tracking = TrackingConfig(uri, str(Path(tracking.artifact_location).expanduser().resolve()),
                                       tracking.experiment)  # absolute: what a run's _run.json records
        self.succeeded = True

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        if error is not None:
            self.client.set_tag(self.run_id, ERROR_TAG, f"{kind.__name__}: {error}"[:TAG_LIMIT])
        status = ("KILLED" if isinstance(error, KeyboardInterrupt)
                  else "FINISHED" if error is None and self.succeeded else "FAILED")
        self.client.set_terminated(self.run_id, status=status)

    def log_params(self, params: dict[str, Any]) -> None:
        entries = [Param(key, str(value)[:PARAM_LIMIT]) for key, value in sorted(params.items())]
        for start in range(0, len(entries), 100):
            self.client.log_batch(self.run_id, params=entries[start : start + 100])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        now = int(pd.Timestamp.now().timestamp() * 1000)
        entries = [Metric(key, float(value), now, 0) for key, value in sorted(metrics.items())]
        self.client.log_batch(self.run_id, metrics=entries)

    def log_artifact_bytes(self, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path))

    def log_lineage(self, manifest_uri: str, digest: str, counts: dict[str, int], data_uri: str) -> None:
        """The manifest as the run's input and the data folder as its output, each by its URI and digest; the
        manifest's counts as its profile. A summary, never the manifest's rows: its cost does not grow with the run."""
        with warnings.catch_warnings():  # a local path resolves to two source kinds, and mlflow says so
            warnings.simplefilter("ignore", UserWarning)
            work = MetaDataset(resolve_dataset_source(manifest_uri), name="manifest", digest=digest[:16])
            output = MetaDataset(resolve_dataset_source(data_uri), name="generated", digest=digest[:16])
        self.client.log_inputs(self.run_id, datasets=[
            DatasetInput(dataset_record(work, profile=counts), tags=[InputTag("mlflow.data.context", "work")]),
            DatasetInput(dataset_record(output), tags=[InputTag("mlflow.data.context", "output")]),
        ])
