"""MLflow tracking against a real sqlite store: the lineage a run records, read back through the client."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipeline.settings import TrackingConfig, ui_command
from pipeline.tracking import RunTracker

DIGEST = "0123456789abcdef0123456789abcdef"


def test_lineage_records_the_manifest_as_a_summary_and_the_output_with_digest_and_source(tmp_path):
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                              artifact_location=str(tmp_path / "artifacts"))
    manifest_uri, data_uri = str(tmp_path / "out" / "_manifest.arrow"), str(tmp_path / "out" / "data")
    with RunTracker(tracking, "lineage", {}) as tracker:
        tracker.log_lineage(manifest_uri, DIGEST, {"samples": 100_000_000, "work_entries": 3}, data_uri)

    run = MlflowClient(tracking_uri=tracker.tracking_uri).get_run(tracker.run_id)
    logged = {tag.value: entry.dataset for entry in run.inputs.dataset_inputs for tag in entry.tags
              if tag.key == "mlflow.data.context"}
    assert set(logged) == {"work", "output"}
    work, output = logged["work"], logged["output"]
    assert (work.name, work.digest) == ("manifest", DIGEST[:16])
    assert (output.name, output.digest) == ("generated", DIGEST[:16])
    assert work.source_type == output.source_type == "local"
    assert manifest_uri in json.loads(work.source)["uri"] and data_uri in json.loads(output.source)["uri"]
    assert json.loads(work.profile) == {"samples": 100_000_000, "work_entries": 3}  # counts, not rows
    assert work.schema is None and output.schema is None and output.profile is None


def test_the_browse_line_opens_the_runs_page_of_the_runs_experiment(tmp_path):
    """``mlflow ui`` alone opens on the GenAI overview; the line names the experiment's runs page too."""
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                              artifact_location=str(tmp_path / "artifacts"), experiment="second")
    MlflowClient(tracking_uri=tracking.tracking_uri).create_experiment("first")  # ids differ from the default's
    tracker = RunTracker(tracking, "browse", {})
    experiment_id = MlflowClient(tracking_uri=tracker.tracking_uri).get_experiment_by_name("second").experiment_id
    assert ui_command(tracking.tracking_uri) == f"mlflow ui --backend-store-uri {tracker.tracking_uri}"
    assert ui_command(tracking.tracking_uri, tracker.run_id) == (
        f"mlflow ui --backend-store-uri {tracker.tracking_uri}, then open "
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs")


def _tracking(tmp_path) -> TrackingConfig:
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                          artifact_location=str(tmp_path / "artifacts"))


def test_a_run_ends_finished_or_failed_with_its_error_and_the_error_propagates(tmp_path):
    with RunTracker(_tracking(tmp_path), "fine", {}) as fine:
        fine.log_metrics({"x": 1.0})
    with pytest.raises(ValueError, match="disk on fire"):
        with RunTracker(_tracking(tmp_path), "broken", {}) as broken:
            raise ValueError("disk on fire")
    with pytest.raises(KeyboardInterrupt):
        with RunTracker(_tracking(tmp_path), "stopped", {}) as stopped:
            raise KeyboardInterrupt("interrupted: 3 of 8 committed")
    with RunTracker(_tracking(tmp_path), "unfinished", {}) as unfinished:
        unfinished.succeeded = False  # ended without an error, but failed its own check (too many failures)

    client = MlflowClient(tracking_uri=fine.tracking_uri)
    runs = {name: client.get_run(run.run_id) for name, run in
            {"fine": fine, "broken": broken, "stopped": stopped, "unfinished": unfinished}.items()}
    assert {name: run.info.status for name, run in runs.items()} == {
        "fine": "FINISHED", "broken": "FAILED", "stopped": "KILLED", "unfinished": "FAILED"}
    assert runs["broken"].data.tags["error"] == "ValueError: disk on fire"
    assert runs["stopped"].data.tags["error"] == "KeyboardInterrupt: interrupted: 3 of 8 committed"
    assert "error" not in runs["fine"].data.tags and "error" not in runs["unfinished"].data.tags


def test_a_child_run_names_its_parent_and_a_failing_child_fails_both(tmp_path):
    with RunTracker(_tracking(tmp_path), "parent", {}) as parent:
        with RunTracker(_tracking(tmp_path), "child", {"method": "jepa"}, parent=parent) as child:
            child.log_metrics({"x": 1.0})
    with pytest.raises(RuntimeError):
        with RunTracker(_tracking(tmp_path), "parent 2", {}) as parent2:
            with RunTracker(_tracking(tmp_path), "child 2", {}, parent=parent2) as child2:
                raise RuntimeError("no features")

    client = MlflowClient(tracking_uri=parent.tracking_uri)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert client.get_run(child.run_id).data.tags["method"] == "jepa"
    assert client.get_run(parent.run_id).info.status == client.get_run(child.run_id).info.status == "FINISHED"
    assert client.get_run(parent2.run_id).info.status == client.get_run(child2.run_id).info.status == "FAILED"
    assert client.get_run(parent2.run_id).data.tags["error"] == "RuntimeError: no features"
