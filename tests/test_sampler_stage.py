"""The sampler stage's failure path, on ``SampleGenerator`` itself (no Ray): a sample that fails is recorded
under ``_failures/`` and left out while the rest of its batch is kept; with ``output.retry_unguided`` it is
sampled again unguided; models that do not load fail the first batch in one line; the next run counts as
failed only the records of ids still not committed. (One Ray run of the same path:
tests/test_generation.py::test_failed_samples_are_recorded_counted_and_fail_the_job.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.generate.config import load_config
from pipeline.generate.job import failed_ids
from pipeline.generate.sampler_stage import SampleGenerator
from pipeline.rows import Committed
from pipeline.schema import FAILURES_DIR, SAMPLE_INDEX, SAMPLER_SCHEMA, bucket_of
from pipeline.settings import ConfigError
from pipeline.storage import StorageConfig, resolve, write_bytes
from tests.conftest import cpu_manifest
from tests.tiny_diffusion import misfit_copy

# eta 1e30 without normalisation overflows the guided samples to NaN; unguided they are fine.
OVERFLOW = {"method": "jepa", "steps": 3, "guidance": {"eta": 1e30, "normalize": False, "tau": 1.0, "k": 4}}


def run_stage(path: str, overrides: list[str] = ()) -> tuple[list[dict], dict[str, dict]]:
    """The config's manifest as one batch through the stage: its output rows and the failure records by id."""
    config = load_config(path, list(overrides))
    table = SampleGenerator(config, run_id="run-1")(cpu_manifest(config).table)
    assert table.schema.equals(SAMPLER_SCHEMA)
    failures = Path(config.output.uri) / FAILURES_DIR
    records = {p.stem: json.loads(p.read_text()) for p in failures.glob("*/*.json")}  # <bucket>/<sample_id>.json
    return table.to_pylist(), records


def test_a_failing_sample_is_recorded_and_the_rest_of_its_batch_kept(write_config, nan_class_unet):
    path = write_config(model={"source": str(nan_class_unet)},  # class 9 turns to NaN
                        work={"class_labels": [0, 9], "samples_per_label": 2})
    manifest = {row["sample_id"]: row for row in cpu_manifest(load_config(path)).table.to_pylist()}
    rows, records = run_stage(path)
    assert sorted(r["sample_id"] for r in rows) == sorted(i for i, row in manifest.items() if row["class_label"] == 0)
    assert all(r["method"] == "jepa" and np.isfinite(r["jepa_score"]) for r in rows)
    assert sorted(records) == sorted(i for i, row in manifest.items() if row["class_label"] == 9)
    for sample_id, record in records.items():
        assert {k: record[k] for k in manifest[sample_id]} == manifest[sample_id]  # the row, to retry it
        assert (Path(load_config(path).output.uri) / FAILURES_DIR / bucket_of(record[SAMPLE_INDEX])
                / f"{sample_id}.json").exists()  # in its bucket, as its row would be
        assert record["run_id"] == "run-1" and record["created_at"]
        assert "NaN or infinite" in record["error"] or "non-finite" in record["error"], record["error"]


def test_a_guidance_overflow_is_recorded_or_retried_unguided_when_configured(write_config):
    path = write_config(sampling=OVERFLOW, work={"class_labels": [0, 3], "samples_per_label": 1})
    rows, records = run_stage(path)
    assert rows == [] and len(records) == 2
    assert all("NaN or infinite" in r["error"] for r in records.values())

    rows, _ = run_stage(path, ["output.retry_unguided=true"])
    assert sorted(r["sample_id"] for r in rows) == sorted(records)
    assert [r["method"] for r in rows] == ["unguided", "unguided"]
    assert all(np.isfinite(r["jepa_score"]) for r in rows)


def test_models_that_do_not_load_fail_the_first_batch_in_one_line(write_config, class_unet, tmp_path):
    """Not the constructor: Ray reports a task's error to the driver, an actor constructor's only as a traceback."""
    broken = misfit_copy(class_unet, tmp_path / "misfit_unet")
    config = load_config(write_config(model={"source": str(broken)}))
    stage = SampleGenerator(config, run_id="run-1")
    with pytest.raises(ConfigError, match=f"the sampler could not load its models \\(model.source {broken}") as error:
        stage(cpu_manifest(config).table)
    assert "\n" not in str(error.value)


def test_records_of_ids_committed_since_are_removed_and_the_rest_counted(tmp_path):
    output = resolve(str(tmp_path / "out"), StorageConfig())
    for index, sample_id in enumerate(("a", "b", "c")):  # c where a run made before the buckets put it
        folder = output.child(FAILURES_DIR) if sample_id == "c" else output.child(FAILURES_DIR, bucket_of(index))
        record = {"sample_index": index, "error": f"E{index}\nmore"}
        write_bytes(folder.child(f"{sample_id}.json"), json.dumps(record).encode())
    committed = Committed(np.array([[1, 2], [5, 6]]))  # b committed since; sample 5 never failed
    assert failed_ids(output, committed) == {"a": "E0", "c": "E2"}
    left = sorted(p.relative_to(tmp_path / "out" / FAILURES_DIR).as_posix() for p in (tmp_path / "out").rglob("*.json"))
    assert left == [f"{bucket_of(0)}/a.json", "c.json"]
