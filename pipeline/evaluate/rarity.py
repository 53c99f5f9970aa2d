"""Rarity against real data, in a feature space, never through the JEPA-SCORE (numpy + scikit-learn, no I/O).

The neighbourhood metrics of the minority-sampling literature (docs/method.md, 'Measuring rarity'):
- AvgkNN: the mean Euclidean distance from a sample to its k nearest reference samples
  (Sehwag et al. 2022; used by minority guidance, Um et al. 2024). Larger = rarer.
- LOF: the local outlier factor of a sample relative to the reference (Breunig et al. 2000), from
  scikit-learn's ``LocalOutlierFactor(novelty=True)``. About 1 inside the data, larger = rarer.
- Rarity Score (Han et al. 2023): each reference sample x_i has a ball of radius r_k(x_i), the distance
  to its k-th nearest other reference sample. A sample's score is the smallest radius among the balls
  that contain it (a sample in a sparse region is only inside large balls). Larger = rarer; a sample
  that no ball contains is *uncovered* and has no score (NaN), reported as a share.

``avg_knn_within`` scores the reference against itself, each sample without itself: how rare each
reference image is within its own set (the prior check's yardstick).

Every metric searches neighbours exactly; a ``reference_index`` may search a faiss index instead
(pipeline/evaluate/neighbours.py), for a reference of a million rows. LOF then comes from the index's
k-NN graph by Breunig et al.'s formula, and a Rarity Score looks for its smallest containing ball
among the sample's ``CANDIDATES`` nearest reference rows (a larger ball centred farther is missed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.neighbors import LocalOutlierFactor

from pipeline.evaluate.neighbours import Index, approximate, search_record
from pipeline.settings import UserError

DEFAULT_K = 5
CANDIDATES = 64  # reference balls an approximate Rarity Score tests per sample: its nearest centres
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class RarityInputError(UserError):
    """Features that the metrics cannot be computed on; the message says which and how to fix it."""


def _check(samples: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    samples, reference = np.asarray(samples, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if reference.ndim != 2 or samples.ndim != 2:
        raise RarityInputError(f"features must be 2-D (rows x dims); got samples {samples.shape}, reference {reference.shape}")
    if not len(samples):
        raise RarityInputError("no samples to measure: the run is empty or every row failed")
    if samples.shape[1] != reference.shape[1]:
        raise RarityInputError(f"sample features have {samples.shape[1]} dims but reference features {reference.shape[1]}: "
                               "embed both in the same feature space")
    if not isinstance(k, int) or k < 1:
        raise RarityInputError(f"k must be a positive integer, got {k!r}")
    available = len(reference) - 1  # a reference ball's radius needs k neighbours besides its centre
    if k > available:
        raise RarityInputError(f"k = {k} needs more than k reference samples, but the reference has {len(reference)}: "
                               f"lower k to at most {max(available, 0)} or give a larger reference")
    if not (np.isfinite(samples).all() and np.isfinite(reference).all()):
        raise RarityInputError("features hold NaN or inf: drop the failed rows before measuring rarity")
    return samples, reference


def avg_knn(samples: np.ndarray, reference: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """AvgkNN of each sample: mean distance to its k nearest reference samples."""
    samples, reference = _check(samples, reference, k)
    return _avg_knn(samples, Index(reference, exact=True), k)


def _avg_knn(samples: np.ndarray, index: Index, k: int) -> np.ndarray:
    return index.query(samples, k)[0].mean(axis=1)


def avg_knn_within(reference: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """AvgkNN of each reference sample among the others (leave one out)."""
    return reference_index(reference, k).within(k)[0].mean(axis=1)


def reference_index(reference: np.ndarray, k: int = DEFAULT_K, neighbours: str = "exact") -> Index:
    """The reference's features, checked, searched as ``neighbours`` (exact, approximate or auto) says: build
    it once and measure every set against it."""
    _, reference = _check(reference, reference, k)
    return Index(reference, exact=not approximate(neighbours, len(reference)))


def local_outlier_factor(samples: np.ndarray, reference: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """LOF of each sample relative to the reference (scikit-learn, k neighbours)."""
    samples, reference = _check(samples, reference, k)
    return _lof(samples, Index(reference, exact=True), k)


def _lof(samples: np.ndarray, index: Index, k: int) -> np.ndarray:
    if index.exact:
        return -LocalOutlierFactor(n_neighbors=k, novelty=True).fit(index.reference).score_samples(samples)
    return lof_from_graph(index.within(k), index.query(samples, k))


def lof_from_graph(within: tuple[np.ndarray, np.ndarray], queried: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """LOF (Breunig et al. 2000) from k-NN lists: ``within`` each reference row's (distances, indices) to its k
    nearest others, ``queried`` each sample's to its k nearest reference rows. The reach distance of a to b is
    max(k-distance(b), d(a, b)); lrd is one over its mean (plus 1e-10, as scikit-learn); LOF is the mean lrd of
    a sample's neighbours over its own."""
    (ref_distances, ref_found), (distances, found) = within, queried
    k_distance = ref_distances[:, -1]
    ref_lrd = 1 / (np.maximum(k_distance[ref_found], ref_distances).mean(axis=1) + 1e-10)
    lrd = 1 / (np.maximum(k_distance[found], distances).mean(axis=1) + 1e-10)
    return ref_lrd[found].mean(axis=1) / lrd


