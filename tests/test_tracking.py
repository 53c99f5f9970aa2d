"""MLflow tracking against a real sqlite store: the lineage a run records, read back through the client."""

from __future__ import annotations

import json

import pandas as pd
from mlflow import MlflowClient

from pipeline.settings import TrackingConfig
from pipeline.tracking import RunTracker

DIGEST = "0123456789abcdef0123456789abcdef"


def test_lineage_records_the_manifest_and_the_output_with_digest_source_schema_and_profile(tmp_path):
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                              artifact_location=str(tmp_path / "artifacts"))
    tracker = RunTracker(tracking, "lineage", {})
    manifest = pd.DataFrame({"sample_id": ["a", "b", "c"], "seed": [1, 2, 3]})
    manifest_uri, data_uri = str(tmp_path / "out" / "manifest.parquet"), str(tmp_path / "out" / "data")
    tracker.log_lineage(manifest, manifest_uri, DIGEST, data_uri)
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
    columns = [column["name"] for column in json.loads(work.schema)["mlflow_colspec"]]
    assert columns == ["sample_id", "seed"]
    assert json.loads(work.profile)["num_rows"] == 3
    assert output.schema is None and output.profile is None  # a folder of files: no table to describe
