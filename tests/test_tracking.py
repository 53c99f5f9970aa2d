"""MLflow tracking against a real sqlite store: the lineage a run records, read back through the client."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from pipeline.settings import TrackingConfig, ui_command
from pipeline.tracking import RunTracker

DIGEST = "0123456789abcdef0123456789abcdef"


def test_lineage_records_the_manifest_as_a_summary_and_the_output_with_digest_and_source(tmp_path):
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                              artifact_location=str(tmp_path / "artifacts"))
    tracker = RunTracker(tracking, "lineage", {})
    manifest_uri, data_uri = str(tmp_path / "out" / "_manifest.arrow"), str(tmp_path / "out" / "data")
    tracker.log_lineage(manifest_uri, DIGEST, {"samples": 100_000_000, "work_entries": 3}, data_uri)
    tracker.end("FINISHED")

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
