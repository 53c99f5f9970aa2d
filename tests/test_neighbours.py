"""The approximate neighbour search against the exact one: recall@k, AvgkNN, LOF and the Rarity Score."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.neighbours import APPROXIMATE_ABOVE, Index, approximate, check_against_exact, recall_at_k
from pipeline.evaluate.prior import prior_summary
from pipeline.evaluate.rarity import RaritySummary, lof_from_graph, local_outlier_factor, reference_index
from pipeline.settings import UserError

K = 5
RECALL_BOUND = 0.95  # the index finds at least this share of the exact k nearest neighbours
AVG_KNN_ERROR = 1e-3  # mean AvgkNN within this relative error of the exact search's


def mixture(rows: int, seed: int, spread: float = 1.0) -> np.ndarray:
    """Rows of a 50-component Gaussian mixture in 32 dims: clustered, as real image features are."""
    centres = np.random.default_rng(0).normal(scale=4, size=(50, 32))
    rng = np.random.default_rng(seed)
    return centres[rng.integers(len(centres), size=rows)] + rng.normal(scale=spread, size=(rows, 32))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return mixture(20_000, seed=1)


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    """A reference small enough for exact leave-one-out searches, the summaries' exact path, in seconds."""
    return mixture(4_000, seed=5)


@pytest.fixture(scope="module")
def small_index(small) -> Index:
    return reference_index(small, K, "approximate")


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return mixture(1_000, seed=2, spread=1.3)  # a little wider than the reference: some rare, some uncovered


@pytest.fixture(scope="module")
def index(reference) -> Index:
    return reference_index(reference, K, "approximate")


def test_the_index_finds_the_nearest_neighbours_of_new_samples(reference, samples, index):
    exact_distances, exact_found = Index(reference, exact=True).query(samples, K)
    distances, found = index.query(samples, K)
    assert recall_at_k(found, exact_found) > RECALL_BOUND
    assert distances.mean() == pytest.approx(exact_distances.mean(), rel=AVG_KNN_ERROR)
    hit = found == exact_found  # a neighbour found is at its exact distance
    np.testing.assert_allclose(distances[hit], exact_distances[hit], rtol=1e-12)


def test_leave_one_out_never_counts_a_row_as_its_own_neighbour(small, small_index):
    distances, found = small_index.within(K)
    assert not (found == np.arange(len(found))[:, None]).any()
    exact_distances, exact_found = Index(small, exact=True).within(K)
    assert recall_at_k(found, exact_found) > RECALL_BOUND
    assert distances.mean() == pytest.approx(exact_distances.mean(), rel=AVG_KNN_ERROR)


def test_lof_from_the_graph_is_scikit_learns_lof_on_exact_neighbours(small, samples):
    exact = Index(small, exact=True)
    np.testing.assert_allclose(lof_from_graph(exact.within(K), exact.query(samples, K)),
                               local_outlier_factor(samples, small, K), rtol=1e-9)


def test_the_summary_by_the_index_matches_the_exact_one(small, samples, small_index):
    exact = RaritySummary.of(samples, small, "mixture", K)
    approximate_summary = RaritySummary.against(samples, small_index, "mixture", K)
    assert exact.neighbours == {"search": "exact"}
    check = approximate_summary.neighbours["check"]
    assert check["queries"] == len(samples) and check["recall_at_k"] > RECALL_BOUND
    assert abs(check["avg_knn_relative_change"]) < AVG_KNN_ERROR
    assert approximate_summary.avg_knn == pytest.approx(exact.avg_knn, rel=AVG_KNN_ERROR)
    assert approximate_summary.lof == pytest.approx(exact.lof, rel=1e-2)
    assert 0.05 < exact.rarity_score_uncovered < 0.95  # both covered and uncovered samples are compared
    assert approximate_summary.rarity_score_uncovered == pytest.approx(exact.rarity_score_uncovered, abs=0.01)
    assert approximate_summary.rarity_score == pytest.approx(exact.rarity_score, rel=1e-2)


def test_the_prior_check_reports_the_index_against_exact_search(small, small_index):
    from pipeline.evaluate.features import FeatureSpace

    space = FeatureSpace.choose("pixels-8", None, None)
    scores = -np.linalg.norm(small - small.mean(0), axis=1)  # lower where farther out: rarer
    exact, exact_within = prior_summary(scores, small, space, K)
    summary, within = prior_summary(scores, small, space, K, index=small_index)
    assert exact["neighbours"] == {"search": "exact"}
    check = summary["neighbours"]["check"]
    assert check["recall_at_k"] > RECALL_BOUND and abs(check["avg_knn_relative_change"]) < AVG_KNN_ERROR
    assert within.mean() == pytest.approx(exact_within.mean(), rel=AVG_KNN_ERROR)
    assert summary["spearman"] == pytest.approx(exact["spearman"], abs=1e-3)


def test_the_check_measures_a_bad_index():
    """An index that misses neighbours shows it: the check's recall and AvgkNN change see it (on unclustered
    points, which a few cells cannot hold)."""
    rng = np.random.default_rng(3)
    index = reference_index(rng.normal(size=(5_000, 32)), K, "approximate")
    index.search.nprobe = 3  # scan 3 cells of 71, not 32
    check = check_against_exact(index, K, rng.normal(size=(1_000, 32)))
    assert check["recall_at_k"] < RECALL_BOUND and check["avg_knn_relative_change"] > AVG_KNN_ERROR


def test_auto_is_exact_up_to_the_threshold():
    assert not approximate("auto", APPROXIMATE_ABOVE) and approximate("auto", APPROXIMATE_ABOVE + 1)
    assert approximate("approximate", 10) and not approximate("exact", 10 ** 9)
    with pytest.raises(UserError, match="neighbours must be one of exact, approximate, auto, got 'faiss'"):
        approximate("faiss", 10)
