"""Near-duplicate removal among a curation's candidates (docs/method.md, 'Curating a rare set'): rows in rarity
order, a row is removed when one of its nearest neighbours by cosine similarity, at or above the threshold, is a rarer
row that was kept, so each cluster of near-duplicates keeps its rarest row.

Neighbours come from faiss: exactly (``IndexFlatIP``) or approximately (an inverted-file index, ``IVF<lists>,Flat``,
its k-means seeded, so a rerun finds the same neighbours; it scales to 10M rows on CPU where the exact search
would compare every pair).
"""

from __future__ import annotations

import math

import numpy as np

SEARCHES = ("approximate", "exact")
NEIGHBOURS = 32  # each row's nearest others searched for near-duplicates
PROBES = 16  # inverted lists an approximate search visits
POINTS_PER_LIST = 39  # faiss's k-means wants at least this many training points per list


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), float32 and contiguous as faiss takes them."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1))


def _index(dimension: int, rows: int, search: str):
    import faiss

    lists = min(int(math.sqrt(rows)), rows // POINTS_PER_LIST)
    if search == "exact" or lists < 2:  # one list would be the exact search
        return faiss.IndexFlatIP(dimension)
    index = faiss.index_factory(dimension, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(lists, PROBES)
    return index


def nearest(unit: np.ndarray, k: int, search: str) -> tuple[np.ndarray, np.ndarray]:
    """Each unit row's ``k`` nearest other rows by cosine similarity: (similarities, row ids), both (n, k), an id of
    -1 (similarity -inf) where fewer were found."""
    rows = len(unit)
    index = _index(unit.shape[1], rows, search)
    index.train(unit)
    index.add(unit)
    similarities, ids = index.search(unit, min(k + 1, rows))
    own = ids == np.arange(rows)[:, None]
    own[:, -1] |= ~own.any(1)  # a row its exact twins crowded out of its own list drops its farthest instead
    similarities, ids = similarities[~own].reshape(rows, -1), ids[~own].reshape(rows, -1)
    return np.where(ids >= 0, similarities, -np.inf), ids


def near_duplicates(vectors: np.ndarray, threshold: float, search: str, k: int = NEIGHBOURS) -> np.ndarray:
    """True for each row to remove; rows in rarity order (rarest first): a row goes when one of its ``k`` nearest
    rows with cosine similarity >= ``threshold`` comes before it and was kept."""
    removed = np.zeros(len(vectors), bool)
    if len(vectors) < 2:
        return removed
    similarities, ids = nearest(unit_rows(vectors), k, search)
    rarer = (similarities >= threshold) & (ids >= 0) & (ids < np.arange(len(vectors))[:, None])
    for row in np.flatnonzero(rarer.any(1)):  # rising order: a rarer row's fate is settled first
        removed[row] = not removed[ids[row, rarer[row]]].all()
    return removed
