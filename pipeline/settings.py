"""Settings every job shares, light to import (no torch): the MLflow store, user and config errors, and the
dataclass -> plain data helpers. The filter's driver and Ray's write workers import only these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


UI_ADDRESS = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves by default
# MLflow's own tracking stores by URI scheme (a database's "+driver" suffix aside); plugins add theirs through
# the "mlflow.tracking_store" entry points, read without importing MLflow.
MLFLOW_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc")


class UserError(ValueError):
    """Input a person gave that cannot work (a config value, a flag, a file, a run); the message is one line
    that names it and the fix. The command line prints it and exits 2 (``jobs.options.refusing``): an error of
    any other class is a bug and keeps its traceback."""


class ConfigError(UserError):
    """A config value is missing, unknown, of the wrong type or out of range; the message names the key."""


@dataclass(frozen=True)
class TrackingConfig:
    """Where the MLflow run goes."""

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    """a local sqlite store by default; an http:// server works too"""
    artifact_location: str = "mlruns/artifacts"
    """for new experiments in a local store"""
    experiment: str = "jepa-minority"
    """the MLflow experiment the runs are grouped under"""

    def __post_init__(self):
        if "@" in urlparse(self.tracking_uri).netloc:
            raise ConfigError("tracking.tracking_uri carries credentials (user:secret@host), which would be logged "
                              "with the config: give the bare URI and put them in MLFLOW_TRACKING_USERNAME / "
                              "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        scheme = urlparse(self.tracking_uri).scheme.split("+")[0]
        if scheme not in MLFLOW_SCHEMES and scheme not in {ep.name for ep in entry_points(group="mlflow.tracking_store")}:
            raise ConfigError(f"tracking.tracking_uri {self.tracking_uri!r}: {scheme}:// is not an MLflow tracking store; "
                              "give sqlite:///PATH (a local store), http(s)://HOST:PORT (a server), or a database or "
                              "plugin scheme MLflow knows")


def ui_command(tracking_uri: str, run_id: str | None = None) -> str:
    """How a person opens the runs: the exact ``mlflow ui`` command for a sqlite store, else the server's
    address; given a run, the runs page of its experiment too (``mlflow ui`` alone opens on its GenAI
    overview, which shows "No data" for these runs)."""
    local = tracking_uri.startswith("sqlite:///")
    if local:
        tracking_uri = f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).expanduser().resolve()}"
        command = f"mlflow ui --backend-store-uri {tracking_uri}"
    if run_id is None:
        return command if local else f"open {tracking_uri} in a browser"
    from mlflow import MlflowClient  # only here: this module stays light for write workers

    experiment_id = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    page = f"{UI_ADDRESS if local else tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{command}, then open {page}" if local else f"open {page} in a browser"


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as nested plain data (it holds no secrets: there are no credential fields)."""
    return dataclasses.asdict(config)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat
