"""The evaluation's math, on feature arrays (numpy, no I/O): rarity, Frechet distance, k-NN manifolds.

- Rarity: the JEPA-SCORE distribution of a set and the share of it below the reference's 10th
  percentile (lower is rarer, docs/method.md, 'JEPA-SCORE').
- Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017):
  ``FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``, in float64. The means and covariances
  are accumulated block by block (``Moments``), so FD sees every row whatever the set's size.
- Improved precision / recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al.
  2020) by the ``prdc`` package's rule, on a bounded uniform subsample (``Subsample``): k-NN balls from
  distances computed in row blocks (scikit-learn's ``pairwise_distances_chunked``), their memberships
  kept sparse (``Balls``), so memory grows with the rows and memberships, not with reference x samples
  as prdc's all-pairs matrices do (40 GB at 100,000 rows); checked against prdc itself in the tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import sparse
from sklearn.metrics import pairwise_distances_chunked

from pipeline.settings import UserError

QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
REFERENCE_QUANTILE = 0.1  # "rarer than the reference's 10th percentile"
BLOCK_MIB = 256  # distances computed per block of rows (a block's partition or comparison copies it once more)


def score_summary(scores: np.ndarray) -> dict:
    """Mean, standard deviation and quantiles of a set's JEPA-SCOREs."""
    if not len(scores):
        raise UserError("no finite JEPA-SCOREs to summarise: the set is empty or every row failed")
    return {"mean": float(scores.mean()), "std": float(scores.std()),
            "quantiles": {f"p{round(q * 100):02d}": float(np.quantile(scores, q)) for q in QUANTILES}}


def share_below(scores: np.ndarray, threshold: float) -> float:
    """The fraction of ``scores`` strictly below ``threshold`` (rarer than it)."""
    return float((scores < threshold).mean())


class Moments:
    """Running count, mean and centred scatter of feature rows, in float64.

    Blocks merge by Chan et al.'s pairwise update, which stays accurate when the mean is large
    next to the spread (a plain sum of squares would cancel).
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim)
        self.scatter = np.zeros((dim, dim))

    def add(self, features: np.ndarray) -> None:
        rows = np.asarray(features, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != len(self.mean):
            raise ValueError(f"features of shape {rows.shape} do not fit moments of dimension {len(self.mean)}")
        if not len(rows):
            return
        mean = rows.mean(0)
        centred = rows - mean
        total = self.count + len(rows)
        delta = mean - self.mean
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * len(rows) / total)
        self.mean += delta * (len(rows) / total)
        self.count = total

    def gaussian(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased covariance) of the rows added so far."""
        if self.count < 2:
            raise UserError(f"a covariance needs at least 2 rows, got {self.count}")
        cov = self.scatter / (self.count - 1)
        return self.mean.copy(), (cov + cov.T) / 2