def rarity_score(samples: np.ndarray, reference: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """Han et al.'s Rarity Score of each sample: the smallest r_k among reference balls that hold it strictly
    (|x - y| < r_k, as in the paper; a point on a sphere is outside), NaN if none.

    Exact: both sets are first centred on the reference mean, so the expanded square |x|^2 + |y|^2 - 2 x.y
    rounds alike wherever the point set lies and the scores are translation invariant, as the metric is.
    Approximate (``RaritySummary.of``): only the balls of the sample's ``CANDIDATES`` nearest reference rows.
    """
    samples, reference = _check(samples, reference, k)
    return _rarity(samples, Index(reference, exact=True), k)


def _rarity(samples: np.ndarray, index: Index, k: int) -> np.ndarray:
    if not index.exact:
        radii = index.within(k)[0][:, -1]  # r_k of each reference ball
        distances, found = index.query(samples, min(CANDIDATES, len(radii)))
        smallest = np.where(distances < radii[found], radii[found], np.inf).min(axis=1)
        return np.where(np.isfinite(smallest), smallest, np.nan)
    centre = index.reference.mean(axis=0)
    samples, reference = samples - centre, index.reference - centre
    radii = Index(reference, exact=True).within(k)[0][:, -1]
    order = np.argsort(radii)  # the first containing ball in this order is the smallest
    sorted_radii, sorted_reference = radii[order], reference[order]
    squared_radii, squared_norms = sorted_radii ** 2, (sorted_reference ** 2).sum(1)
    scores = np.full(len(samples), np.nan)
    for start in range(0, len(samples), 1024):  # bounded memory: 1024 x N distances at a time
        block = samples[start:start + 1024]
        squared = (block ** 2).sum(1)[:, None] + squared_norms[None, :] - 2 * block @ sorted_reference.T
        inside = squared < squared_radii[None, :]
        covered = inside.any(axis=1)
        scores[start:start + len(block)][covered] = sorted_radii[inside[covered].argmax(axis=1)]
    return scores


@dataclass(frozen=True)
class RaritySummary:
    """What ``evaluation.json`` reports per generated run (larger = rarer for every metric)."""

    feature_space: str
    k: int
    avg_knn: float
    avg_knn_quantiles: dict
    lof: float
    rarity_score: float | None  # mean over covered samples; None when no sample is covered
    rarity_score_uncovered: float  # the share of samples that no reference ball contains
    neighbours: dict  # the neighbour search used, and an index's check against exact search

    @classmethod
    def of(cls, samples: np.ndarray, reference: np.ndarray, feature_space: str, k: int = DEFAULT_K,
           neighbours: str = "exact") -> RaritySummary:
        """The three metrics against the reference; ``neighbours``: exact, approximate or auto."""
        return cls.against(samples, reference_index(reference, k, neighbours), feature_space, k)

    @classmethod
    def against(cls, samples: np.ndarray, index: Index, feature_space: str, k: int = DEFAULT_K) -> RaritySummary:
        """The three metrics against a reference's index (``reference_index``)."""
        samples, _ = _check(samples, index.reference, k)
        knn = _avg_knn(samples, index, k)
        rarity = _rarity(samples, index, k)
        covered = rarity[np.isfinite(rarity)]
        return cls(feature_space=feature_space, k=k, avg_knn=float(knn.mean()),
                   avg_knn_quantiles={f"p{round(q * 100):02d}": float(np.quantile(knn, q)) for q in QUANTILES},
                   lof=float(_lof(samples, index, k).mean()),
                   rarity_score=float(covered.mean()) if len(covered) else None,
                   rarity_score_uncovered=float(1 - len(covered) / len(rarity)),
                   neighbours=search_record(index, k, samples))
