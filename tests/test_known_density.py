"""The known-density benchmark's quick run: its JSON holds every reported field, and the yardstick ranks the
world's images by their true rarity (larger metric where the true log-density is lower)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_quick_known_density_run_reports_every_field_and_the_yardstick_has_the_right_sign(tmp_path):
    output = tmp_path / "known_density.json"
    subprocess.run([sys.executable, "-m", "benchmarks.known_density", "--quick", "--output", str(output)],
                   cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, check=True, timeout=600)
    result = json.loads(output.read_text())
    assert set(result["world"]) >= {"weights", "means", "stds", "box", "size"}
    yardstick = result["yardstick_pixel_space"]
    for metric in ("avg_knn", "lof", "rarity_score"):
        assert yardstick[metric]["spearman_with_log_density"] < 0, (metric, yardstick)
    for metric in ("avg_knn", "rarity_score"):  # the neighbourhood metrics find most of the truly rarest tenth
        assert yardstick[metric]["share_flagged_in_rarest_10pct"] > 0.3, (metric, yardstick)
    assert 0 <= yardstick["rarity_score"]["uncovered_share"] < 0.1
    assert {row["name"] for row in result["encoders"]} == {"vicreg D16 seed0", "sigreg D16 seed0"}
    for row in result["encoders"]:
        assert set(row["spearman_with_log_density"]) == {"full", "top1", "top2", "top3", "top4", "top8"}
        assert all(-1 <= value <= 1 for value in row["spearman_with_log_density"].values()), row
        assert 0 <= row["share_lowest_top2_in_rarest_10pct"] <= 1 and math.isfinite(row["heldout_sigreg"])
