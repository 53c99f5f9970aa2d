"""The minority test: is a run closer to the reference's rare part than a baseline, or only off the data?

AvgkNN-style rarity rewards any move away from the reference, noise included. This test
(docs/method.md, 'The minority test') measures a generated run and a baseline run against the
reference's own minority (its rarest ``quantile`` by leave-one-out AvgkNN, per class when labels are
given), in one feature space (numpy and scikit-learn on feature arrays, no I/O):
- Frechet distance to the minority and to the whole reference, and their gap;
- precision / recall / density / coverage against the minority (k-NN balls, prdc's rule);
- the share of samples whose nearest real neighbour is a minority one;
- each figure for the run and the baseline, with a bootstrap interval of (run - baseline), paired
  by seed when both runs carry seeds;
- fidelity at equal rarity: the baseline with Gaussian noise of the sigma that matches the run's
  mean AvgkNN, its precision / recall / coverage beside the run's;
- a verdict: ``minority``, ``inconclusive``, ``off-data`` or ``typical``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.neighbors import NearestNeighbors

from pipeline.evaluate.metrics import (Balls, FrechetToGaussian, Gaussian, knn_ready, kth_neighbour_distances,
                                      manifold_metrics)
from pipeline.evaluate.rarity import DEFAULT_K, avg_knn, avg_knn_within
from pipeline.settings import UserError

VERDICTS = ("minority", "inconclusive", "off-data", "typical")
BASELINE = "baseline"  # the verdict of the baseline run itself
FIGURES = ("fd_minority", "fd_all", "fd_gap", "nearest_minority_share", "precision", "recall", "density", "coverage",
           "precision_all", "avg_knn")
RESAMPLED = tuple(name for name in FIGURES if name != "recall")  # figures with an interval (see ``Balls``)
FIDELITY = ("precision", "recall", "coverage")  # reported at equal rarity, against the whole reference
NOISE_TOLERANCE = 1e-3  # the noisy set's mean AvgkNN within this share of the run's
NOISE_STEPS = 60  # bisection steps at most (the bracket halves each step)


@dataclass(frozen=True)
class MinorityConfig:
    """How the minority reference is chosen, how figures are compared, and when a run counts as minority."""

    quantile: float = 0.25  # the rarest share of the reference (leave-one-out AvgkNN) that is its minority
    per_class: bool = False  # choose that share within each class (needs the reference's labels)
    k: int = DEFAULT_K  # k of AvgkNN (choosing the minority, "rarer", the noise match)
    nearest_k: int = 5  # k of the k-NN balls (precision / recall / density / coverage)
    resamples: int = 500  # bootstrap resamples of (run - baseline)
    confidence: float = 0.95  # of the bootstrap intervals (percentile)
    precision_margin: float = 0.1  # the run's precision against the whole reference may fall at most this far below the baseline's
    seed: int = 0  # the bootstrap's and the noise's RNG: the same inputs give the same result

    def __post_init__(self):
        if not 0 < self.quantile < 1:
            raise UserError(f"the minority quantile must lie strictly between 0 and 1, got {self.quantile}")
        if self.k < 1 or self.nearest_k < 1:
            raise UserError(f"k and nearest_k must be >= 1, got {self.k} and {self.nearest_k}")
        if self.resamples < 1:
            raise UserError(f"resamples must be >= 1, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise UserError(f"confidence must lie strictly between 0 and 1, got {self.confidence}")
        if not 0 <= self.precision_margin <= 1:
            raise UserError(f"precision_margin must lie in [0, 1], got {self.precision_margin}")


def minority_mask(reference: np.ndarray, k: int, quantile: float, labels: np.ndarray | None = None) -> np.ndarray:
    """The reference rows in its rarest ``quantile`` by leave-one-out AvgkNN (within each class with labels)."""
    within = avg_knn_within(reference, k)
    groups = [np.arange(len(reference))] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    mask = np.zeros(len(reference), bool)
    for rows in groups:
        count = max(1, round(quantile * len(rows)))
        mask[rows[np.argsort(-within[rows], kind="stable")[:count]]] = True
    return mask


class MinorityReference:
    """The reference, its minority and what every set is measured against (built once, used for every run)."""

    def __init__(self, reference: np.ndarray, config: MinorityConfig, labels: np.ndarray | None = None):
        if config.per_class and labels is None:
            raise UserError("a per-class minority needs the reference's class labels")
        self.features = np.asarray(reference, np.float64)
        self.config = config
        self.mask = minority_mask(self.features, config.k, config.quantile, labels if config.per_class else None)
        if not knn_ready(int(self.mask.sum()), config.nearest_k):
            raise UserError(f"the minority reference holds {self.mask.sum()} rows (quantile {config.quantile} of "
                             f"{len(self.features)}) but k-NN balls of k = {config.nearest_k} need more: give a larger "
                             "reference, a larger quantile or a smaller k")
        self.minority = self.features[self.mask]
        self.gaussians = {name: Gaussian.of_rows(rows) for name, rows in (("minority", self.minority), ("all", self.features))}
        # the k-NN ball radii of both, once: every set measured against them (run, baseline) uses them
        self.radii = {name: kth_neighbour_distances(rows, config.nearest_k)
                      for name, rows in (("minority", self.minority), ("all", self.features))}
        self.nearest = NearestNeighbors(n_neighbors=1).fit(self.features)

    def figures(self, samples: np.ndarray) -> SetFigures:
        return SetFigures(self, samples)


class SetFigures:
    """One set's figures against a ``MinorityReference``: all its rows (``manifold_metrics``), or a resample by
    lookup (``Balls``)."""

    def __init__(self, reference: MinorityReference, samples: np.ndarray):
        config = reference.config
        self.reference = reference
        self.samples = np.asarray(samples, np.float64)
        self.fd = {name: FrechetToGaussian(self.samples, g) for name, g in reference.gaussians.items()}
        self.avg_knn = avg_knn(self.samples, reference.features, config.k)
        self.nearest_minority = reference.mask[reference.nearest.kneighbors(self.samples, return_distance=False)[:, 0]]
        self.balls = {name: Balls(rows, self.samples, config.nearest_k, radii=reference.radii[name])
                      for name, rows in (("minority", reference.minority), ("all", reference.features))}

    def _shared(self, index: np.ndarray | None) -> dict[str, float]:
        fd_minority, fd_all = self.fd["minority"](index), self.fd["all"](index)
        rows = slice(None) if index is None else index
        return {"fd_minority": fd_minority, "fd_all": fd_all, "fd_gap": fd_minority - fd_all,
                "nearest_minority_share": float(self.nearest_minority[rows].mean()),
                "avg_knn": float(self.avg_knn[rows].mean())}

    def whole(self) -> dict[str, float]:
        """Every figure on every row (precision / recall / density / coverage by ``manifold_metrics``)."""
        k = self.reference.config.nearest_k
        return {**self._shared(None), **manifold_metrics(self.reference.minority, self.samples, k),
                "precision_all": manifold_metrics(self.reference.features, self.samples, k)["precision"]}

    def resampled(self, index: np.ndarray) -> dict[str, float]:
        """The figures of the rows ``index`` draws (repeats allowed), recall left out."""
        return {**self._shared(index), **self.balls["minority"](index),
                "precision_all": self.balls["all"](index)["precision"]}


def resamples(count: int, sizes: tuple[int, int], seeds: tuple[np.ndarray | None, np.ndarray | None],
              rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Bootstrap row indices of (run, baseline): by seed when both carry seeds (the rows of a drawn seed
    come together, whatever their order), else each set on its own."""
    if seeds[0] is None or seeds[1] is None:
        for _ in range(count):
            yield rng.integers(0, sizes[0], sizes[0]), rng.integers(0, sizes[1], sizes[1])
        return
    shared = np.union1d(*seeds)
    groups = [[np.flatnonzero(np.asarray(mine) == seed) for seed in shared] for mine in seeds]
    for _ in range(count):
        drawn = rng.integers(0, len(shared), len(shared))
        yield tuple(np.concatenate([group[d] for d in drawn]) for group in groups)


