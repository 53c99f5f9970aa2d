"""The generated runs an evaluation reads: completed outputs, their _run.json, their encoder."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from pipeline.rows import committed_footers
from pipeline.schema import DATA_DIR, FAILURES_DIR, RUN_FILE
from pipeline.settings import UserError
from pipeline.storage import Location, StorageConfig, StorageError, exists, list_files, read_bytes, resolve


@dataclass(frozen=True)
class GeneratedRun:
    """A completed generation output and what its _run.json says."""

    uri: str
    location: Location
    files: list[str]
    method: str
    encoder: dict
    generation_run_id: str | None
    failed: int
    label: str = ""


def open_generated(uri: str, storage: StorageConfig) -> GeneratedRun:
    location = resolve(uri, storage)
    if not exists(location.child(RUN_FILE)):
        raise StorageError(f"{uri} is not a completed generation run (no {RUN_FILE}); finish it first")
    run = json.loads(read_bytes(location.child(RUN_FILE)))
    config = run.get("config", {})
    if "encoder" not in config or "sampling" not in config:
        raise UserError(f"{uri}/{RUN_FILE} has no encoder / sampling config: was it written by jepa-minority generate?")
    files = [f.path for f in list_files(location.child(DATA_DIR), ".parquet")]
    if not files:
        raise UserError(f"{uri} holds no data files ({DATA_DIR}/*.parquet): nothing to evaluate")
    rows = sum(footer.num_rows for footer in committed_footers(location))  # footers only; a corrupt file named
    if rows < 2:
        raise UserError(f"{uri} holds fewer than 2 rows ({rows} committed): nothing to evaluate")
    return GeneratedRun(uri, location, files, config["sampling"]["method"], config["encoder"], run.get("last_run_id"),
                        len(list_files(location.child(FAILURES_DIR), ".json")))


def labelled_runs(runs: list[GeneratedRun]) -> list[GeneratedRun]:
    """Rows are named by method; runs sharing a method are told apart by their folder names."""
    methods = [run.method for run in runs]
    return [replace(run, label=run.method if methods.count(run.method) == 1
                    else f"{run.method} ({run.uri.rstrip('/').rsplit('/', 1)[-1]})") for run in runs]


def same_encoder(runs: list[GeneratedRun]) -> dict:
    first = runs[0].encoder
    for run in runs[1:]:
        if run.encoder != first:
            raise UserError(f"{runs[0].uri} and {run.uri} were scored by different encoders ({first} vs {run.encoder}): "
                             "their JEPA-SCOREs and embeddings are not comparable; evaluate them separately")
    return first


def check_reference_run(location: Location, uri: str, encoder: dict) -> None:
    """A reference that is itself a generation run must have been scored at the same input size."""
    if location.path.endswith(".parquet") or not exists(location.child(RUN_FILE)):
        return
    theirs = json.loads(read_bytes(location.child(RUN_FILE))).get("config", {}).get("encoder", {})
    if theirs.get("input_size") != encoder["input_size"]:
        raise UserError(f"reference {uri} was scored at input size {theirs.get('input_size')}, the generated runs at "
                         f"{encoder['input_size']}: their JEPA-SCOREs are not comparable")
