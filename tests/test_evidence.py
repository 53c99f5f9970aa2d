"""The evidence table: each arm measured against real images in pixels, never through the JEPA-SCORE, and\ncalled rarer than the baseline only when the minority test says minority."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.evaluate.evidence import Arm, compared, from_rows, markdown, measure
from pipeline.evaluate.features import FeatureSpace
from pipeline.evaluate.minority import MinorityConfig, MinorityReference, minority_mask, minority_test
from pipeline.evaluate.rarity import RaritySummary
from pipeline.images import png_bytes


def grey(values: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(np.full((16, 16), v, np.uint8), mode="L") for v in values]


def test_arms_are_measured_against_the_reference_and_compared_by_the_minority_test():
    rng = np.random.default_rng(0)
    reference = grey(rng.integers(100, 156, 40))  # flat grey images around the middle
    typical = Arm("typical", grey(rng.integers(120, 136, 12)), np.zeros(12, int), np.full(12, -5.0))
    space = FeatureSpace.parse("pixels-16-grey")
    pixels = lambda images: np.stack([space.pixels(i) for i in images]).astype(np.float64)
    own = np.flatnonzero(minority_mask(pixels(reference), 5, 0.25))  # the reference's own rare images
    rare = Arm("rare", [reference[i] for i in own] * 3, np.zeros(3 * len(own), int), np.full(3 * len(own), -6.0))
    outlying = Arm("outlying", grey(rng.integers(0, 40, 12)), np.zeros(12, int), np.full(12, 3.0))  # far darker
    few = Arm("few", grey([128, 129]), np.array([1, 0]), np.array([0.0, 0.0]))
    classify = lambda images: np.array([int(np.asarray(i).mean() < 64) for i in images])  # dark = class 1
    rows = measure([typical, rare, outlying, few], reference, classify, baseline="typical")

    expected = RaritySummary.of(pixels(outlying.images), pixels(reference), space.name)
    assert rows[2].avg_knn == pytest.approx(expected.avg_knn) and rows[2].lof == pytest.approx(expected.lof)
    assert rows[2].rarity_score_uncovered == expected.rarity_score_uncovered == 1.0  # outside every real ball
    assert rows[0].avg_knn < rows[2].avg_knn
    assert rows[0].precision == 1.0 and rows[2].precision == 0.0
    assert [r.class_accuracy for r in rows] == [1.0, 1.0, 0.0, 0.5]
    assert rows[3].precision is None  # too few samples for k-NN balls of 5
    assert rows[2].jepa_score == 3.0  # the objective is reported beside, not used
    assert [r.minority["verdict"] if r.minority else None for r in rows] == ["baseline", "minority", "off-data", None]
    chosen = MinorityReference(pixels(reference), MinorityConfig())
    want = minority_test(pixels(outlying.images), pixels(typical.images), chosen, bounds=(0, 1))
    assert rows[2].minority["fd_minority"] == pytest.approx(want["fd_minority"])
    assert rows[2].minority["intervals"].keys() == want["intervals"].keys()
    for name, bounds in want["intervals"].items():
        assert rows[2].minority["intervals"][name] == pytest.approx(bounds)
    (rare_said, outlying_said, few_said) = compared(rows, "typical")
    assert rare_said.startswith("rare: minority by the minority test against typical: closer to the real minority")
    assert "rarer than typical in the data" in rare_said
    assert outlying_said.startswith("outlying: off-data by the minority test against typical: rarer by AvgkNN")
    assert "farther from the real minority" in outlying_said and "rarer than" not in outlying_said
    assert few_said.startswith("few: too few samples for the minority test")
    table = markdown(rows)
    assert "| outlying |" in table and "| — |" in table and "| off-data |" in table and "| minority |" in table
    with pytest.raises(ValueError, match="measure the arms with baseline='typical' first"):
        compared(measure([typical, rare], reference), "typical")


def test_an_arm_from_generated_rows_carries_its_seeds():
    image = {"bytes": png_bytes(np.zeros((16, 16, 3), np.uint8)), "path": "a.png"}
    table = pa.table({"image": [image, image], "class_label": [1, 2], "jepa_score": [0.5, 0.25], "seed": [7, 9]})
    arm = from_rows("run", table)
    assert arm.seeds.tolist() == [7, 9] and arm.labels.tolist() == [1, 2] and len(arm.images) == 2


def test_only_pixel_spaces_are_taken():
    with pytest.raises(ValueError, match="measures in a pixels-N space, got 'encoder'"):
        measure([], grey([1, 2]), space="encoder")
