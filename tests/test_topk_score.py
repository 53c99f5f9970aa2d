"""The top-k score stored beside the exact JEPA-SCORE: exact from the same SVD, in every row, filter by it,
evaluated, and older runs refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from guidance import jepa_score, jepa_scores, topk_log_volume
from guidance.jepa_score import LOG_FLOOR
from guidance.reference import topk_log_volume_exact
from jobs import filter as filter_job
from jobs import generate as generate_job
from pipeline.curate.config import FilterConfig
from pipeline.curate.filter import run_filter
from pipeline.schema import DATA_DIR, DATA_FILE_PREFIX, OUTPUT_SCHEMA, SELECTION_FILE
from tests.conftest import TINY_SIZE, LinearEncoder, rand_images
from pipeline.settings import TrackingConfig
from tests.test_curation import fake_generation, kept_rows


@pytest.fixture
def tracking(tmp_path):
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                          artifact_location=str(tmp_path / "mlruns" / "artifacts"))


def test_topk_of_a_linear_encoder_is_the_sum_of_its_k_largest_logs():
    sigma = torch.tensor([0.2, 3.0, 1e-3, 1.5, 1e-9, 0.7], dtype=torch.float64)  # unordered: find the k largest
    exact, topk = jepa_scores(LinearEncoder(sigma), rand_images(2), k=3)
    want = math.log(3.0) + math.log(1.5) + math.log(0.7)
    torch.testing.assert_close(topk, torch.full((2,), want, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(exact, jepa_score(LinearEncoder(sigma), rand_images(2)), rtol=0, atol=0)


def test_topk_floor_is_the_objectives():
    exact, topk = jepa_scores(LinearEncoder(torch.tensor([2.0, 1e-12])), rand_images(1), k=2)
    assert topk.item() == pytest.approx(math.log(2.0) + math.log(LOG_FLOOR), rel=1e-9)


def test_topk_equals_the_full_svd_top_k_and_a_converged_sketch(tiny_encoder64):
    images = rand_images(3, (3, TINY_SIZE, TINY_SIZE), seed=11)
    _, topk = jepa_scores(tiny_encoder64, images, k=4)
    with torch.no_grad():
        reference = topk_log_volume_exact(tiny_encoder64, images, 4)
        sketch = topk_log_volume(tiny_encoder64, images, 4, 2, 30, torch.Generator().manual_seed(0))
    assert ((topk - reference).abs() / reference.abs()).max() < 1e-6
    assert ((topk - sketch).abs() / sketch.abs()).max() < 1e-6


def test_k_beyond_the_jacobians_rank_is_refused():
    with pytest.raises(ValueError, match="exceeds min\\(D, N\\)"):
        jepa_scores(LinearEncoder(torch.tensor([1.0, 2.0])), rand_images(1), k=3)


def test_filter_by_topk_score_ranks_by_it_and_the_record_names_it(ray_cluster, tmp_path, tracking):
    scores = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    topk = [6.0, 5.0, 4.0, 3.0, 2.0, float("nan")]  # the other order; a broken top-k score is never kept
    fake_generation(tmp_path / "gen", scores, topk=topk)
    report = run_filter(FilterConfig(input=str(tmp_path / "gen"), output=str(tmp_path / "cur"), keep=2,
                                     by="topk_score", tracking=tracking))
    assert sorted(row["topk_score"] for row in kept_rows(tmp_path / "cur")) == [2.0, 3.0]
    assert report["rule"]["by"] == "topk_score" and report["threshold"] == 3.0 and report["invalid_scores"] == 1
    assert json.loads((tmp_path / "cur" / SELECTION_FILE).read_text())["rule"]["by"] == "topk_score"
    default = run_filter(FilterConfig(input=str(tmp_path / "gen"), output=str(tmp_path / "cur2"), keep=2,
                                      tracking=tracking))
    assert default["rule"]["by"] == "jepa_score"
    assert sorted(row["jepa_score"] for row in kept_rows(tmp_path / "cur2")) == [1.0, 2.0]


def test_filter_cli_takes_by_and_refuses_other_scores(tmp_path, capsys):
    assert filter_job.build_parser().parse_args(["--input", "a", "--output", "b", "--keep", "1",
                                                 "--by", "topk_score"]).by == "topk_score"
    with pytest.raises(ValueError, match="by must be one of jepa_score, topk_score"):
        FilterConfig(input="a", output="b", keep=1, by="score")


def old_rows(folder) -> None:
    """Committed rows as a version before topk_score wrote them."""
    (folder / DATA_DIR).mkdir(parents=True)
    schema = pa.schema([f for f in OUTPUT_SCHEMA if f.name != "topk_score"])
    pq.write_table(schema.empty_table(), folder / DATA_DIR / f"{DATA_FILE_PREFIX}old.parquet")


def test_resuming_a_run_written_before_topk_score_is_refused_in_one_line(write_config, tmp_path, capsys):
    path = write_config()
    old_rows(tmp_path / "out")
    assert generate_job.main([path]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "holds rows written before column topk_score existed" in error and "new output folder" in error


def test_ranking_a_run_written_before_topk_score_by_it_is_refused(tmp_path, capsys):
    old_rows(tmp_path / "gen")
    (tmp_path / "gen" / "_run.json").write_text(json.dumps({"status": "complete"}))
    assert filter_job.main(["--input", str(tmp_path / "gen"), "--output", str(tmp_path / "cur"), "--keep", "1",
                            "--by", "topk_score"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "has no topk_score column (an older version wrote it)" in error


def test_evaluate_summarises_both_scores(ray_cluster, tmp_path, tracking):
    from pipeline.evaluate.config import EvaluateConfig
    from pipeline.evaluate.job import run_evaluation
    from pipeline.evaluate.table import markdown, row_metrics
    from tests.test_evaluation import fake_run

    table = fake_run(tmp_path / "gen", "gen", 0)
    topk = np.random.default_rng(3).normal(-10, 2, table.num_rows)
    file = next((tmp_path / "gen" / DATA_DIR).glob("*.parquet"))
    pq.write_table(table.set_column(OUTPUT_SCHEMA.get_field_index("topk_score"), "topk_score",
                                    pa.array(topk, pa.float64())), file)
    report = run_evaluation(EvaluateConfig(generated=(str(tmp_path / "gen"),), tracking=tracking))
    row = report["rows"][0]
    assert row["jepa_score"]["mean"] == pytest.approx(table.column("jepa_score").to_numpy().mean(), rel=1e-12)
    assert row["topk_score"]["mean"] == pytest.approx(topk.mean(), rel=1e-12)
    assert row["topk_score"]["std"] == pytest.approx(topk.std(), rel=1e-12)
    assert row_metrics(row)["topk_score_mean"] == pytest.approx(topk.mean(), rel=1e-12)
    assert "top-k score ↓" in markdown(report)