def paired(seeds: tuple[np.ndarray | None, np.ndarray | None]) -> bool:
    """Both runs carry seeds, and the same ones: a run that holds only some of the baseline's seeds (a curated
    subset) is resampled on its own, since a drawn seed could leave it fewer than the 2 rows an FD needs."""
    return (seeds[0] is not None and seeds[1] is not None
            and np.array_equal(np.unique(seeds[0]), np.unique(seeds[1])))


@dataclass(frozen=True)
class NoiseMatch:
    """The baseline with Gaussian noise of the ``sigma`` that gives the run's mean AvgkNN (None: unreachable)."""

    sigma: float | None
    avg_knn: float  # the noisy set's mean AvgkNN
    target: float  # the run's
    noisy: dict | None  # precision / recall / coverage of the noisy set against the whole reference
    run: dict  # the same for the run


def noisy(baseline: np.ndarray, sigma: float, noise: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    moved = baseline + sigma * noise
    return moved if bounds is None else np.clip(moved, *bounds)


def match_noise(baseline: np.ndarray, reference: np.ndarray, target: float, k: int, seed: int,
                bounds: tuple[float, float] | None = None) -> tuple[float | None, float]:
    """(sigma, mean AvgkNN) of the baseline plus ``sigma`` times one fixed Gaussian draw (clipped to
    ``bounds``), sigma found by bisection so that the mean AvgkNN equals ``target`` within
    ``NOISE_TOLERANCE`` of it; sigma 0 when the baseline already reaches it, None when no sigma does."""
    noise = np.random.default_rng(seed).standard_normal(baseline.shape)
    rarity = lambda sigma: float(avg_knn(noisy(baseline, sigma, noise, bounds), reference, k).mean())
    low, high = 0.0, float(np.std(reference)) or 1.0
    if rarity(low) >= target:
        return 0.0, rarity(low)
    for _ in range(NOISE_STEPS):  # grow the bracket until it holds the target
        if rarity(high) >= target:
            break
        low, high = high, 2 * high
    else:
        return None, rarity(high)
    for _ in range(NOISE_STEPS):
        middle = (low + high) / 2
        value = rarity(middle)
        if abs(value - target) <= NOISE_TOLERANCE * abs(target):
            return middle, value
        low, high = (middle, high) if value < target else (low, middle)
    return middle, value


def _fidelity(reference: np.ndarray, samples: np.ndarray, k: int) -> dict:
    values = manifold_metrics(reference, samples, k)
    return {name: values[name] for name in FIDELITY}


def equal_rarity(run: np.ndarray, baseline: np.ndarray, reference: MinorityReference, target: float,
                 bounds: tuple[float, float] | None) -> NoiseMatch:
    """Fidelity at equal rarity: the run beside the baseline made as rare by noise alone."""
    config = reference.config
    sigma, reached = match_noise(baseline, reference.features, target, config.k, config.seed, bounds)
    noise = np.random.default_rng(config.seed).standard_normal(baseline.shape)
    made = None if sigma is None else _fidelity(reference.features, noisy(baseline, sigma, noise, bounds), config.nearest_k)
    return NoiseMatch(sigma, reached, target, made, _fidelity(reference.features, run, config.nearest_k))


def verdict(run: dict, base: dict, intervals: dict, margin: float) -> str:
    """docs/method.md, 'The minority test': closer to the minority (FD) with an interval that excludes 0
    and precision within ``margin`` of the baseline's is minority; closer otherwise inconclusive; not
    closer but rarer by AvgkNN (interval above 0) off-data; else typical."""
    if run["fd_minority"] < base["fd_minority"]:
        excluded = intervals["fd_minority"][1] < 0
        faithful = run["precision_all"] >= base["precision_all"] - margin
        return "minority" if excluded and faithful else "inconclusive"
    return "off-data" if intervals["avg_knn"][0] > 0 else "typical"


def minority_test(run: np.ndarray, baseline: np.ndarray, reference: MinorityReference,
                  seeds: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
                  bounds: tuple[float, float] | None = None) -> dict:
    """The run against the baseline and the reference's minority: figures, intervals, equal rarity, verdict."""
    config = reference.config
    seeds = seeds if paired(seeds) else (None, None)
    mine, theirs = reference.figures(run), reference.figures(baseline)
    point, base = mine.whole(), theirs.whole()
    draws = [(mine.resampled(a), theirs.resampled(b)) for a, b in resamples(config.resamples, (len(run), len(baseline)), seeds,
                                                        np.random.default_rng(config.seed))]
    tail = (1 - config.confidence) / 2
    intervals = {}
    for name in RESAMPLED:
        differences = np.array([a[name] - b[name] for a, b in draws])
        intervals[name] = [float(np.quantile(differences, tail)), float(np.quantile(differences, 1 - tail))]
    matched = equal_rarity(np.asarray(run, np.float64), np.asarray(baseline, np.float64), reference, point["avg_knn"], bounds)
    return {"verdict": verdict(point, base, intervals, config.precision_margin), **point, BASELINE: base,
            "intervals": intervals, "paired": paired(seeds), "resamples": config.resamples,
            "confidence": config.confidence, "precision_margin": config.precision_margin,
            "quantile": config.quantile, "per_class": config.per_class, "minority_rows": int(reference.mask.sum()),
            "equal_rarity": asdict(matched)}