def psd_root(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (negative rounding in its eigenvalues clipped to 0)."""
    values, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     root1: np.ndarray | None = None) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``Tr((S1 S2)^{1/2})`` is the sum of the square roots of the eigenvalues of the symmetric PSD
    matrix ``S1^{1/2} S2 S1^{1/2}`` (similar to ``S1 S2``), so no complex square root is needed.
    ``root1``: ``S1^{1/2}`` when already known.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"feature dimensions differ: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    root1 = psd_root(sigma1) if root1 is None else root1
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def knn_ready(samples: int, nearest_k: int) -> bool:
    """Whether a set is large enough for prdc's k-NN balls: a point's radius is the distance to its (k+1)-th
    nearest in its own set, itself counted, so the set needs k + 2 points."""
    return samples >= nearest_k + 2


def kth_neighbour_distances(features: np.ndarray, k: int) -> np.ndarray:
    """Each row's distance to its k-th nearest other row of the set (the row itself counted first, as prdc
    counts it): the radius of its k-NN ball. Distances in blocks of rows, BLOCK_MIB at a time."""
    def kth(block: np.ndarray, start: int) -> np.ndarray:
        return np.partition(block, k, axis=1)[:, k].copy()  # a copy: a view would keep the whole block alive

    return np.concatenate(list(pairwise_distances_chunked(features, reduce_func=kth, working_memory=BLOCK_MIB)))


class Balls:
    """Which reference k-NN balls hold which samples, by prdc's rule (strictly inside the distance to the
    reference row's k-th nearest other reference row; Naeem et al. 2020), and which reference rows lie
    inside a sample's own ball when ``sample_radii`` are given (recall, Kynkaanniemi et al. 2019). The
    reference's own ``radii`` (``kth_neighbour_distances``) may be given when many sets are measured against it.

    Distances come in blocks of reference rows; only memberships are kept, sparse (reference x samples),
    so precision, density and coverage of any resample of the samples (repeats allowed) are a lookup.
    Recall needs the samples' own balls, which a resample's repeated rows shrink: only the whole set's is
    kept."""

    def __init__(self, reference: np.ndarray, samples: np.ndarray, k: int, sample_radii: np.ndarray | None = None,
                 radii: np.ndarray | None = None):
        radii = kth_neighbour_distances(reference, k) if radii is None else radii

        def block(distances: np.ndarray, start: int) -> tuple[sparse.csr_matrix, np.ndarray]:
            inside = sparse.csr_matrix(distances < radii[start:start + len(distances), None])
            recalled = (np.zeros(len(distances)) if sample_radii is None
                        else (distances < sample_radii[None, :]).any(1))
            return inside, recalled

        parts = list(pairwise_distances_chunked(reference, samples, reduce_func=block, working_memory=BLOCK_MIB))
        self.inside = sparse.vstack([inside for inside, _ in parts], format="csr")
        self.recalled = np.concatenate([recalled for _, recalled in parts]).astype(bool)  # reference rows
        self.held = self.inside.getnnz(axis=0)  # per sample: how many reference balls hold it
        self.k = k

    def __call__(self, index: np.ndarray | None = None) -> dict[str, float]:
        """Precision, density and coverage of the samples ``index`` draws (all of them when None)."""
        index = np.arange(self.inside.shape[1]) if index is None else index
        held = self.held[index]
        drawn = np.bincount(index, minlength=self.inside.shape[1]).astype(np.float64)
        return {"precision": float((held > 0).mean()), "density": float(1.0 / self.k * held.mean()),
                "coverage": float(((self.inside @ drawn) > 0).mean())}


def manifold_metrics(real: np.ndarray, fake: np.ndarray, nearest_k: int) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` with k-NN balls, as prdc's
    ``compute_prdc`` computes them from float32 features, in row blocks (``Balls``)."""
    if not (knn_ready(len(real), nearest_k) and knn_ready(len(fake), nearest_k)):
        raise UserError(f"k-NN metrics with k={nearest_k} need at least {nearest_k + 2} samples in each set, "
                         f"got {len(real)} reference and {len(fake)} generated; lower --nearest-k or add samples")
    real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
    balls = Balls(real, fake, nearest_k, sample_radii=kth_neighbour_distances(fake, nearest_k))
    figures = balls()
    return {"precision": figures["precision"], "recall": float(balls.recalled.mean()), "density": figures["density"],
            "coverage": figures["coverage"]}


