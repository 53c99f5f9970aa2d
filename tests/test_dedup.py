"""Near-duplicate search and diverse selection on point sets whose answer is known: the approximate index against
the exact one, the rarest row of each cluster kept, k-center taking one row per cluster where top-k takes one."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.curate.dedup import near_duplicates, nearest, unit_rows
from pipeline.curate.diversity import k_center, narrow
from pipeline.curate.selection import VECTOR


def clusters(count: int, size: int, dimension: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random directions, ``size`` noisy copies of each, shuffled: (points, each point's cluster)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((count, dimension))
    label = rng.permutation(np.repeat(np.arange(count), size))
    return (centres[label] + spread * rng.standard_normal((len(label), dimension))).astype(np.float32), label


def test_the_approximate_neighbours_recall_the_exact_ones():
    points, _ = clusters(60, 50, 32, 1.0)  # 3,000 rows in overlapping clusters: 54 lists, a search visits 16
    exact_similarity, exact = nearest(unit_rows(points), 10, "exact")
    approximate_similarity, approximate = nearest(unit_rows(points), 10, "approximate")
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall > 0.98  # 0.99 here; visiting one list only, 0.87
    assert (approximate != np.arange(len(points))[:, None]).all()  # a row is never its own neighbour
    assert np.all(approximate_similarity <= exact_similarity + 1e-5)  # the exact ones are the nearest


@pytest.mark.parametrize("search", ["exact", "approximate"])
def test_each_cluster_of_near_duplicates_keeps_its_rarest_row(search):
    points, label = clusters(40, 5, 16, 1e-3)  # 200 rows in rarity order: 40 clusters of 5 near-copies
    removed = near_duplicates(points, 0.99, search)
    kept = np.flatnonzero(~removed)
    first = sorted(np.flatnonzero(label == cluster)[0] for cluster in range(40))
    assert kept.tolist() == first  # the rarest (first) row of each cluster, nothing else


def test_a_chain_keeps_every_row_a_kept_rarer_row_is_not_near():
    """Rows 0 - 1 - 2 on an arc, each next one near the one before only: 1 goes for 0, so 2 (near 1 only) stays."""
    angles = np.radians([0.0, 5.0, 10.0])
    removed = near_duplicates(np.stack([np.cos(angles), np.sin(angles)], 1), np.cos(np.radians(7.0)), "exact")
    assert removed.tolist() == [False, True, False]


def test_k_center_takes_one_row_per_cluster_where_top_k_takes_one_cluster():
    rng = np.random.default_rng(1)
    centres = np.eye(4, dtype=np.float32)[:3]
    label = np.array([0] * 6 + [1] * 3 + [2] * 3)  # in rarity order: the six rarest all in cluster 0
    points = centres[label] + 0.05 * rng.standard_normal((12, 4)).astype(np.float32)
    assert set(label[:3]) == {0}
    taken = k_center(points, 3)
    assert taken[0] == 0 and sorted(label[taken]) == [0, 1, 2]
    assert sorted(k_center(points, 20).tolist()) == list(range(12))  # asked for more: every row, once


def test_narrowing_keeps_each_groups_quota_after_removing_its_duplicates():
    points, label = clusters(3, 4, 8, 1e-3, seed=2)
    candidates = pa.table({"sample_id": [f"id{i:02d}" for i in range(12)], "jepa_score": np.arange(12.0),
                           "class_label": [i % 2 for i in range(12)],
                           VECTOR: pa.array(points.tolist(), pa.list_(pa.float32()))})
    kept, removed = narrow(candidates, "class_label", {0: 5, 1: 1}, "jepa_score", "rarest",
                           {"threshold": 0.99, "search": "exact"})
    for group in (0, 1):  # each group keeps the rarest row of each of its clusters, up to its quota
        rows = np.arange(group, 12, 2)
        distinct = [rows[label[rows] == c][0] for c in range(3) if (label[rows] == c).any()]
        want = sorted(distinct)[:{0: 5, 1: 1}[group]]
        assert sorted(int(i[2:]) for i, g in zip(kept["sample_id"].to_pylist(), kept["class_label"].to_pylist())
                      if g == group) == want
        assert removed[group] == 6 - len(distinct)
    assert VECTOR not in kept.column_names
