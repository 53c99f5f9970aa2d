"""Nearest neighbours for the k-NN metrics: exact (scikit-learn) or approximate (a faiss IVF index).

Exact search is the default and what every small reference uses. Above ``APPROXIMATE_ABOVE`` reference
rows, ``auto`` switches to an inverted-file index (faiss ``IndexIVFFlat``): the reference is split into
``sqrt(N)`` k-means cells (trained on ``TRAIN_PER_CELL`` rows each) and a query scans its ``PROBES``
nearest cells, about ``PROBES / sqrt(N)`` of the reference (3 % of a million rows). Only *which* neighbours are
found is approximate: the distances to them are recomputed here in float64 from the features, so a
neighbour that is found has its exact distance (docs/method.md, 'Measuring rarity').
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from pipeline.settings import UserError

MODES = ("exact", "approximate", "auto")
APPROXIMATE_ABOVE = 100_000  # exact k-NN over every pair of 100k rows takes scikit-learn's brute force hours
PROBES = 32  # cells scanned per query: recall@5 1.0 on 20k clustered points, 0.72 on 200k unclustered (docs/cluster.md)
CELL_SIZE = 39  # faiss's k-means needs at least 39 training points per cell
TRAIN_PER_CELL = 64  # k-means rows per cell: a million rows of 2048 dims train in seconds, not an hour
SEED = 1234  # the k-means seed: the same reference gives the same index
BLOCK = 2 ** 27  # float64 differences held at once when distances are recomputed (1 GiB)
CHECK_QUERIES = 1000  # queries searched both ways to measure the index (recall@k, AvgkNN's change)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"neighbours must be one of {', '.join(MODES)}, got {mode!r}")


def approximate(mode: str, reference_rows: int) -> bool:
    """Whether ``mode`` searches approximately for a reference of ``reference_rows``."""
    check_mode(mode)
    return mode == "approximate" or (mode == "auto" and reference_rows > APPROXIMATE_ABOVE)


def search_record(index: Index, k: int, queries: np.ndarray | None = None) -> dict:
    """The search used, as evaluation.json and prior_check.json record it: exact, or the index and its check
    against exact search (``check_against_exact``)."""
    if index.exact:
        return {"search": "exact"}
    return {"search": f"approximate: faiss IVF-Flat, {index.search.nprobe} of {index.search.nlist} cells probed",
            "check": check_against_exact(index, k, queries)}


class Index:
    """The reference's nearest neighbours, exact or approximate; distances always Euclidean in float64."""

    def __init__(self, reference: np.ndarray, exact: bool):
        self.reference = np.asarray(reference, np.float64)
        self.exact = exact
        self.search = None if exact else _ivf(self.reference)  # scikit-learn fits per call, as it always has
        self.found_within: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # by k: LOF and Rarity Score share it

    def query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices) of each query's ``k`` nearest reference rows, nearest first."""
        queries = np.asarray(queries, np.float64)
        if self.exact:
            return NearestNeighbors(n_neighbors=k).fit(self.reference).kneighbors(queries)
        _, found = self.search.search(np.ascontiguousarray(queries, np.float32), k)
        return self._exact_distances(queries, found)

    def within(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices) of each reference row's ``k`` nearest *other* rows (leave one out)."""
        if k not in self.found_within:
            self.found_within[k] = self._within(k)
        return self.found_within[k]

    def _within(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.exact:
            return NearestNeighbors(n_neighbors=k + 1).fit(self.reference).kneighbors(None, n_neighbors=k)
        _, found = self.search.search(np.ascontiguousarray(self.reference, np.float32), k + 1)
        return self._exact_distances(self.reference, _others(found, np.arange(len(found))))

    def _exact_distances(self, queries: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if (found < 0).any():
            raise UserError(f"the approximate index found fewer than {found.shape[1]} neighbours for some rows: "
                             "use --neighbours exact for a reference this small")
        step = max(1, BLOCK // (found.shape[1] * queries.shape[1]))  # bounded memory: BLOCK numbers at a time
        distances = np.concatenate([np.linalg.norm(self.reference[found[start:start + step]]
                                                   - queries[start:start + step, None, :], axis=-1)
                                    for start in range(0, len(found), step)])
        order = np.argsort(distances, axis=1, kind="stable")
        return np.take_along_axis(distances, order, 1), np.take_along_axis(found, order, 1)


def _others(found: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each row's k + 1 found neighbours without the row itself (the last one where a duplicate hid it)."""
    own = found == rows[:, None]
    own[~own.any(axis=1), -1] = True
    return found[~own].reshape(len(found), found.shape[1] - 1)


def _ivf(reference: np.ndarray):
    """An IVF-Flat index of ``sqrt(N)`` cells (fewer when N is small), k-means seeded, probing ``PROBES``."""
    import faiss

    rows, dims = reference.shape
    cells = max(1, min(round(np.sqrt(rows)), rows // CELL_SIZE))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dims), dims, cells)
    index.cp.seed = SEED
    index.cp.max_points_per_centroid = TRAIN_PER_CELL
    points = np.ascontiguousarray(reference, np.float32)
    index.train(points)
    index.add(points)
    index.nprobe = min(PROBES, cells)
    return index


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """The share of the exact k nearest neighbours that the index found (rows of indices, same k)."""
    return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, exact)]) / exact.shape[1])


def check_against_exact(index: Index, k: int, queries: np.ndarray | None = None, seed: int = 0) -> dict:
    """The index against exact search on a uniform subsample of ``CHECK_QUERIES`` queries (the reference's own
    rows, leave one out, when ``queries`` is None): recall@k and the relative change of their mean AvgkNN."""
    reference = index.reference
    exact = NearestNeighbors(n_neighbors=k + 1).fit(reference)
    if queries is None:
        rows = _chosen(len(reference), seed)
        distances, found = (part[rows] for part in index.within(k))
        exact_found = _others(exact.kneighbors(reference[rows])[1], rows)
        exact_distances = np.linalg.norm(reference[exact_found] - reference[rows][:, None, :], axis=-1)
    else:
        chosen = np.asarray(queries, np.float64)[_chosen(len(queries), seed)]
        distances, found = index.query(chosen, k)
        exact_distances, exact_found = exact.kneighbors(chosen, n_neighbors=k)
    exact_mean, mean = float(exact_distances.mean()), float(distances.mean())
    return {"queries": len(found), "k": k, "recall_at_k": recall_at_k(found, exact_found),
            "avg_knn_exact": exact_mean, "avg_knn_index": mean, "avg_knn_relative_change": mean / exact_mean - 1}


def _chosen(rows: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(rows)[:CHECK_QUERIES])
