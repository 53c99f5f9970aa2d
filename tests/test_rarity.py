"""The non-circular rarity metrics on point sets whose answers are derived by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluate.rarity import (RarityInputError, RaritySummary, avg_knn, avg_knn_within, local_outlier_factor,
                                      rarity_score)


def on_a_line(*xs: float) -> np.ndarray:
    """Points on the x axis of a 3-D space (the extra dims are zero, so distances are |x - x'|)."""
    return np.array([[x, 0.0, 0.0] for x in xs])


LATTICE = on_a_line(*range(10))  # 0, 1, ..., 9
# A dense cluster (spacing 1/8) and a sparse one (spacing 2); binary fractions keep every distance exact.
CLUSTERS = on_a_line(0, 0.125, 0.25, 0.375, 0.5, 10, 12, 14, 16, 18)


def test_avg_knn_on_a_lattice():
    # 4.5: its two nearest are 4 and 5, both 0.5 away; 20: nearest 9 and 8, at 11 and 12.
    assert avg_knn(on_a_line(4.5, 20), LATTICE, k=2) == pytest.approx([0.5, 11.5], abs=1e-12)
    # k = 3 at 4.5: 4, 5 (0.5 each) and 3 or 6 (1.5).
    assert avg_knn(on_a_line(4.5), LATTICE, k=3) == pytest.approx([2.5 / 3], abs=1e-12)


def test_avg_knn_within_leaves_each_point_out():
    # Interior points: two neighbours at 1. The ends: neighbours at 1 and 2.
    expected = [1.5] + [1.0] * 8 + [1.5]
    assert avg_knn_within(LATTICE, k=2) == pytest.approx(expected, abs=1e-12)


def test_lof_on_a_lattice_by_hand():
    """k = 2. Reference: the 2-distance is 1 inside the lattice and 2 at the ends, so lrd(8) = lrd(9) = 2/3.

    A point between 4 and 5: reach distances max(1, 0.5) = 1 to both, lrd 1, LOF = mean(lrd(4), lrd(5)) / 1 = 1.
    A point at 20: reach distances max(2, 11) = 11 to 9 and max(1, 12) = 12 to 8, lrd = 1 / 11.5, so
    LOF = (2/3) / (1/11.5) = 23/3.
    """
    assert local_outlier_factor(on_a_line(4.5, 20), LATTICE, k=2) == pytest.approx([1.0, 23 / 3], rel=1e-9)


def test_rarity_score_two_clusters_and_a_point_outside_every_ball():
    """k = 1: the dense cluster's balls have radius 1/8, the sparse cluster's radius 2.

    0.3125 lies inside the balls of 0.25 and 0.375 (1/16 away): score 1/8. 13 lies inside those of 12 and 14
    (1 away): score 2. 5 is 4.5 from the dense cluster's edge and 5 from the sparse one's: no ball holds it.
    """
    scores = rarity_score(on_a_line(0.3125, 13, 5), CLUSTERS, k=1)
    assert scores[:2] == pytest.approx([0.125, 2.0], abs=1e-12)
    assert math.isnan(scores[2])


def test_rarity_score_takes_the_smallest_containing_ball():
    # 10.0625 is inside the sparse ball of 10 (radius 2) and no dense ball; 0.5 + 1/16 is inside 0.5's ball only.
    # A point at 0.5 itself sits inside 0.375's and 0.5's balls (both 1/8) and, 9.5 away, no sparse ball.
    scores = rarity_score(on_a_line(10.0625, 0.5625, 0.5), CLUSTERS, k=1)
    assert scores == pytest.approx([2.0, 0.125, 0.125], abs=1e-12)


def test_a_point_on_a_ball_boundary_is_outside_as_in_han_et_al():
    # k = 2 on the lattice: 9's second neighbour is 7, so its ball has radius 2 and 11 lies on its sphere
    # (8's ball has radius 1 and is 3 away): outside, by the paper's strict |x - y| < r. 10.75 is inside 9's ball.
    scores = rarity_score(on_a_line(11, 10.75, 11.5), LATTICE, k=2)
    assert math.isnan(scores[0]) and scores[1] == pytest.approx(2.0) and math.isnan(scores[2])


def test_rarity_score_is_translation_invariant():
    """Moving both point sets far from the origin changes no score: the ball test never compares squares of
    numbers a million times larger than the distances."""
    rng = np.random.default_rng(0)
    reference, samples = rng.normal(size=(200, 8)), rng.normal(scale=1.5, size=(100, 8))
    offset = np.full(8, 1e6)
    scores, moved = rarity_score(samples, reference, k=5), rarity_score(samples + offset, reference + offset, k=5)
    assert 10 < np.isnan(scores).sum() < 90  # some samples outside every ball, most inside
    np.testing.assert_array_equal(np.isnan(moved), np.isnan(scores))
    np.testing.assert_allclose(moved, scores, rtol=1e-6)


def test_summary_reports_every_field():
    summary = RaritySummary.of(on_a_line(4.5, 20), LATTICE, feature_space="pixels-8x8", k=2)
    assert summary.feature_space == "pixels-8x8" and summary.k == 2
    assert summary.avg_knn == pytest.approx((0.5 + 11.5) / 2)
    assert summary.lof == pytest.approx((1 + 23 / 3) / 2)
    assert summary.rarity_score == pytest.approx(1.0)  # 4.5 is inside balls of radius 1; 20 is uncovered
    assert summary.rarity_score_uncovered == pytest.approx(0.5)
    assert summary.avg_knn_quantiles["p50"] == pytest.approx(6.0)


def test_metrics_rise_with_distance_from_the_data():
    """Sanity on random data: samples pushed away from a Gaussian reference score rarer on all three metrics."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 4))
    near, far = rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) * 2.5
    assert avg_knn(far, reference).mean() > avg_knn(near, reference).mean()
    assert local_outlier_factor(far, reference).mean() > local_outlier_factor(near, reference).mean()
    near_r, far_r = rarity_score(near, reference), rarity_score(far, reference)
    assert np.isnan(far_r).mean() > np.isnan(near_r).mean()


@pytest.mark.parametrize("samples, reference, k, message", [
    (on_a_line(1), on_a_line(0, 1, 2), 3, "k = 3 needs more than k reference samples, but the reference has 3"),
    (np.zeros((2, 4)), np.zeros((5, 3)), 2, "sample features have 4 dims but reference features 3"),
    (np.zeros((0, 3)), LATTICE, 2, "no samples to measure"),
    (np.array([[np.nan, 0, 0]]), LATTICE, 2, "NaN or inf"),
    (on_a_line(1), LATTICE, 0, "k must be a positive integer"),
])
def test_bad_input_is_refused_in_one_line(samples, reference, k, message):
    for metric in (avg_knn, local_outlier_factor, rarity_score):
        with pytest.raises(RarityInputError, match=message) as refused:
            metric(samples, reference, k=k)
        assert "\n" not in str(refused.value)
