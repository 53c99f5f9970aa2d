"""The evidence table: each arm measured against real images in pixels, never through the JEPA-SCORE."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluate.evidence import Arm, compared, markdown, measure
from pipeline.evaluate.features import FeatureSpace
from pipeline.evaluate.rarity import RaritySummary


def grey(values: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(np.full((16, 16), v, np.uint8), mode="L") for v in values]


def test_arms_are_measured_against_the_reference_and_compared_in_plain_words():
    rng = np.random.default_rng(0)
    reference = grey(rng.integers(100, 156, 40))  # flat grey images around the middle
    typical = Arm("typical", grey(rng.integers(110, 146, 12)), np.zeros(12, int), np.full(12, -5.0))
    outlying = Arm("outlying", grey(rng.integers(0, 40, 12)), np.zeros(12, int), np.full(12, 3.0))  # far darker
    few = Arm("few", grey([128, 129]), np.array([1, 0]), np.array([0.0, 0.0]))
    classify = lambda images: np.array([int(np.asarray(i).mean() < 64) for i in images])  # dark = class 1
    rows = measure([typical, outlying, few], reference, classify)

    space = FeatureSpace.parse("pixels-16-grey")
    pixels = lambda images: np.stack([space.pixels(i) for i in images]).astype(np.float64)
    expected = RaritySummary.of(pixels(outlying.images), pixels(reference), space.name)
    assert rows[1].avg_knn == pytest.approx(expected.avg_knn) and rows[1].lof == pytest.approx(expected.lof)
    assert rows[1].rarity_score_uncovered == expected.rarity_score_uncovered == 1.0  # outside every real ball
    assert rows[0].avg_knn < rows[1].avg_knn
    assert rows[0].precision == 1.0 and rows[1].precision == 0.0
    assert (rows[0].class_accuracy, rows[1].class_accuracy, rows[2].class_accuracy) == (1.0, 0.0, 0.5)
    assert rows[2].precision is None  # too few samples for k-NN balls of 5
    assert rows[1].jepa_score == 3.0  # the objective is reported beside, not used
    (outlying_said, few_said) = compared(rows, "typical")
    assert outlying_said.startswith("outlying: rarer than typical by AvgkNN")
    assert few_said.startswith("few: not rarer than typical by AvgkNN")
    assert "| outlying |" in markdown(rows) and "| — |" in markdown(rows)


def test_only_pixel_spaces_are_taken():
    with pytest.raises(ValueError, match="measures in a pixels-N space, got 'encoder'"):
        measure([], grey([1, 2]), space="encoder")