def subsample_key(seed: int, sample_id: str) -> int:
    """A uniform 64-bit key per row: keeping the smallest keys is a uniform subsample, in any read order."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest(), "big")


def subsample_keys(seed: int, ids: list[str]) -> np.ndarray:
    """``subsample_key`` of each id (uint64): computed once per block for every ``Subsample`` of the same rows."""
    return np.fromiter((subsample_key(seed, i) for i in ids), np.uint64, len(ids))


class Subsample:
    """At most ``size`` rows, uniform over all rows offered: those of the smallest keys (``subsample_keys``),
    returned in key order, so the same rows in the same order whatever the block order, and rows of several
    subsamples offered the same keys stay aligned.

    Rows gather in a buffer with a quarter of ``size`` to spare; when it fills, only the ``size`` smallest
    keys stay. Each row is copied a few times on the way, not once per block (keeping the subsample in one
    array and concatenating each block to it copies the whole subsample every block: about 1.6 TB of
    copying for a million 2048-wide Inception rows in blocks of 1,024 with ``size`` 100,000)."""

    def __init__(self, size: int, dtype: type = np.float32):
        self.size = size
        self.dtype = dtype  # float32 keeps wide features small; float64 for values that must stay exact
        self.keys = np.zeros(0, np.uint64)
        self.rows: np.ndarray | None = None  # the buffer: its first ``count`` rows are held
        self.count = 0

    def add(self, keys: np.ndarray, features: np.ndarray) -> None:
        rows = np.asarray(features, self.dtype)
        if len(keys) > self.size:  # a block larger than the subsample: only its own smallest keys can stay
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            keys, rows = keys[keep], rows[keep]
        if self.rows is None:
            capacity = self.size + max(self.size // 4, len(keys))
            self.keys, self.rows = np.empty(capacity, np.uint64), np.empty((capacity, *rows.shape[1:]), self.dtype)
        if self.count + len(keys) > len(self.keys):
            self._keep_smallest()
        if self.count + len(keys) > len(self.keys):  # a block larger than the spare room: room for it
            self.keys = np.concatenate([self.keys[: self.count], np.empty(len(keys), np.uint64)])
            self.rows = np.concatenate([self.rows[: self.count], np.empty((len(keys), *rows.shape[1:]), self.dtype)])
        self.keys[self.count: self.count + len(keys)] = keys
        self.rows[self.count: self.count + len(keys)] = rows
        self.count += len(keys)

    def _keep_smallest(self) -> None:
        if self.count > self.size:
            keep = np.sort(np.argpartition(self.keys[: self.count], self.size - 1)[: self.size])
            self.keys[: self.size], self.rows[: self.size] = self.keys[keep], self.rows[keep]
            self.count = self.size

    @property
    def features(self) -> np.ndarray:
        """The kept rows, in key order (a copy)."""
        if self.rows is None:
            return np.zeros((0, 0), self.dtype)
        self._keep_smallest()
        return self.rows[np.argsort(self.keys[: self.count], kind="stable")]


@dataclass(frozen=True)
class Gaussian:
    """Mean and covariance of a feature set, and how many rows made them."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @classmethod
    def of(cls, moments: Moments) -> Gaussian:
        mean, cov = moments.gaussian()
        return cls(mean, cov, moments.count)

    @classmethod
    def of_rows(cls, rows: np.ndarray) -> Gaussian:
        """Fitted to the feature rows (N, D) at hand."""
        moments = Moments(rows.shape[1])
        moments.add(rows)
        return cls.of(moments)

    def distance(self, other: Gaussian) -> float:
        """FD to ``other`` (a reference), through its cached covariance root: FD is symmetric, and a reference
        that many runs are measured against then decomposes once."""
        return frechet_distance(other.mean, other.cov, self.mean, self.cov, root1=other.cov_root)

    @cached_property
    def cov_root(self) -> np.ndarray:
        """The covariance's symmetric square root, computed once: every set measured against this Gaussian
        shares it (a d x d eigendecomposition, seconds at d = 3072)."""
        return psd_root(self.cov)


class FrechetToGaussian:
    """FD from rows of one set, resampled many times (a bootstrap), to one fixed Gaussian ``target``.

    The same value as ``frechet_distance(target, Gaussian of the rows)``, computed without a d x d
    eigendecomposition per resample: with ``Y = X S^{1/2}`` (S the target's covariance), the
    eigenvalues of ``S^{1/2} C S^{1/2}`` (C the rows' covariance) are the squared singular values of
    the centred ``Y`` over ``n - 1``, so each resample costs one SVD of an (n, d) matrix.
    """

    def __init__(self, rows: np.ndarray, target: Gaussian):
        self.rows = np.asarray(rows, np.float64)
        self.projected = self.rows @ target.cov_root
        self.target = target
        self.target_trace = float(np.trace(target.cov))

    def __call__(self, index: np.ndarray | None = None) -> float:
        """FD of the rows ``index`` selects (repeats allowed; every row when None)."""
        rows = self.rows if index is None else self.rows[index]
        projected = self.projected if index is None else self.projected[index]
        if len(rows) < 2:
            raise UserError(f"a covariance needs at least 2 rows, got {len(rows)}")
        mean = rows.mean(0)
        trace = ((rows - mean) ** 2).sum() / (len(rows) - 1)
        trace_root = np.linalg.svd(projected - projected.mean(0), compute_uv=False).sum() / np.sqrt(len(rows) - 1)
        diff = mean - self.target.mean
        return float(diff @ diff + self.target_trace + trace - 2 * trace_root)
